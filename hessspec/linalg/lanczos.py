"""Lanczos: extreme eigenpairs by thick-restart Lanczos, and the plain tridiagonalization.

* :func:`top_eigenpairs` computes the ``k`` largest (or smallest) eigenpairs by thick-restart
  Lanczos with full reorthogonalization (Wu & Simon 2000). Convergence is judged pair by
  pair, as ARPACK does, and every returned pair carries its true residual, computed with a
  real matvec, and error bounds.
* :func:`lanczos_tridiag` is the plain iteration from a given vector: the basis and the
  tridiagonal ``T = V^T A V``.

Both run on :mod:`hessspec.linalg.krylov`'s compiled engine through a
:class:`~hessspec.linalg.krylov_runner.KrylovRunner`: one program per operator structure and
basis size, reused for every ``k``, ``which``, start vector, key, and for the operator of the
same loss at other parameters. The host decides, between compiled segments of steps, from
the small projected matrix: Ritz values by ``numpy.linalg.eigh``, convergence, restarts.

The thick-restart iteration of :func:`top_eigenpairs`, with ``m = num_steps``:

* **cycle** (:func:`_extend`): Lanczos steps extend an orthonormal basis ``V`` (up to ``m``
  rows); at checkpoints (after ``k + 2`` steps, then about every half again) the host forms
  the Rayleigh quotient ``T = V^T A V`` and its Ritz pairs ``(theta_i, V^T s_i)`` with the
  residual bounds ``||f|| |s_i[last]| + sum_r lost_r |s_i[r]|`` (``f`` the vector after the
  last step, ``lost_r`` what breakdowns and random continuations dropped). Pair ``i`` passes
  when its bound is at most ``max(tol |theta_i|, RESIDUAL_FLOOR * eps * ||A||_est)`` (``eps``
  of the operator's dtype, ``||A||_est`` the largest ``|theta|`` seen): relative to its own
  eigenvalue, so a large eigenvalue at the other end cannot hide unconverged pairs.
* **restart** (:func:`_restart`): a cycle that fills ``m`` rows first keeps the best
  ``p = k + (m - k) // 2`` Ritz vectors and continues from ``f / ||f||`` (from a random
  vector orthogonal to the basis after a breakdown), so nothing learned about the wanted
  pairs is discarded. After ``max_restarts`` restarts the pairs still short of their
  threshold are named in a :class:`LanczosConvergenceWarning` and flagged in ``converged``.
* **verify** (:func:`_verify`): when every wanted bound passes, the ``k`` Ritz vectors replace
  the basis and their true residuals ``||A y_i - theta_i y_i||`` are computed with ``k`` real
  matvecs; they must pass the same test. A single start vector sees one direction per
  eigenspace, so with ``verify=True`` a converged answer is then checked by continuing from a
  random vector orthogonal to it: if that reveals eigenvalues the first start vector missed
  (a second copy of a degenerate outlier) the iteration goes on, otherwise the pairs are
  returned (about as many extra matvecs as the first convergence took).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from hessspec.linalg.krylov import basis_rows, breakdown_tolerance, check_basis_memory
from hessspec.linalg.krylov_runner import KrylovRunner, check_finite
from hessspec.linalg.linop import LinearOperator, as_operator, solver_dtype
from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype
from hessspec.linalg.memory import check_call

__all__ = [
    "EigenResult",
    "LanczosConvergenceWarning",
    "LanczosResult",
    "breakdown_tolerance",
    "default_tolerance",
    "lanczos_tridiag",
    "top_eigenpairs",
]

RESIDUAL_FLOOR = 100.0
"""A pair converges when ``||A v - theta v|| <= max(tol |theta|, RESIDUAL_FLOOR * eps *
||A||_est)``, ``eps`` the operator dtype's: near ``theta = 0`` a relative test cannot be met
(ARPACK uses a floor for the same reason); the floor is what rounding in the matvec allows."""


class LanczosConvergenceWarning(RuntimeWarning):
    """Some eigenpairs did not reach the requested residual tolerance within the budget."""


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos_tridiag` (``m = num_steps``, ``n = dim``), NumPy arrays.

    Attributes:
        basis: ``(m, n)`` orthonormal Krylov basis, rows ``v_0, ..., v_{m-1}`` (the basis
            dtype: float64 where x64 is on, unless ``basis_dtype="float32"``).
            Rows from ``num_steps_done`` on are zero.
        alphas: ``(m,)`` diagonal of ``T = V^T A V``; zero from ``num_steps_done`` on.
        betas: ``(m - 1,)`` off-diagonal of ``T``; ``betas[j]`` couples ``v_j`` and
            ``v_{j+1}``. Zero from ``num_steps_done - 1`` on.
        num_steps_done: number of valid steps ``d <= m``. ``d < m`` means the Krylov space
            became invariant to within the matvec's resolution (``beta_{d-1} <=
            breakdown_tolerance * max ||A v_i||``): ``T[:d, :d]`` holds eigenvalues of ``A``.
    """

    basis: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    num_steps_done: int


