"""hs.hessian_operator on flax models, every BatchNorm mode, against dense jax.hessian (float64).

The reference is sum_b (|b|/N) Hess L_b over the same partition into batches, computed with
jax.hessian on the flat parameters; for train-mode BN this is the definition of the
operator, for every other case it equals the Hessian of the dataset mean.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hessspec as hs
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective

NUM_EXAMPLES = 10
BATCH_SIZES = (None, 4)  # one batch; full batches in a scan and a ragged one (10 = 2*4 + 2)
MODELS = {
    "mlp": dict(input_shape=(4, 4, 1), hidden=(5,)),
    "cnn": dict(input_shape=(4, 4, 1), channels=(2, 3)),
}
MODES = [(False, None), (True, "train"), (True, "eval"), (True, "population")]


def _data(key):
    kx, ky = jax.random.split(key)
    x = 0.5 + jax.random.normal(kx, (NUM_EXAMPLES, 4, 4, 1), dtype=jnp.float64)
    return {"x": x, "y": jax.random.randint(ky, (NUM_EXAMPLES,), 0, 3)}


def _model(name, batchnorm, data):
    spec = dict(MODELS[name])
    model = make_model(
        name, spec.pop("input_shape"), 3, batchnorm, seed=1, dtype=jnp.float64, **spec
    )
    if batchnorm:  # non-trivial running averages for eval mode: one train-mode pass
        model.train()
        model(2.0 * data["x"][::-1] - 0.3)
        model.eval()
    return model


def _reference(loss_fn, params, data, batch_size):
    """sum_b (|b|/N) Hess L_b with jax.hessian per batch (one compile per batch shape)."""
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda p, b: loss_fn(unravel(p), b)))
    step = NUM_EXAMPLES if batch_size is None else batch_size
    total = 0.0
    for start in range(0, NUM_EXAMPLES, step):
        batch = jax.tree_util.tree_map(lambda a, s=start: a[s : s + step], data)
        hess = hessian(flat, batch)
        total = total + (batch["y"].shape[0] / NUM_EXAMPLES) * np.asarray(hess)
    return total


def _leaf_index(params, selected):
    """Indices of the flat parameter vector that belong to the selected leaves."""
    sizes = [int(np.size(a)) for a in jax.tree_util.tree_leaves(params)]
    return np.flatnonzero(np.repeat(selected, sizes))


@pytest.mark.parametrize(("batchnorm", "bn_mode"), MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_hessian_matches_dense_reference(key, name, batchnorm, bn_mode):
    """The full operator, and block operators (wrt as a prefix mask, optax's convention, and
    as a predicate on paths), against the dense float64 Hessian and its diagonal block, for
    one batch and for full batches plus a ragged one; the GGN's block is the block of the
    (dense-tested) full GGN; ravel/unravel map the block's pytree."""
    data = _data(key)
    model = _model(name, batchnorm, data)
    population = data["x"] if bn_mode == "population" else None
    obj = make_objective(model, "cross_entropy", bn_mode=bn_mode, population_data=population)
    separable = bn_mode != "train"  # then every partition gives the full-batch Hessian
    full = _reference(obj.loss_fn, obj.params, data, None) if separable else None
    first = sorted(obj.params)[0]  # a module attribute: head, linears, ...
    mask = {k: k == first for k in obj.params}  # a prefix of the params tree
    selected = [p[0].key == first for p, _ in jax.tree_util.tree_leaves_with_path(obj.params)]
    index = _leaf_index(obj.params, selected)
    dims = []
    for batch_size in BATCH_SIZES:
        op = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=batch_size)
        ref = full if separable else _reference(obj.loss_fn, obj.params, data, batch_size)
        norm = np.linalg.norm(ref, 2)
        assert norm > 1e-3
        np.testing.assert_allclose(op.to_dense(), ref, rtol=0, atol=1e-10 * norm)
        dims.append(op.dim)
        wrt = mask if batch_size is None else (lambda path: path.split("/")[0] == first)
        block = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size, wrt=wrt)
        assert block.dim == index.size < op.dim
        np.testing.assert_allclose(
            block.to_dense(), ref[np.ix_(index, index)], rtol=0, atol=1e-10 * norm
        )
    assert len(set(dims)) == 1 and dims[0] == sum(
        np.size(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    )
    tree = block.unravel(np.arange(block.dim, dtype=np.float64))
    assert all(not jax.tree.leaves(v) for k, v in tree.items() if k != first)
    np.testing.assert_array_equal(block.ravel(tree), np.arange(block.dim))
    np.testing.assert_array_equal(  # a full params-shaped pytree: its block is taken
        block.ravel(jax.tree.map(jnp.ones_like, obj.params)), np.ones(block.dim)
    )
    if name == "mlp":
        model_fn = jax.tree_util.Partial(lambda f, p, b: f(p, b["x"]), obj.logits_fn)
        ggn = hs.ggn_operator(model_fn, obj.output_loss_fn, obj.params, data, batch_size=4)
        ggn_block = hs.ggn_operator(
            model_fn, obj.output_loss_fn, obj.params, data, batch_size=4, wrt=mask
        )
        dense = ggn.to_dense()
        np.testing.assert_allclose(
            ggn_block.to_dense(), dense[np.ix_(index, index)], rtol=0,
            atol=1e-12 * np.abs(dense).max(),
        )  # fmt: skip


def test_train_mode_hessian_depends_on_the_partition(key):
    """Train-mode BN does not separate over examples: the batch size changes the operator,
    while eval mode does not (a check that the modes are really different functions)."""
    data = _data(key)
    model = _model("mlp", True, data)
    for mode, should_differ in (("train", True), ("eval", False)):
        obj = make_objective(model, "cross_entropy", bn_mode=mode)
        h_all = hs.hessian_operator(obj.loss_fn, obj.params, data).to_dense()
        h_ragged = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=4).to_dense()
        differs = np.abs(h_all - h_ragged).max() > 1e-6 * np.abs(h_all).max()
        assert differs == should_differ, mode


def test_top_eigenpairs_of_a_bn_network_match_dense(key):
    data = _data(key)
    obj = make_objective(_model("cnn", True, data), "cross_entropy", bn_mode="train")
    op = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=4)
    dense = _reference(obj.loss_fn, obj.params, data, 4)
    evals, evecs = np.linalg.eigh(dense)
    top = hs.top_eigenpairs(op, k=3)
    bottom = hs.top_eigenpairs(op, k=2, which="smallest")
    scale = np.abs(evals).max()
    np.testing.assert_allclose(top.values, evals[::-1][:3], rtol=1e-8, atol=1e-12 * scale)
    np.testing.assert_allclose(bottom.values, evals[:2], rtol=1e-8, atol=1e-12 * scale)
    overlap = np.abs(np.asarray(top.vectors) @ evecs[:, ::-1][:, :3])
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-6)
    assert np.all(top.residuals <= 1e-6 * scale)


def test_block_errors_name_the_paths(key):
    data = _data(key)
    obj = make_objective(_model("mlp", False, data), "cross_entropy")
    with pytest.raises(ValueError, match="wrt selects no parameter; the parameter paths are"):
        hs.hessian_operator(obj.loss_fn, obj.params, data, wrt=lambda path: False)
    with pytest.raises(ValueError, match="prefix of it"):
        hs.hessian_operator(obj.loss_fn, obj.params, data, wrt={"nope": True})
