"""The host side of the Krylov engine: one solver run's basis, its random vectors, and the
calls of :mod:`hessspec.linalg.krylov`'s compiled programs on it.

A solver (:func:`hessspec.top_eigenpairs`, :func:`hessspec.lanczos_tridiag`,
:func:`hessspec.spectral_density`, :func:`hessspec.linalg.trace`) makes one
:class:`KrylovRunner` and drives it with a few verbs: Lanczos steps from a start vector
(:meth:`KrylovRunner.lanczos`), a thick restart (:meth:`KrylovRunner.restart`), statistics of
basis rows (:meth:`KrylovRunner.row_stats`), quadratic forms and Hutch++'s range rows
(:meth:`KrylovRunner.quadratic_form`, :meth:`KrylovRunner.store_range`). Between verbs it
reads the small projected matrix back (:meth:`KrylovRunner.projected`) and decides on the host.

Random vectors (start vectors, probes, the noise a breakdown continues from) are drawn on the
host by a NumPy generator seeded from the run's JAX key, so no random-number program is
compiled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessspec.linalg.krylov import (
    ACTION_LANCZOS,
    ACTION_STATS,
    ACTION_STORE,
    PREPARE_GIVEN,
    PREPARE_RESIDUAL,
    PREPARE_ROW,
    SOURCE_CARRIED,
    SOURCE_ROW,
    KrylovPass,
    breakdown_tolerance,
    engine,
    num_blocks,
    read_row,
    resolution_tolerance,
    thick_restart,
    zero_state,
)
from hessspec.linalg.linop import LinearOperator, solver_dtype

__all__ = [
    "DEFAULT_SEED",
    "KrylovRunner",
    "Projection",
    "RowStats",
    "check_finite",
    "numpy_generator",
]

DEFAULT_SEED = 0
"""Seed used when ``key=None``, as for ``jax.random.key(0)`` (results are reproducible)."""

_PREPARE_CODES = {"row": PREPARE_ROW, "given": PREPARE_GIVEN, "residual": PREPARE_RESIDUAL}


def check_finite(*arrays: Any) -> None:
    """Raise ``FloatingPointError`` if any array holds NaN or Inf (a matvec went bad)."""
    for a in arrays:
        if not np.all(np.isfinite(np.asarray(a))):
            raise FloatingPointError(
                "the Hessian-vector product (matvec) is not finite: NaN or Inf appeared in "
                "the Krylov iteration. Check the parameters and the data for NaN/Inf (and "
                "the loss for overflow, e.g. log of 0)."
            )


def numpy_generator(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX PRNG key (None: :data:`DEFAULT_SEED`): the solvers
    draw their random vectors on the host, so no random-number program is compiled."""
    if key is None:
        return np.random.default_rng(DEFAULT_SEED)
    data = np.asarray(jax.random.key_data(key), dtype=np.uint32).ravel()
    return np.random.default_rng([int(d) for d in data])


class Projection(NamedTuple):
    """The engine state a Lanczos solver decides from, on the host (``M`` basis rows).

    Attributes:
        coef: ``(M, M)`` float64 row-wise projections (see
            :class:`hessspec.linalg.krylov.KrylovState`); ``tril(coef)`` holds ``V^T A V``.
        residual_norm: ``||f||``, the norm of the vector after the last Lanczos step.
        lost: ``(M,)`` float64 residual parts outside the basis, per row.
        steps_done: index after the last Lanczos step done.
    """

    coef: np.ndarray
    residual_norm: float
    lost: np.ndarray
    steps_done: int


class RowStats(NamedTuple):
    """Statistics of a pass over vectors ``x_i``, float64 ``(count,)`` arrays on the host.

    Attributes:
        quad: ``<x_i, A x_i>`` (for a Hutch++ range row: its norm after Gram-Schmidt).
        misfit: ``||A x_i - theta_i x_i||`` for the given ``theta_i``.
    """

    quad: np.ndarray
    misfit: np.ndarray


