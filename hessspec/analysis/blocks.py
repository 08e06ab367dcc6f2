"""Per-layer (block) Hessian spectra: each block's top eigenpairs, density and trace, and how
different the blocks' spectra are.

A block is a set of parameter leaves; its Hessian is the diagonal block of the full Hessian for
those leaves, the others held fixed (:func:`hessspec.hessian_operator` with ``wrt=``). Zhang
et al. (2024, "Why Transformers need Adam: a Hessian perspective") compare such block spectra
by the Jensen-Shannon distance between their densities; :func:`block_spectra` reports that
matrix beside each block's measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from hessspec.analysis.spectrum import density_js_distance
from hessspec.curvature.layout import flat_layout
from hessspec.curvature.operators import hessian_operator
from hessspec.linalg.density import SpectralDensity, density_grid, ghorbani_sigma, spectral_density
from hessspec.linalg.lanczos import EigenResult, top_eigenpairs
from hessspec.linalg.trace import TraceEstimate, trace

__all__ = ["BlockSpectra", "BlockSpectrum", "block_spectra", "layer_blocks"]


class BlockSpectrum(NamedTuple):
    """One block's measurements.

    Attributes:
        name: the block's name.
        paths: the parameter paths it holds (``"linears/0/kernel"``, ...).
        dim: its number of parameters.
        eigen: its top eigenpairs (:func:`hessspec.top_eigenpairs`).
        density: its SLQ density (:func:`hessspec.spectral_density`).
        trace: its Hutch++ trace (:func:`hessspec.linalg.trace`).
    """

    name: str
    paths: tuple[str, ...]
    dim: int
    eigen: EigenResult
    density: SpectralDensity
    trace: TraceEstimate


class BlockSpectra(NamedTuple):
    """Output of :func:`block_spectra`.

    Attributes:
        blocks: the :class:`BlockSpectrum` of each block, in order.
        grid: ``(G,)`` the common grid of the smoothed densities.
        sigma: their common Gaussian width: Ghorbani's, ``sqrt(1e-5 max(1, range))`` over
            the range of all blocks' nodes.
        densities: ``(B, G)`` each block's density on ``grid`` with width ``sigma``.
        js_distances: ``(B, B)`` pairwise Jensen-Shannon distances (base 2, in ``[0, 1]``)
            between those densities (:func:`hessspec.density_js_distance`).
    """

    blocks: tuple[BlockSpectrum, ...]
    grid: np.ndarray
    sigma: float
    densities: np.ndarray
    js_distances: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)


def layer_blocks(params: Any) -> dict[str, Callable[[str], bool]]:
    """One block per layer: the parameter leaves grouped by their path without its last key
    (``linears/0/kernel`` and ``linears/0/bias`` form ``linears/0``; a top-level leaf is its
    own block). Returns ``{name: predicate on paths}``, in parameter order."""
    layout = flat_layout(params)
    groups: dict[str, set[str]] = {}
    for path in layout.paths:
        groups.setdefault(path.rsplit("/", 1)[0] if "/" in path else path, set()).add(path)
    return {name: (lambda p, members=frozenset(m): p in members) for name, m in groups.items()}


def _as_blocks(params: Any, blocks: Any) -> dict[str, Any]:
    if blocks is None:
        return layer_blocks(params)
    if isinstance(blocks, Mapping):
        return dict(blocks)
    if isinstance(blocks, Sequence) and not isinstance(blocks, str):
        return {
            str(prefix): (lambda p, pre=str(prefix): p == pre or p.startswith(pre + "/"))
            for prefix in blocks
        }
    raise TypeError(
        "blocks must be None (one block per layer), a mapping {name: wrt} (a mask pytree or a "
        f"predicate on paths) or a sequence of path prefixes; got {type(blocks).__name__}."
    )


def block_spectra(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    blocks: Any = None,
    k: int = 5,
    num_probes: int = 10,
    num_steps: int = 90,
    trace_matvecs: int = 300,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    basis_dtype: Any = None,
    check_memory: bool | float = True,
) -> BlockSpectra:
    """Per-block Hessian spectra of the dataset-mean loss.

    For each block: the operator ``hessian_operator(loss_fn, params, data, batch_size,
    wrt=block)``, its top ``k`` eigenpairs with residuals, an SLQ density of ``num_probes`` x
    ``num_steps`` and a Hutch++ trace of ``trace_matvecs`` (``k`` and ``num_steps`` capped at
    the block's size). Then the densities on a common grid with a common width, and their
    pairwise Jensen-Shannon distances. Blocks of the same shapes share compiled programs; each
    new block shape compiles the solver engine once.

    Args:
        loss_fn, params, data, batch_size: as in :func:`hessspec.hessian_operator`.
        blocks: None (one block per layer, :func:`layer_blocks`), a mapping ``{name: wrt}``
            (a mask pytree or prefix, or a predicate on parameter paths), or a sequence of
            path prefixes (``["linears/0", "head"]``).
        k, num_probes, num_steps, trace_matvecs: solver sizes per block.
        key: PRNG key (None: ``jax.random.key(0)``), split per solver; every block uses the
            same keys (common random numbers: two blocks with the same spectrum get the same
            density, and differences between blocks are not probe noise).
        basis_dtype, check_memory: as in the solvers.

    Returns:
        :class:`BlockSpectra`.
    """
    specs = _as_blocks(params, blocks)
    if not specs:
        raise ValueError("block_spectra: no blocks given.")
    key = jax.random.key(0) if key is None else key
    k_eig, k_slq, k_tr = jax.random.split(key, 3)
    results = []
    for name, wrt in specs.items():
        op = hessian_operator(loss_fn, params, data, batch_size, wrt=wrt)
        layout = flat_layout(params, wrt)
        paths = tuple(p for p, keep in zip(layout.paths, layout.selected, strict=True) if keep)
        eig = top_eigenpairs(
            op,
            min(int(k), op.dim),
            key=k_eig,
            basis_dtype=basis_dtype,
            check_memory=check_memory,
        )
        density = spectral_density(
            op,
            num_probes,
            min(int(num_steps), op.dim),
            key=k_slq,
            basis_dtype=basis_dtype,
            check_memory=check_memory,
        )
        tr = trace(op, trace_matvecs, key=k_tr, basis_dtype=basis_dtype, check_memory=check_memory)
        results.append(BlockSpectrum(name, paths, op.dim, eig, density, tr))
    lo = min(min(b.density.lambda_min, float(b.eigen.values.min())) for b in results)
    hi = max(max(b.density.lambda_max, float(b.eigen.values.max())) for b in results)
    sigma = ghorbani_sigma(lo, hi)
    grid = density_grid(lo, hi, sigma)
    densities = np.stack([b.density.density(grid, sigma) for b in results])
    return BlockSpectra(
        blocks=tuple(results),
        grid=grid,
        sigma=sigma,
        densities=densities,
        js_distances=density_js_distance(densities, grid),
    )
