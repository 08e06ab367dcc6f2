"""Lanczos with full reorthogonalization: the tridiagonal, and extreme eigenpairs.

Two layers:

* :func:`lanczos_tridiag` is the plain iteration. From a start vector ``v_0`` it builds an
  orthonormal Krylov basis ``V = [v_0, ..., v_{m-1}]`` of ``K_m(A, v_0)`` and the symmetric
  tridiagonal ``T_m = V^T A V`` (diagonal ``alphas``, off-diagonal ``betas``), in one compiled
  ``lax.while_loop``. Every new vector is orthogonalized against the whole stored basis by
  classical Gram-Schmidt, twice ("twice is enough", Giraud et al. 2005), so the basis stays
  orthonormal to working precision and no spurious copies of converged eigenvalues appear.
  Used by stochastic Lanczos quadrature (:mod:`hessspec.density`).
* :func:`top_eigenpairs` computes the ``k`` largest (or smallest) eigenpairs by thick-restart
  Lanczos (Wu & Simon 2000) on top of the same compiled step loop, with convergence judged
  by residual norms ``||A v - lambda v||`` computed with real matvecs.

Precision: the basis, the reorthogonalization and the projected matrix live in
:func:`hessspec.linop.solver_dtype` of the operator's dtype -- float64 whenever jax's x64 flag
is on, even for a float32 operator (each vector is cast to the operator's dtype for the matvec
and the product cast back). The flag itself is never changed.

Compilation: the loops are jitted with the operator's ``apply`` function static and its
``operand`` (parameters, data) traced, so a second call on the same operator, with any key,
reuses the compiled program.
"""

from __future__ import annotations

import operator
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hessspec.linop import LinearOperator, as_operator, solver_dtype

__all__ = [
    "EigenResult",
    "LanczosConvergenceWarning",
    "LanczosResult",
    "breakdown_tolerance",
    "default_tolerance",
    "lanczos_tridiag",
    "top_eigenpairs",
]

DEFAULT_SEED = 0
"""Seed of the key used when ``key=None``: ``jax.random.key(0)`` (results are reproducible)."""


