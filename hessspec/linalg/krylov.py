"""The Krylov engine: one compiled matvec loop shared by every solver.

Lanczos (:func:`hessspec.top_eigenpairs`, :func:`hessspec.lanczos_tridiag`), stochastic
Lanczos quadrature (:func:`hessspec.spectral_density`) and Hutch++
(:func:`hessspec.linalg.trace`) all run the same compiled program, :func:`engine`: a
``lax.while_loop`` whose body takes one vector ``x``, computes ``w = A x`` with the operator's
matvec, and does one of three things with it. What the program depends on is the operator's
*structure* (its ``apply``, hashable by value, and the shapes and dtypes of its operand) and
the number of basis rows ``M`` -- never ``k``, ``which``, the number of probes or of
matvecs, nor the operator's values. Everything else (where to start and stop, which vector,
which action, coefficients) is a traced argument (:class:`KrylovPass`). So a process
compiles the program once per operator structure and basis size, and a Hessian of the same
loss at the next checkpoint, another ``k``, the smallest end, another probe count or a
trace reuse it. The host side (:class:`hessspec.linalg.krylov_runner.KrylovRunner`) draws
the random vectors and calls the programs.

Per loop iteration ``i`` in ``[lo, hi)``:

* source of ``x`` (:attr:`KrylovPass.source`): the carried vector (the current Lanczos
  vector, or at ``lo`` a prepared one: a given vector such as a Rademacher probe, the
  residual ``f`` or a basis row, optionally projected off rows ``0..lo-1``,
  ``z - V^T V z``), or row ``i`` of the basis;
* action: a Lanczos step (three-term recurrence, Gram-Schmidt against the stored basis,
  breakdown handling, the new row written in place), row statistics (``<x, A x>`` and
  ``||A x - theta_i x||``), or orthonormalize ``A x`` against the stored rows and store it
  at row ``i`` (the range finder of Hutch++).

Around it, small programs without a matvec: :func:`zero_state` allocates, :func:`thick_restart`
performs a thick restart ``V <- S^T V`` (Wu & Simon 2000), :func:`read_row` reads a row. The
restart is separate so that the engine's memory does not include its temporary copy of the
basis. Nothing is ever cleared: every pass reads only the rows it has written (rows beyond
the Krylov front are masked out of Gram-Schmidt), so SLQ starts each probe over at row 0.

The basis ``V`` has ``M = basis_rows(m)`` rows (a power of two, at least
:data:`MIN_BASIS_ROWS`; rows beyond the Krylov front are never read), stored in row blocks so a
Gram-Schmidt pass reads only the blocks already filled, in the basis dtype (the solver dtype,
float64 where x64 is on, or float32 on request), in device or host memory.

Precision: vectors, coefficients and the projected matrix are in the solver dtype
(:func:`hessspec.linalg.linop.solver_dtype`); each ``x`` is cast to the operator's dtype for the
matvec and the product cast back.

Reorthogonalization: a Lanczos step subtracts the three-term recurrence and then makes one
classical Gram-Schmidt pass against the stored rows; a step whose recurrence does not hold
(the first of a call, the one after a fresh vector) makes at least two. Any pass that shrinks
the vector below :data:`DGKS_RATIO` of its norm is followed by another (Daniel, Gragg,
Kaufman & Stewart 1976), at most :data:`MAX_GS_PASSES`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hessspec.linalg.linop import matvec

__all__ = [
    "BASIS_MEMORIES",
    "BREAKDOWN_FACTOR",
    "DGKS_RATIO",
    "MIN_BASIS_ROWS",
    "RESOLUTION_FACTOR",
    "KrylovPass",
    "KrylovState",
    "basis_rows",
    "breakdown_tolerance",
    "check_basis_memory",
    "resolution_tolerance",
]

MIN_BASIS_ROWS = 128
"""Fewest rows of a basis. Every default (top-k Lanczos for ``k`` up to 54, 90-step SLQ,
Hutch++ with up to 384 matvecs) fits in 128 rows, so they share one compiled engine."""

NUM_BASIS_BLOCKS = 8
"""A large basis is stored as this many row blocks (one ``(B, R, n)`` array); step ``j``
reorthogonalizes only against the blocks holding rows ``0..j``, in a loop over blocks."""

BLOCKED_MIN_ELEMENTS = 2**18
"""Bases with fewer entries (``rows * dim``) stay one block: they sit in cache."""

DGKS_RATIO = 0.7
"""A Gram-Schmidt pass that leaves less than this fraction of the vector's norm is repeated."""

