"""Figures of a study, drawn from its results (the parsed results.json) and spectra arrays.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no display, no
global state); :func:`hessspec.studies.batchnorm_spectrum.report.write_report` saves them as
PNG. They read only the documented entries of results.json and spectra.npz, so a notebook
can redraw a finished run with
``hessspec.studies.batchnorm_spectrum.results.load_results(folder)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from hessspec.studies.batchnorm_spectrum.results import spectra_key


def _plain_log_y(ax) -> None:
    """A log y axis labelled in plain numbers (``20``, ``0.5``, not ``2 x 10^1``), with
    minor labels at 2 and 5 times each power of ten."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return f"{value:g}" if mantissa in (2, 5) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


__all__ = [
    "density_figure",
    "draw_all",
    "gradient_energy_figure",
    "loss_curves_figure",
    "outlier_ratio_figure",
    "overlap_figure",
    "per_layer_density_figure",
    "run_label",
    "sharpness_figure",
    "top_eigenvalues_figure",
]

_MODE_COLORS = {
    None: "tab:red",
    "train": "tab:blue",
    "eval": "tab:green",
    "population": "tab:purple",
}
_EXTRA = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def run_label(run: Mapping[str, Any]) -> str:
    """Legend label of a run: its name, and its BatchNorm mode or "no BN"."""
    mode = run.get("bn_mode")
    return f"{run['name']} (BN, {mode})" if mode else f"{run['name']} (no BN)"


def _runs(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results.get("runs", []) if r.get("checkpoints")]


def _colors(results: Mapping[str, Any]) -> dict[str, str]:
    runs = _runs(results)
    models = sorted({str(r.get("model")) for r in runs})
    out = {}
    for i, r in enumerate(runs):
        if len(models) <= 1:
            out[r["name"]] = _MODE_COLORS.get(r.get("bn_mode"), _EXTRA[i % len(_EXTRA)])
        else:
            out[r["name"]] = _EXTRA[i % len(_EXTRA)]
    return out


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _steps(results: Mapping[str, Any]) -> list[int]:
    return sorted({c["step"] for r in _runs(results) for c in r["checkpoints"]})