class EigenResult(NamedTuple):
    """Output of :func:`top_eigenpairs`; every field a NumPy array (float64) or an int.

    Attributes:
        values: ``(k,)`` eigenvalues; largest first for ``which="largest"`` (algebraic),
            most negative first for ``which="smallest"``.
        vectors: ``(k, dim)`` orthonormal eigenvectors as rows.
        residuals: ``(k,)`` ``||A v_i - lambda_i v_i||``, computed with real matvecs on the
            returned vectors.
        converged: ``(k,)`` bool, ``residuals <= max(tol |values|, floor)`` (see
            :func:`top_eigenpairs`).
        error_bounds: ``(k,)`` bounds on ``|lambda - value|`` for the nearest true
            eigenvalue ``lambda``: ``min(||r||, ||r||^2 / gap)``, ``gap`` the distance to the
            nearest other Ritz value less ``||r||`` (the second bound only where that is
            positive).
        num_matvecs: total matvecs spent (Lanczos steps plus residual checks).
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    error_bounds: np.ndarray
    num_matvecs: int


def default_tolerance(op_dtype) -> float:
    """Default relative residual tolerance of :func:`top_eigenpairs` for an operator dtype.

    ``1e-6`` for float64 operators, ``1e-3`` for float32, ``1e-2`` for 16-bit: rounding in
    the matvec, not the float64 solver, is the floor on attainable residuals.
    """
    bits = np.dtype(op_dtype).itemsize * 8
    if bits >= 64:
        return 1e-6
    if bits >= 32:
        return 1e-3
    return 1e-2


class _Ritz(NamedTuple):
    """Ritz pairs of the projected matrix after ``steps`` rows (host arrays, float64).

    Attributes:
        theta: ``(steps,)`` Ritz values, ascending.
        s: ``(steps, steps)`` eigenvectors of ``T`` as columns (the Ritz vectors are
            ``V^T s[:, i]``).
        order: ``(steps,)`` indices into ``theta``, the wanted end first.
        estimates: ``(k,)`` residual bounds of the wanted pairs.
        thresholds: ``(k,)`` what each wanted pair's residual must reach.
        f_norm: ``||f||``, the norm of the vector after the last step.
        lost: ``(steps,)`` residual parts outside the basis, per row.
        floor: the absolute residual floor, ``RESIDUAL_FLOOR * eps * ||A||_est`` with the
            largest ``|theta|`` seen so far.
    """

    theta: np.ndarray
    s: np.ndarray
    order: np.ndarray
    estimates: np.ndarray
    thresholds: np.ndarray
    f_norm: float
    lost: np.ndarray
    floor: float

    @property
    def passed(self) -> bool:
        """Every wanted pair's residual bound is below its threshold."""
        return bool(np.all(self.estimates <= self.thresholds))


