"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a symmetric ``A`` (``n x n``) with eigenpairs ``(lambda_i, q_i)``, the spectral density
``phi(t) = (1/n) sum_i delta(t - lambda_i)`` is estimated from random unit probes ``v``
(normalized Rademacher vectors): ``E_v[ sum_i (q_i . v)^2 delta(t - lambda_i) ] = phi(t)``.
For each probe, ``m`` Lanczos steps from ``v`` give a tridiagonal ``T_m`` whose eigenpairs
``(tau_l, u_l)`` are the nodes and weights ``w_l = u_l[0]^2`` of the ``m``-point Gaussian
quadrature of that probe's measure (Golub & Meurant; Ubaru, Chen & Saad 2017; Ghorbani,
Krishnan & Xiao 2019). Averaging the probes' quadratures and broadening each node by a
Gaussian gives a smooth density.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from hessspec.linalg.krylov import (
    RESOLUTION_FACTOR,
    basis_rows,
    check_basis_memory,
    resolution_tolerance,
)
from hessspec.linalg.krylov_runner import KrylovRunner, check_finite
from hessspec.linalg.linop import LinearOperator, as_operator
from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype
from hessspec.linalg.memory import check_call

__all__ = [
    "SpectralDensity",
    "density_grid",
    "SpectralResolutionWarning",
    "gaussian_quadrature",
    "ghorbani_sigma",
    "spectral_density",
]


def ghorbani_sigma(lambda_min: float, lambda_max: float) -> float:
    """Ghorbani et al.'s broadening: ``sigma = sqrt(1e-5 * max(1, lambda_max - lambda_min))``.

    That is, Gaussian variance ``1e-5 * max(1, range)``. Note it is an absolute width: for a
    spectrum much narrower than 1 it is wide relative to the spectrum.
    """
    return float(np.sqrt(1e-5 * max(1.0, float(lambda_max) - float(lambda_min))))


