"""Convolutions rewritten to canonical layout: same numbers, canonical dimension numbers
everywhere (top level, inside jit calls and inside scan bodies), operators unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import hessspec as hs
from hessspec.curvature.conv_layout import canonical_conv, canonical_convolutions
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective

CASES = [
    # (lhs shape, rhs shape, dimension numbers, strides, padding, lhs dil, rhs dil, groups)
    ((2, 7, 6, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1), (1, 1), 1),
    ((2, 3, 7, 6), (4, 3, 3, 2), ("NCHW", "OIHW", "NCHW"), (2, 1), "VALID", (1, 1), (1, 1), 1),
    ((7, 6, 2, 3), (3, 4, 2, 3), ("HWNC", "IOHW", "CHWN"), (1, 2), ((1, 0), (2, 1)), (1, 1),
     (2, 1), 1),
    ((2, 7, 6, 4), (3, 3, 2, 6), ("NHWC", "HWIO", "NHWC"), (1, 1), ((1, 1), (1, 1)), (2, 1),
     (1, 1), 2),
    ((5, 9, 2), (3, 2, 4), ("NWC", "WIO", "NCW"), (2,), "SAME", (1,), (1,), 1),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c[2]))
def test_canonical_conv_matches_lax(key, case):
    lhs_shape, rhs_shape, dn, strides, padding, lhs_dil, rhs_dil, groups = case
    k1, k2 = jax.random.split(key)
    lhs = jax.random.normal(k1, lhs_shape)
    rhs = jax.random.normal(k2, rhs_shape)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dn,
            feature_group_count=groups,
        )  # fmt: skip

    ref = conv(lhs, rhs)
    jaxpr = jax.make_jaxpr(conv)(lhs, rhs)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]
    got = canonical_conv(lhs, rhs, **eqn.params)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # and the transposes the kernel gradient and input gradient need (batch_group_count,
    # swapped roles) through the rewritten function
    out_t = jax.random.normal(key, ref.shape)
    vjp_ref = jax.vjp(conv, lhs, rhs)[1](out_t)
    vjp_got = canonical_convolutions(lambda x, w, t: jax.vjp(conv, x, w)[1](t))(lhs, rhs, out_t)
    for a, b in zip(vjp_got, vjp_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


def _conv_dimension_numbers(closed):
    """Every convolution's dimension numbers in a jaxpr, nested bodies included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is lax.conv_general_dilated_p:
                found.append(eqn.params["dimension_numbers"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple) else (value,):
                    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                        visit(sub.jaxpr)

    visit(closed.jaxpr)
    return found


def test_cnn_hvp_has_only_canonical_convolutions(key):
    """The HVP of a flax CNN with BN, batched (scan body) and ragged: before the rewrite
    reverse mode leaves non-canonical convolutions; after it, none, and the operator is the
    same to rounding."""
    model = make_model("cnn", (8, 8, 1), 10, batchnorm=True, seed=0, dtype=jnp.float64)
    obj = make_objective(model, "cross_entropy", bn_mode="train")
    x = jax.random.uniform(key, (11, 8, 8, 1), jnp.float64)
    data = {"x": x, "y": jnp.arange(11) % 10}
    op = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=4)
    v = jax.random.normal(jax.random.fold_in(key, 1), (op.dim,))
    canonical = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

    raw = jax.make_jaxpr(lambda v, o: _raw_hvp(obj.loss_fn, op, v, o))(v, op.operand)
    assert any(dn != canonical for dn in _conv_dimension_numbers(raw))

    rewritten = jax.make_jaxpr(op.apply)(v, op.operand)
    dns = _conv_dimension_numbers(rewritten)
    assert len(dns) >= 6 and all(dn == canonical for dn in dns), dns
    raw_hvp = jax.jit(lambda v, o: _raw_hvp(obj.loss_fn, op, v, o))(v, op.operand)
    np.testing.assert_allclose(
        op.matvec(v), raw_hvp, rtol=0, atol=1e-12 * np.abs(op.matvec(v)).max()
    )


def _raw_hvp(loss_fn, op, v, operand):
    """The operator's HVP written out plainly (jvp of grad per batch, weighted sum)."""
    flat, _, _, (full, rest) = operand  # (parameters, fixed leaves, loss leaves, batches)
    n = full["y"].shape[0] * full["y"].shape[1] + rest["y"].shape[0]

    def hvp(batch):
        def grad_flat(p):
            return jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(op.unravel(p), batch))[0]

        return jax.jvp(grad_flat, (flat,), (v,))[1] * (batch["y"].shape[0] / n)

    def body(acc, batch):
        return acc + hvp(batch), None

    total, _ = lax.scan(body, jnp.zeros_like(flat), full)
    return total + hvp(rest)
