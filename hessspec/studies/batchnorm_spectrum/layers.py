"""Per-layer Hessian spectra at one checkpoint: one block per layer, each block's top
eigenvalues, SLQ density and trace, and the Jensen-Shannon distances between the blocks'
densities (:func:`hessspec.analysis.blocks.block_spectra`).

A block is a diagonal block of the analysed Hessian: the second derivatives with respect to
one layer's parameters, the others held fixed. One block per layer (:func:`layer_groups`):
a linear or convolution layer's kernel and bias, **together with the scale and shift of the
BatchNorm that follows it** (``linears/0`` holds ``linears/0/kernel`` and ``norms/0/scale``,
``norms/0/bias``), so that the networks with and without BatchNorm have the same blocks
under the same names and their per-layer spectra compare row by row. A BatchNorm layer whose
layer cannot be found by name stays a block of its own.

The blocks' traces add up to the trace of the whole Hessian (the trace of a matrix is the
sum of its diagonal blocks' traces); a block's share of the total trace is its trace over
the sum of the blocks' traces.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from hessspec.studies.common.jsonio import jsonable

__all__ = ["layer_groups", "layer_paths", "measure_layers"]


def _parent(path: str) -> str:
    """The layer a parameter path belongs to: the path without its last key."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def _is_norm(name: str) -> bool:
    return "norm" in name.rsplit("/", 1)[-1] or "/norms/" in f"/{name}/"


def _layer_of_norm(name: str, layers: set[str]) -> str | None:
    """The layer a BatchNorm group normalises, found by name: ``norms/i`` after
    ``linears/i`` or ``convs/i``, ``…/norm1`` after ``…/conv1``, ``…/shortcut_norm`` after
    ``…/shortcut_conv``, ``stem_norm`` after ``stem``; None when there is none."""
    head, _, last = name.rpartition("/")
    prefix = f"{head}/" if head else ""
    candidates = [
        name.replace("norms/", "linears/", 1),
        name.replace("norms/", "convs/", 1),
        prefix + last.replace("norm", "conv"),
        prefix + last.removesuffix("_norm"),
    ]
    for candidate in candidates:
        if candidate != name and candidate in layers and not _is_norm(candidate):
            return candidate
    return None


def _order(name: str) -> tuple:
    """Input to output for the models of :mod:`hessspec.nn.models`: the stem first, the
    head last, numbered layers in numeric order."""
    rank = 0 if name.startswith("stem") else 2 if name.startswith("head") else 1
    return rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_paths(paths: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``{layer: its parameter paths}`` for the parameter paths of a network (see the module
    docstring: BatchNorm scale and shift join the layer they follow), input to output."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(_parent(path), []).append(path)
    merged: dict[str, list[str]] = {}
    for name, members in groups.items():
        target = _layer_of_norm(name, set(groups)) if _is_norm(name) else None
        merged.setdefault(target or name, []).extend(members)
    return {name: sorted(merged[name]) for name in sorted(merged, key=_order)}


def layer_groups(params: Any) -> dict[str, Callable[[str], bool]]:
    """``{layer: predicate on parameter paths}`` (the ``wrt`` of each block) of
    :func:`layer_paths` of ``params``'s leaves."""
    from hessspec.curvature.layout import flat_layout

    groups = layer_paths(list(flat_layout(params).paths))
    return {name: (lambda p, m=frozenset(members): p in m) for name, members in groups.items()}


def measure_layers(
    loss_fn: Any,
    params: Any,
    data: Any,
    *,
    settings: Any,
    batch_size: int | None,
    key: Any,
    check_memory: bool | float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The per-layer spectra of ``loss_fn`` at ``params`` over ``data``.

    Args:
        loss_fn, params, data, batch_size: as in :func:`hessspec.hessian_operator` (the
            analysed objective and its batches).
        settings: a :class:`~hessspec.studies.batchnorm_spectrum.settings.StudySettings`
            (``per_layer_*`` sizes, ``basis_dtype``).
        key: PRNG key (the same probes for every block: common random numbers).
        check_memory: the solvers' memory check.

    Returns:
        ``(record, arrays)``: the ``per_layer`` entry of a checkpoint in results.json
        (``names``, ``sizes``, ``parameters`` (paths per block), ``top_eigenvalues`` and
        ``residuals`` (per block, largest first), ``traces``, ``trace_stderrs``,
        ``js_distances`` (``B x B``), ``density_sigma``) and the arrays for spectra.npz
        (``layer_density_grid`` ``(G,)``, ``layer_densities`` ``(B, G)``, and per block
        ``layer<i>_nodes``, ``layer<i>_weights`` ``(P, m)``).
    """
    from hessspec.analysis.blocks import block_spectra

    spectra = block_spectra(
        loss_fn,
        params,
        data,
        blocks=layer_groups(params),
        k=settings.per_layer_top_k,
        num_probes=settings.per_layer_slq_probes,
        num_steps=settings.per_layer_slq_steps,
        trace_matvecs=settings.per_layer_trace_matvecs,
        batch_size=batch_size,
        key=key,
        basis_dtype=settings.basis_dtype,
        check_memory=check_memory,
    )
    blocks = spectra.blocks
    record = {
        "names": list(spectra.names),
        "sizes": [int(b.dim) for b in blocks],
        "parameters": [list(b.paths) for b in blocks],
        "top_eigenvalues": [jsonable(np.asarray(b.eigen.values, np.float64)) for b in blocks],
        "residuals": [jsonable(np.asarray(b.eigen.residuals, np.float64)) for b in blocks],
        "traces": jsonable(np.array([b.trace.value for b in blocks], np.float64)),
        "trace_stderrs": jsonable(np.array([b.trace.stderr for b in blocks], np.float64)),
        "js_distances": jsonable(np.asarray(spectra.js_distances, np.float64)),
        "density_sigma": float(spectra.sigma),
    }
    arrays = {
        "layer_density_grid": np.asarray(spectra.grid, np.float64),
        "layer_densities": np.asarray(spectra.densities, np.float64),
    }
    for i, b in enumerate(blocks):
        arrays[f"layer{i}_nodes"] = np.asarray(b.density.nodes, np.float64)
        arrays[f"layer{i}_weights"] = np.asarray(b.density.weights, np.float64)
    return record, arrays