class LanczosConvergenceWarning(RuntimeWarning):
    """Some eigenpairs did not reach the requested residual tolerance within the budget."""


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos_tridiag` (``m = num_steps``, ``n = dim``).

    Attributes:
        basis: ``(m, n)`` orthonormal Krylov basis, rows ``v_0, ..., v_{m-1}`` (solver dtype).
            Rows from ``num_steps_done`` on are zero.
        alphas: ``(m,)`` diagonal of ``T = V^T A V``; zero from ``num_steps_done`` on.
        betas: ``(m - 1,)`` off-diagonal of ``T``; ``betas[j]`` couples ``v_j`` and
            ``v_{j+1}``. Zero from ``num_steps_done - 1`` on.
        num_steps_done: number of valid steps ``d <= m``. ``d < m`` means the Krylov space
            became invariant (``beta_{d-1} <= breakdown_tolerance * ||A||``): ``T[:d, :d]``
            then holds eigenvalues of ``A`` exactly and the iteration stopped cleanly.
    """

    basis: jax.Array
    alphas: jax.Array
    betas: jax.Array
    num_steps_done: jax.Array


class EigenResult(NamedTuple):
    """Output of :func:`top_eigenpairs`.

    Attributes:
        values: ``(k,)`` eigenvalues; largest first for ``which="largest"`` (algebraic),
            most negative first for ``which="smallest"``.
        vectors: ``(k, dim)`` orthonormal eigenvectors as rows (solver dtype: float64 when
            x64 is on).
        residuals: ``(k,)`` residual norms ``||A v_i - lambda_i v_i||``, computed with real
            matvecs on the returned vectors.
        converged: ``(k,)`` bool, ``residuals <= tol * ||A||_est`` with ``||A||_est`` the
            largest ``|Ritz value|`` seen.
        num_matvecs: total number of matvecs spent (Lanczos steps plus residual checks).
    """

    values: np.ndarray
    vectors: jax.Array
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int


def breakdown_tolerance(op_dtype) -> float:
    """Relative threshold under which a Lanczos ``beta`` counts as zero (invariant subspace).

    ``beta_j <= 100 * eps(op_dtype) * max_i ||A v_i||``: the precision of the *matvec* bounds
    how small a genuine ``beta`` can be told apart from rounding, so the operator's dtype (not
    the solver's) sets it. Missing a breakdown is harmless (the next vector is then a
    noise direction orthogonal to the basis, coupled by a ~0 ``beta``).
    """
    return 100.0 * float(jnp.finfo(op_dtype).eps)


def default_tolerance(op_dtype) -> float:
    """Default relative residual tolerance of :func:`top_eigenpairs` for an operator dtype.

    ``1e-6`` for float64 operators, ``1e-3`` for float32, ``1e-2`` for 16-bit. It is set by
    the operator's dtype because rounding in the matvec, not the float64 solver, is the floor
    on attainable residuals: a float32 Hessian-vector product carries relative errors of
    ~1e-7..1e-5, so a 1e-6 target would often be unreachable.
    """
    bits = np.dtype(op_dtype).itemsize * 8
    if bits >= 64:
        return 1e-6
    if bits >= 32:
        return 1e-3
    return 1e-2


def _default_key(key):
    return jax.random.key(DEFAULT_SEED) if key is None else key


def _orthogonalize(basis: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classical Gram-Schmidt twice: ``w - V^T (V w)`` applied two times.

    Args:
        basis: ``(m, n)`` rows orthonormal (unused rows zero).
        w: ``(n,)`` vector.

    Returns:
        The orthogonalized ``(n,)`` vector and the ``(m,)`` total coefficients ``c1 + c2``
        (``= V w`` up to rounding, more accurate than one pass).
    """
    c1 = basis @ w
    w = w - c1 @ basis
    c2 = basis @ w
    w = w - c2 @ basis
    return w, c1 + c2


def _krylov_steps(
    apply,
    operand,
    basis,
    proj,
    start,
    noise,
    stopped,
    *,
    op_dtype,
    breakdown_tol,
    restart,
    early_exit,
):
    """Run Lanczos steps ``j = start, ..., m-1`` with full reorthogonalization (traceable).

    State on entry: rows ``0..start`` of ``basis`` (``(m, n)``) are orthonormal, row ``start``
    is the next vector to expand, later rows are zero; columns ``< start`` of ``proj``
    (``(m, m)``) are filled. Step ``j`` sets ``proj[:j+1, j] = V A v_j`` (Gram-Schmidt
    coefficients) and ``proj[j+1, j] = beta_j = ||w_j||``, so ``triu(proj)`` is the upper
    triangle of the Rayleigh quotient ``V^T A V`` and the diagonal/subdiagonal are the
    Lanczos ``alphas``/``betas``.

    Breakdown (``beta_j <= breakdown_tol * max_i ||A v_i||``): with ``restart=False`` the
    iteration stops (later rows/columns stay zero); with ``restart=True`` it continues from a
    fresh random vector orthogonal to the basis, coupled by ``beta_j = 0`` (this is how
    degenerate eigenvalues beyond the start vector's Krylov space are reached). The fresh
    vector at step ``j`` is the Gaussian ``noise`` (``(n,)``) cyclically shifted by ``j + 1``:
    distinct shifts give linearly independent generic vectors, without a PRNG inside the
    compiled loop.

    ``early_exit=True`` runs a ``lax.while_loop`` that stops at breakdown (no wasted
    matvecs); ``early_exit=False`` a fixed-trip ``lax.fori_loop`` whose steps after breakdown
    are masked out. Use the latter under ``vmap``: a batched ``while_loop`` selects the whole
    ``(m, n)`` state every step, the fixed loop only row-sized pieces.

    Returns:
        ``(steps_done, basis, proj, f, f_norm, scale)``: ``f`` is the residual vector
        ``beta_{m-1} v_m`` after the last step (zero on breakdown), ``scale`` the largest
        ``||A v_j||`` seen (a lower bound on ``||A||``).
    """
    m, n = basis.shape
    sdt = basis.dtype
    zero = jnp.zeros((), sdt)

    def step(j, state):
        done, basis, proj, f, f_norm, scale, stop = state
        active = ~stop
        w = apply(basis[j].astype(op_dtype), operand).astype(sdt)
        scale = jnp.where(active, jnp.maximum(scale, jnp.linalg.norm(w)), scale)
        w, coeffs = _orthogonalize(basis, w)
        proj = proj.at[:, j].set(jnp.where(active, coeffs, proj[:, j]))
        beta = jnp.linalg.norm(w)
        broken = beta <= breakdown_tol * scale  # False for NaN: surfaces in the host check
        last = j == m - 1
        nxt = jnp.minimum(j + 1, m - 1)
        safe_beta = jnp.where(broken, jnp.ones((), sdt), beta)
        if restart:

            def fresh(_):
                r, _ = _orthogonalize(basis, jnp.roll(noise, j + 1))
                return r / jnp.linalg.norm(r), zero

            def extend(_):
                return w / safe_beta, beta

            v_next, sub = jax.lax.cond(broken & ~last, fresh, extend, None)
            new_stop = stop
        else:
            v_next = jnp.where(broken, zero, w / safe_beta)
            sub = jnp.where(broken, zero, beta)
            new_stop = stop | broken
        write = active & ~last
        basis = basis.at[nxt].set(jnp.where(write, v_next, basis[nxt]))
        proj = proj.at[nxt, j].set(jnp.where(write, sub, proj[nxt, j]))
        f = jnp.where(active & last & ~broken, w, f)
        f_norm = jnp.where(active & last, jnp.where(broken, zero, beta), f_norm)
        done = done + active.astype(done.dtype)
        return done, basis, proj, f, f_norm, scale, new_stop

    start = jnp.asarray(start, jnp.int32)
    init = (start, basis, proj, jnp.zeros((n,), sdt), zero, zero, jnp.asarray(stopped))
    if early_exit:

        def cond(carry):
            j, state = carry
            return (j < m) & ~state[-1]

        def body(carry):
            j, state = carry
            return j + 1, step(j, state)

        _, state = jax.lax.while_loop(cond, body, (start, init))
    else:
        state = jax.lax.fori_loop(start, m, step, init)
    done, basis, proj, f, f_norm, scale, _ = state
    return done, basis, proj, f, f_norm, scale


def _tridiag_core(apply, operand, v0, num_steps, op_dtype, early_exit=True):
    """Traceable body of :func:`lanczos_tridiag`; SLQ vmaps it with ``early_exit=False``."""
    sdt = solver_dtype(op_dtype)
    (n,) = v0.shape
    v0 = v0.astype(sdt)
    norm = jnp.linalg.norm(v0)
    ok = norm > 0
    basis = jnp.zeros((num_steps, n), sdt).at[0].set(v0 / jnp.where(ok, norm, 1))
    proj = jnp.zeros((num_steps, num_steps), sdt)
    done, basis, proj, *_ = _krylov_steps(
        apply,
        operand,
        basis,
        proj,
        0,
        jnp.zeros((n,), sdt),
        ~ok,
        op_dtype=op_dtype,
        breakdown_tol=breakdown_tolerance(op_dtype),
        restart=False,
        early_exit=early_exit,
    )
    return LanczosResult(basis, jnp.diagonal(proj), jnp.diagonal(proj, -1), done)


_tridiag_jit = jax.jit(_tridiag_core, static_argnames=("apply", "num_steps", "op_dtype"))


def lanczos_tridiag(apply, operand, v0, num_steps: int, op_dtype) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization, in one compiled loop.

    Builds ``V`` (``(m, n)``, orthonormal rows) and ``T = V^T A V`` tridiagonal, with
    ``v_0 = v0 / ||v0||`` and, for ``j = 0..m-1``::

        w = A v_j;  alpha_j = <v_j, w>;  w <- w - V^T (V w)  (twice);
        beta_j = ||w||;  v_{j+1} = w / beta_j.

    Stops cleanly at breakdown (``beta_j <= breakdown_tolerance(op_dtype) * max ||A v_i||``,
    an invariant subspace): later alphas, betas and basis rows are zero and
    ``num_steps_done`` says how many steps are valid. Never divides by ~0. A zero ``v0``
    gives ``num_steps_done = 0``.

    Args:
        apply: ``(v, operand) -> A v`` on ``(n,)`` vectors of dtype ``op_dtype``
            (``LinearOperator.apply``); a static jit argument (hashed by identity).
        operand: pytree read by ``apply``; traced.
        v0: ``(n,)`` start vector (any scale).
        num_steps: ``m``, the number of Lanczos steps, ``1 <= m <= n``.
        op_dtype: dtype ``apply`` computes in. Basis and ``T`` use ``solver_dtype(op_dtype)``.

    Returns:
        :class:`LanczosResult` ``(basis (m, n), alphas (m,), betas (m-1,), num_steps_done)``.

    Raises:
        ValueError: ``v0`` not a vector, or ``num_steps`` outside ``[1, n]``.
    """
    v0 = jnp.asarray(v0)
    if v0.ndim != 1:
        raise ValueError(f"lanczos_tridiag: v0 must be a flat vector, got shape {v0.shape}.")
    n = v0.shape[0]
    num_steps = int(num_steps)
    if not 1 <= num_steps <= n:
        raise ValueError(
            f"lanczos_tridiag: num_steps={num_steps} must be in [1, dim={n}]; a Krylov space "
            "has at most dim dimensions, so use num_steps <= dim."
        )
    return _tridiag_jit(apply, operand, v0, num_steps, np.dtype(op_dtype))


@partial(jax.jit, static_argnames=("apply", "op_dtype", "breakdown_tol"))
def _extend_jit(apply, operand, basis, proj, start, noise, op_dtype, breakdown_tol):
    _, basis, proj, f, f_norm, scale = _krylov_steps(
        apply,
        operand,
        basis,
        proj,
        start,
        noise,
        False,
        op_dtype=op_dtype,
        breakdown_tol=breakdown_tol,
        restart=True,
        early_exit=False,
    )
    return basis, proj, f, f_norm, scale


@jax.jit
def _thick_restart(basis, ritz_coeffs, ritz_values, f, f_norm, arrow, use_random, noise):
    """Restart state: keep ``p`` Ritz vectors, continue from ``f / ||f||`` (or from the random
    vector ``noise`` orthogonalized against them).

    With ``Y = S^T V`` (``(p, n)``, ``S = ritz_coeffs`` ``(m, p)``) the new basis is
    ``[Y; v_p; 0]`` and the projected matrix ``[[diag(theta), arrow^T], [arrow, .]]`` with
    ``arrow_i = ||f|| S[m-1, i]`` (``A y_i = theta_i y_i + arrow_i f / ||f||``). Column ``p`` is
    then filled by the next Lanczos step.
    """
    m = basis.shape[0]
    p = ritz_coeffs.shape[1]
    kept = ritz_coeffs.T @ basis
    new_basis = jnp.zeros_like(basis).at[:p].set(kept)
    v = jnp.where(use_random, noise, f / jnp.where(f_norm > 0, f_norm, 1))
    v, _ = _orthogonalize(new_basis, v)
    new_basis = new_basis.at[p].set(v / jnp.linalg.norm(v))
    proj = jnp.zeros((m, m), basis.dtype)
    proj = proj.at[jnp.arange(p), jnp.arange(p)].set(ritz_values)
    proj = proj.at[p, :p].set(jnp.where(use_random, 0, arrow))
    return new_basis, proj


@partial(jax.jit, static_argnames=("apply", "op_dtype", "batch_size"))
def _residual_norms(apply, operand, vectors, values, op_dtype, batch_size):
    """``||A y_i - theta_i y_i||`` for the rows ``y_i`` of ``vectors`` (``(k, n)``)."""

    def mv(y):
        return apply(y.astype(op_dtype), operand).astype(vectors.dtype)

    if batch_size is None:
        products = jax.vmap(mv)(vectors)
    else:
        products = jax.lax.map(mv, vectors, batch_size=batch_size)
    return jnp.linalg.norm(products - values[:, None] * vectors, axis=1)


def _check_finite(*arrays: Any) -> None:
    for a in arrays:
        if not np.all(np.isfinite(np.asarray(a))):
            raise FloatingPointError(
                "the Hessian-vector product (matvec) is not finite: NaN or Inf appeared in "
                "the Lanczos iteration. Check the parameters and the data for NaN/Inf (and "
                "the loss for overflow, e.g. log of 0)."
            )


def top_eigenpairs(
    op: LinearOperator | Any,
    k: int,
    num_steps: int | None = None,
    key: jax.Array | None = None,
    which: str = "largest",
    tol: float | None = None,
    max_restarts: int = 50,
    dim: int | None = None,
    progress: bool = False,
    verify: bool = True,
    matvec_batch_size: int | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator, by thick-restart
    Lanczos with full reorthogonalization.

    Each cycle extends an orthonormal basis ``V`` (``(m, n)``, ``m = num_steps``) by Lanczos
    steps, forms the Rayleigh quotient ``T = V^T A V`` (``(m, m)``), and takes Ritz pairs
    ``(theta_i, y_i = V^T s_i)`` from ``T s_i = theta_i s_i``. The Ritz residual estimate is
    ``||f|| |s_i[m-1]|`` (``f`` the unnormalized next Lanczos vector). When all ``k`` wanted
    estimates are below ``tol * ||A||_est`` (``||A||_est`` = largest ``|theta|`` seen), the true
    residuals ``||A y_i - theta_i y_i||`` are computed with ``k`` real matvecs and must pass
    the same test. Otherwise the cycle restarts thick: the ``p = k + (m - k) // 2`` best Ritz
    vectors are kept and the iteration continues from ``f / ||f||`` (Wu & Simon 2000), so no
    Krylov information about the wanted pairs is discarded and memory stays ``m x n``.

    Multiplicities: a single start vector only sees one direction per eigenspace. When the
    Krylov space becomes invariant (breakdown) the iteration continues from a random vector
    orthogonal to the basis, and with ``verify=True`` a converged answer is checked by one
    more cycle from a fresh random vector orthogonal to the kept Ritz vectors (about
    ``m - p`` extra matvecs); if that reveals eigenvalues the start vector missed (e.g. a
    second copy of a degenerate outlier), iteration continues. Set ``verify=False`` to skip.

    Args:
        op: :class:`~hessspec.linop.LinearOperator`, or a callable ``v -> A v`` with ``dim=``.
            ``A`` must be symmetric.
        k: number of eigenpairs, ``1 <= k <= dim``.
        num_steps: basis size ``m`` (restart length); ``k < m <= dim`` (``m = k`` only when
            ``k = dim``). Default ``min(dim, max(2k + 20, 3k))``. Memory is ``m * dim``.
        key: PRNG key for the start vector and random restarts; ``None`` uses
            ``jax.random.key(0)`` (reproducible).
        which: ``"largest"`` (algebraically largest first) or ``"smallest"`` (most
            negative first).
        tol: relative residual tolerance: converged means
            ``||A v - lambda v|| <= tol * ||A||_est``. Default :func:`default_tolerance` of the
            operator's dtype (``1e-6`` float64, ``1e-3`` float32).
        max_restarts: restart budget (cycles = ``max_restarts + 1``).
        dim: vector length when ``op`` is a plain callable.
        progress: show a tqdm bar over cycles.
        verify: run the verification cycle described above.
        matvec_batch_size: the ``k`` residual matvecs run vmapped together (``None``) or in
            ``lax.map`` chunks of this size, to bound memory for large models.

    Returns:
        :class:`EigenResult` ``(values (k,), vectors (k, dim), residuals (k,), converged (k,),
        num_matvecs)``.

    Raises:
        ValueError: ``k``, ``num_steps``, ``which``, ``tol`` or ``max_restarts`` invalid.
        FloatingPointError: the matvec produced NaN/Inf.

    Warns:
        LanczosConvergenceWarning: some pairs missed ``tol`` after the budget; the message
            names them (index, value, residual) and ``converged`` flags them.
    """
    op = as_operator(op, dim)
    n = op.dim
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"top_eigenpairs: k={k} must be at least 1.")
    if k > n:
        raise ValueError(f"top_eigenpairs: k={k} exceeds the operator's dim={n}; use k <= {n}.")
    if which not in ("largest", "smallest"):
        raise ValueError(f"top_eigenpairs: which={which!r} must be 'largest' or 'smallest'.")
    m = min(n, max(2 * k + 20, 3 * k)) if num_steps is None else operator.index(num_steps)
    if m > n:
        raise ValueError(
            f"top_eigenpairs: num_steps={m} exceeds dim={n}; a Krylov basis has at most dim "
            f"vectors, use num_steps <= {n}."
        )
    if m < k or (m == k and m < n):
        raise ValueError(
            f"top_eigenpairs: num_steps={m} must exceed k={k} (restarts keep k Ritz vectors "
            f"and need room for new ones); use num_steps >= {min(n, k + 1)}, e.g. "
            f"{min(n, max(2 * k + 20, 3 * k))}."
        )
    tol = default_tolerance(op.dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"top_eigenpairs: tol={tol} must be positive.")
    if int(max_restarts) < 0:
        raise ValueError(f"top_eigenpairs: max_restarts={max_restarts} must be >= 0.")
    if matvec_batch_size is not None and int(matvec_batch_size) < 1:
        raise ValueError(f"matvec_batch_size={matvec_batch_size} must be a positive integer.")

    sdt = solver_dtype(op.dtype)
    bd_tol = breakdown_tolerance(op.dtype)
    key_v0, key_loop = jax.random.split(_default_key(key))
    v0 = jax.random.normal(key_v0, (n,), sdt)
    basis = jnp.zeros((m, n), sdt).at[0].set(v0 / jnp.linalg.norm(v0))
    proj = jnp.zeros((m, m), sdt)
    start = 0
    p = min(m - 1, k + (m - k) // 2)
    need_verify = bool(verify) and m < n
    largest = which == "largest"

    num_matvecs = 0
    anorm = 0.0
    pending: EigenResult | None = None  # converged answer awaiting its verification cycle
    last_state = None
    bar = tqdm(total=int(max_restarts) + 1, desc="lanczos", disable=not progress, leave=False)
    try:
        for cycle in range(int(max_restarts) + 1):
            basis, proj, f, f_norm, scale = _extend_jit(
                op.apply,
                op.operand,
                basis,
                proj,
                start,
                jax.random.normal(jax.random.fold_in(key_loop, 2 * cycle), (n,), sdt),
                op.dtype,
                bd_tol,
            )
            num_matvecs += m - start
            proj_h = np.asarray(proj, dtype=np.float64)
            f_norm = float(f_norm)
            _check_finite(proj_h, f_norm)
            t = np.triu(proj_h) + np.triu(proj_h, 1).T
            theta, s = np.linalg.eigh(t)
            order = np.arange(m)[::-1] if largest else np.arange(m)
            anorm = max(anorm, float(np.max(np.abs(theta))))
            thresh = tol * anorm
            want = order[:k]
            estimates = f_norm * np.abs(s[m - 1, want])
            last_state = (basis, theta, s, want, thresh)
            all_est = bool(np.all(estimates <= thresh))
            bar.update(1)
            bar.set_postfix(converged=int(np.sum(estimates <= thresh)), matvecs=num_matvecs)

            if pending is not None:  # this was the verification cycle
                if all_est and np.max(np.abs(theta[want] - pending.values)) <= thresh:
                    return pending._replace(num_matvecs=num_matvecs)
                pending = None  # it found something new: keep iterating

            if all_est:
                result = _finish(op, basis, theta, s, want, thresh, matvec_batch_size)
                num_matvecs += k
                if bool(np.all(result.converged)):
                    result = result._replace(num_matvecs=num_matvecs)
                    if not need_verify:
                        return result
                    pending = result

            if cycle == int(max_restarts):
                break
            keep = order[:p]
            arrow = f_norm * s[m - 1, keep]
            use_random = pending is not None or f_norm <= bd_tol * float(scale)
            basis, proj = _thick_restart(
                basis,
                jnp.asarray(s[:, keep], sdt),
                jnp.asarray(theta[keep], sdt),
                f,
                jnp.asarray(f_norm, sdt),
                jnp.asarray(arrow, sdt),
                use_random,
                jax.random.normal(jax.random.fold_in(key_loop, 2 * cycle + 1), (n,), sdt),
            )
            start = p
    finally:
        bar.close()

    if pending is not None:  # budget ended during verification: the answer itself converged
        return pending._replace(num_matvecs=num_matvecs)
    basis, theta, s, want, thresh = last_state
    result = _finish(op, basis, theta, s, want, thresh, matvec_batch_size)
    num_matvecs += k
    result = result._replace(num_matvecs=num_matvecs)
    bad = np.flatnonzero(~result.converged)
    if bad.size:
        pairs = ", ".join(
            f"(index {i}, value {result.values[i]:.6g}, residual {result.residuals[i]:.3g})"
            for i in bad
        )
        warnings.warn(
            LanczosConvergenceWarning(
                f"top_eigenpairs: {bad.size} of {k} eigenpairs did not converge to "
                f"||A v - lambda v|| <= tol * ||A||_est = {tol:.3g} * {thresh / tol:.6g} after "
                f"{int(max_restarts) + 1} cycles and {num_matvecs} matvecs: pairs {pairs}. "
                "Increase num_steps or max_restarts, or loosen tol."
            ),
            stacklevel=1,
        )
    return result


def _finish(op, basis, theta, s, want, thresh, batch_size) -> EigenResult:
    """Ritz vectors for the wanted pairs and their true residuals (``k`` matvecs)."""
    sdt = basis.dtype
    vectors = jnp.asarray(s[:, want].T, sdt) @ basis
    values = theta[want]
    residuals = _residual_norms(
        op.apply,
        op.operand,
        vectors,
        jnp.asarray(values, sdt),
        op.dtype,
        None if batch_size is None else int(batch_size),
    )
    residuals = np.asarray(residuals, dtype=np.float64)
    _check_finite(residuals)
    return EigenResult(
        values=np.asarray(values, dtype=np.float64),
        vectors=vectors,
        residuals=residuals,
        converged=residuals <= thresh,
        num_matvecs=0,
    )
