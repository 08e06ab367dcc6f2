"""The edge-of-stability study, run end to end: :func:`run_edge_of_stability_study`.

For every network (without and with BatchNorm) and every run (gradient descent at each
learning rate, heavy-ball momentum at each momentum learning rate), an MLP trains by
full-batch gradient descent on the square loss against one-hot targets
(:func:`hessspec.nn.train.train` with the whole training set as its batch) while
:class:`hessspec.nn.sharpness.SharpnessTracker` measures ``lambda_max`` of the training
objective every ``track_every`` steps, warm-started. Each run is summarised by its
stability threshold, the first tracked step at which ``lambda_max`` reached it and the
median of ``lambda_max / threshold`` from then on.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hessspec.studies.common.checks import dtype_of
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.runner import Study, run_study
from hessspec.studies.edge_of_stability.config import EXPERIMENT, EdgeOfStabilityConfig
from hessspec.studies.edge_of_stability.plots import figures_for
from hessspec.studies.edge_of_stability.report import report

__all__ = ["EDGE_OF_STABILITY", "run_edge_of_stability_study", "summarize_sharpness"]


def _runs(config: EdgeOfStabilityConfig) -> list[tuple[bool, float, float]]:
    """``(batchnorm, learning_rate, momentum)`` of every run, in report order."""
    plain = [(lr, 0.0) for lr in config.learning_rates]
    heavy = [(lr, config.momentum) for lr in config.momentum_learning_rates]
    return [(bn, lr, m) for bn in config.batchnorm for lr, m in [*plain, *heavy]]


def _digits(config: EdgeOfStabilityConfig):
    """The training subset: ``train_size`` digits, flattened, in the config's dtype."""
    from hessspec.nn.data import load_digits, subsample

    data = load_digits(
        "train",
        seed=config.seed,
        preprocessing=config.preprocessing,
        flatten=True,
        dtype=np.dtype(dtype_of(config.dtype)),
    )
    if config.train_size > data.num_examples:
        raise ConfigError(
            f"config key 'train_size' = {config.train_size} exceeds the {data.num_examples} "
            "digits of the training split."
        )
    return subsample(data, config.train_size, seed=config.seed)


def summarize_sharpness(steps, values, threshold: float) -> dict[str, Any]:
    """The edge-of-stability summary of one tracked run.

    Args:
        steps: ``(T,)`` tracked steps, increasing.
        values: ``(T,)`` ``lambda_max`` at those steps.
        threshold: the run's stability threshold.

    Returns:
        ``first_step_at_threshold``: the first tracked step with ``lambda_max >= threshold``
        (None if never); ``median_ratio_after``: the median of ``lambda_max / threshold``
        over the tracked steps from that one on (None if never reached);
        ``max_ratio``: the largest ``lambda_max / threshold``; ``initial_ratio``.
    """
    ratios = np.asarray(values, np.float64) / float(threshold)
    reached = np.flatnonzero(ratios >= 1.0)
    first = int(reached[0]) if reached.size else None
    return {
        "first_step_at_threshold": None if first is None else int(steps[first]),
        "median_ratio_after": None if first is None else float(np.median(ratios[first:])),
        "max_ratio": float(ratios.max()),
        "initial_ratio": float(ratios[0]),
    }


def _train_run(config: EdgeOfStabilityConfig, data, batchnorm: bool, lr: float, momentum: float):
    """One run: the model trained with sharpness tracking; its results entry."""
    from hessspec.nn.models import make_model
    from hessspec.nn.objective import make_objective
    from hessspec.nn.sharpness import SharpnessTracker, sharpness_observer, tracking_steps
    from hessspec.nn.train import (
        LossCurve,
        TrainConfig,
        TrainingDiverged,
        stability_threshold,
        train,
    )

    model = make_model(
        "mlp",
        data.input_shape,
        data.num_classes,
        batchnorm,
        seed=config.seed,
        dtype=dtype_of(config.dtype),
        hidden=config.hidden,
        activation=config.activation,
    )
    objective = make_objective(model, "mse", bn_mode="train" if batchnorm else None)
    batch = {"x": data.x, "y": data.y}
    tracker = SharpnessTracker(objective.loss_fn, batch, tol=config.tolerance)
    cfg = TrainConfig(
        optimizer="sgd",
        learning_rate=lr,
        momentum=momentum,
        batch_size=data.num_examples,
        steps=config.steps,
        checkpoints=(),
        num_checkpoints=1,
    )
    started, diverged, measured, curve = time.perf_counter(), None, [], LossCurve()
    try:
        train(
            model,
            data.x,
            data.y,
            cfg,
            loss="mse",
            seed=config.seed,
            progress=False,
            observe=sharpness_observer(tracker, measured),
            curve=curve,
            observe_at=tracking_steps(config.steps, config.track_every),
        )
    except TrainingDiverged as e:
        diverged = e.step
    losses = curve.losses()
    threshold = stability_threshold(cfg)
    steps = [s for s, _ in measured]
    values = [estimate.value for _, estimate in measured]
    return {
        "network": "mlp-bn" if batchnorm else "mlp",
        "batchnorm": batchnorm,
        "learning_rate": lr,
        "momentum": momentum,
        "stability_threshold": threshold,
        "sharpness": [{"step": s, "lambda_max": v} for s, v in zip(steps, values, strict=True)],
        "losses": np.asarray(losses, np.float64),
        "final_loss": float(losses[-1]) if len(losses) else None,
        "diverged_at": diverged,
        "seconds": time.perf_counter() - started,
        **summarize_sharpness(steps, values, threshold),
    }


def _measure(config: EdgeOfStabilityConfig, bar):
    """Every run: the ``runs`` entry and the seconds of the training."""
    data = _digits(config)
    t0, runs = time.perf_counter(), []
    for batchnorm, lr, momentum in _runs(config):
        bar.set_postfix_str(f"{'BN ' if batchnorm else ''}lr={lr:g} momentum={momentum:g}")
        runs.append(_train_run(config, data, batchnorm, lr, momentum))
        bar.update(1)
    entries = {"num_examples": data.num_examples, "runs": runs}
    return entries, {"training_s": time.perf_counter() - t0}


def _num_parts(config: EdgeOfStabilityConfig) -> int:
    """The parts the progress bar counts: one per run."""
    return len(_runs(config))


#: The study for :func:`hessspec.studies.common.runner.run_study`.
EDGE_OF_STABILITY = Study(
    EXPERIMENT, EdgeOfStabilityConfig, figures_for, _num_parts, _measure, report
)


def run_edge_of_stability_study(
    config, out_dir, progress=True, *, overwrite=False
) -> dict[str, Any]:
    """Run the edge-of-stability study and write results.json, figures/*.png, report.md and
    config.toml into ``out_dir``; the arguments are those of
    :func:`hessspec.studies.common.runner.run_study` (``config`` an
    :class:`EdgeOfStabilityConfig` or a mapping).

    Returns:
        The results dict (what results.json holds): ``experiment``, ``config``,
        ``num_examples``, ``runs`` (per run: ``network``, ``batchnorm``, ``learning_rate``,
        ``momentum``, ``stability_threshold``, ``sharpness`` = list of ``{"step",
        "lambda_max"}``, ``losses`` (the loss after every step), ``final_loss``,
        ``diverged_at``, ``first_step_at_threshold``, ``median_ratio_after``,
        ``max_ratio``, ``initial_ratio``, ``seconds``), ``environment``, ``timing`` and
        ``files``.
    """
    return run_study(EDGE_OF_STABILITY, config, out_dir, progress=progress, overwrite=overwrite)
