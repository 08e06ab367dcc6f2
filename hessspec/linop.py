"""Symmetric linear operators on flat vectors, and the precision rules shared by the solvers.

Every algorithm in hessspec (Lanczos, SLQ, trace estimation) takes a :class:`LinearOperator`
or, for tests and explicit matrices, a plain callable ``v -> A v`` together with ``dim=``;
:func:`as_operator` turns either into a :class:`LinearOperator`.

The operator is split into a pure function ``apply(v, operand) -> A v`` and its ``operand``
(a pytree of arrays: parameters, data). Solvers jit with ``apply`` static and ``operand``
traced, so the data is an argument of the compiled program rather than a baked-in constant,
and a second solver call on the same operator reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LinearOperator", "as_operator", "solver_dtype"]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearOperator:
    """A symmetric linear operator ``A`` acting on flat vectors of length ``dim``.

    Attributes:
        apply: pure function ``(v, operand) -> A v``; ``v`` and the result have shape
            ``(dim,)`` and dtype ``dtype``. Hashed by identity (it is a static jit argument).
        operand: pytree of arrays that ``apply`` reads (parameters, data); traced under jit.
        dim: length of the vectors.
        dtype: dtype in which ``apply`` computes (the model's dtype for a Hessian).
        ravel: pytree -> flat vector of length ``dim`` (None for a plain matrix operator).
        unravel: flat vector -> pytree shaped like the parameters (None likewise).
        description: one line saying what the operator is, for reports and errors.
    """

    apply: Callable[[jax.Array, Any], jax.Array]
    operand: Any
    dim: int
    dtype: np.dtype
    ravel: Callable[[Any], jax.Array] | None = None
    unravel: Callable[[jax.Array], Any] | None = None
    description: str = ""
    _jitted_apply: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if int(self.dim) < 1:
            raise ValueError(f"LinearOperator: dim must be a positive integer, got {self.dim}.")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "_jitted_apply", jax.jit(self.apply))

    def matvec(self, v: jax.Array) -> jax.Array:
        """``A v`` for a flat vector ``v`` of shape ``(dim,)``; jit-compiled once per operator."""
        v = jnp.asarray(v)
        if v.shape != (self.dim,):
            raise ValueError(
                f"matvec expects a flat vector of shape ({self.dim},), got shape {v.shape}; "
                "use op.ravel(pytree) to flatten parameters-shaped vectors."
            )
        return self._jitted_apply(v.astype(self.dtype), self.operand)

    def __matmul__(self, v):
        return self.matvec(v)

    def to_dense(self) -> np.ndarray:
        """The dense ``(dim, dim)`` matrix, one matvec per column. For tests and small dims."""
        eye = jnp.eye(self.dim, dtype=self.dtype)
        cols = jax.jit(jax.vmap(self.apply, in_axes=(0, None)))(eye, self.operand)
        return np.asarray(cols).T


def _call_matvec(matvec: Callable, v: jax.Array, operand: Any) -> jax.Array:
    del operand
    return matvec(v)


_WRAPPED: weakref.WeakKeyDictionary[Callable, Callable] = weakref.WeakKeyDictionary()


def _apply_for(matvec: Callable) -> Callable:
    """One stable ``apply`` per user callable, so repeated solver calls do not recompile."""
    try:
        return _WRAPPED[matvec]
    except (KeyError, TypeError):
        pass

    def apply(v, operand):
        return _call_matvec(matvec, v, operand)

    try:
        _WRAPPED[matvec] = apply
    except TypeError:  # not weak-referenceable: works, but recompiles per call
        pass
    return apply


def as_operator(op: LinearOperator | Callable, dim: int | None = None) -> LinearOperator:
    """Return ``op`` as a :class:`LinearOperator`.

    Args:
        op: a :class:`LinearOperator`, or a callable ``v -> A v`` on flat vectors of shape
            ``(dim,)`` (then ``dim`` is required). ``A`` must be symmetric.
        dim: the vector length for a plain callable; checked against an operator's ``dim``.

    Raises:
        ValueError: ``dim`` missing or inconsistent, or the callable does not map
            ``(dim,)`` to ``(dim,)``.
    """
    if isinstance(op, LinearOperator):
        if dim is not None and int(dim) != op.dim:
            raise ValueError(f"dim={dim} disagrees with the operator's dim={op.dim}.")
        return op
    if not callable(op):
        raise TypeError(
            f"expected a LinearOperator or a callable v -> A v, got {type(op).__name__}. "
            "Build one with hs.hessian_operator(...) or pass matvec=... with dim=..."
        )
    if dim is None:
        raise ValueError("a plain matvec callable needs dim= (the length of the flat vectors).")
    dim = int(dim)
    if dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}.")
    float_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    out = jax.eval_shape(op, jax.ShapeDtypeStruct((dim,), float_dtype))
    if not hasattr(out, "shape") or tuple(out.shape) != (dim,):
        raise ValueError(
            f"the matvec callable must map a vector of shape ({dim},) to shape ({dim},), "
            f"got {getattr(out, 'shape', type(out).__name__)}."
        )
    return LinearOperator(
        apply=_apply_for(op), operand=(), dim=dim, dtype=out.dtype, description="user matvec"
    )


def solver_dtype(op_dtype) -> np.dtype:
    """dtype for Krylov bases and tridiagonals: float64 whenever x64 is enabled (mixed
    precision for float32 operators), otherwise float32 (also for float16/bfloat16 operators,
    whose few mantissa bits cannot hold an orthonormal basis). Never flips the flag."""
    if jax.config.jax_enable_x64:
        return np.dtype(np.float64)
    return np.dtype(jnp.promote_types(op_dtype, jnp.float32))
