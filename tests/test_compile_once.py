"""Compile once: every follow-up call that should reuse compiled programs compiles nothing.

Compilations are counted with JAX's own monitoring events (one event per XLA compilation;
in-memory cache hits emit none), so these tests fail the moment a call path starts
compiling again for something it has seen: another k, the smallest end, another probe
count, a trace, or the operator of the same loss at the next checkpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from reference import matrix_with_spectrum

import hessspec as hs
from hessspec.nn.data import load_digits
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective

_COMPILES: list[float] = []


def _listener(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(duration)


monitoring.register_event_duration_secs_listener(_listener)


def compiles(fn):
    """``(result, number of XLA compilations while fn ran)``."""
    before = len(_COMPILES)
    out = fn()
    return out, len(_COMPILES) - before


@pytest.fixture(scope="module")
def digits():
    return load_digits("train", dtype=np.float64).take(slice(0, 120))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_follow_up_calls_compile_nothing(digits, batchnorm):
    """The issue's six follow-ups after a first top_eigenpairs call, on an MLP without and
    with BatchNorm (train mode, two batches), each compile nothing; results stay exact."""
    model = make_model(
        "mlp", digits.input_shape, 10, batchnorm, seed=0, hidden=(8, 8), dtype=jnp.float64
    )
    obj = make_objective(model, bn_mode="train" if batchnorm else None)
    params = obj.params
    later = jax.tree.map(lambda a: a * 1.01, params)  # the next checkpoint's parameters
    op = hs.hessian_operator(obj.loss_fn, params, digits.batch, batch_size=64)
    first = hs.top_eigenpairs(op, 5)
    assert np.all(first.converged)

    def next_checkpoint():
        new = hs.hessian_operator(obj.loss_fn, later, digits.batch, batch_size=64)
        return new, hs.top_eigenpairs(new, 5)

    steps = {
        "k=7": lambda: hs.top_eigenpairs(op, 7),
        "smallest k=3": lambda: hs.top_eigenpairs(op, 3, which="smallest"),
        "new key": lambda: hs.top_eigenpairs(op, 5, key=jax.random.key(3)),
        "next checkpoint": next_checkpoint,
    }
    results = {}
    for name, fn in steps.items():
        results[name], count = compiles(fn)
        assert count == 0, f"{name} compiled {count} programs"
    op2, top2 = results["next checkpoint"]
    for name, fn in {
        "density": lambda: hs.spectral_density(op2, num_probes=4, num_steps=30),
        "trace": lambda: hs.trace(op2, num_matvecs=60),
        "density, 2 probes": lambda: hs.spectral_density(op2, num_probes=2, num_steps=30),
        "trace, hutchinson": lambda: hs.trace(op2, num_matvecs=20, method="hutchinson"),
    }.items():
        results[name], count = compiles(fn)
        assert count == 0, f"{name} compiled {count} programs"
    # the answers are the new operator's own (dense float64 reference)
    dense = np.linalg.eigvalsh(op2.to_dense())
    np.testing.assert_allclose(top2.values, dense[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(results["k=7"].values, np.linalg.eigvalsh(op.to_dense())[::-1][:7],
                               rtol=1e-6)  # fmt: skip
    tr = results["trace"]
    assert abs(tr.value - np.sum(dense)) <= 4 * tr.stderr


def test_eval_mode_statistics_are_operand_leaves(digits):
    """In BN eval mode the running averages change between checkpoints; they are leaves of
    the objective's loss, so the next checkpoint's operator compiles nothing and its
    Hessian is that checkpoint's (a different one)."""
    model = make_model("mlp", digits.input_shape, 10, True, seed=0, hidden=(8,), dtype=jnp.float64)
    obj = make_objective(model, bn_mode="eval")
    op = hs.hessian_operator(obj.loss_fn, obj.params, digits.batch)
    hs.top_eigenpairs(op, 3)
    model.eval()
    from flax import nnx

    for bn in [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]:
        bn.mean[...] = bn.mean[...] + 0.3
        bn.var[...] = bn.var[...] * 2.0
    later = make_objective(model, bn_mode="eval")
    new, count = compiles(lambda: hs.hessian_operator(later.loss_fn, later.params, digits.batch))
    top, count_top = compiles(lambda: hs.top_eigenpairs(new, 3))
    assert count + count_top == 0
    hessian = jax.jit(jax.hessian(lambda p: later.loss_fn(new.unravel(p), digits.batch)))
    ref = np.linalg.eigvalsh(np.asarray(hessian(new.ravel(later.params))))
    np.testing.assert_allclose(top.values, ref[::-1][:3], rtol=1e-8)
    old = np.linalg.eigvalsh(op.to_dense())
    assert not np.allclose(old[::-1][:3], top.values, rtol=1e-3)


