"""Networks: models (flax nnx), objectives with an explicit BatchNorm mode, data loaders and
the one optax training loop.

Modules, from the bottom up:

- :mod:`~hessspec.nn.layers`: initializers, BatchNorm (exact variance) and noisy BatchNorm,
  the dense/conv constructors the models share;
- :mod:`~hessspec.nn.models`: MLP, CNN, ResNet, the linear model, :func:`make_model`;
- :mod:`~hessspec.nn.objective`: :func:`make_objective`, a model as a pure
  ``loss_fn(params, batch)`` with its BatchNorm mode (``BN_MODES``);
  :mod:`~hessspec.nn.batchnorm_stats`: the population statistics of the
  ``"population"`` mode;
- :mod:`~hessspec.nn.dataset` (:class:`Dataset`, :func:`subsample`, :func:`batches`),
  :mod:`~hessspec.nn.data_files` (CIFAR-10 and MNIST files) and :mod:`~hessspec.nn.data`
  (the digits, synthetic Gaussian data, :func:`load_train_test`; every data name);
- :mod:`~hessspec.nn.schedule` (mini-batches or the full batch per step),
  :mod:`~hessspec.nn.records` (the loss curve, the saved state, divergence) and
  :mod:`~hessspec.nn.loop`: :func:`optimize`, the one optimization loop (any pytree, any
  optax optimizer; per-step metric and stop criterion, observers, save and resume);
- :mod:`~hessspec.nn.train`: :func:`train`, that loop for an nnx model with analysis
  checkpoints; :func:`make_optimizer` and :func:`stability_threshold` of a
  :class:`TrainConfig`;
- :mod:`~hessspec.nn.progress`: progress bars and log lines.

``hessspec.nn.train`` is the module (import the function as
``from hessspec.nn.train import train``); every other name above is exported here.
"""

from hessspec.nn.batchnorm_stats import population_statistics
from hessspec.nn.data import (
    Dataset,
    batches,
    load_cifar10,
    load_digits,
    load_mnist,
    load_train_test,
    subsample,
    synthetic_gaussian,
)
from hessspec.nn.loop import Observation, OptimizeResult, optimize
from hessspec.nn.models import CNN, MLP, LinearModel, ResNet, count_params, make_model
from hessspec.nn.objective import BN_MODES, Objective, make_objective, output_loss, with_params
from hessspec.nn.records import LossCurve, TrainingDiverged, TrainingState
from hessspec.nn.schedule import BatchOrder, FullBatch
from hessspec.nn.train import (
    TrainConfig,
    TrainHistory,
    make_optimizer,
    stability_threshold,
)

__all__ = [
    "BN_MODES",
    "CNN",
    "MLP",
    "BatchOrder",
    "Dataset",
    "FullBatch",
    "LinearModel",
    "LossCurve",
    "Objective",
    "Observation",
    "OptimizeResult",
    "ResNet",
    "TrainConfig",
    "TrainHistory",
    "TrainingDiverged",
    "TrainingState",
    "batches",
    "count_params",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_train_test",
    "make_model",
    "make_objective",
    "make_optimizer",
    "optimize",
    "output_loss",
    "population_statistics",
    "stability_threshold",
    "subsample",
    "synthetic_gaussian",
    "with_params",
]
