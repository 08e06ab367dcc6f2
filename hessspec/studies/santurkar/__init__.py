"""The Santurkar study: does BatchNorm make the loss landscape smoother? (Santurkar, Tsipras,
Ilyas & Madry 2018, "How does batch normalization help optimization?").

The same network on the digits is trained with plain SGD at ONE shared learning rate in
several variants: ``"standard"`` (no BatchNorm), ``"batchnorm"`` and ``"noisy_batchnorm"``
(BatchNorm followed by noise of non-zero mean and non-unit scale, redrawn at every step:
:class:`hessspec.nn.models.NoisyBatchNorm`). Every ``record_every`` steps, on the mini-batch
the next update uses and in the mode that update uses (batch statistics; for the noisy
variant the noise draw of that update, held fixed), it records (:mod:`.train`)

- :func:`hessspec.landscape_along_gradient`: the loss along ``-g`` for step lengths
  ``s`` in ``[lr/2, 4 lr]`` and its range, the gradient predictiveness
  ``||grad L(x) - grad L(x - s g)||`` and the effective beta-smoothness
  ``max_s ||grad L(x) - grad L(x - s g)|| / ||s g||``;
- :func:`hessspec.internal_covariate_shift` per layer: ``||G - G'||`` and ``cos(G, G')``,
  ``G'`` the layer's gradient after the earlier layers took their SGD step.

Figures (:mod:`.plots`) follow their Fig. 4 (shaded loss range along the gradient over
training; shaded gradient predictiveness; beta-smoothness) plus the covariate shift per
layer (their Fig. 5) and the training curves. report.md (:mod:`.report`) compares the
variants with numbers (:mod:`.summary`): the study's acceptance is a smaller loss range and
beta-smoothness with BatchNorm than without at the same learning rate. An optional sweep
over more learning rates (landscape only) shows where that holds: at small steps the loss
range is first order, ``~ (4 - 1/2) lr ||g||^2``, and says more about the gradient norm than
about the curvature; the comparison is about smoothness once ``4 lr`` reaches the curvature
scale ``~ 2 / beta``.

Run by :func:`run_santurkar_study`; the configuration is :class:`SanturkarConfig`
(:mod:`.config`; TOML: ``experiment = "santurkar"``, see ``experiments/santurkar.toml``).
"""

from hessspec.studies.common.config import apply_overrides as override_config
from hessspec.studies.santurkar.config import QUICK_OVERRIDES, VARIANTS, SanturkarConfig
from hessspec.studies.santurkar.plots import (
    plot_covariate_shift,
    plot_landscape,
    plot_lr_sweep,
    plot_training,
)
from hessspec.studies.santurkar.run import run_santurkar_study
from hessspec.studies.santurkar.summary import summarize_records
from hessspec.studies.santurkar.train import layer_order_for, train_mode_loss

__all__ = [
    "QUICK_OVERRIDES",
    "VARIANTS",
    "SanturkarConfig",
    "layer_order_for",
    "override_config",
    "plot_covariate_shift",
    "plot_landscape",
    "plot_lr_sweep",
    "plot_training",
    "run_santurkar_study",
    "summarize_records",
    "train_mode_loss",
]
