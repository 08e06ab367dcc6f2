"""Hessian and Gauss-Newton operators against dense float64 references (jax.hessian)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessspec as hs


def _mlp_params(key, sizes=(5, 4, 3)):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params.append(
            {
                "w": jax.random.normal(k1, (a, b)) / np.sqrt(a),
                "b": 0.1 * jax.random.normal(k2, (b,)),
            }
        )
    return params


def _mlp_logits(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _xent(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def _loss(params, batch):
    return _xent(_mlp_logits(params, batch["x"]), batch)


def _batchnorm_loss(params, batch):
    """Batch statistics enter every example's loss: not separable over examples."""
    h = batch["x"] @ params[0]["w"] + params[0]["b"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return _xent(jnp.tanh(h) @ params[1]["w"] + params[1]["b"], batch)


def _data(key, n=13, d=5, c=3):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, d)), "y": jax.random.randint(ky, (n,), 0, c)}


def _reference(loss_fn, params, data, batch_size):
    """sum_b (|b|/N) Hess L_b, dense, from jax.hessian on flat parameters."""
    flat, unravel = ravel_pytree(params)
    n = data["y"].shape[0]
    bs = n if batch_size is None else batch_size
    hessian = jax.jit(jax.hessian(lambda p, b: loss_fn(unravel(p), b)))  # one compile a shape
    total = 0.0
    for start in range(0, n, bs):
        batch = jax.tree_util.tree_map(lambda a, s=start: a[s : s + bs], data)
        total = total + (batch["y"].shape[0] / n) * np.asarray(hessian(flat, batch))
    return total


@pytest.mark.parametrize(
    ("loss_fn", "batch_size"),
    [(_loss, bs) for bs in (None, 13, 4, 5, 3)] + [(_batchnorm_loss, bs) for bs in (None, 4, 5)],
    ids=lambda a: getattr(a, "__name__", str(a)),
)
def test_hessian_operator_matches_dense_reference(key, loss_fn, batch_size):
    """Batch sizes: whole set, == N, ragged (13 = 3*4 + 1, 2*5 + 3, 4*3 + 1)."""
    params, data = _mlp_params(key), _data(jax.random.fold_in(key, 1))
    op = hs.hessian_operator(loss_fn, params, data, batch_size=batch_size)
    dense = op.to_dense()
    ref = _reference(loss_fn, params, data, batch_size)
    assert op.dim == ref.shape[0] and op.dtype == np.float64
    np.testing.assert_allclose(dense, ref, rtol=0, atol=1e-10 * np.linalg.norm(ref, 2))
    np.testing.assert_allclose(dense, dense.T, atol=1e-12 * np.linalg.norm(ref, 2))


def test_separable_loss_is_independent_of_batch_size(key):
    params, data = _mlp_params(key), _data(jax.random.fold_in(key, 1))
    full = hs.hessian_operator(_loss, params, data).to_dense()
    ragged = hs.hessian_operator(_loss, params, data, batch_size=5).to_dense()
    np.testing.assert_allclose(ragged, full, atol=1e-12 * np.abs(full).max())


def test_ravel_unravel_and_matvec_shapes(key):
    params, data = _mlp_params(key), _data(key)
    op = hs.hessian_operator(_loss, params, data, batch_size=4)
    v = jax.random.normal(key, (op.dim,))
    tree = op.unravel(v)
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(op.ravel(tree), v)
    hv = op.matvec(v)
    assert hv.shape == (op.dim,) and hv.dtype == jnp.float64
    with pytest.raises(ValueError, match="flat vector of shape"):
        op.matvec(v[:-1])
    with pytest.raises(ValueError, match="pytree shaped like params"):
        op.ravel(params[:1])


