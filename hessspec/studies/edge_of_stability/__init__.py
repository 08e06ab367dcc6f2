"""The edge-of-stability study (Cohen, Kaur, Li, Kolter & Talwalkar 2021, "Gradient descent
on neural networks typically occurs at the edge of stability").

Gradient descent with step ``lr`` on a quadratic is stable only while the sharpness
``lambda_max < 2 / lr`` (heavy-ball momentum ``beta``: ``(2 + 2 beta) / lr``). Cohen et al.
found that full-batch gradient descent on neural networks raises the sharpness until it
reaches that threshold ("progressive sharpening") and then hovers at it while the loss keeps
falling, non-monotonically. This study trains a tanh MLP on the digits with the square loss
on one-hot targets by full-batch gradient descent at several learning rates and one
heavy-ball momentum, without and with BatchNorm, tracking ``lambda_max`` every few steps
(:mod:`hessspec.nn.sharpness`: warm-started Lanczos, compiled once), and reports per run the
step at which the sharpness first reached its threshold and its median afterwards as a
multiple of the threshold (:mod:`.run`, :mod:`.report`, :mod:`.plots`).

Run by :func:`run_edge_of_stability_study`; the configuration is
:class:`EdgeOfStabilityConfig` (TOML: ``experiment = "edge_of_stability"``, see
``experiments/edge_of_stability.toml``).
"""

from hessspec.studies.edge_of_stability.config import QUICK_OVERRIDES, EdgeOfStabilityConfig
from hessspec.studies.edge_of_stability.plots import plot_losses, plot_sharpness
from hessspec.studies.edge_of_stability.report import verdict
from hessspec.studies.edge_of_stability.run import (
    run_edge_of_stability_study,
    summarize_sharpness,
)

__all__ = [
    "QUICK_OVERRIDES",
    "EdgeOfStabilityConfig",
    "plot_losses",
    "plot_sharpness",
    "run_edge_of_stability_study",
    "summarize_sharpness",
    "verdict",
]