def test_plain_matrix_operators_share_programs():
    """Two explicit matrices of the same size behind one module-level apply: one program."""
    a, ev_a, _ = matrix_with_spectrum(np.linspace(-1, 3, 60), seed=1)
    b, ev_b, _ = matrix_with_spectrum(np.linspace(0, 9, 60), seed=2)

    def apply(v, m):
        return m @ v

    op_a = hs.LinearOperator(apply=apply, operand=jnp.asarray(a), dim=60, dtype=np.float64)
    op_b = hs.LinearOperator(apply=apply, operand=jnp.asarray(b), dim=60, dtype=np.float64)
    hs.top_eigenpairs(op_a, 4)
    res, count = compiles(lambda: hs.top_eigenpairs(op_b, 4))
    assert count == 0
    np.testing.assert_allclose(res.values, ev_b[::-1][:4], rtol=1e-10)
    assert jax.tree.structure(op_a) == jax.tree.structure(op_b)
    assert jax.tree.leaves(op_b)[0] is op_b.operand


def test_warm_start_costs_a_few_matvecs(digits):
    """Sharpness tracking: the previous top eigenvector as the start vector converges in a
    handful of matvecs at a nearby checkpoint."""
    model = make_model("mlp", digits.input_shape, 10, False, seed=0, hidden=(8,), dtype=jnp.float64)
    obj = make_objective(model)
    op = hs.hessian_operator(obj.loss_fn, obj.params, digits.batch)
    cold = hs.top_eigenpairs(op, 1, verify=False)
    near = jax.tree.map(lambda a: a * 1.001, obj.params)
    op2 = hs.hessian_operator(obj.loss_fn, near, digits.batch)
    warm = hs.top_eigenpairs(op2, 1, start_vector=cold.vectors[0], verify=False)
    ref = np.linalg.eigvalsh(op2.to_dense())[-1]
    assert warm.values[0] == pytest.approx(ref, rel=1e-6) and warm.converged[0]
    assert warm.num_matvecs <= 12 < cold.num_matvecs


def test_sharpness_tracking_and_block_operators_compile_once(digits):
    """Sharpness tracking during training: after the first cold solve and the first warm
    one, every later measurement (new parameters each time) compiles nothing, and each
    value is the dense lambda_max. A per-layer block operator (``wrt``) at the next
    checkpoint compiles nothing either."""
    from hessspec.nn.sharpness import SharpnessTracker

    model = make_model("mlp", digits.input_shape, 10, True, seed=0, hidden=(8,), dtype=jnp.float64)
    obj = make_objective(model, bn_mode="train")
    tracker = SharpnessTracker(obj.loss_fn, digits.batch, batch_size=64, tol=1e-8)
    checkpoints = [jax.tree.map(lambda a, s=s: a * s, obj.params) for s in (1, 1.01, 1.02, 1.03)]
    tracker(checkpoints[0])
    tracker(checkpoints[1])  # the first warm-started solve compiles its own programs
    for params in checkpoints[2:]:
        estimate, count = compiles(lambda params=params: tracker(params))
        assert count == 0, f"a later sharpness measurement compiled {count} programs"
        dense = hs.hessian_operator(obj.loss_fn, params, digits.batch, 64).to_dense()
        assert estimate.value == pytest.approx(np.linalg.eigvalsh(dense)[-1], rel=1e-7)

    first_layer = hs.layer_blocks(checkpoints[0])["linears/0"]
    block = hs.hessian_operator(obj.loss_fn, checkpoints[0], digits.batch, 64, wrt=first_layer)
    assert 0 < block.dim < hs.hessian_operator(obj.loss_fn, obj.params, digits.batch).dim
    hs.top_eigenpairs(block, 3)
    later_layer = hs.layer_blocks(checkpoints[3])["linears/0"]  # made anew, as per checkpoint
    later, count = compiles(
        lambda: hs.top_eigenpairs(
            hs.hessian_operator(obj.loss_fn, checkpoints[3], digits.batch, 64, wrt=later_layer),
            3,
        )
    )
    assert count == 0, f"the block operator at the next checkpoint compiled {count} programs"
    assert np.all(later.converged)
