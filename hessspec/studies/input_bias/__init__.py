"""The input-bias study: what a non-zero input mean does to the Hessian (LeCun, Kanter &
Solla 1991), measured matrix-free and compared with the closed forms of
:mod:`hessspec.analysis.theory`.

Two parts, both run by :func:`run_input_bias_study`:

1. **Linear model, squared loss, synthetic inputs** (:mod:`.linear`). ``p`` samples of
   ``N`` i.i.d. Gaussian inputs of variance ``v``, once *biased* (mean ``m``) and once
   *centred* (mean 0; the same noise draws). The Hessian ``R = X^T X / p`` is measured
   through :func:`hessspec.hessian_operator` only (Lanczos, SLQ) and compared with theory:
   the biased outlier against ``N m^2 + v``, the bulk edges against Marchenko-Pastur
   ``v (1 -+ sqrt(N/p))^2``, each with its relative error and a pass/fail at
   ``linear.tolerance``. Plain GD at ``lr = 1 / lambda_max`` is run to tolerance and its
   step count set against the worst-case bound.
2. **One-hidden-layer MLP on the digits** (:mod:`.mlp`): raw vs centred inputs vs
   BatchNorm, at initialisation and after a short training: top eigenvalues, outliers, SLQ
   density, the top eigenvector's overlap with the input-mean direction.

Outputs (in ``out_dir``, :mod:`hessspec.studies.common.output`): ``results.json`` (every
number, plus SLQ nodes and weights so the figures can be redrawn, :mod:`.plots`),
``figures/*.png``, ``report.md`` (:mod:`.report`) and ``config.toml``; every file written
atomically, never over a file this run does not own.

The configuration is :class:`InputBiasConfig` (:mod:`.config`; TOML:
``experiment = "input_bias"`` plus ``[linear]`` and ``[mlp]`` tables, see
``experiments/input_bias.toml``).
"""

from hessspec.studies.common.config import apply_overrides as override_config
from hessspec.studies.input_bias.config import (
    QUICK_OVERRIDES,
    InputBiasConfig,
    LinearSettings,
    MLPSettings,
)
from hessspec.studies.input_bias.linear import run_gradient_descent
from hessspec.studies.input_bias.plots import (
    plot_gd_convergence,
    plot_linear_density,
    plot_mlp_density,
    plot_mlp_top_eigenvalues,
    plot_mlp_training,
)
from hessspec.studies.input_bias.run import run_input_bias_study

__all__ = [
    "QUICK_OVERRIDES",
    "InputBiasConfig",
    "LinearSettings",
    "MLPSettings",
    "override_config",
    "plot_gd_convergence",
    "plot_linear_density",
    "plot_mlp_density",
    "plot_mlp_top_eigenvalues",
    "plot_mlp_training",
    "run_gradient_descent",
    "run_input_bias_study",
]