MAX_GS_PASSES = 3
"""Most Gram-Schmidt passes per vector."""

BREAKDOWN_FACTOR = 100.0
"""A Lanczos ``beta_j`` counts as zero (the Krylov space is invariant) when ``beta_j <=
BREAKDOWN_FACTOR * eps(op dtype) * ||A v_j||``: relative to the step's own product, whose
rounding is what remains at invariance (a float64 dense matrix with three distinct
eigenvalues stops at ``beta ~ 10 eps ||A||``). Missing a breakdown is harmless (the next
vector is a rounding-noise direction orthogonal to the basis, coupled by ``beta ~ 0``)."""

RESOLUTION_FACTOR = 12.0
"""What a matvec resolves at all: ``RESOLUTION_FACTOR * eps(op dtype) * max_i ||A x_i||``.
A large eigenvalue sets the rounding of every product, so where ``beta_j`` falls below this
(a breakdown included) eigenvalues closer together than it may have been merged or replaced
by noise (the bulk of width 0.1 under a float32 outlier of 1e4 keeps ``beta ~ 0.025 =
21 eps ||A||``; one of width 1e-4 falls below); such steps are counted
(``KrylovState.unresolved``) and reported."""

COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
"""XLA options of the engine program: LLVM's level 1 instead of the default compiles the
program about a third faster on CPU and runs its matvec as fast (measured on the digits MLP
and CNN; matrix products and convolutions are library calls either way)."""

SMALL_PROGRAM_OPTIONS = {"xla_backend_optimization_level": 0}
"""XLA options of the programs around the engine (allocation, reset, restart, reading a row):
memory moves and one matrix product (a library call), which LLVM optimization does not
speed up; level 0 compiles them several times faster."""

BASIS_MEMORIES = ("device", "host")
"""Where the basis can live: the operator's device memory, or host memory (JAX memory space
``pinned_host``), streamed block by block to the device for each Gram-Schmidt pass."""


def basis_rows(num_steps: int) -> int:
    """Rows ``M`` of the basis for ``num_steps`` Lanczos steps (or stored vectors): the next
    power of two, at least :data:`MIN_BASIS_ROWS`."""
    return max(MIN_BASIS_ROWS, 1 << (max(int(num_steps), 1) - 1).bit_length())


def breakdown_tolerance(op_dtype) -> float:
    """Relative breakdown threshold ``BREAKDOWN_FACTOR * eps(op_dtype)`` (see
    :data:`BREAKDOWN_FACTOR`): the matvec's precision, not the solver's, sets it."""
    return BREAKDOWN_FACTOR * float(jnp.finfo(op_dtype).eps)


def resolution_tolerance(op_dtype) -> float:
    """Relative resolution ``RESOLUTION_FACTOR * eps(op_dtype)`` (see
    :data:`RESOLUTION_FACTOR`), to be multiplied by the largest ``||A x||`` seen."""
    return RESOLUTION_FACTOR * float(jnp.finfo(op_dtype).eps)


def check_basis_memory(basis_memory: str, caller: str) -> bool:
    """Validate ``basis_memory``; True for ``"host"``."""
    if basis_memory not in BASIS_MEMORIES:
        raise ValueError(
            f"{caller}: basis_memory={basis_memory!r} must be 'device' or 'host' (keep the "
            "Krylov basis in host memory to save device memory)."
        )
    return basis_memory == "host"


# ---------------------------------------------------------------------------------------
# the blocked basis


def num_blocks(rows: int, dim: int) -> int:
    """Number of row blocks of a ``(rows, dim)`` basis (a static choice; divides ``rows``)."""
    if rows * dim < BLOCKED_MIN_ELEMENTS:
        return 1
    count = min(rows, NUM_BASIS_BLOCKS)
    while rows % count:
        count -= 1
    return count


def _on_host(a) -> bool:
    return getattr(jax.typeof(a), "memory_space", None) == jax.memory.Space.Host


def _to_device(a):
    return jax.device_put(a, jax.memory.Space.Device) if _on_host(a) else a


def _to_space_of(a, ref):
    return jax.device_put(a, jax.memory.Space.Host) if _on_host(ref) else a


