"""Symmetric linear operators on flat vectors, and the precision rules shared by the solvers.

Every algorithm in hessspec (Lanczos, SLQ, trace estimation) takes a :class:`LinearOperator`
or, for tests and explicit matrices, a plain callable ``v -> A v`` together with ``dim=``;
:func:`as_operator` turns either into a :class:`LinearOperator`.

The operator is split into a pure function ``apply(v, operand) -> A v`` and its ``operand``
(a pytree of arrays: parameters, data). Solvers jit with ``apply`` static and ``operand``
traced, so the data is an argument of the compiled program rather than a baked-in constant:
a second solver call on the same operator, or on an operator whose ``apply`` compares equal
and whose operand has the same shapes, reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LinearOperator",
    "as_operator",
    "basis_dtype",
    "device_of",
    "linearize",
    "matvec",
    "solver_dtype",
]


class _Extras:
    """What an operator carries besides its computation (ravel, unravel, description): kept
    through flattening but equal for every operator, so it never splits a jit cache."""

    __slots__ = ("ravel", "unravel", "description")

    def __init__(self, ravel, unravel, description):
        self.ravel, self.unravel, self.description = ravel, unravel, description

    def __eq__(self, other):
        return isinstance(other, _Extras)

    def __hash__(self):
        return 0


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class LinearOperator:
    """A symmetric linear operator ``A`` acting on flat vectors of length ``dim``.

    A pytree: its one child is ``operand`` (the arrays: parameters, data, statistics), its
    static part ``apply``, ``dim`` and ``dtype``. Solvers are jitted with ``apply`` static
    and ``operand`` traced, so two operators whose ``apply`` compare equal and whose operands
    have the same shapes and dtypes share every compiled program: the Hessian of the same
    loss at the next checkpoint compiles nothing. ``ravel``, ``unravel`` and
    ``description`` travel along but never take part in that comparison.

    Attributes:
        apply: pure function ``(v, operand) -> A v``; ``v`` and the result have shape
            ``(dim,)`` and dtype ``dtype``. A static jit argument: hashed, compared with
            ``==`` (functions by identity; :func:`hessspec.hessian_operator` builds one
            that compares by value).
        operand: pytree of arrays that ``apply`` reads; traced under jit.
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

    def __post_init__(self):
        if int(self.dim) < 1:
            raise ValueError(f"LinearOperator: dim must be a positive integer, got {self.dim}.")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    def tree_flatten(self):
        extras = _Extras(self.ravel, self.unravel, self.description)
        return (self.operand,), (self.apply, self.dim, self.dtype, extras)

    @classmethod
    def tree_unflatten(cls, aux, children):
        apply, dim, dtype, extras = aux
        return cls(apply, children[0], dim, dtype, extras.ravel, extras.unravel, extras.description)

    def matvec(self, v: jax.Array) -> jax.Array:
        """``A v`` for a flat vector ``v`` of shape ``(dim,)``; one compiled program per
        operator structure."""
        v = jnp.asarray(v)
        if v.shape != (self.dim,):
            raise ValueError(
                f"matvec expects a flat vector of shape ({self.dim},), got shape {v.shape}; "
                "use op.ravel(pytree) to flatten parameters-shaped vectors."
            )
        return matvec(self.apply, v.astype(self.dtype), self.operand)

    def __matmul__(self, v):
        return self.matvec(v)

    def to_dense(self) -> np.ndarray:
        """The dense ``(dim, dim)`` matrix, one matvec per column. For tests and small dims."""
        return np.asarray(_dense(self.apply, self.dim, self.dtype, self.operand)).T


@functools.partial(jax.jit, static_argnums=0)
def matvec(apply, v, operand):
    """``apply(v, operand)``, jitted with ``apply`` static. Every solver program calls the
    operator through it, so the matvec is traced once per operator structure and the
    trace is shared (the memory estimate, ``op.matvec`` and the solver engine)."""
    return apply(v, operand)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _dense(apply, dim, dtype, operand):
    return jax.vmap(apply, in_axes=(0, None))(jnp.eye(dim, dtype=dtype), operand)


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


