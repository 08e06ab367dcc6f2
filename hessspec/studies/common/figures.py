"""Figures of the studies: matplotlib objects without pyplot (no global backend, no state
shared between figures), the axes a plot function draws on, and training curves.

A study's ``plot_*(results, axes=None)`` draws from the study's results (the dict its run
returns, or its parsed results.json) on the given matplotlib axes (``axes``, or ``ax`` for
one; None makes a new figure, :func:`panels`, :func:`panel`) and returns the Figure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["new_figure", "panel", "panels", "plot_training_losses", "running_mean"]


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib Figure and its axes.

    Args:
        nrows, ncols: the grid of axes.
        size: ``(width, height)`` in inches of one panel.

    Returns:
        ``(figure, axes)`` with ``axes`` a 2-D array of shape ``(nrows, ncols)``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def panels(
    axes,
    nrows: int = 1,
    ncols: int = 1,
    size: tuple[float, float] = (6.0, 4.0),
    *,
    grid: bool = False,
):
    """``(figure, axes)`` for a plot function's ``axes`` argument.

    Given axes (a sequence or a 2-D array of Axes) come back with their figure; None makes
    a new figure (:func:`new_figure`) whose axes come back as the ``(nrows, ncols)`` array
    when ``grid`` or ``nrows > 1``, else as its one row.
    """
    if axes is None:
        _, axes = new_figure(nrows, ncols, size)
        if nrows == 1 and not grid:
            axes = axes[0]
    first = axes
    while not hasattr(first, "figure"):
        first = first[0]
    return first.figure, axes


def panel(ax, size: tuple[float, float] = (6.0, 4.0)):
    """``(figure, ax)`` for a plot function's one-Axes ``ax`` argument: the given Axes and
    its figure, or for None a new figure's only Axes."""
    fig, axes = panels(None if ax is None else [ax], 1, 1, size)
    return fig, axes[0]


def running_mean(values: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each ``window`` consecutive values, and the 1-based step each mean ends
    at: ``(steps (T - w + 1,), means (T - w + 1,))`` for ``T`` values."""
    values = np.asarray(values, np.float64)
    w = max(1, int(window))
    means = np.convolve(values, np.ones(w) / w, mode="valid")
    return np.arange(w, values.size + 1), means


def plot_training_losses(
    ax, curves: Iterable[tuple[Sequence[float], Mapping[str, Any]]], *, lr: float, points: int
) -> None:
    """Training curves on ``ax`` (log y): for each ``(losses, style)`` of ``curves`` the
    running mean of the mini-batch losses over ``len(losses) // points`` steps, drawn with
    the matplotlib ``style`` (``label``, ``color``); empty curves are left out."""
    for losses, style in curves:
        if len(losses):
            ax.semilogy(*running_mean(losses, len(losses) // points), **style)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("mini-batch loss (running mean)")
    ax.set_title(f"training at lr = {lr:g}")
    ax.legend(fontsize=8)
