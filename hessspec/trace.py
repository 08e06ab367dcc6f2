"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (1989): for Rademacher ``z`` (i.i.d. +-1 entries) ``E[z^T A z] = tr(A)``; the mean
of ``N`` samples has variance ``2 (||A||_F^2 - sum_i A_ii^2) / N``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends ``s = m // 3`` matvecs on a sketch
``A S`` (``S`` Rademacher, ``n x s``), takes ``Q = qr(A S)`` (``n x s``, orthonormal), computes
``tr(Q^T A Q)`` exactly with ``s`` more matvecs, and estimates the trace of the deflated
remainder ``(I - Q Q^T) A (I - Q Q^T)`` by Hutchinson with the remaining ``g = m - 2s``
probes. Since ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))``, the estimate is
unbiased given ``Q``, and its variance involves only the Frobenius norm of the remainder:
for matrices with a few dominant eigenvalues (Hessians) it is far smaller than
Hutchinson's.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessspec.lanczos import DEFAULT_SEED, _check_finite, _device_of
from hessspec.linop import LinearOperator, as_operator, solver_dtype

__all__ = ["TraceEstimate", "trace"]


class TraceEstimate(NamedTuple):
    """Output of :func:`trace`.

    Attributes:
        value: the trace estimate.
        stderr: standard error ``std(samples, ddof=1) / sqrt(#samples)`` of the Hutchinson
            samples (for Hutch++, of the deflated remainder only: the exactly computed
            ``tr(Q^T A Q)`` part contributes no sampling error given ``Q``).
        num_matvecs: matvecs spent.
    """

    value: float
    stderr: float
    num_matvecs: int


def _matmat(apply, operand, rows, op_dtype, batch_size):
    """``A x_i`` for every row ``x_i`` of ``rows`` (``(b, n)``), in the rows' dtype."""

    def mv(x):
        return apply(x.astype(op_dtype), operand).astype(rows.dtype)

    if batch_size is None:
        return jax.vmap(mv)(rows)
    return jax.lax.map(mv, rows, batch_size=batch_size)


@partial(
    jax.jit,
    static_argnames=("apply", "dim", "num_sketch", "num_probes", "op_dtype", "batch_size"),
)
def _estimate(apply, operand, key, dim, num_sketch, num_probes, op_dtype, batch_size):
    """Hutch++ with ``num_sketch`` sketch columns (0: plain Hutchinson); returns
    ``(exact_part, samples (num_probes,))``."""
    sdt = solver_dtype(op_dtype)
    key_s, key_g = jax.random.split(key)
    probes = jax.random.rademacher(key_g, (num_probes, dim), dtype=sdt)
    if num_sketch == 0:
        exact = jnp.zeros((), sdt)
    else:
        sketch = jax.random.rademacher(key_s, (num_sketch, dim), dtype=sdt)
        q, _ = jnp.linalg.qr(_matmat(apply, operand, sketch, op_dtype, batch_size).T)
        qt = q.T  # (s, n) orthonormal rows
        exact = jnp.sum(qt * _matmat(apply, operand, qt, op_dtype, batch_size))
        probes = probes - (probes @ q) @ qt
    samples = jnp.sum(probes * _matmat(apply, operand, probes, op_dtype, batch_size), axis=1)
    return exact, samples


def trace(
    op: LinearOperator | Any,
    num_matvecs: int = 300,
    key: jax.Array | None = None,
    method: str = "hutch++",
    dim: int | None = None,
    batch_size: int | None = None,
    check_memory: bool | float = True,
) -> TraceEstimate:
    """Estimate ``tr(A)`` of a symmetric operator from matvecs.

    ``method="hutchinson"``: ``tr ~ mean_i z_i^T A z_i`` over ``m = num_matvecs`` Rademacher
    probes. ``method="hutch++"``: ``s = min(m // 3, dim)`` sketch matvecs, ``s`` for the exact
    ``tr(Q^T A Q)``, and ``g = m - 2s`` Hutchinson probes ``(I - QQ^T) z`` on the remainder
    (when ``s = dim`` the remainder is 0 and the answer exact: only ``2 dim + 2`` matvecs are
    spent and stderr is ~0).

    Args:
        op: :class:`~hessspec.linop.LinearOperator`, or a callable ``v -> A v`` with ``dim=``.
        num_matvecs: total matvec budget ``m``: at least 2 (Hutchinson) or 4 (Hutch++).
        key: PRNG key; ``None`` uses ``jax.random.key(0)``.
        method: ``"hutch++"`` or ``"hutchinson"``.
        dim: vector length when ``op`` is a plain callable.
        batch_size: matvecs run vmapped all together (``None``) or in ``lax.map`` chunks of
            this size, to bound memory for large models.
        check_memory: before starting, compare :func:`hessspec.memory.estimate_memory` of
            this call with :func:`hessspec.memory.available_memory` and raise
            ``MemoryError`` if it cannot fit. A number is used as the available bytes
            instead; False skips the check.

    Returns:
        :class:`TraceEstimate` ``(value, stderr, num_matvecs)``.

    Raises:
        ValueError: unknown method, or ``num_matvecs`` too small for a standard error.
        MemoryError: the memory estimate exceeds the available memory (``check_memory``).
        FloatingPointError: the matvec produced NaN/Inf.
    """
    op = as_operator(op, dim)
    n = op.dim
    m = int(num_matvecs)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"trace: method={method!r} must be 'hutch++' or 'hutchinson'.")
    if method == "hutchinson":
        if m < 2:
            raise ValueError(
                f"trace: num_matvecs={m} is too small for Hutchinson; it needs at least 2 "
                "probes for a standard error (use a few hundred for ~5% accuracy)."
            )
        num_sketch, num_probes = 0, m
    else:
        if m < 4:
            raise ValueError(
                f"trace: num_matvecs={m} is too small for Hutch++, which needs at least 4 "
                "(1 sketch, 1 projection, 2 probes); use a few hundred, or "
                "method='hutchinson'."
            )
        num_sketch = min(m // 3, n)
        num_probes = m - 2 * num_sketch
        if num_sketch == n:  # Q spans everything: the remainder is 0, 2 probes confirm it
            num_probes = 2
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"trace: batch_size={batch_size} must be a positive integer.")
    if check_memory is not False:
        from hessspec.memory import check_fits, estimate_memory

        check_fits(
            estimate_memory(op, num_matvecs=m, matvec_batch_size=batch_size, method=method),
            available=None if check_memory is True else float(check_memory),
            device=_device_of(op),
        )
    key = jax.random.key(DEFAULT_SEED) if key is None else key
    exact, samples = _estimate(
        op.apply,
        op.operand,
        key,
        n,
        num_sketch,
        num_probes,
        op.dtype,
        None if batch_size is None else int(batch_size),
    )
    exact = float(exact)
    samples = np.asarray(samples, dtype=np.float64)
    _check_finite(exact, samples)
    return TraceEstimate(
        value=exact + float(np.mean(samples)),
        stderr=float(np.std(samples, ddof=1) / np.sqrt(samples.size)),
        num_matvecs=2 * num_sketch + num_probes,
    )