class _Plan(NamedTuple):
    """The validated options of one :func:`top_eigenpairs` call.

    Attributes:
        k: pairs wanted.
        m: the longest cycle (basis rows used).
        keep: Ritz vectors a restart keeps, ``p = k + (m - k) // 2`` (at most ``m - 1``).
        largest: the largest end (else the smallest).
        tol: relative residual tolerance.
        max_restarts: restart budget.
        verify: check a converged answer from a random vector (only where ``m < dim``).
    """

    k: int
    m: int
    keep: int
    largest: bool
    tol: float
    max_restarts: int
    verify: bool


class _Search(NamedTuple):
    """Where the host loop of :func:`top_eigenpairs` stands between engine calls.

    Attributes:
        front: basis rows filled (the Krylov front).
        start: how the next segment starts: None continues from row ``front``;
            ``"random"``, ``"residual"`` or an ``(n,)`` vector is placed at row ``front``.
        restarts: thick restarts done.
        num_matvecs: matvecs spent.
        floor: the absolute residual floor so far (grows with ``||A||_est``).
        pending: a converged answer awaiting verification, or None.
    """

    front: int
    start: Any
    restarts: int
    num_matvecs: int
    floor: float
    pending: EigenResult | None


def _projected_matrix(coef: np.ndarray, steps: int) -> np.ndarray:
    """``V^T A V`` over rows ``0..steps-1`` from the row-wise coefficients (lower triangle)."""
    t = np.tril(coef[:steps, :steps])
    return t + np.tril(t, -1).T


def _ritz(runner: KrylovRunner, steps: int, plan: _Plan, floor: float) -> _Ritz:
    """Ritz pairs, residual bounds and per-pair thresholds after ``steps`` rows; the absolute
    residual ``floor`` so far is raised to what this ``||A||_est`` allows (see
    :data:`RESIDUAL_FLOOR`)."""
    proj = runner.projected()
    check_finite(proj.coef[:steps, : steps + 1], proj.residual_norm)
    theta, s = np.linalg.eigh(_projected_matrix(proj.coef, steps))
    order = np.arange(steps)[::-1] if plan.largest else np.arange(steps)
    want = order[: plan.k]
    floor = max(floor, RESIDUAL_FLOOR * np.finfo(runner.op.dtype).eps * np.max(np.abs(theta)))
    lost = proj.lost[:steps]
    estimates = proj.residual_norm * np.abs(s[steps - 1, want]) + lost @ np.abs(s[:, want])
    thresholds = np.maximum(plan.tol * np.abs(theta[want]), floor)
    return _Ritz(theta, s, order, estimates, thresholds, proj.residual_norm, lost, floor)


def _kept_lost(ritz: _Ritz, columns: np.ndarray, random_next: bool) -> np.ndarray:
    """Residual parts outside the basis of Ritz vectors kept by a restart: the injected
    vectors' dropped norms, plus ``f``'s part when the continuation is not ``f``."""
    s = ritz.s[:, columns]
    lost = ritz.lost @ np.abs(s)
    if random_next:
        lost = lost + ritz.f_norm * np.abs(s[-1])
    return lost