def gaussian_quadrature(
    alphas: Any, betas: Any, num_steps_done: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the Gaussian quadrature defined by Lanczos tridiagonals.

    For ``T`` with diagonal ``alphas`` and off-diagonal ``betas``, ``T = U diag(tau) U^T``:
    nodes ``tau`` (ascending) and weights ``U[0, :]^2`` (summing to 1). Computed in float64
    with ``scipy.linalg.eigh_tridiagonal``.

    Args:
        alphas: ``(..., m)`` diagonals.
        betas: ``(..., m - 1)`` off-diagonals.
        num_steps_done: optional ``(...)`` valid sizes ``d <= m`` (Lanczos breakdown). Only
            ``T[:d, :d]`` is used; the ``m - d`` padding entries get weight 0 and repeat that
            probe's largest node (so they change neither sums nor the nodes' range).
            ``d = 0`` gives all-zero nodes and weights.

    Returns:
        ``(nodes, weights)``, each ``(..., m)`` float64.
    """
    import scipy.linalg  # deferred: a fifth of a second of `import hessspec`

    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    m = alphas.shape[-1]
    if m < 1 or betas.shape != alphas.shape[:-1] + (m - 1,):
        raise ValueError(
            f"gaussian_quadrature: alphas {alphas.shape} and betas {betas.shape} must have "
            "shapes (..., m) and (..., m - 1) with m >= 1."
        )
    batch = alphas.shape[:-1]
    if num_steps_done is None:
        done = np.full(batch, m, dtype=np.int64)
    else:
        done = np.broadcast_to(np.asarray(num_steps_done, dtype=np.int64), batch)
    a2 = alphas.reshape(-1, m)
    b2 = betas.reshape(a2.shape[0], m - 1)
    d2 = done.reshape(-1)
    nodes = np.zeros_like(a2)
    weights = np.zeros_like(a2)
    for i in range(a2.shape[0]):
        d = int(d2[i])
        if not 0 <= d <= m:
            raise ValueError(f"gaussian_quadrature: num_steps_done={d} outside [0, {m}].")
        if d == 0:
            continue
        if d == 1:
            tau, u0 = a2[i, :1], np.ones(1)
        else:
            tau, u = scipy.linalg.eigh_tridiagonal(a2[i, :d], b2[i, : d - 1])
            u0 = u[0]
        nodes[i, :d] = tau
        nodes[i, d:] = tau[-1]
        weights[i, :d] = u0**2
    return nodes.reshape(alphas.shape), weights.reshape(alphas.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Probe-wise Gaussian quadratures of the spectral measure, and their smoothing; the
    output of :func:`spectral_density` (NumPy arrays on the host).

    Attributes:
        nodes: ``(num_probes, num_steps)`` float64 quadrature nodes (Ritz values), ascending
            per probe; entries past a probe's ``num_steps_done`` have weight 0.
        weights: ``(num_probes, num_steps)`` float64 weights; each row sums to 1.
        num_steps_done: ``(num_probes,)`` int64 valid Lanczos steps per probe (``< num_steps``
            only where the Krylov space became invariant).
        dim: the operator's dimension ``n``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_steps_done: np.ndarray
    dim: int

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def lambda_min(self) -> float:
        """Smallest node (estimate of the smallest eigenvalue)."""
        return float(np.min(self.nodes))

    @property
    def lambda_max(self) -> float:
        """Largest node (estimate of the largest eigenvalue)."""
        return float(np.max(self.nodes))

    @property
    def default_sigma(self) -> float:
        """Default kernel width: :func:`ghorbani_sigma` of the extreme nodes,
        ``sqrt(1e-5 * max(1, lambda_max - lambda_min))``."""
        return ghorbani_sigma(self.lambda_min, self.lambda_max)

    def trace(self) -> tuple[float, float]:
        """The SLQ estimate of ``tr(A)`` and its standard error: per probe
        ``n sum_l w_l tau_l = n v^T A v`` (a Hutchinson sample of the normalized Rademacher
        probe ``v``), averaged over probes; the error is the spread over probes /
        ``sqrt(P)`` (NaN for one probe). :func:`hessspec.linalg.trace` (Hutch++) is far more
        accurate for the same matvecs when a few eigenvalues dominate."""
        per_probe = self.dim * np.sum(self.weights * self.nodes, axis=1)
        if per_probe.size < 2:
            return float(per_probe.mean()), float("nan")
        return float(per_probe.mean()), float(per_probe.std(ddof=1) / np.sqrt(per_probe.size))

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """The probe-averaged discrete measure: ``(points, masses)``, each
        ``(num_probes * num_steps,)``, masses ``weights / num_probes`` summing to 1."""
        return self.nodes.reshape(-1), self.weights.reshape(-1) / self.num_probes

    def density(self, grid: Any, sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density on ``grid``.

        ``rho(t) = (1/P) sum_p sum_l w_{p,l} N(t; tau_{p,l}, sigma^2)`` with
        ``N(t; mu, s^2) = exp(-(t - mu)^2 / (2 s^2)) / (s sqrt(2 pi))``: a probability density
        (integrates to 1 over the real line; on a grid covering
        ``[lambda_min - 5 sigma, lambda_max + 5 sigma]`` its Riemann sum is 1 to ~1e-6).
        It is not renormalized to the grid.

        Args:
            grid: ``(G,)`` points.
            sigma: kernel standard deviation; default :attr:`default_sigma`.

        Returns:
            ``(G,)`` float64 density values.
        """
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1:
            raise ValueError(f"density: grid must be 1-D, got shape {grid.shape}.")
        sigma = self.default_sigma if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"density: sigma={sigma} must be positive.")
        points, masses = self.quadrature()
        keep = masses > 0
        points, masses = points[keep], masses[keep]
        out = np.empty_like(grid)
        norm = 1.0 / (sigma * np.sqrt(2.0 * np.pi))
        chunk = max(1, 2_000_000 // max(1, points.size))
        for lo in range(0, grid.size, chunk):
            z = (grid[lo : lo + chunk, None] - points[None, :]) / sigma
            out[lo : lo + chunk] = (np.exp(-0.5 * z**2) @ masses) * norm
        return out


def density_grid(lo: float, hi: float, sigma: float, max_points: int = 20000) -> np.ndarray:
    """A uniform grid over ``[lo - 6 sigma, hi + 6 sigma]`` with about 5 points per ``sigma``
    (at least 1000, at most ``max_points``), so the Gaussian kernels are resolved."""
    a, b = lo - 6 * sigma, hi + 6 * sigma
    n = int(np.clip(np.ceil(5 * (b - a) / sigma), 1000, max_points))
    return np.linspace(a, b, n)


class SpectralResolutionWarning(UserWarning):
    """SLQ probes stopped early because the matvec could not resolve more of the spectrum."""


class _ProbeTridiagonals(NamedTuple):
    """The Lanczos tridiagonals of the SLQ probes (host arrays, ``P`` probes, ``m`` steps).

    Attributes:
        alphas: ``(P, m)`` diagonals; zero past a probe's ``done``.
        betas: ``(P, m - 1)`` off-diagonals; zero past ``done - 1``.
        done: ``(P,)`` int64 valid steps per probe.
        unresolved: ``(probe, steps, scale)`` of each probe with steps below the matvec's
            resolution (see :data:`hessspec.linalg.krylov.RESOLUTION_FACTOR`).
    """

    alphas: np.ndarray
    betas: np.ndarray
    done: np.ndarray
    unresolved: list[tuple[int, int, float]]


def _probe_tridiagonals(
    runner: KrylovRunner, num_probes: int, num_steps: int, *, progress: bool
) -> _ProbeTridiagonals:
    """``num_steps`` Lanczos steps from each of ``num_probes`` Rademacher probes (one after
    another on the runner's basis, each starting over at row 0), stopping at breakdown."""
    from tqdm.auto import tqdm

    alphas = np.zeros((num_probes, num_steps))
    betas = np.zeros((num_probes, max(num_steps - 1, 0)))
    done = np.zeros(num_probes, np.int64)
    unresolved = []
    for p in tqdm(range(num_probes), desc="slq", disable=not progress, leave=False):
        runner.lanczos(0, num_steps, stop_at_breakdown=True, start=runner.rademacher())
        proj = runner.projected()
        check_finite(proj.coef)
        steps = done[p] = proj.steps_done
        alphas[p, :steps] = np.diagonal(proj.coef)[:steps]
        betas[p, : max(steps - 1, 0)] = np.diagonal(proj.coef, 1)[: max(steps - 1, 0)]
        count = int(runner.state.unresolved)
        if count:
            unresolved.append((p, count, float(runner.state.scale)))
    return _ProbeTridiagonals(alphas, betas, done, unresolved)


def _check_sizes(num_probes, num_steps, n: int) -> tuple[int, int]:
    num_probes = operator.index(num_probes)
    num_steps = operator.index(num_steps)
    if num_probes < 1:
        raise ValueError(f"spectral_density: num_probes={num_probes} must be at least 1.")
    if num_steps < 1:
        raise ValueError(f"spectral_density: num_steps={num_steps} must be at least 1.")
    if num_steps > n:
        raise ValueError(
            f"spectral_density: num_steps={num_steps} exceeds the operator's dim={n}; a "
            f"Krylov space has at most dim dimensions, use num_steps <= {n} (num_steps = dim "
            "gives the exact spectrum)."
        )
    return num_probes, num_steps


def spectral_density(
    op: LinearOperator | Any,
    num_probes: int = 10,
    num_steps: int = 90,
    *,
    key: jax.Array | None = None,
    dim: int | None = None,
    basis_dtype: Any = None,
    basis_memory: str = "device",
    check_memory: bool | float = True,
    progress: bool = False,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of a symmetric operator.

    For each of ``P = num_probes`` Rademacher probes ``v_p`` (entries ``+-1/sqrt(n)``, drawn
    by a NumPy generator seeded from ``key``) runs ``m = num_steps`` Lanczos steps with full
    reorthogonalization and returns the probe's Gaussian quadrature. The probes run one after
    another on one basis, in :mod:`hessspec.linalg.krylov`'s compiled engine: the program depends
    neither on ``P`` nor on ``m`` (up to the basis size ``basis_rows(m)``, 128 rows for
    ``m <= 128``), so it is the program :func:`hessspec.top_eigenpairs` compiled for the same
    operator.

    Where a probe's Krylov space becomes invariant before ``m`` steps (``A`` has fewer than
    ``m`` distinct eigenvalues: ``beta_j <= breakdown_tolerance(dtype) * ||A v_j||``) the
    iteration stops and the unused slots get weight 0: the quadrature is then exact for that
    probe. A large eigenvalue sets the rounding of every product: for an operator in float32
    or less, where a step's ``beta`` falls below ``resolution_tolerance(dtype) * max ||A v||``
    (a breakdown included) eigenvalues closer together than that may be merged or replaced by
    rounding noise, and a :class:`SpectralResolutionWarning` says so (a bulk of width 0.1
    under an outlier of 1e4 is resolved in float32; one of width 1e-4 is not).

    Cost: ``P * m`` matvecs; memory: one basis of ``basis_rows(m)`` rows, the operator's
    data and the working set of one matvec.

    Args:
        op: :class:`~hessspec.linalg.linop.LinearOperator`, or a callable ``v -> A v`` with
        ``dim=``.
        num_probes: ``P >= 1``.
        num_steps: ``m``, ``1 <= m <= dim``.
        key: PRNG key for the probes; ``None`` uses ``jax.random.key(0)``.
        dim: vector length when ``op`` is a plain callable.
        basis_dtype: dtype of the basis: None (the solver dtype, float64 when x64 is on) or
            ``"float32"`` (half the memory; nodes carry relative errors of ~1e-7, far below
            the smoothing width).
        basis_memory: ``"device"`` or ``"host"`` (see :func:`hessspec.top_eigenpairs`).
        check_memory: compare :func:`hessspec.linalg.memory.estimate_memory` with the memory
            available first and raise ``MemoryError`` if it cannot fit; a number is used as
            the available bytes; False skips the check.
        progress: show a tqdm bar over probes.

    Returns:
        :class:`SpectralDensity` with ``nodes``/``weights`` of shape ``(P, m)``.

    Raises:
        ValueError: ``num_probes < 1``, ``num_steps`` outside ``[1, dim]``, bad
            ``basis_dtype`` or ``basis_memory``.
        MemoryError: the memory estimate exceeds the available memory (``check_memory``).
        FloatingPointError: the matvec produced NaN/Inf.
    """
    op = as_operator(op, dim)
    num_probes, num_steps = _check_sizes(num_probes, num_steps, op.dim)
    bdt = resolve_basis_dtype(op.dtype, basis_dtype)
    host = check_basis_memory(basis_memory, "spectral_density")
    check_call(
        check_memory,
        op,
        num_steps=num_steps,
        num_probes=num_probes,
        basis_dtype=bdt,
        basis_memory=basis_memory,
    )
    runner = KrylovRunner(op, basis_rows(num_steps), basis_dtype=bdt, host=host, key=key)
    probes = _probe_tridiagonals(runner, num_probes, num_steps, progress=progress)
    if probes.unresolved and np.finfo(op.dtype).eps > 1e-10:
        _warn_resolution(probes.unresolved, op.dtype)
    nodes, weights = gaussian_quadrature(probes.alphas, probes.betas, probes.done)
    return SpectralDensity(nodes=nodes, weights=weights, num_steps_done=probes.done, dim=op.dim)


def _warn_resolution(unresolved, op_dtype) -> None:
    """Name the probes whose Lanczos steps went below what a low-precision matvec resolves."""
    resolution = resolution_tolerance(op_dtype) * max(scale for _, _, scale in unresolved)
    probes = ", ".join(f"{p} ({count} steps)" for p, count, _ in unresolved[:5])
    more = f" and {len(unresolved) - 5} more" if len(unresolved) > 5 else ""
    warnings.warn(
        SpectralResolutionWarning(
            f"spectral_density: probes {probes}{more} reached Lanczos steps whose beta was "
            f"below what {np.dtype(op_dtype).name} matvecs resolve (about {resolution:.3g}, "
            f"{RESOLUTION_FACTOR:g} eps x the largest |A v|): eigenvalues closer together "
            "than that are merged into single nodes or replaced by rounding noise. A float64 "
            "operator resolves them."
        ),
        stacklevel=3,
    )
