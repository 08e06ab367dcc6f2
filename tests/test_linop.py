"""Linear-operator helpers: dtype rules and linearized (primal-cached) operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessspec as hs
from hessspec.linalg.linop import basis_dtype, linearize, solver_dtype


def test_linearized_hessian_is_the_same_operator(rng):
    x = rng.normal(size=(37, 5))
    y = rng.normal(size=37)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "v": jnp.asarray(rng.normal(size=3))}

    def loss_fn(p, batch):
        return jnp.mean((jnp.tanh(batch["x"] @ p["w"]) @ p["v"] - batch["y"]) ** 2)

    op = hs.hessian_operator(loss_fn, params, {"x": x, "y": y}, batch_size=10)  # ragged
    lin = linearize(op)
    assert (lin.dim, lin.dtype) == (op.dim, op.dtype) and "linearized" in lin.description
    vs = jax.random.normal(jax.random.key(0), (3, op.dim))
    for v in vs:
        np.testing.assert_allclose(lin.matvec(v), op.matvec(v), rtol=0, atol=1e-13)
    dense = np.stack([np.asarray(op.matvec(e)) for e in np.eye(op.dim)], axis=1)
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)  # a symmetric Hessian
    np.testing.assert_allclose(np.asarray(lin.matvec(vs[0])), dense @ vs[0], atol=1e-12)


def test_dtype_rules():
    assert solver_dtype(np.float32) == np.float64  # x64 is on in the tests
    assert basis_dtype(np.float32) == np.float64
    assert basis_dtype(np.float64, "float32") == np.float32
    with pytest.raises(ValueError, match="not a dtype"):
        basis_dtype(np.float32, "nonsense")