def _error_bounds(theta_all: np.ndarray, want: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """``min(||r||, ||r||^2 / gap)`` with ``gap`` the distance from each wanted Ritz value to
    the nearest other one, less ``||r||`` (Kato-Temple; the gap bound where it is positive)."""
    bounds = residuals.copy()
    for i, idx in enumerate(want):
        others = np.delete(theta_all, idx)
        if others.size == 0:
            continue
        gap = float(np.min(np.abs(others - theta_all[idx]))) - residuals[i]
        if gap > 0:
            bounds[i] = min(residuals[i], residuals[i] ** 2 / gap)
    return bounds


def _check_pairs(
    runner: KrylovRunner, ritz: _Ritz, k: int, *, random_next: bool, num_matvecs: int
) -> EigenResult:
    """Restart keeping the ``k`` wanted Ritz vectors (rows ``0..k-1``), continued by ``f`` or
    a random vector, and measure their true residuals (``k`` matvecs, counted in
    ``num_matvecs``): the :class:`EigenResult` they make."""
    want = ritz.order[:k]
    values = ritz.theta[want]
    runner.restart(ritz.s[:, want], values, k, lost=_kept_lost(ritz, want, random_next))
    residuals = runner.row_stats(0, k, values).misfit
    check_finite(residuals)
    return EigenResult(
        values=np.asarray(values, np.float64),
        vectors=runner.rows_on_host(k),
        residuals=residuals,
        converged=residuals <= ritz.thresholds,
        error_bounds=_error_bounds(ritz.theta, want, residuals),
        num_matvecs=int(num_matvecs),
    )


def _extend(runner: KrylovRunner, search: _Search, plan: _Plan) -> tuple[_Search, _Ritz]:
    """Cycle: Lanczos steps up to the next checkpoint (``k + 2`` rows, then about half as many
    again, at most ``m``), then the Ritz pairs of the basis."""
    front = search.front
    stop = min(plan.m, max(front + max(4, front // 2), plan.k + 2))
    runner.lanczos(front, stop, stop_at_breakdown=False, start=search.start)
    ritz = _ritz(runner, stop, plan, search.floor)
    num_matvecs = search.num_matvecs + stop - front
    return search._replace(front=stop, start=None, num_matvecs=num_matvecs, floor=ritz.floor), ritz


def _restart(runner: KrylovRunner, search: _Search, ritz: _Ritz, plan: _Plan) -> _Search:
    """Restart: keep the best ``p`` Ritz vectors and continue from ``f / ||f||``, or from a
    random vector where ``f`` vanished (a breakdown)."""
    keep = ritz.order[: plan.keep]
    random_next = not ritz.f_norm > runner.breakdown_tol * float(runner.state.scale)
    lost = _kept_lost(ritz, keep, random_next)
    runner.restart(ritz.s[:, keep], ritz.theta[keep], plan.keep, lost=lost)
    return search._replace(
        front=plan.keep,
        start="random" if random_next else "residual",
        restarts=search.restarts + 1,
    )


def _verify(
    runner: KrylovRunner, search: _Search, ritz: _Ritz, plan: _Plan
) -> tuple[_Search, EigenResult | None]:
    """Verify: every wanted bound passed. Measure the true residuals of the Ritz pairs; a
    first converged answer is held (``pending``) while the iteration continues from a random
    vector; the answer that comes back with the same values confirms it. Returns the search
    and the answer, or None to go on."""
    pending = search.pending
    values = ritz.theta[ritz.order[: plan.k]]
    verified = pending is not None and bool(
        np.all(np.abs(values - pending.values) <= ritz.thresholds)
    )
    if pending is not None and not verified:
        pending = None  # the random direction found something new: start over
    random_next = plan.verify and pending is None
    num_matvecs = search.num_matvecs + plan.k
    result = _check_pairs(runner, ritz, plan.k, random_next=random_next, num_matvecs=num_matvecs)
    search = search._replace(
        front=plan.k,
        start="random" if random_next else "residual",
        num_matvecs=num_matvecs,
        pending=pending,
    )
    if verified:
        confirmed = result if result.converged.all() else pending
        return search, confirmed._replace(num_matvecs=num_matvecs)
    if result.converged.all():
        if not plan.verify:
            return search, result
        search = search._replace(pending=result)
    return search, None


def _thick_restart_lanczos(runner: KrylovRunner, plan: _Plan, start, bar) -> EigenResult:
    """The host loop of :func:`top_eigenpairs` on a fresh ``runner`` (see the module
    docstring): cycles, restarts when a cycle fills the basis, verification when every
    wanted pair passes. ``start`` is the start vector or ``"random"``."""
    search = _Search(front=0, start=start, restarts=0, num_matvecs=0, floor=0.0, pending=None)
    while True:
        search, ritz = _extend(runner, search, plan)
        num_passed = int(np.sum(ritz.estimates <= ritz.thresholds))
        bar.set_postfix(converged=num_passed, matvecs=search.num_matvecs)
        if ritz.passed:
            search, answer = _verify(runner, search, ritz, plan)
            if answer is not None:
                return answer
        elif search.front == plan.m:
            if search.restarts == plan.max_restarts:
                break
            search = _restart(runner, search, ritz, plan)
            bar.update(1)
    if search.pending is not None:  # the budget ended during verification: that converged
        return search.pending._replace(num_matvecs=search.num_matvecs)
    num_matvecs = search.num_matvecs + plan.k
    result = _check_pairs(runner, ritz, plan.k, random_next=False, num_matvecs=num_matvecs)
    _warn_unconverged(result, plan)
    return result


def _check_k_and_steps(k, num_steps, n) -> tuple[int, int]:
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"top_eigenpairs: k={k} must be at least 1.")
    if k > n:
        raise ValueError(f"top_eigenpairs: k={k} exceeds the operator's dim={n}; use k <= {n}.")
    default = min(n, basis_rows(max(2 * k + 20, 3 * k)))
    m = default if num_steps is None else operator.index(num_steps)
    if m > n:
        raise ValueError(
            f"top_eigenpairs: num_steps={m} exceeds dim={n}; a Krylov basis has at most dim "
            f"vectors, use num_steps <= {n}."
        )
    if m < k or (m == k and m < n):
        raise ValueError(
            f"top_eigenpairs: num_steps={m} must exceed k={k} (restarts keep k Ritz vectors "
            f"and need room for new ones); use num_steps >= {min(n, k + 1)}, e.g. {default}."
        )
    return k, m


def _plan(op: LinearOperator, k, num_steps, which, tol, max_restarts, verify) -> _Plan:
    """Validate the options of :func:`top_eigenpairs` (one line naming the problem each)."""
    k, m = _check_k_and_steps(k, num_steps, op.dim)
    if which not in ("largest", "smallest"):
        raise ValueError(f"top_eigenpairs: which={which!r} must be 'largest' or 'smallest'.")
    tol = default_tolerance(op.dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"top_eigenpairs: tol={tol} must be positive.")
    max_restarts = operator.index(max_restarts)
    if max_restarts < 0:
        raise ValueError(f"top_eigenpairs: max_restarts={max_restarts} must be >= 0.")
    return _Plan(
        k=k,
        m=m,
        keep=min(m - 1, k + (m - k) // 2),
        largest=which == "largest",
        tol=tol,
        max_restarts=max_restarts,
        verify=bool(verify) and m < op.dim,
    )


def _start_vector(start_vector, n: int, sdt):
    """A given start vector ``(n,)``, or several ``(r, n)`` summed (e.g. the previous
    checkpoint's eigenvectors), as an array of the solver dtype; None stays None."""
    if start_vector is None:
        return None
    v = np.asarray(start_vector, dtype=np.float64)
    if v.ndim == 2 and v.shape[1] == n:
        v = v.sum(axis=0)
    if v.shape != (n,):
        raise ValueError(
            f"top_eigenpairs: start_vector must have shape ({n},) or (r, {n}), got "
            f"{np.shape(start_vector)}."
        )
    if not np.all(np.isfinite(v)) or not np.any(v):
        raise ValueError("top_eigenpairs: start_vector must be finite and nonzero.")
    return v.astype(sdt)


def top_eigenpairs(
    op: LinearOperator | Any,
    k: int,
    *,
    num_steps: int | None = None,
    key: jax.Array | None = None,
    which: str = "largest",
    tol: float | None = None,
    max_restarts: int = 50,
    start_vector: Any = None,
    verify: bool = True,
    progress: bool = False,
    basis_dtype: Any = None,
    basis_memory: str = "device",
    check_memory: bool | float = True,
    dim: int | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator, by thick-restart
    Lanczos with full reorthogonalization (cycles, restarts and verification as the module
    docstring describes).

    Pair ``i`` converges when ``||A v_i - lambda_i v_i|| <= max(tol |lambda_i|, floor)``,
    ``floor = RESIDUAL_FLOOR * eps * ||A||_est``, checked on the returned vectors with real
    matvecs. Compilation: the program depends on the operator's structure and ``M =
    basis_rows(m)`` (128 rows for every ``m <= 128``), not on ``k``, ``which``, ``key`` or
    the operator's values, so later calls on the same or a same-structure operator compile
    nothing.

    Args:
        op: :class:`~hessspec.linalg.linop.LinearOperator`, or a callable ``v -> A v`` with
            ``dim=``. ``A`` must be symmetric.
        k: number of eigenpairs, ``1 <= k <= dim``.
        num_steps: the longest cycle ``m``, ``k < m <= dim`` (``m = k`` only when ``k = dim``).
            Default: ``basis_rows(max(2k + 20, 3k))`` (128 for ``k <= 54``), capped at dim.
            Memory is about ``2 M dim`` numbers at the peak (basis and a restart's copy).
        key: PRNG key for the start vector and random vectors; ``None`` uses
            ``jax.random.key(0)`` (reproducible).
        which: ``"largest"`` (algebraically largest first) or ``"smallest"`` (most negative
            first).
        tol: relative residual tolerance. Default :func:`default_tolerance` of the operator's
            dtype (``1e-6`` float64, ``1e-3`` float32).
        max_restarts: restart budget (cycles = ``max_restarts + 1``).
        start_vector: ``(dim,)`` vector to start from, or ``(r, dim)`` rows summed (the
            previous checkpoint's eigenvectors: a warm start converges in a few steps);
            default a random vector.
        verify: check a converged answer from a random vector (skip it for warm-started
            tracking).
        progress: show a tqdm bar over cycles.
        basis_dtype: dtype of the stored basis: None (the solver dtype, float64 when x64 is
            on) or ``"float32"`` (half the memory; eigenvalues then carry relative errors of
            ~1e-7 and ``tol`` should not go below ~1e-5). Returned vectors are float64 arrays
            holding the stored rows.
        basis_memory: ``"device"`` or ``"host"``: keep the basis in host memory (JAX's
            ``pinned_host``), streamed block by block to the device for each Gram-Schmidt
            pass. Same numbers either way.
        check_memory: compare :func:`hessspec.linalg.memory.estimate_memory` of this call with
            :func:`hessspec.linalg.memory.available_memory` first and raise ``MemoryError`` if it
            cannot fit; a number is used as the available bytes; False skips the check.
        dim: vector length when ``op`` is a plain callable.

    Returns:
        :class:`EigenResult` (NumPy arrays).

    Raises:
        ValueError: bad ``k``, ``num_steps``, ``which``, ``tol``, ``max_restarts``,
            ``start_vector`` or ``basis_dtype``.
        MemoryError: the memory estimate exceeds the available memory (``check_memory``).
        FloatingPointError: the matvec produced NaN/Inf.

    Warns:
        LanczosConvergenceWarning: pairs that missed their threshold, by index, value and
            residual.
    """
    from tqdm.auto import tqdm

    op = as_operator(op, dim)
    plan = _plan(op, k, num_steps, which, tol, max_restarts, verify)
    start = _start_vector(start_vector, op.dim, solver_dtype(op.dtype))
    bdt = resolve_basis_dtype(op.dtype, basis_dtype)
    host = check_basis_memory(basis_memory, "top_eigenpairs")
    check_call(
        check_memory, op, num_steps=plan.m, k=plan.k, basis_dtype=bdt, basis_memory=basis_memory
    )
    runner = KrylovRunner(op, basis_rows(plan.m), basis_dtype=bdt, host=host, key=key)
    bar = tqdm(total=plan.max_restarts + 1, desc="lanczos", disable=not progress, leave=False)
    with bar:
        return _thick_restart_lanczos(runner, plan, "random" if start is None else start, bar)


def _warn_unconverged(result: EigenResult, plan: _Plan) -> None:
    bad = np.flatnonzero(~result.converged)
    if not bad.size:
        return
    pairs = ", ".join(
        f"(index {i}, value {result.values[i]:.6g}, residual {result.residuals[i]:.3g}, "
        f"error bound {result.error_bounds[i]:.3g})"
        for i in bad
    )
    warnings.warn(
        LanczosConvergenceWarning(
            f"top_eigenpairs: {bad.size} of {plan.k} eigenpairs did not converge to "
            f"||A v - lambda v|| <= max({plan.tol:.3g} |lambda|, floor) after "
            f"{plan.max_restarts + 1} cycles and {result.num_matvecs} matvecs: pairs {pairs}. "
            "Increase num_steps or max_restarts, or loosen tol."
        ),
        stacklevel=3,
    )


def lanczos_tridiag(
    op: LinearOperator | Any,
    v0: Any,
    num_steps: int,
    *,
    dim: int | None = None,
    basis_dtype: Any = None,
    basis_memory: str = "device",
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization, on the compiled engine.

    Builds ``V`` (``(m, n)``, orthonormal rows) and ``T = V^T A V`` tridiagonal, with
    ``v_0 = v0 / ||v0||`` and, for ``j = 0..m-1``::

        w = A v_j;  w <- w - beta_{j-1} v_{j-1};  alpha_j = <v_j, w>;  w <- w - alpha_j v_j;
        w <- w - V^T (V w)  (again where a pass shrinks w below 0.7 of its norm);
        beta_j = ||w||;  v_{j+1} = w / beta_j.

    Stops cleanly at breakdown (``beta_j <= breakdown_tolerance(dtype) * max ||A v_i||``):
    later alphas, betas and basis rows are zero and ``num_steps_done`` says how many steps are
    valid. A zero ``v0`` gives ``num_steps_done = 0``.

    Args:
        op: :class:`~hessspec.linalg.linop.LinearOperator`, or a callable ``v -> A v`` with
        ``dim=``.
        v0: ``(n,)`` start vector (any scale).
        num_steps: ``m``, ``1 <= m <= n``.
        dim: vector length when ``op`` is a plain callable.
        basis_dtype: dtype of the stored basis (see :func:`hessspec.linalg.linop.basis_dtype`).
        basis_memory: ``"device"`` or ``"host"``.

    Returns:
        :class:`LanczosResult` (NumPy arrays).
    """
    op = as_operator(op, dim)
    n = op.dim
    v0 = np.asarray(v0)
    if v0.shape != (n,):
        raise ValueError(
            f"lanczos_tridiag: v0 must be a flat vector of shape ({n},), got shape {v0.shape}."
        )
    m = operator.index(num_steps)
    if not 1 <= m <= n:
        raise ValueError(
            f"lanczos_tridiag: num_steps={m} must be in [1, dim={n}]; a Krylov space has at "
            "most dim dimensions, so use num_steps <= dim."
        )
    bdt = resolve_basis_dtype(op.dtype, basis_dtype)
    host = check_basis_memory(basis_memory, "lanczos_tridiag")
    if not np.any(v0):
        return LanczosResult(np.zeros((m, n), bdt), np.zeros(m), np.zeros(m - 1), 0)
    runner = KrylovRunner(op, basis_rows(m), basis_dtype=bdt, host=host, key=None)
    runner.lanczos(0, m, stop_at_breakdown=True, start=v0.astype(solver_dtype(op.dtype)))
    coef, _, _, done = runner.projected()
    check_finite(coef)
    alphas = np.diagonal(coef)[:m].copy()
    betas = np.diagonal(coef, 1)[: m - 1].copy()
    alphas[done:] = 0
    betas[max(done - 1, 0) :] = 0
    basis = np.zeros((m, n), bdt)
    basis[:done] = runner.rows_on_host(done, bdt)
    return LanczosResult(basis, alphas, betas, done)
