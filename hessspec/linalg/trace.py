"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (1989): for Rademacher ``z`` (i.i.d. +-1 entries) ``E[z^T A z] = tr(A)``; the mean
of ``N`` samples has variance ``2 (||A||_F^2 - sum_i A_ii^2) / N``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends ``s = m // 3`` matvecs on a sketch
``A S`` (``S`` Rademacher, ``n x s``), takes ``Q`` an orthonormal basis of its range (``n x s``,
here by Gram-Schmidt as each column arrives), computes
``tr(Q^T A Q)`` exactly with ``s`` more matvecs, and estimates the trace of the deflated
remainder ``(I - Q Q^T) A (I - Q Q^T)`` by Hutchinson with the remaining ``g = m - 2s``
probes. Since ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))``, the estimate is
unbiased given ``Q``, and its variance involves only the Frobenius norm of the remainder:
for matrices with a few dominant eigenvalues (Hessians) it is far smaller than
Hutchinson's.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import numpy as np

from hessspec.linalg.krylov import basis_rows
from hessspec.linalg.krylov_runner import KrylovRunner, check_finite
from hessspec.linalg.linop import LinearOperator, as_operator
from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype
from hessspec.linalg.memory import check_call

__all__ = ["TraceEstimate", "trace"]


class TraceEstimate(NamedTuple):
    """Output of :func:`trace`: Python numbers (host values, no arrays).

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


def trace(
    op: LinearOperator | Any,
    num_matvecs: int = 300,
    *,
    key: jax.Array | None = None,
    method: str = "hutch++",
    dim: int | None = None,
    basis_dtype: Any = None,
    check_memory: bool | float = True,
) -> TraceEstimate:
    """Estimate ``tr(A)`` of a symmetric operator from matvecs.

    ``method="hutchinson"``: ``tr ~ mean_i z_i^T A z_i`` over ``m = num_matvecs`` Rademacher
    probes. ``method="hutch++"``: ``s = min(m // 3, dim)`` sketch matvecs ``A z_i`` whose
    orthonormalization (Gram-Schmidt, twice) gives ``Q``; ``s`` more for the exact
    ``tr(Q^T A Q)``; and ``g = m - 2s`` Hutchinson probes ``(I - QQ^T) z`` on the remainder
    (when ``s = dim`` the remainder is 0 and the answer exact: only ``2 dim + 2`` matvecs are
    spent and stderr is ~0). ``Q`` lives in the rows of :mod:`hessspec.linalg.krylov`'s basis, and
    every matvec runs in its compiled engine: the same program as the Lanczos solvers on
    this operator, whatever ``num_matvecs``.

    Args:
        op: :class:`~hessspec.linalg.linop.LinearOperator`, or a callable ``v -> A v`` with
        ``dim=``.
        num_matvecs: total matvec budget ``m``: at least 2 (Hutchinson) or 4 (Hutch++).
        key: PRNG key; ``None`` uses ``jax.random.key(0)``.
        method: ``"hutch++"`` or ``"hutchinson"``.
        dim: vector length when ``op`` is a plain callable.
        basis_dtype: dtype in which ``Q`` is stored (see :func:`hessspec.top_eigenpairs`).
        check_memory: compare :func:`hessspec.linalg.memory.estimate_memory` with the memory
            available first and raise ``MemoryError`` if it cannot fit; a number is used as
            the available bytes; False skips the check.

    Returns:
        :class:`TraceEstimate` ``(value, stderr, num_matvecs)``.

    Raises:
        ValueError: unknown method, or ``num_matvecs`` too small for a standard error.
        MemoryError: the memory estimate exceeds the available memory (``check_memory``).
        FloatingPointError: the matvec produced NaN/Inf.
    """
    op = as_operator(op, dim)
    n = op.dim
    m = operator.index(num_matvecs)
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
    bdt = resolve_basis_dtype(op.dtype, basis_dtype)
    check_call(check_memory, op, num_matvecs=m, method=method, basis_dtype=bdt)
    rows = basis_rows(max(num_sketch, 1))
    runner = KrylovRunner(op, rows, basis_dtype=bdt, host=False, key=key)
    exact = 0.0
    if num_sketch:
        for i in range(num_sketch):
            runner.store_range(i, runner.rademacher())
        quad, _ = runner.row_stats(0, num_sketch, np.zeros(num_sketch))
        check_finite(quad)
        exact = float(np.sum(quad))
    samples = np.array(
        [
            runner.quadratic_form(runner.rademacher(), project_rows=num_sketch)
            for _ in range(num_probes)
        ]
    )
    check_finite(samples)
    return TraceEstimate(
        value=exact + float(np.mean(samples)),
        stderr=float(np.std(samples, ddof=1) / np.sqrt(samples.size)),
        num_matvecs=2 * num_sketch + num_probes,
    )
