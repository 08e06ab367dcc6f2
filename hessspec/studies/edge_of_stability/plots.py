"""Figures of the edge-of-stability study, drawn from its results (results.json): the
sharpness ``lambda_max`` against the step with each run's stability threshold, and the
training loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hessspec.studies.common.figures import panels

__all__ = ["figures_for", "plot_losses", "plot_sharpness", "run_label"]

NETWORK_TITLES = {"mlp": "MLP without BatchNorm", "mlp-bn": "MLP with BatchNorm (train mode)"}


def run_label(run: Mapping[str, Any]) -> str:
    """``"lr = 0.2"`` or ``"lr = 0.3, momentum 0.5"``."""
    label = f"lr = {run['learning_rate']:g}"
    return label + (f", momentum {run['momentum']:g}" if run["momentum"] else "")


def _networks(results: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(run["network"] for run in results["runs"]))


def _by_network(results: Mapping[str, Any], draw: Callable, axes, ylabel: str):
    """One panel per network, ``draw(ax, run, color)`` for each of its runs."""
    networks = _networks(results)
    fig, axes = panels(axes, 1, len(networks), (6.0, 4.2))
    for ax, network in zip(axes, networks, strict=True):
        runs = [r for r in results["runs"] if r["network"] == network]
        for i, run in enumerate(runs):
            draw(ax, run, f"C{i}")
        ax.set_title(NETWORK_TITLES.get(network, network))
        ax.set_xlabel("gradient-descent step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    return fig


def _draw_sharpness(ax, run: Mapping[str, Any], color: str) -> None:
    steps = [p["step"] for p in run["sharpness"]]
    values = [p["lambda_max"] for p in run["sharpness"]]
    label = run_label(run)
    if run["diverged_at"] is not None:
        label += f" (diverged at step {run['diverged_at']})"
    ax.plot(steps, values, color=color, lw=1.4, label=label)
    ax.axhline(run["stability_threshold"], color=color, ls="--", lw=1.0)
    if values and min(values) > 0:
        ax.set_yscale("log")


def _clip_to_stable_runs(fig, results: Mapping[str, Any]) -> None:
    """Each panel's y range from the runs that did not diverge (a diverging run's sharpness
    grows by orders of magnitude and would flatten the others); it leaves the panel."""
    for ax, network in zip(fig.axes, _networks(results), strict=False):
        stable = [r for r in results["runs"] if r["network"] == network and not r["diverged_at"]]
        values = [p["lambda_max"] for r in stable for p in r["sharpness"]]
        values += [r["stability_threshold"] for r in stable]
        if values and min(values) > 0:
            ax.set_ylim(min(values) / 1.15, max(values) * 1.15)


def plot_sharpness(results: Mapping[str, Any], axes=None):
    """``lambda_max`` of the training loss against the step, one panel per network (log
    scale when every value is positive; the y range that of the runs that did not
    diverge); the dashed line of the same colour is the run's threshold, 2 / lr (gradient
    descent) or (2 + 2 momentum) / lr (heavy ball)."""
    fig = _by_network(results, _draw_sharpness, axes, "sharpness $\\lambda_{max}$")
    _clip_to_stable_runs(fig, results)
    fig.suptitle("Sharpness during full-batch training; dashed: stability threshold")
    return fig


def _draw_loss(ax, run: Mapping[str, Any], color: str) -> None:
    losses = [x for x in run["losses"] if x is not None]
    if losses:
        ax.semilogy(range(1, len(losses) + 1), losses, color=color, lw=1.0, label=run_label(run))


def plot_losses(results: Mapping[str, Any], axes=None):
    """The training loss after every step (log scale), one panel per network: at the edge
    of stability it keeps falling over the long run while oscillating on short ones."""
    fig = _by_network(results, _draw_loss, axes, "training loss (square loss)")
    fig.suptitle("Training loss")
    return fig


def figures_for(config) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
    """The figures every run draws: ``{file name: draw(results) -> Figure}``."""
    return {"figures/sharpness.png": plot_sharpness, "figures/loss.png": plot_losses}
