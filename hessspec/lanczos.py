"""Lanczos with full reorthogonalization: the tridiagonal, and extreme eigenpairs.

Two layers:

* :func:`lanczos_tridiag` is the plain iteration. From a start vector ``v_0`` it builds an
  orthonormal Krylov basis ``V = [v_0, ..., v_{m-1}]`` of ``K_m(A, v_0)`` and the symmetric
  tridiagonal ``T_m = V^T A V`` (diagonal ``alphas``, off-diagonal ``betas``), in one compiled
  ``lax.while_loop``. Full reorthogonalization: each step applies the three-term recurrence
  and then one classical Gram-Schmidt pass against the whole stored basis (two passes,
  "twice is enough" (Giraud et al. 2005), where the recurrence does not hold: the first
  vector of a run or of a thick restart, a fresh vector after a breakdown), so the basis
  stays orthonormal to working precision and no spurious copies of converged eigenvalues
  appear. Used by stochastic Lanczos quadrature (:mod:`hessspec.density`).
* :func:`top_eigenpairs` computes the ``k`` largest (or smallest) eigenpairs by thick-restart
  Lanczos (Wu & Simon 2000) on top of the same compiled step loop, with convergence judged
  by residual norms ``||A v - lambda v||`` computed with real matvecs.

Cost of a step beyond its matvec: the Gram-Schmidt pass reads the filled rows of the basis
twice. A large basis is stored in row blocks (:data:`NUM_BASIS_BLOCKS`) so that step ``j``
reads only the blocks holding rows ``0..j`` (about half the basis on average); the current
and previous Lanczos vectors are carried in the loop, never read back; the basis and the
projected matrix are updated in place (one row per step), and top_eigenpairs donates them
between its compiled calls. There is no host round trip inside a run of steps.

Precision: the reorthogonalization arithmetic and the projected matrix live in
:func:`hessspec.linop.solver_dtype` of the operator's dtype -- float64 whenever jax's x64 flag
is on, even for a float32 operator (each vector is cast to the operator's dtype for the matvec
and the product cast back). The basis is stored in the same dtype, or in float32 with
``basis_dtype="float32"`` (half the memory and traffic; orthonormal to ~1e-7). The flag
itself is never changed.

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
from hessspec.linop import basis_dtype as resolve_basis_dtype

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


NUM_BASIS_BLOCKS = 8
"""The Krylov basis of a large run is stored as this many row blocks (fewer when
``num_steps`` is smaller).

