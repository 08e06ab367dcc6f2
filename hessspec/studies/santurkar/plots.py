"""The Santurkar study's figures (their Fig. 4 and 5, the training curves, the learning-rate
sweep): ``plot_*(results, axes=None)`` as :mod:`hessspec.studies.common.figures` describes,
public; notebook 04 redraws them from results.json."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hessspec.studies.common.figures import panel, panels, plot_training_losses

__all__ = [
    "FIGURES",
    "figures_for",
    "variant_label",
    "plot_covariate_shift",
    "plot_landscape",
    "plot_lr_sweep",
    "plot_training",
]

_COLORS = {"standard": "C3", "batchnorm": "C0", "noisy_batchnorm": "C2"}


def variant_label(variant: str) -> str:
    """The variant's name in figures and reports."""
    return {"standard": "standard", "batchnorm": "BatchNorm", "noisy_batchnorm": "noisy BN"}[
        variant
    ]


def plot_landscape(results: Mapping[str, Any], axes=None):
    """Santurkar et al. Fig. 4: (a) the loss range along the gradient, shaded between its
    minimum and maximum over the step lengths, over training; (b) the gradient
    predictiveness ``||grad L(x) - grad L(x - s g)||``, shaded likewise; (c) the effective
    beta-smoothness. One colour per variant."""
    fig, axes = panels(axes, 1, 3, size=(5.0, 3.8))
    lr = results["learning_rate"]
    for variant, run in results["runs"].items():
        rec = run["records"]
        steps = np.asarray(rec["steps"])
        losses = np.asarray(rec["losses"], np.float64)
        pred = np.asarray(rec["gradient_predictiveness"], np.float64)
        c = _COLORS[variant]
        axes[0].fill_between(
            steps, losses.min(1), losses.max(1), color=c, alpha=0.35, label=variant_label(variant)
        )
        axes[1].fill_between(
            steps, pred.min(1), pred.max(1), color=c, alpha=0.35, label=variant_label(variant)
        )
        axes[2].plot(steps, rec["beta_smoothness"], color=c, label=variant_label(variant))
    lo, hi = results["config"]["step_range"]
    axes[0].set_title(f"loss landscape: L(x - s g), s in [{lo:g}, {hi:g}] lr")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[1].set_title("gradient predictiveness")
    axes[1].set_ylabel("||grad L(x) - grad L(x - s g)||")
    axes[1].set_yscale("log")
    axes[2].set_title("effective beta-smoothness")
    axes[2].set_ylabel("max_s ||grad L(x) - grad L(x - s g)|| / ||s g||")
    for ax in axes:
        ax.set_xlabel(f"SGD step (lr = {lr:g})")
        ax.legend(fontsize=8)
    return fig


def plot_covariate_shift(results: Mapping[str, Any], axes=None):
    """Internal covariate shift per layer over training (their Fig. 5): the relative change
    ``||G - G'|| / ||G||`` (top row, log) and ``cos(G, G')`` (bottom row), one column per
    layer from the second on (the first has no earlier layers: ``G' = G``), one colour per
    variant."""
    runs = results["runs"]
    first = next(iter(runs.values()))
    num_layers = len(first["layer_names"])
    if num_layers < 2:
        raise ValueError("these results hold no covariate-shift records beyond layer 1.")
    cols = list(range(1, num_layers))
    fig, axes = panels(axes, 2, len(cols), size=(3.8, 3.0), grid=True)
    for variant, run in runs.items():
        rec = run["records"]
        steps = np.asarray(rec["steps"])
        l2 = np.asarray(rec["ics_l2"], np.float64)
        norm = np.asarray(rec["ics_grad_norm"], np.float64)
        cos = np.asarray(rec["ics_cosine"], np.float64)
        rel = l2 / np.where(norm > 0, norm, np.nan)
        for c, j in enumerate(cols):
            kw = {"color": _COLORS[variant], "label": variant_label(variant)}
            axes[0][c].semilogy(steps, rel[:, j], **kw)
            axes[1][c].plot(steps, cos[:, j], **kw)
    for c, j in enumerate(cols):
        axes[0][c].set_title(f"layer {j + 1} of {num_layers}")
        axes[1][c].set_xlabel("SGD step")
    axes[0][0].set_ylabel("||G - G'|| / ||G||")
    axes[1][0].set_ylabel("cos(G, G')")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_training(results: Mapping[str, Any], ax=None):
    """Mini-batch training loss of each variant at the shared learning rate."""
    fig, ax = panel(ax)
    curves = [
        (
            run["train_losses"],
            {
                "color": _COLORS[variant],
                "label": f"{variant_label(variant)} (test acc {run['test_accuracy']:.3f})",
            },
        )
        for variant, run in results["runs"].items()
    ]
    plot_training_losses(ax, curves, lr=results["learning_rate"], points=40)
    return fig


def plot_lr_sweep(results: Mapping[str, Any], axes=None):
    """Mean loss range and mean beta-smoothness against the learning rate, per variant."""
    fig, axes = panels(axes, 1, 2, size=(5.0, 3.8))
    table = results["lr_table"]
    for variant in results["config"]["variants"]:
        rows = sorted(
            (r for r in table if r["variant"] == variant), key=lambda r: r["learning_rate"]
        )
        lrs = [r["learning_rate"] for r in rows]
        style = {"color": _COLORS[variant], "label": variant_label(variant)}
        axes[0].loglog(lrs, [r["loss_range_mean"] for r in rows], "o-", **style)
        axes[1].loglog(lrs, [r["beta_mean"] for r in rows], "o-", **style)
    axes[0].set_ylabel("mean loss range along the gradient")
    axes[1].set_ylabel("mean effective beta-smoothness")
    for ax in axes:
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=8)
    return fig


#: Figure file name -> the function drawing it.
FIGURES = {
    "figures/landscape.png": plot_landscape,
    "figures/ics.png": plot_covariate_shift,
    "figures/training.png": plot_training,
    "figures/lr_sweep.png": plot_lr_sweep,
}


def figures_for(config) -> dict[str, Any]:
    """{figure file name: function drawing it} of a run of ``config`` (a SanturkarConfig):
    the sweep figure only with sweep learning rates."""
    names = ["figures/landscape.png", "figures/ics.png", "figures/training.png"]
    if config.sweep_learning_rates:
        names.append("figures/lr_sweep.png")
    return {name: FIGURES[name] for name in names}