def test_float32_params_give_float32_hvps(key):
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), _mlp_params(key))
    data = _data(key)
    data["x"] = data["x"].astype(jnp.float32)
    op = hs.hessian_operator(_loss, params, data)
    assert op.dtype == np.float32
    hv = op.matvec(jnp.ones(op.dim))
    assert hv.dtype == jnp.float32
    ref = _reference(
        _loss,
        jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params),
        jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, data
        ),
        None,
    )
    np.testing.assert_allclose(hv, ref @ np.ones(op.dim), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_ggn_matches_dense_reference_and_splits_hessian(key, batch_size):
    params, data = _mlp_params(key), _data(jax.random.fold_in(key, 2))
    flat, unravel = ravel_pytree(params)
    n = data["y"].shape[0]
    bs = n if batch_size is None else batch_size

    @jax.jit
    def batch_ggn(b):  # J^T H_out J of one batch, one compile a shape
        jac = jax.jacobian(lambda p: _mlp_logits(unravel(p), b["x"]).ravel())(flat)
        z = _mlp_logits(unravel(flat), b["x"])
        h_out = jax.hessian(lambda o: _xent(o.reshape(z.shape), b))(z.ravel())
        return jac.T @ h_out @ jac

    ref = 0.0
    for s in range(0, n, bs):
        b = jax.tree_util.tree_map(lambda a, s=s: a[s : s + bs], data)
        ref = ref + (b["y"].shape[0] / n) * np.asarray(batch_ggn(b))
    op = hs.ggn_operator(lambda p, b: _mlp_logits(p, b["x"]), _xent, params, data, batch_size)
    ggn = op.to_dense()
    np.testing.assert_allclose(ggn, ref, atol=1e-10 * np.linalg.norm(ref, 2))
    assert np.linalg.eigvalsh(ggn).min() > -1e-10 * np.linalg.norm(ref, 2)  # PSD for a convex loss
    hess = hs.hessian_operator(_loss, params, data, batch_size).to_dense()
    residual = hess - ggn  # Papyan's R: nonzero for a nonlinear network
    assert np.linalg.norm(residual) > 1e-3 * np.linalg.norm(hess)


def test_matvec_compiles_once(key):
    params, data = _mlp_params(key), _data(key)
    traces = []

    def counting_loss(p, b):
        traces.append(1)
        return _loss(p, b)

    op = hs.hessian_operator(counting_loss, params, data, batch_size=4)
    before = len(traces)
    op.matvec(jnp.ones(op.dim))
    after_first = len(traces)
    for _ in range(3):
        op.matvec(jax.random.normal(key, (op.dim,)))
    assert len(traces) == after_first > before


def test_dataset_gradient_matches_full_batch(key):
    params, data = _mlp_params(key), _data(key)
    flat, unravel = ravel_pytree(params)
    ref_loss, ref_grad = jax.value_and_grad(lambda p: _loss(unravel(p), data))(flat)
    out = hs.dataset_gradient(_loss, params, data, batch_size=4)
    np.testing.assert_allclose(out.loss, ref_loss, rtol=1e-13)
    np.testing.assert_allclose(out.gradient, ref_grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- errors name the problem


def test_non_scalar_loss_is_rejected(key):
    params, data = _mlp_params(key), _data(key)
    with pytest.raises(ValueError, match="must return a scalar"):
        hs.hessian_operator(lambda p, b: _mlp_logits(p, b["x"]), params, data)


def test_disagreeing_leading_axes_are_rejected(key):
    params, data = _mlp_params(key), _data(key)
    data["y"] = data["y"][:-1]
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        hs.hessian_operator(_loss, params, data)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_batch_size_is_rejected(key, bad):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        hs.hessian_operator(_loss, _mlp_params(key), _data(key), batch_size=bad)


@pytest.mark.parametrize("where", ["params", "data"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_are_rejected(key, where, value):
    params, data = _mlp_params(key), _data(key)
    if where == "params":
        params[0]["w"] = params[0]["w"].at[0, 0].set(value)
    else:
        data["x"] = data["x"].at[3, 1].set(value)
    with pytest.raises(ValueError, match="NaN/Inf"):
        hs.hessian_operator(_loss, params, data)


def test_a_failing_loss_keeps_its_own_exception_with_a_note(key):
    """Python control flow on a traced value: the user sees JAX's own error (its type and
    message intact) with a note saying where hessspec called the loss."""
    params = _mlp_params(key)

    def branching_loss(p, batch):
        out = _mlp_logits(p, batch["x"])
        if out.sum() > 0:  # not allowed under tracing
            return jnp.mean(out**2)
        return jnp.mean(out)

    data = {"x": jax.random.normal(key, (8, 5))}
    with pytest.raises(jax.errors.TracerBoolConversionError) as err:
        hs.hessian_operator(branching_loss, params, data)
    notes = "".join(getattr(err.value, "__notes__", []))
    assert "loss_fn(params, batch)" in notes and "jnp.where or lax.cond" in notes


def test_non_array_parameters_are_named_with_the_fix(key):
    """An equinox-style model passed whole (arrays plus an activation function): the leaf is
    named and the fix (eqx.partition) given, instead of a failure inside ravel_pytree."""
    params = {"layers": _mlp_params(key), "activation": jax.nn.relu}
    data = {"x": jnp.ones((4, 5))}
    with pytest.raises(TypeError, match=r"\['activation'\] \(.*eqx\.partition") as err:
        hs.hessian_operator(lambda p, b: jnp.mean(b["x"]), params, data)
    assert "pytree of arrays" in str(err.value)


def test_count_params_counts_any_pytree(key):
    """Plain dicts (linen/haiku style), nested lists, arrays and pytrees with non-array leaves
    (counted 0), and nnx modules (their nnx.Param entries)."""
    params = _mlp_params(key)  # 5*4 + 4 + 4*3 + 3
    assert hs.count_params(params) == 39
    assert hs.count_params({"params": params, "fn": jnp.tanh}) == 39
    assert hs.count_params(jnp.ones((3, 7))) == 21
    from flax import nnx

    model = hs.MLP(5, (4,), 3, rngs=nnx.Rngs(0))
    assert hs.count_params(model) == 39
