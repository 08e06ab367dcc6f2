"""Sections of report.md beyond the whole-Hessian tables: the per-layer spectra at the last
checkpoint (:func:`per_layer_lines`) and the sharpness during training
(:func:`sharpness_lines`). Every number goes through
:func:`hessspec.studies.common.formatting.fmt`, as in the rest of the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hessspec.studies.common.formatting import fmt, md_table

__all__ = ["layer_shares", "network_label", "per_layer_lines", "run_label", "sharpness_lines"]


def run_label(run: Mapping[str, Any]) -> str:
    """A run's name with its BatchNorm mode, or "no BN"."""
    if run.get("bn_mode"):
        return f"{run['name']} (BN, {run['bn_mode']} mode)"
    return f"{run['name']} (no BN)"


def network_label(run: Mapping[str, Any]) -> str:
    """The trained network of a run (BN modes share one training): ``mlp`` or ``mlp + BN``."""
    return f"{run.get('model')}{' + BN' if run.get('batchnorm') else ''}"


def layer_shares(traces: list[float | None]) -> list[float | None]:
    """Each block's share of the total trace: ``trace_b / sum_c trace_c`` (the sum of the
    diagonal blocks' traces is the trace of the whole Hessian); None when a trace is missing
    or the sum is not positive."""
    if any(t is None for t in traces) or not sum(traces) > 0:
        return [None] * len(traces)
    total = sum(traces)
    return [t / total for t in traces]


def _last_with_layers(run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    checkpoints = [c for c in run.get("checkpoints", []) if c.get("per_layer")]
    return checkpoints[-1] if checkpoints else None


def per_layer_lines(results: Mapping[str, Any]) -> list[str]:
    """The per-layer table at each run's last checkpoint with per-layer spectra: per layer
    and run, the block's size, λ1, trace and share of the total trace (layers as rows, the
    runs with and without BN side by side); then the Jensen-Shannon distances between each
    run's layer densities. Empty when no run measured per-layer spectra."""
    runs = [(r, c) for r in results.get("runs", []) if (c := _last_with_layers(r))]
    if not runs:
        return []
    names: list[str] = []
    for _, c in runs:
        names += [n for n in c["per_layer"]["names"] if n not in names]
    rows = []
    for name in names:
        for run, c in runs:
            layers = c["per_layer"]
            if name not in layers["names"]:
                continue
            i = layers["names"].index(name)
            lam = layers["top_eigenvalues"][i] or [None]
            share = layer_shares(layers["traces"])[i]
            rows.append(
                [name, run_label(run), fmt(c["step"]), fmt(layers["sizes"][i]), fmt(lam[0]),
                 fmt(layers["traces"][i]), fmt(share)]
            )  # fmt: skip
    header = ["layer", "run", "step", "parameters", "λ1", "trace", "share of the trace"]
    lines = ["", "## Per layer at the last checkpoint", "", *md_table(header, rows).splitlines()]
    lines += ["", "Jensen-Shannon distances between the layers' spectral densities:", ""]
    for run, c in runs:
        layers = c["per_layer"]
        pairs = [
            f"{a}–{b} {fmt(layers['js_distances'][i][j])}"
            for i, a in enumerate(layers["names"])
            for j, b in enumerate(layers["names"])
            if i < j
        ]
        lines.append(f"- {run_label(run)}, step {c['step']}: {', '.join(pairs) or 'one layer'}.")
    return lines


def _sharpness_line(run: Mapping[str, Any]) -> str:
    """One network's sharpness in words: first, last and largest λmax, the threshold."""
    entries = [e for e in run["sharpness"] if e.get("lambda_max") is not None]
    if not entries:
        return f"- {network_label(run)}: no sharpness measured."
    first, last = entries[0], entries[-1]
    top = max(entries, key=lambda e: e["lambda_max"])
    line = (
        f"- {network_label(run)}: λmax {fmt(first['lambda_max'])} at step {first['step']}, "
        f"{fmt(last['lambda_max'])} at step {last['step']}, largest {fmt(top['lambda_max'])} "
        f"at step {top['step']}"
    )
    threshold = run.get("stability_threshold")
    if threshold is None:
        return line + "; no stability threshold for this optimizer (Adam or Nesterov)."
    return (
        line + f"; stability threshold {fmt(threshold)}, the largest λmax is "
        f"{fmt(top['lambda_max'] / threshold)} of it."
    )


def sharpness_lines(results: Mapping[str, Any]) -> list[str]:
    """The sharpness section: what was tracked and how, and one line per trained network
    (its BN modes share the training). Empty when the sharpness was not tracked."""
    tracked, seen = [], set()
    for run in results.get("runs", []):
        key = (run.get("model"), run.get("batchnorm"))
        if run.get("sharpness") and key not in seen:
            seen.add(key)
            tracked.append(run)
    if not tracked:
        return []
    t = results.get("config", {}).get("train", {})
    wd = results.get("settings", {}).get("weight_decay") or 0
    every, batch = t.get("track_sharpness_every"), t.get("batch_size")
    lines = [
        "",
        "## Sharpness during training",
        "",
        f"λmax of the training objective every {every} steps (Lanczos warm-started from the "
        "previous top eigenvector): BatchNorm in train mode, the analysis set in batches of "
        f"{batch} as in training"
        + (f", plus (wd/2)·‖w‖² with wd = {fmt(wd)}" if wd else "")
        + ". Stability threshold (Cohen et al. 2021): 2/lr for gradient descent, "
        "(2 + 2·momentum)/lr with heavy-ball momentum.",
        "",
    ]
    return lines + [_sharpness_line(run) for run in tracked]