class KrylovRunner:
    """One solver run's basis and the calls of the compiled programs on it.

    Args:
        op: the operator.
        rows: basis rows ``M`` (use :func:`hessspec.linalg.krylov.basis_rows`).
        basis_dtype: dtype of the stored basis.
        host: keep the basis in host memory.
        key: PRNG key of the run (seeds the host generator of probes and start vectors);
            None for the default seed.
    """

    def __init__(self, op: LinearOperator, rows: int, *, basis_dtype, host: bool, key):
        self.op = op
        self.rows = int(rows)
        self.sdt = solver_dtype(op.dtype)
        self.rng = numpy_generator(key)
        self.breakdown_tol = breakdown_tolerance(op.dtype)
        self.resolution_tol = resolution_tolerance(op.dtype)
        self.state = zero_state(
            self.rows, op.dim, self.sdt, np.dtype(basis_dtype), num_blocks(self.rows, op.dim), host
        )
        self._zeros_n = jax.device_put(np.zeros(op.dim, self.sdt))
        self.noise = jnp.asarray(self.rng.standard_normal(op.dim).astype(self.sdt))
        self._no_values = np.zeros(self.rows, self.sdt)

    def rademacher(self) -> np.ndarray:
        """A fresh ``(n,)`` vector of independent ``+-1`` entries (solver dtype)."""
        return self.rng.choice(np.array([-1.0, 1.0], self.sdt), size=self.op.dim)

    def restart(self, coeffs, values, keep: int, *, lost=None) -> None:
        """Thick restart keeping ``keep`` Ritz vectors ``coeffs[:, i]`` (``(m, keep)``, host
        arrays) with Ritz values ``values``; the next pass prepares the continuation."""
        s = np.zeros((self.rows, self.rows), self.sdt)
        s[: coeffs.shape[0], :keep] = coeffs[:, :keep]
        vals = np.zeros(self.rows, self.sdt)
        vals[:keep] = values[:keep]
        lost_rows = np.zeros(self.rows, self.sdt)
        if lost is not None:
            lost_rows[:keep] = lost[:keep]
        self.state = thick_restart(self.state, s, vals, np.int32(keep), lost_rows)

    def _run(
        self,
        lo: int,
        hi: int,
        *,
        source=SOURCE_CARRIED,
        action=ACTION_LANCZOS,
        prepare=None,
        vector=None,
        passes=2,
        normalize=True,
        store=True,
        values=None,
        stop=False,
    ) -> None:
        """One engine call; ``prepare`` is None (no preparation), ``"row"``, ``"given"``
        (``vector``) or ``"residual"``."""
        ctl = KrylovPass(
            source=np.int32(source),
            action=np.int32(action),
            lo=np.int32(lo),
            hi=np.int32(hi),
            prepare=np.bool_(prepare is not None),
            prepare_source=np.int32(_PREPARE_CODES.get(prepare, PREPARE_ROW)),
            prepare_passes=np.int32(passes),
            prepare_normalize=np.bool_(normalize),
            prepare_store=np.bool_(store),
            vector=self._zeros_n if vector is None else vector,
            noise=self.noise,
            values=self._no_values if values is None else values,
            stop_at_breakdown=np.bool_(stop),
            breakdown_tol=np.asarray(self.breakdown_tol, self.sdt),
            resolution_tol=np.asarray(self.resolution_tol, self.sdt),
        )
        self.state = engine(self.op.apply, self.op.dtype, self.op.operand, self.state, ctl)

    def lanczos(self, lo: int, hi: int, *, stop_at_breakdown: bool, start=None) -> None:
        """Lanczos steps ``lo .. hi - 1``. ``start``: None continues from row ``lo``; a
        vector (``(n,)``), ``"random"`` or ``"residual"`` (``f``) is first orthonormalized
        against rows ``0..lo-1`` and placed at row ``lo``."""
        if start is None:
            self._run(lo, hi, stop=stop_at_breakdown)
            return
        if isinstance(start, str) and start == "residual":
            self._run(lo, hi, prepare="residual", stop=stop_at_breakdown)
            return
        vector = self.rademacher() if isinstance(start, str) and start == "random" else start
        self._run(lo, hi, prepare="given", vector=vector, stop=stop_at_breakdown)

    def row_stats(self, lo: int, hi: int, values) -> RowStats:
        """:class:`RowStats` of basis rows ``y_i``, ``i = lo .. hi - 1``, against ``values``:
        ``<y_i, A y_i>`` and ``||A y_i - values_i y_i||``."""
        vals = np.zeros(self.rows, self.sdt)
        vals[lo:hi] = values
        self._run(lo, hi, source=SOURCE_ROW, action=ACTION_STATS, values=vals)
        return self.stats(hi - lo)

    def quadratic_form(self, vector, *, project_rows: int = 0) -> float:
        """``z^T A z`` for ``z = vector`` projected off basis rows ``0..project_rows-1``
        (one Gram-Schmidt pass; none for 0)."""
        self._run(
            project_rows,
            project_rows + 1,
            action=ACTION_STATS,
            prepare="given",
            vector=vector,
            passes=1 if project_rows else 0,
            normalize=False,
            store=False,
        )
        return float(self.stats(1).quad[0])

    def store_range(self, row: int, vector) -> float:
        """Row ``row`` = ``A z`` orthonormalized against rows ``0..row-1``; returns its norm
        after Gram-Schmidt (0 where ``A z`` lies in their span: the row is then zero)."""
        self._run(
            row,
            row + 1,
            action=ACTION_STORE,
            prepare="given",
            vector=vector,
            passes=0,
            normalize=False,
            store=False,
        )
        return float(self.stats(1).quad[0])

    def stats(self, count: int) -> RowStats:
        """The :class:`RowStats` of the last pass's first ``count`` iterations."""
        quad = np.asarray(self.state.quad, np.float64)[:count]
        misfit = np.asarray(self.state.misfit, np.float64)[:count]
        return RowStats(quad, misfit)

    def projected(self) -> Projection:
        """The :class:`Projection` of the current state, on the host (float64)."""
        st = self.state
        return Projection(
            coef=np.asarray(st.coef, np.float64),
            residual_norm=float(st.residual_norm),
            lost=np.asarray(st.lost, np.float64),
            steps_done=int(st.steps_done),
        )

    def rows_on_host(self, count: int, dtype=np.float64) -> np.ndarray:
        """Basis rows ``0..count-1`` as a ``(count, n)`` NumPy array of ``dtype``."""
        out = np.empty((count, self.op.dim), dtype)
        for i in range(count):
            out[i] = np.asarray(read_row(self.state.basis, np.int32(i)), dtype)
        return out
