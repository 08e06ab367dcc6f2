"""Per-layer (block) spectra against the dense float64 diagonal blocks of the Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessspec as hs
from hessspec.curvature.layout import flat_layout
from hessspec.nn.data import load_digits
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective


@pytest.fixture(scope="module")
def problem():
    data = load_digits("train", dtype=np.float64).take(slice(0, 60))
    model = make_model("mlp", data.input_shape, 10, False, seed=0, hidden=(6,), dtype=jnp.float64)
    obj = make_objective(model)
    return obj, data.batch


def test_layer_blocks_match_dense_diagonal_blocks(problem):
    obj, batch = problem
    res = hs.block_spectra(
        obj.loss_fn, obj.params, batch, k=3, num_probes=4, num_steps=40, trace_matvecs=120
    )
    assert res.names == ("head", "linears/0")  # one block per layer, in parameter order
    flat_op = hs.hessian_operator(obj.loss_fn, obj.params, batch)
    dense = flat_op.to_dense()
    sizes = [int(np.size(a)) for a in jax.tree.leaves(obj.params)]
    offsets = np.cumsum([0, *sizes])
    paths = flat_layout(obj.params).paths
    for block in res.blocks:
        index = np.concatenate(
            [np.arange(offsets[i], offsets[i + 1]) for i, p in enumerate(paths) if p in block.paths]
        )
        sub = dense[np.ix_(index, index)]
        ev = np.linalg.eigvalsh(sub)
        assert block.dim == index.size
        np.testing.assert_allclose(block.eigen.values, ev[::-1][:3], rtol=1e-8)
        assert abs(block.trace.value - np.trace(sub)) <= 4 * block.trace.stderr + 1e-9
        assert block.density.lambda_max == pytest.approx(ev[-1], rel=1e-6)
    d = res.js_distances
    assert d.shape == (2, 2) and np.all(np.diag(d) == 0) and 0 < d[0, 1] <= 1
    assert res.densities.shape == (2, res.grid.size)


def test_the_same_block_twice_is_at_distance_zero(problem):
    obj, batch = problem
    res = hs.block_spectra(
        obj.loss_fn,
        obj.params,
        batch,
        blocks={"a": {"head": True, "linears": False}, "b": lambda p: p.startswith("head/")},
        k=2,
        num_probes=3,
        num_steps=20,
        trace_matvecs=30,
    )
    assert res.js_distances[0, 1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(res.blocks[0].eigen.values, res.blocks[1].eigen.values)
    with pytest.raises(TypeError, match="blocks must be"):
        hs.block_spectra(obj.loss_fn, obj.params, batch, blocks="head")