def _panels(n: int, hspace: float = 0.45) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` density panels, three to a row (the unused ones hidden)."""
    rows, cols = _grid(max(n, 1))
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.subplots_adjust(hspace=hspace, wspace=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _finish_density_panel(ax, title: str, floor: float, top: float) -> None:
    """Log y axis from ``floor`` to ``top`` (when they make a range), title, labels, legend."""
    ax.set_yscale("log")
    if np.isfinite(floor) and top > floor:
        ax.set_ylim(floor, top)
    ax.set_title(title)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper right")


def density_figure(results: Mapping[str, Any], spectra: Mapping[str, np.ndarray]) -> Figure:
    """The smoothed SLQ spectral density on a log y axis, one panel per checkpoint step,
    every run overlaid (with and without BatchNorm). The kernel width σ of each curve is in
    its legend entry."""
    steps = _steps(results)
    fig, axes = _panels(len(steps))
    colors = _colors(results)
    for ax, step in zip(axes, steps, strict=False):
        floor, top = np.inf, 0.0
        for run in _runs(results):
            gk = spectra_key(run["name"], step, "density_grid")
            dk = spectra_key(run["name"], step, "density")
            if gk not in spectra or dk not in spectra:
                continue
            grid, dens = np.asarray(spectra[gk]), np.asarray(spectra[dk])
            ck = next(c for c in run["checkpoints"] if c["step"] == step)
            sigma = ck.get("density_sigma")
            label = run_label(run) + (f", σ={sigma:.2g}" if sigma else "")
            ax.plot(grid, np.maximum(dens, 1e-300), color=colors[run["name"]], lw=1.1, label=label)
            if dens.max() > 0:
                floor = min(floor, dens.max() * 1e-7)
                top = max(top, dens.max() * 3)
        _finish_density_panel(ax, f"step {step}", floor, top)
    fig.suptitle("Hessian spectral density (SLQ, Gaussian smoothing)", y=1.0)
    return fig


def top_eigenvalues_figure(results: Mapping[str, Any]) -> Figure:
    """The top eigenvalues over training, one panel per run: λ1..λK dark, λK+1..λ2K light,
    log y axis when all are positive."""
    runs = _runs(results)
    rows, cols = _grid(max(len(runs), 1), max_cols=2)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.subplots_adjust(hspace=0.45, wspace=0.3)
    colors = _colors(results)
    all_positive = all(
        v is not None and v > 0
        for r in runs
        for c in r["checkpoints"]
        for v in c.get("top_eigenvalues", [])
    )
    for ax, run in zip(axes, runs, strict=False):
        steps = [c["step"] for c in run["checkpoints"]]
        lam = np.array(
            [[np.nan if v is None else v for v in c["top_eigenvalues"]] for c in run["checkpoints"]]
        )
        k = int(run.get("num_classes") or 1)
        for i in range(lam.shape[1]):
            ax.plot(
                steps,
                lam[:, i],
                marker="o",
                ms=2.5,
                lw=1.0,
                color=colors[run["name"]],
                alpha=1.0 if i < k else 0.3,
            )
        if all_positive:
            _plain_log_y(ax)
        ax.set_title(run_label(run))
        ax.set_xlabel("training step")
        ax.set_ylabel("eigenvalue")
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.suptitle("Top Hessian eigenvalues over training (dark: λ1..λK, light: λK+1..λ2K)", y=1.02)
    return fig


def _values(checkpoints: list[Mapping[str, Any]], key: str) -> list[float]:
    """``checkpoint[key]`` of each checkpoint, NaN where missing or null."""
    return [np.nan if c.get(key) is None else c[key] for c in checkpoints]


def _over_training(results: Mapping[str, Any], key: str) -> tuple[Figure, Any, int]:
    """A figure of checkpoint entry ``key`` against the step, one line per run; the axes
    and ``K`` (the number of classes)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    colors = _colors(results)
    k = 1
    for run in _runs(results):
        k = int(run.get("num_classes") or 1)
        steps = [c["step"] for c in run["checkpoints"]]
        values = _values(run["checkpoints"], key)
        ax.plot(steps, values, marker="o", color=colors[run["name"]], label=run_label(run))
    return fig, ax, k


def outlier_ratio_figure(results: Mapping[str, Any]) -> Figure:
    """The headline ratio λ1/λK+1 over training, every run (one definition for every run
    and checkpoint; K the number of classes)."""
    fig, ax, k = _over_training(results, "headline_ratio")
    _plain_log_y(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"λ1 / λ{k + 1}")
    ax.set_title(f"Outliers against the bulk over training: λ1/λK+1 (K = {k})")
    ax.legend(fontsize=7, loc="best")
    return fig


def overlap_figure(results: Mapping[str, Any]) -> Figure:
    """The overlap ||Q_prev^T Q||_F^2 / K of the top-K eigenspace of each checkpoint with
    the previous checkpoint's, over training, every run (Gur-Ari et al. 2018)."""
    fig, ax, k = _over_training(results, "top_k_overlap_with_previous")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step (overlap with the previous checkpoint)")
    ax.set_ylabel(f"‖Q_prevᵀ Q‖²_F / {k}")
    ax.set_title(f"Top-{k} Hessian eigenspace: overlap with the previous checkpoint")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def per_layer_density_figure(
    results: Mapping[str, Any], spectra: Mapping[str, np.ndarray]
) -> Figure:
    """Per-layer spectral densities at each run's last checkpoint with per-layer spectra,
    one panel per run (without and with BatchNorm side by side), one curve per layer, log y
    axis; the common kernel width σ of each panel in its title."""
    runs = [
        (r, [c for c in r["checkpoints"] if c.get("per_layer")][-1])
        for r in _runs(results)
        if any(c.get("per_layer") for c in r["checkpoints"])
    ]
    fig, axes = _panels(len(runs), hspace=0.55)
    for ax, (run, c) in zip(axes, runs, strict=False):
        grid = spectra.get(spectra_key(run["name"], c["step"], "layer_density_grid"))
        dens = spectra.get(spectra_key(run["name"], c["step"], "layer_densities"))
        if grid is None or dens is None:
            continue
        top = float(np.max(dens)) if np.size(dens) else 0.0
        for i, name in enumerate(c["per_layer"]["names"]):
            color = f"C{i % 10}"
            ax.plot(grid, np.maximum(dens[i], 1e-300), lw=1.1, color=color, label=name)
        sigma = c["per_layer"].get("density_sigma")
        title = f"{run_label(run)}\nstep {c['step']}" + (f", σ={sigma:.2g}" if sigma else "")
        _finish_density_panel(ax, title, top * 1e-7, top * 3)
    fig.suptitle("Per-layer Hessian spectral densities at the last checkpoint", y=1.06)
    return fig


def sharpness_figure(results: Mapping[str, Any]) -> Figure:
    """λmax of the training objective against the step, one curve per trained network (its
    BN modes share the training), the stability threshold of the optimizer dashed."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    colors = _colors(results)
    seen, thresholds = set(), set()
    for run in _runs(results):
        key = (run.get("model"), run.get("batchnorm"))
        entries = run.get("sharpness") or []
        if not entries or key in seen:
            continue
        seen.add(key)
        label = f"{run['model']}{' + BN' if run.get('batchnorm') else ''}"
        ax.plot([e["step"] for e in entries], _values(entries, "lambda_max"), marker=".",
                ms=3, lw=1.0, color=colors[run["name"]], label=f"{label}: λmax")  # fmt: skip
        if run.get("stability_threshold") is not None:
            thresholds.add(float(run["stability_threshold"]))
    for threshold in sorted(thresholds):
        ax.axhline(threshold, color="k", ls="--", lw=0.9, label=f"threshold {threshold:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("λmax")
    ax.set_title("Sharpness during training (dashed: stability threshold)")
    ax.legend(fontsize=7, loc="best")
    return fig


def gradient_energy_figure(results: Mapping[str, Any]) -> Figure:
    """Left: fraction of the gradient in the top-k eigenspace against k at the last
    checkpoint (full batch: solid; mini-batch mean ± std: dashed and shaded), with k = K
    marked. Right: the top-K fraction over training."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    fig.subplots_adjust(wspace=0.25)
    colors = _colors(results)
    k_ref = None
    for run in _runs(results):
        color = colors[run["name"]]
        last = run["checkpoints"][-1]
        full = np.array([np.nan if v is None else v for v in last["gradient_energy_full"]])
        mean = np.array(
            [np.nan if v is None else v for v in last["gradient_energy_minibatch_mean"]]
        )
        std = np.array([np.nan if v is None else v for v in last["gradient_energy_minibatch_std"]])
        ks = np.arange(1, full.size + 1)
        left.plot(ks, full, marker="o", ms=3, color=color, label=f"{run_label(run)}: full batch")
        left.plot(ks, mean, ls="--", color=color, alpha=0.8, label="   mini-batch mean ± std")
        left.fill_between(ks, mean - std, mean + std, color=color, alpha=0.15)
        k = int(run.get("num_classes") or 1)
        k_ref = k
        steps = [c["step"] for c in run["checkpoints"]]
        top_k = [
            (c["gradient_energy_full"][k - 1] if len(c["gradient_energy_full"]) >= k else None)
            for c in run["checkpoints"]
        ]
        top_k_mb = [
            (
                c["gradient_energy_minibatch_mean"][k - 1]
                if len(c["gradient_energy_minibatch_mean"]) >= k
                else None
            )
            for c in run["checkpoints"]
        ]
        right.plot(
            steps,
            [np.nan if v is None else v for v in top_k],
            marker="o",
            color=color,
            label=f"{run_label(run)}: full batch",
        )
        right.plot(
            steps,
            [np.nan if v is None else v for v in top_k_mb],
            ls="--",
            marker=".",
            color=color,
            alpha=0.8,
            label="   mini-batch mean",
        )
    if k_ref is not None:
        left.axvline(k_ref, color="k", lw=0.8, ls=":")
        left.text(k_ref, 0.95, f" k = K = {k_ref}", fontsize=8)
    left.set_ylim(0, 1.02)
    left.set_xlabel("k (number of top eigenvectors)")
    left.set_ylabel("||P_k g||² / ||g||²")
    steps_all = _steps(results)
    left.set_title(
        f"Gradient energy in the top-k eigenspace, step {steps_all[-1] if steps_all else ''}"
    )
    left.legend(fontsize=7, loc="lower right")
    right.set_ylim(0, 1.02)
    right.set_xlabel("training step")
    right.set_ylabel("||P_K g||² / ||g||²")
    right.set_title("Gradient energy in the top-K eigenspace over training")
    right.legend(fontsize=7, loc="lower right")
    return fig


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if y.size < 2 or window <= 1:
        return y
    window = min(window, y.size)
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def loss_curves_figure(results: Mapping[str, Any]) -> Figure:
    """Left: the training mini-batch loss per step (running mean) and the train loss at the
    checkpoints, log y. Right: test accuracy at the checkpoints."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    fig.subplots_adjust(wspace=0.25)
    colors = _colors(results)
    seen_curves = set()
    for run in _runs(results):
        color = colors[run["name"]]
        curve = run.get("loss_curve") or {}
        steps = np.asarray(curve.get("step") or [], dtype=float)
        losses = np.asarray(
            [np.nan if v is None else v for v in (curve.get("loss") or [])], dtype=float
        )
        key = (run.get("model"), run.get("batchnorm"))
        if steps.size and key not in seen_curves:  # BN modes share one training
            seen_curves.add(key)
            window = max(1, steps.size // 50)
            left.plot(
                steps,
                _smooth(losses, window),
                color=color,
                lw=1.0,
                alpha=0.8,
                label=f"{run['model']}{' + BN' if run.get('batchnorm') else ''}: mini-batch "
                f"loss (mean of {window})",
            )
        cs = [c["step"] for c in run["checkpoints"]]
        tl = [
            np.nan if c.get("train_loss") is None else c["train_loss"] for c in run["checkpoints"]
        ]
        acc = [
            np.nan if c.get("test_accuracy") is None else c["test_accuracy"]
            for c in run["checkpoints"]
        ]
        left.plot(cs, tl, ls="none", marker="o", color=color, label=f"{run_label(run)}: train loss")
        right.plot(cs, acc, marker="o", color=color, label=run_label(run))
    left.set_yscale("log")
    left.set_xlabel("training step")
    left.set_ylabel("loss")
    left.set_title("Training loss")
    left.legend(fontsize=7, loc="upper right")
    right.set_xlabel("training step")
    right.set_ylabel("test accuracy")
    right.set_title("Test accuracy at the checkpoints")
    right.legend(fontsize=7, loc="lower right")
    return fig


def draw_all(
    results: Mapping[str, Any], spectra: Mapping[str, np.ndarray]
) -> dict[str, tuple[str, Figure]]:
    """Every figure of a study: caption -> (file stem, Figure)."""
    if not _runs(results):
        return {}
    return {
        "Spectral density per checkpoint, with and without BatchNorm": (
            "density",
            density_figure(results, spectra),
        ),
        "Top eigenvalues over training": ("top_eigenvalues", top_eigenvalues_figure(results)),
        "Outlier ratio λ1/λK+1 over training": ("outlier_ratio", outlier_ratio_figure(results)),
        "Gradient energy in the top-k eigenspace": (
            "gradient_energy",
            gradient_energy_figure(results),
        ),
        "Loss curves and test accuracy": ("loss_curves", loss_curves_figure(results)),
        **_tracking_figures(results, spectra),
    }


def _tracking_figures(
    results: Mapping[str, Any], spectra: Mapping[str, np.ndarray]
) -> dict[str, tuple[str, Figure]]:
    """The figures of what a run measured beyond the whole Hessian, when it did: the
    per-layer densities, the top-K overlap over training, the sharpness."""
    runs = _runs(results)
    checkpoints = [c for r in runs for c in r["checkpoints"]]
    figures = {}
    if any(c.get("per_layer") for c in checkpoints):
        figures["Per-layer spectral densities at the last checkpoint"] = (
            "per_layer_density",
            per_layer_density_figure(results, spectra),
        )
    if any(c.get("top_k_overlap_with_previous") is not None for c in checkpoints):
        figures["Top-K eigenspace overlap with the previous checkpoint"] = (
            "overlap",
            overlap_figure(results),
        )
    if any(r.get("sharpness") for r in runs):
        figures["Sharpness during training"] = ("sharpness", sharpness_figure(results))
    return figures