def device_of(op: LinearOperator):
    """The first device holding the operator's data (None: jax's default device)."""
    for leaf in jax.tree_util.tree_leaves(op.operand):
        devices = getattr(leaf, "devices", None)
        if callable(devices):
            try:
                return sorted(devices(), key=lambda d: d.id)[0]
            except Exception:  # noqa: BLE001 - tracers, deleted arrays: fall back
                return None
    return None


def solver_dtype(op_dtype) -> np.dtype:
    """dtype for Krylov bases and tridiagonals: float64 whenever x64 is enabled (mixed
    precision for float32 operators), otherwise float32 (also for float16/bfloat16 operators,
    whose few mantissa bits cannot hold an orthonormal basis). Never flips the flag."""
    if jax.config.jax_enable_x64:
        return np.dtype(np.float64)
    return np.dtype(jnp.promote_types(op_dtype, jnp.float32))


def basis_dtype(op_dtype, requested=None) -> np.dtype:
    """dtype in which a solver stores its Krylov basis (the ``(num_steps, dim)`` array).

    ``requested=None`` gives :func:`solver_dtype` (float64 whenever x64 is on). A requested
    ``"float32"`` keeps the basis in float32, halving the largest array of a Lanczos run for
    big models, while the tridiagonal (projected) matrix and the local three-term recurrence
    stay in :func:`solver_dtype`: the basis is then orthonormal to ~1e-7 and eigenvalues are
    accurate to about that relative level.

    Args:
        op_dtype: the operator's dtype.
        requested: None, or a floating dtype (name or dtype) of at least 32 bits.

    Raises:
        ValueError: a non-floating or 16-bit dtype, or float64 while jax's x64 flag is off.
    """
    if requested is None:
        return solver_dtype(op_dtype)
    try:
        dt = np.dtype(requested)
    except TypeError:
        raise ValueError(
            f"basis_dtype={requested!r} is not a dtype; use None, 'float32' or 'float64'."
        ) from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(
            f"basis_dtype={dt.name} must be 'float32' or 'float64' (fewer bits cannot hold an "
            "orthonormal basis)."
        )
    if dt == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "basis_dtype='float64' needs jax.config.update('jax_enable_x64', True); without "
            "x64 the basis is float32."
        )
    return dt


def _call_linear(v, linear):
    return linear(v)


def linearize(op: LinearOperator) -> LinearOperator:
    """The same operator with the work that does not depend on ``v`` done once, up front.

    ``op.apply(v, operand)`` is linear in ``v``, but its program usually also computes things
    that depend only on the operand: for a Hessian-vector product by forward-over-reverse,
    the loss's whole forward and backward pass at the parameters, redone at every product.
    ``jax.linearize`` of ``v -> op.apply(v, op.operand)`` evaluates that part once (in one
    compiled call) and keeps what the rest needs (activations, per-example derivatives) as
    arrays; the returned operator's matvec replays only the ``v``-dependent part, with the
    same floating-point operations, so the products are identical. On CPU this saves about
    a quarter of an HVP's time.

    Memory: the kept arrays become the new operator's ``operand``, typically a few times the
    activations of the whole dataset (all batches of a batched operator at once, so it
    undoes the memory bound of ``batch_size``); :func:`hessspec.linalg.memory.estimate_memory`
    counts them. Use it when many matvecs follow (Lanczos, SLQ) and memory allows.

    Args:
        op: a :class:`LinearOperator`.

    Returns:
        A :class:`LinearOperator` with the same ``dim``, ``dtype``, ``ravel``, ``unravel``.
    """

    @jax.jit
    def build(operand):
        zero = jnp.zeros((op.dim,), op.dtype)
        return jax.linearize(lambda v: op.apply(v, operand), zero)[1]

    linear = build(op.operand)
    return LinearOperator(
        apply=_call_linear,
        operand=linear,
        dim=op.dim,
        dtype=op.dtype,
        ravel=op.ravel,
        unravel=op.unravel,
        description=f"{op.description} (linearized)" if op.description else "linearized",
    )