def _get_row(basis, i):
    """Row ``i`` of the ``(B, R, n)`` basis, on the device."""
    r = basis.shape[1]
    i = jnp.asarray(i, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    row = jax.lax.dynamic_slice(basis, (i // r, i % r, zero), (1, 1, basis.shape[2]))
    return _to_device(row).reshape(-1)


def _set_row(basis, i, row):
    """The basis with row ``i`` replaced by ``row`` (in place under jit)."""
    r = basis.shape[1]
    i = jnp.asarray(i, jnp.int32)
    new = _to_space_of(row.astype(basis.dtype).reshape(1, 1, -1), basis)
    return jax.lax.dynamic_update_slice(basis, new, (i // r, i % r, jnp.zeros((), jnp.int32)))


def _gs_pass(basis, w, rows):
    """One classical Gram-Schmidt pass ``w - V^T (V w)`` against basis rows ``0..rows-1``
    (traced; later rows are ignored, whatever they hold), one ``(R, n)`` block of the
    ``(B, R, n)`` basis at a time (a block in host memory is streamed to the device). Returns
    the new ``w`` and the ``(B R,)`` coefficients ``V w`` (zero from row ``rows`` on). The
    products run in the basis dtype."""
    nb, r, n = basis.shape
    wb = w.astype(basis.dtype)
    local = jnp.arange(r)

    def body(t, carry):
        update, coeffs = carry
        blk = _to_device(jax.lax.dynamic_index_in_dim(basis, t, keepdims=False))
        c = jnp.where(t * r + local < rows, blk @ wb, 0)
        return update + c @ blk, jax.lax.dynamic_update_slice(coeffs, c, (t * r,))

    init = (jnp.zeros((n,), basis.dtype), jnp.zeros((nb * r,), basis.dtype))
    update, coeffs = jax.lax.fori_loop(0, (rows + r - 1) // r, body, init)
    return w - update.astype(w.dtype), coeffs.astype(w.dtype)


def _orthogonalize(basis, w, rows, min_passes):
    """Gram-Schmidt against basis rows ``0..rows-1``: ``min_passes`` passes (traced), and
    one more while a pass shrinks ``w`` below :data:`DGKS_RATIO` of its norm, at most
    :data:`MAX_GS_PASSES`. Returns ``w`` and the summed coefficients."""
    size = basis.shape[0] * basis.shape[1]

    def cond(carry):
        passes, _, _, shrunk = carry
        return (passes < min_passes) | (shrunk & (passes < MAX_GS_PASSES))

    def body(carry):
        passes, w, coeffs, _ = carry
        before = jnp.linalg.norm(w)
        w, c = _gs_pass(basis, w, rows)
        return passes + 1, w, coeffs + c, jnp.linalg.norm(w) < DGKS_RATIO * before

    init = (jnp.zeros((), jnp.int32), w, jnp.zeros((size,), w.dtype), jnp.ones((), bool))
    _, w, coeffs, _ = jax.lax.while_loop(cond, body, init)
    return w, coeffs


# ---------------------------------------------------------------------------------------
# state and passes


class KrylovState(NamedTuple):
    """What persists between engine calls (all device arrays; ``M`` rows, ``n = dim``).

    Attributes:
        basis: the basis ``V``, ``M`` rows of length ``n`` stored as ``(B, R, n)`` row
            blocks (``M = B R``; basis dtype; host or device memory). Rows beyond the Krylov
            front may hold an earlier run's vectors: nothing reads them.
        coef: ``(M, M)`` projections by rows: Lanczos step ``j`` writes row ``j``,
            ``coef[j, :j+1] = V A v_j`` and ``coef[j, j+1] = beta_j``. ``tril(coef)`` is the
            lower triangle of the Rayleigh quotient ``V^T A V``.
        residual: ``(n,)`` ``f``, the vector after the last Lanczos step before
            normalization (``beta_j v_{j+1}``).
        residual_norm: ``||f||`` (0 after a breakdown that stopped the run).
        scale: largest ``||A x||`` seen since the last reset (a lower bound on ``||A||``).
        lost: ``(M,)`` norms of residual parts outside the basis, per row: what a breakdown
            dropped, and the residuals of restarted Ritz vectors continued by a random
            vector. A Ritz vector ``V^T s`` has residual at most
            ``|s_last| ||f|| + sum_r |s_r| lost_r``.
        quad: ``(M,)`` ``<x, A x>`` of each iteration of a statistics pass, at ``i - lo``
            (for a store pass: the norm of ``A x`` after Gram-Schmidt).
        misfit: ``(M,)`` ``||A x - values_i x||`` of a statistics pass, at ``i - lo``.
        steps_done: index after the last Lanczos step done.
        need_fresh: the last step broke down; the next iteration places a fresh vector.
        unresolved: Lanczos steps since the last reset whose ``beta`` was below what the
            matvec resolves (:data:`RESOLUTION_FACTOR`), breakdowns included.
    """

    basis: jax.Array
    coef: jax.Array
    residual: jax.Array
    residual_norm: jax.Array
    scale: jax.Array
    lost: jax.Array
    quad: jax.Array
    misfit: jax.Array
    steps_done: jax.Array
    need_fresh: jax.Array
    unresolved: jax.Array


class KrylovPass(NamedTuple):
    """One engine call; every field traced, so no combination compiles anew.

    The call runs iterations ``i = lo .. hi - 1``, each one matvec ``w = A x``:

    * ``x`` (``source``): ``SOURCE_CARRIED``, the vector the previous iteration left (the
      Lanczos vector; at ``lo``, basis row ``lo`` or the prepared vector), or
      ``SOURCE_ROW``, basis row ``i``;
    * then (``action``): ``ACTION_LANCZOS`` a Lanczos step; ``ACTION_STATS`` records
      ``<x, w>`` and ``||w - values[i] x||``; ``ACTION_STORE`` orthonormalizes ``w`` against
      rows ``0..i-1`` and stores it at row ``i``.

    With ``prepare``, a first iteration without matvec prepares the start vector: the
    ``prepare_source`` (``PREPARE_ROW``: row ``lo``; ``PREPARE_GIVEN``: ``vector``;
    ``PREPARE_RESIDUAL``: the state's ``f``) gets ``prepare_passes`` Gram-Schmidt passes
    against rows ``0..lo-1``, is normalized if ``prepare_normalize``, stored at row ``lo``
    if ``prepare_store``, and becomes the carried vector.

    Attributes:
        source, action, lo, hi, prepare, prepare_source, prepare_passes, prepare_normalize,
        prepare_store: as above.
        vector: ``(n,)`` the given vector.
        noise: ``(n,)`` a random vector; after a breakdown at step ``j`` (unless
            ``stop_at_breakdown``) the run continues from ``roll(noise, j + 1)``
            orthonormalized against the basis.
        values: ``(M,)`` the ``theta_i`` of a statistics pass, by row.
        stop_at_breakdown: a breakdown ends the pass (SLQ, tridiagonalization).
        breakdown_tol: relative breakdown threshold (:func:`breakdown_tolerance`).
        resolution_tol: relative resolution (:func:`resolution_tolerance`).
    """

    source: jax.Array
    action: jax.Array
    lo: jax.Array
    hi: jax.Array
    prepare: jax.Array
    prepare_source: jax.Array
    prepare_passes: jax.Array
    prepare_normalize: jax.Array
    prepare_store: jax.Array
    vector: jax.Array
    noise: jax.Array
    values: jax.Array
    stop_at_breakdown: jax.Array
    breakdown_tol: jax.Array
    resolution_tol: jax.Array


SOURCE_CARRIED, SOURCE_ROW = 0, 1
ACTION_LANCZOS, ACTION_STATS, ACTION_STORE = 0, 1, 2
PREPARE_ROW, PREPARE_GIVEN, PREPARE_RESIDUAL = 0, 1, 2


class _Carry(NamedTuple):
    i: jax.Array
    state: KrylovState
    v: jax.Array  # the carried vector (solver dtype)
    v_prev: jax.Array
    fresh_prev: jax.Array  # the carried vector starts a sequence: no three-term recurrence
    stop: jax.Array
    prepared: jax.Array


def _safe_unit(u, norm):
    ok = norm > 0
    return jnp.where(ok, u / jnp.where(ok, norm, 1), 0)


def _iteration(carry: _Carry, ctl: KrylovPass, apply, op_dtype, operand) -> _Carry:
    """One loop iteration: prepare a vector, or ``w = A x`` and the action. Every branch
    shares one matvec, one Gram-Schmidt loop and one row write (compile time)."""
    st, i = carry.state, carry.i
    sdt = st.coef.dtype
    rows = st.coef.shape[0]
    zero = jnp.zeros((), sdt)
    prep = (ctl.prepare & ~carry.prepared) | st.need_fresh
    fresh = st.need_fresh
    # a run that starts over at row 0 forgets the previous run's scale and counts (the basis
    # and coefficients need no clearing: nothing reads rows beyond the Krylov front)
    start = prep & ~fresh & (i == 0)
    st = st._replace(
        scale=jnp.where(start, zero, st.scale),
        unresolved=jnp.where(start, 0, st.unresolved),
    )

    row = _get_row(st.basis, jnp.clip(i, 0, rows - 1)).astype(sdt)
    raw = jnp.where(
        ctl.prepare_source == PREPARE_GIVEN,
        ctl.vector.astype(sdt),
        jnp.where(ctl.prepare_source == PREPARE_RESIDUAL, st.residual, row),
    )
    raw = jnp.where(fresh, jnp.roll(ctl.noise, i).astype(sdt), raw)
    x = jnp.where(prep, raw, jnp.where(ctl.source == SOURCE_ROW, row, carry.v))
    w = jax.lax.cond(
        prep, lambda x: x, lambda x: matvec(apply, x.astype(op_dtype), operand).astype(sdt), x
    )
    w_norm = jnp.linalg.norm(w)
    scale = jnp.where(prep, st.scale, jnp.maximum(st.scale, w_norm))

    lanczos = ~prep & (ctl.action == ACTION_LANCZOS)
    store = ~prep & (ctl.action == ACTION_STORE)
    recurrence = lanczos & ~carry.fresh_prev
    jm = jnp.maximum(i - 1, 0)
    b_prev = st.coef[jm, i]
    w3 = w - b_prev * carry.v_prev
    alpha = carry.v @ w3
    u = jnp.where(recurrence, w3 - alpha * carry.v, w)
    local = jnp.where(recurrence, jnp.zeros((rows,), sdt).at[i].set(alpha).at[jm].add(b_prev), 0)
    passes = jnp.where(
        prep,
        jnp.where(fresh, 2, ctl.prepare_passes),
        jnp.where(lanczos, jnp.where(recurrence, 1, 2), jnp.where(store, 2, 0)),
    )
    u, c_pass = _orthogonalize(st.basis, u, jnp.where(lanczos, i + 1, i), passes)
    beta = jnp.linalg.norm(u)

    # Lanczos: breakdown, the next vector, the coefficients of row i
    broken = lanczos & (beta <= ctl.breakdown_tol * w_norm)  # False for NaN: host sees it
    unresolved = lanczos & (beta <= ctl.resolution_tol * scale)
    stop = broken & ctl.stop_at_breakdown
    full = i >= rows - 1
    need_fresh = broken & ~ctl.stop_at_breakdown & ~full
    sub = jnp.where(broken, zero, beta)
    coeffs = (local + c_pass).at[jnp.minimum(i + 1, rows - 1)].set(jnp.where(full, 0, sub))

    normalize = prep & (fresh | ctl.prepare_normalize) | store | (lanczos & ~broken)
    vec = jnp.where(normalize, _safe_unit(u, beta), u)
    vec = jnp.where(store & ~(beta > ctl.breakdown_tol * w_norm), 0, vec)
    write = (prep & (fresh | ctl.prepare_store)) | store | (lanczos & ~broken & ~full)
    target = jnp.where(lanczos, i + 1, i)
    basis = jax.lax.cond(
        write,
        lambda b: _set_row(b, jnp.minimum(target, rows - 1), vec),
        lambda b: b,
        st.basis,
    )
    stats = ~prep & (ctl.action == ACTION_STATS)
    at = jnp.clip(i - ctl.lo, 0, rows - 1)
    state = st._replace(
        basis=basis,
        coef=jnp.where(lanczos, st.coef.at[i].set(coeffs), st.coef),
        residual=jnp.where(lanczos, jnp.where(stop, 0, u), st.residual),
        residual_norm=jnp.where(lanczos, jnp.where(stop, zero, beta), st.residual_norm),
        scale=scale,
        lost=jnp.where(lanczos, st.lost.at[i].set(jnp.where(need_fresh, beta, zero)), st.lost),
        quad=jnp.where(
            stats, st.quad.at[at].set(x @ w), jnp.where(store, st.quad.at[at].set(beta), st.quad)
        ),
        misfit=jnp.where(
            stats, st.misfit.at[at].set(jnp.linalg.norm(w - ctl.values[i] * x)), st.misfit
        ),
        steps_done=jnp.where(lanczos, i + 1, st.steps_done),
        need_fresh=jnp.where(prep, False, need_fresh),
        unresolved=st.unresolved + unresolved.astype(jnp.int32),
    )
    # the next vector is exactly the stored row (basis dtype)
    stored = vec.astype(st.basis.dtype).astype(sdt)
    v_next = jnp.where(prep | lanczos, jnp.where(write, stored, vec), carry.v)
    return _Carry(
        i=jnp.where(prep, i, i + 1),
        state=state,
        v=jnp.where(stop, 0, v_next),
        v_prev=jnp.where(lanczos, carry.v, carry.v_prev),
        fresh_prev=prep,
        stop=stop,
        prepared=carry.prepared | prep,
    )


@partial(
    jax.jit,
    static_argnames=("apply", "op_dtype"),
    donate_argnames=("state",),
    compiler_options=COMPILER_OPTIONS,
)
def engine(apply, op_dtype, operand, state: KrylovState, ctl: KrylovPass) -> KrylovState:
    """Iterations ``ctl.lo .. ctl.hi - 1`` (see :class:`KrylovPass`). One compiled program
    per ``apply``, operand structure and basis shape."""
    sdt = state.coef.dtype
    n = state.residual.shape[0]
    rows = state.coef.shape[0]
    v = _get_row(state.basis, jnp.clip(ctl.lo, 0, rows - 1)).astype(sdt)
    false = jnp.zeros((), bool)
    init = _Carry(ctl.lo, state, v, jnp.zeros((n,), sdt), jnp.ones((), bool), false, false)

    def cond(carry):
        return (carry.i < ctl.hi) & ~carry.stop

    def body(carry):
        return _iteration(carry, ctl, apply, op_dtype, operand)

    return jax.lax.while_loop(cond, body, init).state


# ---------------------------------------------------------------------------------------
# programs without a matvec


@partial(
    jax.jit,
    static_argnames=("rows", "dim", "sdt", "bdt", "count", "host"),
    compiler_options=SMALL_PROGRAM_OPTIONS,
)
def zero_state(rows, dim, sdt, bdt, count, host) -> KrylovState:
    basis = jnp.zeros((count, rows // count, dim), bdt)
    if host:
        basis = jax.device_put(basis, jax.memory.Space.Host)
    vec = jnp.zeros((rows,), sdt)
    return KrylovState(
        basis=basis,
        coef=jnp.zeros((rows, rows), sdt),
        residual=jnp.zeros((dim,), sdt),
        residual_norm=jnp.zeros((), sdt),
        scale=jnp.zeros((), sdt),
        lost=vec,
        quad=vec,
        misfit=vec,
        steps_done=jnp.zeros((), jnp.int32),
        need_fresh=jnp.zeros((), bool),
        unresolved=jnp.zeros((), jnp.int32),
    )


@partial(jax.jit, donate_argnames=("state",), compiler_options=SMALL_PROGRAM_OPTIONS)
def thick_restart(state: KrylovState, coeffs, values, keep, lost) -> KrylovState:
    """Thick restart: rows ``0..keep-1`` become ``Y = S^T V`` (``S = coeffs`` ``(M, M)``, zero
    beyond column ``keep``), later rows zero; the projected matrix ``diag(values[:keep])``,
    ``lost`` the given per-row bounds. ``f`` stays (the next pass may continue from it)."""
    basis = state.basis
    nb, r, n = basis.shape
    s_blocks = coeffs.astype(basis.dtype).reshape(nb, r, nb * r)

    def add_block(t, kept):  # Y = S^T V, one block of V at a time
        blk = _to_device(jax.lax.dynamic_index_in_dim(basis, t, keepdims=False))
        return kept + jax.lax.dynamic_index_in_dim(s_blocks, t, keepdims=False).T @ blk

    kept = jax.lax.fori_loop(0, nb, add_block, jnp.zeros((nb * r, n), basis.dtype))
    new = _to_space_of(kept.reshape(nb, r, n), basis)
    first = jnp.arange(state.coef.shape[0]) < keep
    return state._replace(
        basis=new,
        coef=jnp.diag(jnp.where(first, values, 0)).astype(state.coef.dtype),
        lost=jnp.where(first, lost, 0).astype(state.lost.dtype),
        steps_done=keep.astype(jnp.int32),
        need_fresh=jnp.zeros((), bool),
    )


@partial(jax.jit, compiler_options=SMALL_PROGRAM_OPTIONS)
def read_row(basis, i):
    return _get_row(basis, i)
