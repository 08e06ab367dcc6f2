"""Convolutions in canonical layout, so XLA:CPU runs them fast inside loop bodies.

XLA:CPU rewrites a convolution into its fast form (batch, spatial..., feature) layout and
a library kernel only at the top level of a program; inside a ``while`` body (every
``lax.fori_loop``, ``lax.scan``, ``lax.while_loop``, hence every Lanczos step and every
scanned batch) a convolution with any other dimension order runs as a naive loop nest (JAX
issue #12868). Reverse-mode differentiation produces exactly such convolutions: the kernel
gradient of ``NHWC x HWIO -> NHWC`` contracts over the batch and is emitted as
``f01b x i01o -> 01bf``. Measured on the bundled digits CNN (1437 images, float32, 2
cores): one HVP takes 0.055 s at top level and 0.64 s inside a ``fori_loop``; with the
rewrite below, 0.045 s inside the loop.

:func:`canonical_convolutions` traces a function to a jaxpr and evaluates it again with
every ``conv_general_dilated`` replaced by: transpose the operands to (batch, spatial...,
feature) and (spatial..., in, out), convolve with those canonical dimension numbers, and
transpose the result back. The arithmetic is the same convolution (results are identical
to rounding), only the layout changes. It recurses into ``jit`` calls, and into the bodies
of ``scan``, ``while`` and ``cond`` so a model's own loops benefit too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:  # imported where used: jax.extend loads pallas (20 ms of `import hessspec`)
    from jax.extend import core as jex_core

__all__ = ["canonical_conv", "canonical_convolutions", "use_canonical_convolutions"]

_INLINED_CALLS = ("pjit", "jit", "closed_call", "core_call")
"""Call primitives whose body is evaluated inline (rewritten) instead of re-bound."""


def canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """``conv_general_dilated_p`` with ``params``, computed in canonical layout.

    With ``lhs_spec = (b, f, s_1..s_d)``, ``rhs_spec = (o, i, k_1..k_d)`` and ``out_spec``
    the axis positions of ``dimension_numbers``: ``lhs`` is transposed to
    ``(b, s_1..s_d, f)``, ``rhs`` to ``(k_1..k_d, i, o)``, the convolution runs with those
    dimension numbers (strides, padding, dilations and group counts unchanged: they refer
    to logical dimensions), and the ``(batch, spatial..., feature)`` result is transposed
    to the positions ``out_spec`` asks for.
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    d = len(lhs_spec) - 2
    lhs_t = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs_t = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    spatial = tuple(range(1, d + 1))
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, d + 1, *spatial),
        rhs_spec=(d + 1, d, *range(d)),
        out_spec=(0, d + 1, *spatial),
    )
    out = lax.conv_general_dilated_p.bind(
        lhs_t, rhs_t, **{**params, "dimension_numbers": canonical}
    )
    perm = [0] * (d + 2)
    perm[out_spec[0]] = 0
    perm[out_spec[1]] = d + 1
    for i in range(d):
        perm[out_spec[2 + i]] = 1 + i
    return jnp.transpose(out, perm)


def _rewrite_closed(closed: jex_core.ClosedJaxpr) -> jex_core.ClosedJaxpr:
    """The same computation as ``closed`` (same input and output types), convs rewritten."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in closed.in_avals]
    rewritten = jax.make_jaxpr(lambda *args: _evaluate(closed.jaxpr, closed.consts, args))(*specs)
    if [a.strip_weak_type() for a in rewritten.out_avals] != [
        a.strip_weak_type() for a in closed.out_avals
    ]:  # pragma: no cover - a rewrite never changes types; keep the original if it did
        return closed
    return rewritten


def _rewrite_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of a higher-order primitive with each ClosedJaxpr body rewritten."""
    from jax.extend import core as jex_core

    out = {}
    for name, value in params.items():
        if isinstance(value, jex_core.ClosedJaxpr):
            out[name] = _rewrite_closed(value)
        elif (
            isinstance(value, tuple)
            and value
            and all(isinstance(b, jex_core.ClosedJaxpr) for b in value)
        ):
            out[name] = tuple(_rewrite_closed(b) for b in value)
        else:
            out[name] = value
    return out


def _evaluate(jaxpr: jex_core.Jaxpr, consts, args) -> list[Any]:
    """Evaluate ``jaxpr`` with convolutions in canonical layout."""
    from jax.extend import core as jex_core

    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim = eqn.primitive
        if prim is lax.conv_general_dilated_p:
            outs = [canonical_conv(*invals, **eqn.params)]
        elif prim.name in _INLINED_CALLS and isinstance(
            eqn.params.get("jaxpr"), jex_core.ClosedJaxpr
        ):
            body = eqn.params["jaxpr"]
            outs = _evaluate(body.jaxpr, body.consts, invals)
        else:
            params = eqn.params
            if prim.name in ("scan", "while", "cond"):
                params = _rewrite_params(params)
            bind_params = prim.get_bind_params(params)
            if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
                subfuns, bind_params = bind_params
            else:
                subfuns = ()
            outs = prim.bind(*subfuns, *invals, **bind_params)
            if not prim.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def canonical_convolutions(fn: Callable) -> Callable:
    """``fn`` with every convolution it performs computed in canonical layout.

    Same arguments, same results (pytrees) as ``fn``; traced once per call (use it inside
    ``jax.jit``). Functions without convolutions are returned computations unchanged.
    """

    def wrapped(*args):
        flat_args, _ = jax.tree_util.tree_flatten(args)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, flat_args)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def use_canonical_convolutions(platform: str) -> bool:
    """Whether operators on ``platform`` rewrite convolutions: on ``"cpu"`` only (GPU and
    TPU compilers choose convolution layouts themselves, inside loops too)."""
    return platform == "cpu"