Step ``j`` reorthogonalizes only against the blocks that hold rows ``0..j``: over a run that
reads about ``(1 + 1/B) / 2`` of the basis per pass instead of all of it. Separate arrays
(not slices of one) because XLA on CPU materializes a slice before a dot, which would cost
more memory traffic than it saves."""

BLOCKED_MIN_ELEMENTS = 2**18
"""Bases with fewer entries (``num_steps * dim``) stay one block: they sit in cache, where
reading unused zero rows costs little, and one block compiles faster."""


def _num_blocks(m: int, n: int) -> int:
    """Number of row blocks for an ``(m, n)`` basis (a static choice, made outside jit)."""
    if m * n < BLOCKED_MIN_ELEMENTS:
        return 1
    return max(1, min(m, NUM_BASIS_BLOCKS))


def _block_bounds(m: int, num_blocks: int) -> tuple[int, ...]:
    """Row offsets ``(0, o_1, ..., m)`` of ``num_blocks`` near-equal blocks (static)."""
    s = max(1, min(m, num_blocks))
    return tuple(i * m // s for i in range(s + 1))


def _join_rows(blocks: tuple[jax.Array, ...]) -> jax.Array:
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=0)


BASIS_MEMORIES = ("device", "host")
"""Where the Krylov basis can live: the operator's device memory, or host memory (JAX memory
space ``pinned_host``): there each step streams the basis blocks to the device for its
Gram-Schmidt pass and writes its new row back, so device memory holds one block at a time
instead of the whole ``(m, n)`` basis, at the price of moving the basis over the host link
once per pass. On CPU both are the same RAM (the option changes nothing but the placement
label)."""


def _check_basis_memory(basis_memory: str, caller: str) -> bool:
    """Validate ``basis_memory``; True for ``"host"``."""
    if basis_memory not in BASIS_MEMORIES:
        raise ValueError(
            f"{caller}: basis_memory={basis_memory!r} must be 'device' or 'host' (keep the "
            "Krylov basis in host memory to save device memory)."
        )
    return basis_memory == "host"


def _on_host(a) -> bool:
    return getattr(jax.typeof(a), "memory_space", None) == jax.memory.Space.Host


def _to_device(a):
    """``a`` in device memory (a no-op for arrays already there)."""
    return jax.device_put(a, jax.memory.Space.Device) if _on_host(a) else a


def _to_space_of(a, ref):
    """``a`` moved to the memory space of ``ref`` (host or device)."""
    return jax.device_put(a, jax.memory.Space.Host) if _on_host(ref) else a


def _to_host_blocks(blocks, host: bool):
    return tuple(jax.device_put(b, jax.memory.Space.Host) for b in blocks) if host else blocks


def _bounds_of(blocks) -> tuple[int, ...]:
    out = [0]
    for blk in blocks:
        out.append(out[-1] + blk.shape[0])
    return tuple(out)


def _block_index(i, bounds):
    """Index of the block holding row ``i`` (traced int)."""
    if len(bounds) <= 2:
        return jnp.zeros((), jnp.int32)
    return jnp.sum(i >= jnp.asarray(bounds[1:-1], jnp.int32)).astype(jnp.int32)


def _get_row(blocks, i):
    """Row ``i`` of the blocked basis (one row copied, the blocks untouched)."""
    bounds = _bounds_of(blocks)

    def branch(t):
        return lambda blocks, i: jax.lax.dynamic_index_in_dim(
            _to_device(blocks[t]), i - bounds[t], keepdims=False
        )

    if len(blocks) == 1:
        return branch(0)(blocks, i)
    return jax.lax.switch(
        _block_index(i, bounds), [branch(t) for t in range(len(blocks))], blocks, i
    )


def _set_row(blocks, i, row, pred):
    """Blocks with row ``i`` replaced by ``row`` where ``pred`` (in place under jit).

    Each block's write sits in a ``lax.cond``: only the block holding row ``i`` is touched
    (a select on every block would read and write one row of each, every step).
    """
    bounds = _bounds_of(blocks)
    out = []
    for t, blk in enumerate(blocks):
        lo, hi = bounds[t], bounds[t + 1]
        local = jnp.clip(i - lo, 0, hi - lo - 1)
        hit = pred & (i >= lo) & (i < hi)
        new = _to_space_of(row.astype(blk.dtype), blk)
        if len(blocks) == 1 and not _on_host(blk):
            old = jax.lax.dynamic_index_in_dim(blk, local, keepdims=False)
            out.append(jax.lax.dynamic_update_index_in_dim(blk, jnp.where(hit, new, old), local, 0))
        else:
            out.append(
                jax.lax.cond(
                    hit,
                    lambda b, r, k: jax.lax.dynamic_update_index_in_dim(b, r, k, 0),
                    lambda b, r, k: b,
                    blk,
                    new,
                    local,
                )
            )
    return tuple(out)


def _cgs_pass(blocks, w, num_blocks):
    """One classical Gram-Schmidt pass ``w - V^T (V w)`` against the first ``num_blocks``
    blocks (traced, ``1 <= num_blocks <= len(blocks)``).

    Returns the new ``w`` (dtype of ``w``) and the ``(m,)`` coefficients ``V w`` (zero for rows
    in blocks not visited). The products run in the basis dtype (``w`` is cast to it), so a
    float32 basis is read as float32, never promoted. Each block after the first sits in its
    own ``lax.cond``: a block not yet filled is not read, and the program grows linearly with
    the number of blocks.
    """
    bdt = blocks[0].dtype
    wb = w.astype(bdt)

    def dot(blk, x):
        return _to_device(blk) @ x

    def tdot(c, blk):
        return c @ _to_device(blk)

    def skip_dot(blk, x):
        return jnp.zeros(blk.shape[:1], bdt)

    def skip_tdot(c, blk):
        return jnp.zeros(blk.shape[1:], bdt)

    first = _to_device(blocks[0])
    coeffs = [first @ wb]
    for t, blk in enumerate(blocks[1:], start=1):
        coeffs.append(jax.lax.cond(t < num_blocks, dot, skip_dot, blk, wb))
    update = coeffs[0] @ first
    for t, (c, blk) in enumerate(zip(coeffs[1:], blocks[1:], strict=True), start=1):
        update = update + jax.lax.cond(t < num_blocks, tdot, skip_tdot, c, blk)
    c = coeffs[0] if len(coeffs) == 1 else jnp.concatenate(coeffs)
    return w - update.astype(w.dtype), c.astype(w.dtype)


def _cgs(blocks, w, num_blocks, passes):
    """``passes`` (traced: 1 or 2) Gram-Schmidt passes; returns ``w`` and the summed
    coefficients. One compiled pass inside a loop keeps the program small."""
    m = _bounds_of(blocks)[-1]

    def body(_, carry):
        w, c = carry
        w, c_new = _cgs_pass(blocks, w, num_blocks)
        return w, c + c_new

    return jax.lax.fori_loop(0, passes, body, (w, jnp.zeros((m,), w.dtype)))


def _orthogonalize(blocks, w):
    """Classical Gram-Schmidt twice against the whole (blocked) basis; unused rows are zero.

    Returns the orthogonalized vector and the total coefficients ``c1 + c2``.
    """
    return _cgs(blocks, w, len(blocks), 2)


def _krylov_steps(
    apply,
    operand,
    blocks,
    coef,
    start,
    noise,
    stopped,
    *,
    op_dtype,
    breakdown_tol,
    restart,
    early_exit,
    inject_at=-1,
):
    """Run Lanczos steps ``j = start, ..., m-1`` with full reorthogonalization (traceable).

    The basis ``V`` (``(m, n)``) is held as a tuple of row ``blocks`` (:func:`_num_blocks`)
    in the basis dtype; ``coef`` (``(m, m)``, solver dtype) holds the projections *by rows*:
    step ``j`` writes row ``j``, ``coef[j, :j+1] = V A v_j`` (the Gram-Schmidt coefficients)
    and ``coef[j, j+1] = beta_j = ||w_j||``. So ``tril(coef)`` is the lower triangle of the
    Rayleigh quotient ``V^T A V``, ``diag(coef)`` the Lanczos ``alphas`` and
    ``diag(coef, 1)`` the ``betas``; writing a contiguous row keeps the update in place.

    State on entry: rows ``0..start`` of ``V`` are orthonormal, row ``start`` is the next
    vector to expand, later rows are zero; rows ``< start`` of ``coef`` are filled.

    Reorthogonalization: the first step of a call (``j == start``: ``v_0``, or the first
    vector after a thick restart, which couples to every kept Ritz vector) subtracts its
    projection on all filled rows by classical Gram-Schmidt twice ("twice is enough").
    Every later step first applies the three-term recurrence (``w -= beta_{j-1} v_{j-1}``,
    then ``alpha_j = <v_j, w>``, ``w -= alpha_j v_j``), which removes all but rounding-level
    components along the basis, then one Gram-Schmidt pass against the filled rows
    removes those: the textbook full reorthogonalization, half the memory traffic of two
    full passes, as orthonormal (to ~1e-15 in float64). Passes read only the blocks holding
    rows ``0..j`` (``lax.switch`` over the block count).

    Breakdown (``beta_j <= breakdown_tol * max_i ||A v_i||``): with ``restart=False`` the
    iteration stops (later rows stay zero); with ``restart=True`` it continues from a fresh
    random vector orthogonal to the basis, coupled by ``beta_j = 0`` (this is how degenerate
    eigenvalues beyond the start vector's Krylov space are reached). The fresh vector at step
    ``j`` is the Gaussian ``noise`` (``(n,)``) cyclically shifted by ``j + 1``: distinct shifts
    give linearly independent generic vectors, without a PRNG inside the compiled loop.

    ``early_exit=True`` runs a ``lax.while_loop`` that stops at breakdown (no wasted
    matvecs); ``early_exit=False`` a fixed-trip ``lax.fori_loop`` whose steps after breakdown
    are masked out. Use the latter under ``vmap``: a batched ``while_loop`` selects the whole
    state every step, the fixed loop only row-sized pieces.

    ``inject_at`` (``restart=True`` only, traced): at that step the iteration also continues
    from a fresh random vector, as if it had broken down, although ``beta_j`` is not small
    (the verification cycle of :func:`top_eigenpairs` explores a random direction after
    improving the current answer). The dropped ``w_j`` is recorded in ``lost[j] = beta_j``:
    a Ritz vector ``V^T s`` then has residual at most
    ``|s_{m-1}| ||f|| + sum_j |s_j| lost[j]``. The step after a fresh vector, and every step
    after a forced injection, reorthogonalizes twice (the three-term recurrence does not
    hold across them).

    Returns:
        ``(steps_done, blocks, coef, f, f_norm, scale, lost)``: ``f`` is the residual vector
        ``beta_{m-1} v_m`` after the last step (zero on breakdown), ``scale`` the largest
        ``||A v_j||`` seen (a lower bound on ``||A||``), ``lost`` ``(m,)`` the norms of the
        vectors dropped where a fresh vector was injected.
    """
    m = coef.shape[0]
    n = blocks[0].shape[-1]
    sdt = coef.dtype
    zero = jnp.zeros((), sdt)
    bounds = _bounds_of(blocks)
    start = jnp.asarray(start, jnp.int32)

    bdt = blocks[0].dtype

    def step(j, state):
        done, blocks, coef, w_out, f_norm, scale, stop, lost, fresh_prev, v, v_prev = state
        active = ~stop
        w = apply(v.astype(op_dtype), operand).astype(sdt)
        scale = jnp.where(active, jnp.maximum(scale, jnp.linalg.norm(w)), scale)
        filled = _block_index(j, bounds) + 1

        def no_local(w):
            return w, jnp.zeros((m,), sdt)

        def three_term(w):
            jm = jnp.maximum(j - 1, 0)
            b_prev = coef[jm, j]  # beta_{j-1}
            w = w - b_prev * v_prev
            alpha = v @ w
            w = w - alpha * v
            local = jnp.zeros((m,), sdt).at[j].set(alpha).at[jm].add(b_prev)
            return w, local

        # the three-term recurrence holds (older components at rounding level) only for a
        # vector that continues a Lanczos sequence: not for the first vector of a call (a
        # restart couples it to every kept Ritz vector), not for a fresh one, nor after a
        # forced injection (A v_l keeps components along the dropped w for every later l)
        if restart:
            two_pass = (j == start) | fresh_prev | ((inject_at >= 0) & (j > inject_at))
        else:
            two_pass = j == start
        w, c_local = jax.lax.cond(two_pass, no_local, three_term, w)
        w, c_pass = _cgs(blocks, w, filled, jnp.where(two_pass, 2, 1))
        coeffs = c_local + c_pass
        beta = jnp.linalg.norm(w)
        broken = beta <= breakdown_tol * scale  # False for NaN: surfaces in the host check
        last = j == m - 1
        nxt = jnp.minimum(j + 1, m - 1)
        safe_beta = jnp.where(broken, jnp.ones((), sdt), beta)
        if restart:
            inject = (broken | (j == inject_at)) & ~last

            def fresh(_):
                r, _ = _orthogonalize(blocks, jnp.roll(noise, j + 1))
                return r / jnp.linalg.norm(r), zero

            def extend(_):
                return w / safe_beta, beta

            v_next, sub = jax.lax.cond(inject, fresh, extend, None)
            lost = lost.at[j].set(jnp.where(active & inject, beta, zero))
            fresh_prev = active & inject
            new_stop = stop
        else:
            v_next = jnp.where(broken, zero, w / safe_beta)
            sub = jnp.where(broken, zero, beta)
            new_stop = stop | broken
        v_next = v_next.astype(bdt)  # the vector expanded next is exactly the stored row
        coeffs = coeffs.at[nxt].set(jnp.where(last, coeffs[nxt], sub))
        coef = coef.at[j].set(jnp.where(active, coeffs, coef[j]))
        # the write condition must not depend on `active`: under vmap (SLQ) that is batched
        # and would turn the in-place row write into a select over whole blocks. It need
        # not: once stopped, v_next is 0 and the rows it writes are already 0.
        blocks = _set_row(blocks, nxt, v_next, ~last)
        f_norm = jnp.where(active & last, jnp.where(broken, zero, beta), f_norm)
        done = done + active.astype(done.dtype)
        # carried, so no step reads its vectors back from the blocks (after a breakdown
        # without restart v_next is 0 and stays 0: the masked steps multiply zeros)
        v_next = v_next.astype(sdt)
        return done, blocks, coef, w, f_norm, scale, new_stop, lost, fresh_prev, v_next, v

    v_start = _get_row(blocks, start).astype(sdt)
    init = (
        start,
        tuple(blocks),
        coef,
        jnp.zeros((n,), sdt),
        zero,
        zero,
        jnp.asarray(stopped),
        jnp.zeros((m,), sdt),
        jnp.zeros((), bool),
        v_start,
        jnp.zeros((n,), sdt),
    )
    if early_exit:

        def cond(carry):
            j, state = carry
            return (j < m) & ~state[6]

        def body(carry):
            j, state = carry
            return j + 1, step(j, state)

        _, state = jax.lax.while_loop(cond, body, (start, init))
    else:
        state = jax.lax.fori_loop(start, m, step, init)
    done, blocks, coef, w_last, f_norm, scale, _, lost, *_ = state
    # f is the last step's w, unless that step broke down (then f_norm = 0 and f = 0)
    f = jnp.where(f_norm > 0, w_last, zero)
    return done, blocks, coef, f, f_norm, scale, lost


def _initial_blocks(v0, m, bdt, num_blocks, host=False):
    """Blocked ``(m, n)`` basis with row 0 = ``v0`` (already normalized), zeros elsewhere;
    in host memory when ``host``."""
    n = v0.shape[0]
    b = _block_bounds(m, num_blocks)
    blocks = [jnp.zeros((hi - lo, n), bdt) for lo, hi in zip(b[:-1], b[1:], strict=True)]
    blocks[0] = blocks[0].at[0].set(v0.astype(bdt))
    return _to_host_blocks(blocks, host)


def _tridiag_core(
    apply, operand, v0, num_steps, op_dtype, early_exit=True, bdt=None, num_blocks=1, host=False
):
    """Traceable body of :func:`lanczos_tridiag`; SLQ vmaps it with ``early_exit=False``.

    Returns ``(blocks, alphas, betas, num_steps_done)``; the blocks in host memory when
    ``host``.
    """
    sdt = solver_dtype(op_dtype)
    bdt = sdt if bdt is None else bdt
    (n,) = v0.shape
    v0 = v0.astype(sdt)
    norm = jnp.linalg.norm(v0)
    ok = norm > 0
    blocks = _initial_blocks(v0 / jnp.where(ok, norm, 1), num_steps, bdt, num_blocks, host)
    coef = jnp.zeros((num_steps, num_steps), sdt)
    done, blocks, coef, *_ = _krylov_steps(
        apply,
        operand,
        blocks,
        coef,
        0,
        jnp.zeros((n,), sdt),
        ~ok,
        op_dtype=op_dtype,
        breakdown_tol=breakdown_tolerance(op_dtype),
        restart=False,
        early_exit=early_exit,
    )
    return blocks, jnp.diagonal(coef), jnp.diagonal(coef, 1), done


@partial(jax.jit, static_argnames=("apply", "num_steps", "op_dtype", "bdt", "num_blocks", "host"))
def _tridiag_jit(apply, operand, v0, num_steps, op_dtype, bdt, num_blocks, host):
    blocks, alphas, betas, done = _tridiag_core(
        apply, operand, v0, num_steps, op_dtype, True, bdt, num_blocks, host
    )
    if host:  # joined outside: concatenation is device work
        return blocks, alphas, betas, done
    return LanczosResult(_join_rows(blocks), alphas, betas, done)


def lanczos_tridiag(
    apply, operand, v0, num_steps: int, op_dtype, basis_dtype=None, basis_memory="device"
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization, in one compiled loop.

    Builds ``V`` (``(m, n)``, orthonormal rows) and ``T = V^T A V`` tridiagonal, with
    ``v_0 = v0 / ||v0||`` and, for ``j = 0..m-1``::

        w = A v_j;  w <- w - beta_{j-1} v_{j-1};  alpha_j = <v_j, w>;  w <- w - alpha_j v_j;
        w <- w - V^T (V w)  (full reorthogonalization);  beta_j = ||w||;  v_{j+1} = w / beta_j.

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
        op_dtype: dtype ``apply`` computes in. ``T`` uses ``solver_dtype(op_dtype)``.
        basis_dtype: dtype of ``V`` (see :func:`hessspec.linop.basis_dtype`); None: the
            solver dtype.
        basis_memory: ``"device"`` or ``"host"`` (:data:`BASIS_MEMORIES`): keep ``V`` in
            host memory during the run; the returned basis is then a NumPy array.

    Returns:
        :class:`LanczosResult` ``(basis (m, n), alphas (m,), betas (m-1,), num_steps_done)``.

    Raises:
        ValueError: ``v0`` not a vector, ``num_steps`` outside ``[1, n]``, or a bad
            ``basis_dtype``.
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
    op_dtype = np.dtype(op_dtype)
    bdt = resolve_basis_dtype(op_dtype, basis_dtype)
    host = _check_basis_memory(basis_memory, "lanczos_tridiag")
    out = _tridiag_jit(
        apply, operand, v0, num_steps, op_dtype, bdt, _num_blocks(num_steps, n), host
    )
    if host:
        blocks, alphas, betas, done = out
        return LanczosResult(np.concatenate([np.asarray(b) for b in blocks]), alphas, betas, done)
    return out


@partial(
    jax.jit,
    static_argnames=("apply", "op_dtype", "breakdown_tol"),
    donate_argnames=("blocks", "coef"),
)
def _extend_jit(apply, operand, blocks, coef, start, noise, inject_at, op_dtype, breakdown_tol):
    _, blocks, coef, f, f_norm, scale, lost = _krylov_steps(
        apply,
        operand,
        blocks,
        coef,
        start,
        noise,
        False,
        op_dtype=op_dtype,
        breakdown_tol=breakdown_tol,
        restart=True,
        early_exit=False,
        inject_at=inject_at,
    )
    return blocks, coef, f, f_norm, scale, lost


def _combine_rows(coeffs, blocks):
    """``coeffs^T V`` for ``coeffs`` ``(m, p)`` and the blocked basis: ``(p, n)``, basis dtype."""
    bounds = _bounds_of(blocks)
    bdt = blocks[0].dtype
    out = None
    for t, blk in enumerate(blocks):
        part = coeffs[bounds[t] : bounds[t + 1]].T.astype(bdt) @ _to_device(blk)
        out = part if out is None else out + part
    return out


@partial(jax.jit, donate_argnames=("blocks",))
def _thick_restart(blocks, ritz_coeffs, ritz_values, f, f_norm, arrow, use_random, noise):
    """Restart state: keep ``p`` Ritz vectors, continue from ``f / ||f||`` (or from the random
    vector ``noise`` orthogonalized against them).

    With ``Y = S^T V`` (``(p, n)``, ``S = ritz_coeffs`` ``(m, p)``) the new basis is
    ``[Y; v_p; 0]`` and the projected matrix (by rows, see :func:`_krylov_steps`)
    ``[[diag(theta), arrow^T], [., .]]`` with ``arrow_i = ||f|| S[m-1, i]``
    (``A y_i = theta_i y_i + arrow_i f / ||f||``). Row ``p`` is then filled by the next
    Lanczos step.
    """
    bounds = _bounds_of(blocks)
    m = bounds[-1]
    p = ritz_coeffs.shape[1]
    sdt = ritz_values.dtype
    kept = _combine_rows(ritz_coeffs, blocks)
    new = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        blk = jnp.zeros((hi - lo, kept.shape[1]), kept.dtype)
        if lo < p:
            blk = blk.at[: min(hi, p) - lo].set(kept[lo : min(hi, p)])
        new.append(blk)
    new = _to_host_blocks(new, _on_host(blocks[0]))
    v = jnp.where(use_random, noise, f / jnp.where(f_norm > 0, f_norm, 1))
    v, _ = _orthogonalize(new, v)
    new = _set_row(new, p, v / jnp.linalg.norm(v), jnp.ones((), bool))
    coef = jnp.zeros((m, m), sdt)
    coef = coef.at[jnp.arange(p), jnp.arange(p)].set(ritz_values)
    coef = coef.at[:p, p].set(jnp.where(use_random, 0, arrow))
    return new, coef


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
    basis_dtype: Any = None,
    check_memory: bool | float = True,
    basis_memory: str = "device",
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
    more cycle (about ``m - p + k`` extra matvecs) that continues from ``f`` for half its
    steps and then from a fresh random vector orthogonal to everything so far; if that
    reveals eigenvalues the start vector missed (e.g. a second copy of a degenerate
    outlier), iteration continues, otherwise that cycle's Ritz pairs (from a space holding
    the first answer, so at least as accurate) are returned when their residuals pass. The
    dropped Lanczos vector enters the residual estimates. Set ``verify=False`` to skip.

    Args:
        op: :class:`~hessspec.linop.LinearOperator`, or a callable ``v -> A v`` with ``dim=``.
            ``A`` must be symmetric.
        k: number of eigenpairs, ``1 <= k <= dim``.
        num_steps: basis size ``m`` (restart length); ``k < m <= dim`` (``m = k`` only when
            ``k = dim``). Default ``min(dim, max(2k + 20, 3k))``. Memory is about
            ``(2m + k) * dim`` numbers at the peak (basis, restart, eigenvectors).
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
        basis_dtype: dtype of the ``(m, dim)`` Krylov basis, the largest array of the run:
            None (the solver dtype, float64 when x64 is on) or ``"float32"`` (half the
            memory and memory traffic; the projected matrix stays in the solver dtype;
            eigenvalues then carry relative errors of ~1e-7 and ``tol`` should not go below
            ~1e-5). Returned vectors are in the solver dtype either way.
        basis_memory: ``"device"`` or ``"host"``: keep the basis in host memory (JAX's
            ``pinned_host`` memory space), streamed block by block to the device for each
            Gram-Schmidt pass; device memory then holds one block (of 8) instead of the
            whole basis. For accelerators short of memory; same numbers either way.
        check_memory: before starting, compare :func:`hessspec.memory.estimate_memory` of
            this call with :func:`hessspec.memory.available_memory` and raise
            ``MemoryError`` if it cannot fit. A number is used as the available bytes
            instead; False skips the check.

    Returns:
        :class:`EigenResult` ``(values (k,), vectors (k, dim), residuals (k,), converged (k,),
        num_matvecs)``.

    Raises:
        ValueError: ``k``, ``num_steps``, ``which``, ``tol``, ``max_restarts`` or
            ``basis_dtype`` invalid.
        MemoryError: the memory estimate exceeds the available memory (``check_memory``);
            the message says how much is needed and which option lowers it.
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
    bdt = resolve_basis_dtype(op.dtype, basis_dtype)
    host = _check_basis_memory(basis_memory, "top_eigenpairs")
    if check_memory is not False:
        from hessspec.memory import check_fits, estimate_memory

        check_fits(
            estimate_memory(
                op,
                num_steps=m,
                k=k,
                basis_dtype=bdt,
                matvec_batch_size=matvec_batch_size,
                basis_memory=basis_memory,
            ),
            available=None if check_memory is True else float(check_memory),
            device=_device_of(op),
        )
    bd_tol = breakdown_tolerance(op.dtype)
    key_v0, key_loop = jax.random.split(_default_key(key))
    v0 = jax.random.normal(key_v0, (n,), sdt)
    blocks = _initial_blocks(v0 / jnp.linalg.norm(v0), m, bdt, _num_blocks(m, n), host)
    coef = jnp.zeros((m, m), sdt)
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
        inject_at = -1
        for cycle in range(int(max_restarts) + 1):
            blocks, coef, f, f_norm, scale, lost = _extend_jit(
                op.apply,
                op.operand,
                blocks,
                coef,
                start,
                jax.random.normal(jax.random.fold_in(key_loop, 2 * cycle), (n,), sdt),
                inject_at,
                op.dtype,
                bd_tol,
            )
            num_matvecs += m - start
            coef_h = np.asarray(coef, dtype=np.float64)
            f_norm = float(f_norm)
            _check_finite(coef_h, f_norm)
            t = np.tril(coef_h) + np.tril(coef_h, -1).T
            theta, s = np.linalg.eigh(t)
            order = np.arange(m)[::-1] if largest else np.arange(m)
            anorm = max(anorm, float(np.max(np.abs(theta))))
            thresh = tol * anorm
            want = order[:k]
            lost = np.asarray(lost, dtype=np.float64)
            estimates = f_norm * np.abs(s[m - 1, want]) + lost @ np.abs(s[:, want])
            last_state = (blocks, theta, s, want, thresh)
            all_est = bool(np.all(estimates <= thresh))
            bar.update(1)
            bar.set_postfix(converged=int(np.sum(estimates <= thresh)), matvecs=num_matvecs)

            if pending is not None:  # this was the verification cycle
                if np.max(np.abs(theta[want] - pending.values)) <= thresh:
                    # nothing new was found. Its space also holds the pending pairs, so its
                    # Ritz pairs are at least as good: return them if their true residuals
                    # pass (the estimates are loose after the injected random vector)
                    newer = _finish(op, blocks, theta, s, want, thresh, matvec_batch_size, sdt)
                    num_matvecs += k
                    if bool(np.all(newer.converged)):
                        return newer._replace(num_matvecs=num_matvecs)
                    return pending._replace(num_matvecs=num_matvecs)
                pending = None  # it found something new: keep iterating

            if all_est:
                result = _finish(op, blocks, theta, s, want, thresh, matvec_batch_size, sdt)
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
            # verification: improve the answer from f for half the cycle, then explore a
            # random direction (too short a cycle for both: start from the random vector)
            inject_at = p + (m - p - 1) // 2 if pending is not None and m - p >= 3 else -1
            use_random = (pending is not None and inject_at < 0) or (
                f_norm <= bd_tol * float(scale)
            )
            blocks, coef = _thick_restart(
                blocks,
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
    blocks, theta, s, want, thresh = last_state
    result = _finish(op, blocks, theta, s, want, thresh, matvec_batch_size, sdt)
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


@jax.jit
def _ritz_vectors(coeffs, blocks):
    """``coeffs^T V`` in the solver dtype (``coeffs`` ``(m, k)``), block by block."""
    bounds = _bounds_of(blocks)
    out = None
    for t, blk in enumerate(blocks):
        part = coeffs[bounds[t] : bounds[t + 1]].T @ _to_device(blk).astype(coeffs.dtype)
        out = part if out is None else out + part
    return out


def _device_of(op):
    """The first device holding the operator's data (None: jax's default device)."""
    for leaf in jax.tree_util.tree_leaves(op.operand):
        devices = getattr(leaf, "devices", None)
        if callable(devices):
            try:
                return sorted(devices(), key=lambda d: d.id)[0]
            except Exception:  # noqa: BLE001 - tracers, deleted arrays: fall back
                return None
    return None


def _finish(op, blocks, theta, s, want, thresh, batch_size, sdt) -> EigenResult:
    """Ritz vectors for the wanted pairs and their true residuals (``k`` matvecs)."""
    vectors = _ritz_vectors(jnp.asarray(s[:, want], sdt), blocks)
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
