"""Training a flax.nnx model with optax, with analysis checkpoints at chosen steps, that can
stop and resume; the optimizer a config describes and its stability threshold.

:func:`train` is :func:`hessspec.nn.loop.optimize` (the one optimization loop) for an nnx
model: a seeded mini-batch optimizer over the model's parameters, its BatchNorm running
averages as the loop's state, and a callback at the checkpoint steps (step 0 = at
initialization, before any update) with the model holding the parameters and BatchNorm
running averages of that step. It knows nothing of Hessians (the callback analyses, see
:mod:`hessspec.studies.batchnorm_spectrum.analyzer`) nor of files (``on_save`` receives the
:class:`TrainingState` to store, see :mod:`hessspec.studies.common.checkpoint`).

BatchNorm layers train as usual: batch statistics in the forward pass, running averages
updated at every step (so an ``"eval"``-mode analysis later sees the averages SGD left).

Mini-batches (:class:`BatchOrder`): every epoch is a fresh seeded permutation of the
training set cut into ``N // batch_size`` full batches (the ragged rest of each epoch is
skipped, so every step sees the same batch size). The training set lives on the device
once; a step receives only the indices of its batch. The loss curve streams to the host
(:class:`LossCurve`); a non-finite loss stops the training (:class:`TrainingDiverged`).

Stopping and resuming: ``on_save`` receives the state at every checkpoint step (before its
analysis), at the last step, and, when the training is interrupted (``KeyboardInterrupt``
between steps), at the step reached. ``resume_from`` continues from such a state: the same
parameters, BatchNorm statistics, optimizer state and batch order, so the resumed training
takes exactly the steps an uninterrupted one would have taken, none of them twice.

The loop's pieces are importable from here too: :func:`optimize`, :class:`Observation`,
:class:`BatchOrder`, :class:`FullBatch`, :func:`batch_indices`, :class:`LossCurve`,
:class:`TrainingState`, :class:`TrainingDiverged`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import optax
from flax import nnx

from hessspec.nn.loop import Observation, OptimizeResult, optimize
from hessspec.nn.objective import output_loss
from hessspec.nn.records import LossCurve, TrainingDiverged, TrainingState
from hessspec.nn.schedule import BatchOrder, FullBatch, batch_indices

__all__ = [
    "BatchOrder",
    "FullBatch",
    "LossCurve",
    "Observation",
    "OptimizeResult",
    "TrainConfig",
    "TrainHistory",
    "TrainingDiverged",
    "TrainingState",
    "batch_indices",
    "make_optimizer",
    "model_train_loss",
    "optimize",
    "stability_threshold",
    "train",
]


def _field(default, help: str):
    """A dataclass field with a help text (shown by ``--help`` and in the docs)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the optimizer, the training length and the analysis checkpoints."""

    optimizer: str = _field("sgd", "'sgd' (with momentum) or 'adam'")
    learning_rate: float = _field(0.003, "learning rate (constant)")
    momentum: float = _field(0.9, "sgd: heavy-ball momentum (0 for plain SGD)")
    nesterov: bool = _field(False, "sgd: Nesterov momentum")
    adam_b1: float = _field(0.9, "adam: beta1")
    adam_b2: float = _field(0.999, "adam: beta2")
    weight_decay: float = _field(
        0.0, "weight decay (L2 on the gradient for sgd, decoupled AdamW for adam)"
    )
    batch_size: int = _field(64, "training mini-batch size")
    steps: int = _field(500, "number of optimizer steps")
    checkpoints: tuple[int, ...] = _field(
        (),
        "steps at which to analyse the Hessian (0 = at initialization); empty: "
        "train.num_checkpoints steps, 0 then doubling up to train.steps",
    )
    num_checkpoints: int = _field(
        5, "number of automatic checkpoints when train.checkpoints is empty"
    )


@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """What happened during training.

    Attributes:
        steps: ``(T,)`` step numbers ``1..T`` (step ``t`` is the ``t``-th update).
        losses: ``(T,)`` mini-batch loss at each step, computed before its update (a
            resumed training includes the steps before the resume).
        checkpoints: the steps at which the callback ran (in this call).
        seconds: wall time of the updates alone (callbacks, saves and compilation
            excluded), over every session of a resumed training.
        observations: ``(step, value)`` of every ``observe`` call that returned something
            other than None (in this call), e.g. the sharpness every few steps.
    """

    steps: np.ndarray
    losses: np.ndarray
    checkpoints: tuple[int, ...]
    seconds: float
    observations: tuple[tuple[int, Any], ...] = ()


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer a :class:`TrainConfig` describes.

    - ``"sgd"``: ``optax.sgd(learning_rate, momentum, nesterov)`` (plain SGD when momentum
      is 0), with ``weight_decay * params`` added to the gradient first (L2);
    - ``"adam"``: ``optax.adam`` with ``adam_b1``/``adam_b2``, or ``optax.adamw`` (decoupled
      decay) when ``weight_decay > 0``.
    """
    if cfg.optimizer == "sgd":
        sgd = optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
        if cfg.weight_decay > 0:
            return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd)
        return sgd
    if cfg.optimizer == "adam":
        if cfg.weight_decay > 0:
            return optax.adamw(
                cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay
            )
        return optax.adam(cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adam'.")


def stability_threshold(optimizer_config) -> float:
    """The sharpness above which the optimizer is unstable on a quadratic (Cohen et al. 2021):
    ``2 / lr`` for gradient descent, ``(2 + 2 momentum) / lr`` for heavy-ball momentum.

    On :math:`L(w) = \\tfrac12 w^\\top A w` gradient descent with step :math:`\\eta` maps each
    eigencomponent :math:`c` (eigenvalue :math:`\\lambda`) to :math:`(1 - \\eta\\lambda) c`: it
    shrinks iff :math:`0 < \\lambda < 2/\\eta`. Heavy-ball momentum as optax applies it,
    :math:`v_{t+1} = \\beta v_t + g_t`, :math:`w_{t+1} = w_t - \\eta v_{t+1}`, acts on
    :math:`(c_t, c_{t-1})` by the companion matrix of
    :math:`z^2 - (1 + \\beta - \\eta\\lambda) z + \\beta`, whose roots lie inside the unit
    circle iff :math:`0 < \\eta\\lambda < 2 + 2\\beta` (for :math:`0 \\le \\beta < 1`). So the
    iteration is stable iff :math:`\\lambda_{\\max}(A)` stays below this threshold; training
    that drives the sharpness up to it is at the edge of stability. With ``weight_decay``
    the descended objective adds :math:`\\tfrac{wd}{2}\\|w\\|^2`: compare
    :math:`\\lambda_{\\max} + wd` with the threshold.

    Args:
        optimizer_config: a :class:`TrainConfig` (or anything with its ``optimizer``,
            ``learning_rate``, ``momentum`` and ``nesterov`` fields).

    Returns:
        The threshold on :math:`\\lambda_{\\max}`, a float.

    Raises:
        ValueError: Adam or Nesterov momentum, where this threshold is not defined; a
            learning rate that is not positive.
    """
    cfg = optimizer_config
    if cfg.optimizer == "adam":
        raise ValueError(
            "the stability threshold is undefined for adam: its step is preconditioned per "
            "coordinate, so no threshold on lambda_max applies; use optimizer='sgd'."
        )
    if cfg.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adam'.")
    if cfg.nesterov:
        raise ValueError(
            "the stability threshold is undefined here for Nesterov momentum (Cohen et al. "
            "2021 give 2/lr for gradient descent and (2 + 2 momentum)/lr for heavy-ball "
            "momentum); set train.nesterov = false."
        )
    if not cfg.learning_rate > 0:
        raise ValueError(f"the learning rate must be positive, got {cfg.learning_rate}.")
    return (2.0 + 2.0 * float(cfg.momentum or 0.0)) / float(cfg.learning_rate)


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """:func:`make_optimizer`, the same object for the same optimizer settings (the other
    fields do not count), so the loop's compiled programs are reused."""
    return _cached_optimizer(dataclasses.replace(cfg, steps=0, checkpoints=(), num_checkpoints=1))


@functools.lru_cache(maxsize=32)
def _cached_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return make_optimizer(cfg)


@functools.lru_cache(maxsize=32)
def model_train_loss(graphdef, loss: str):
    """``loss_fn(params, rest, batch) -> (mean loss, new rest)`` of a model graph in train
    mode (batch statistics; the running averages and RNG counters it updates are the new
    rest); cached, so training the same architecture again reuses the compiled loop."""

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch["x"])
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return output_loss(logits, batch, loss), nnx.to_pure_dict(new_rest)

    return loss_fn


def _observer(model, checkpoints, on_checkpoint, observe, observe_at):
    """The loop's observer for :func:`train` and its steps: at a checkpoint, the model
    loaded with that step's state for ``on_checkpoint`` (then back in train mode); at an
    ``observe_at`` step, ``observe`` (its value is the observer's)."""
    at_checkpoints = set(checkpoints) if on_checkpoint is not None else set()
    observed = set(observe_at) if observe is not None else set()
    if not at_checkpoints | observed:
        return None, ()

    def observer(seen: Observation):
        if seen.step in at_checkpoints:
            _load(model, seen.params, seen.state)
            on_checkpoint(seen.step, model, seen.status)
            model.train()
        return observe(seen) if seen.step in observed else None

    return observer, sorted(at_checkpoints | observed)


def _load(model: nnx.Module, params, rest) -> None:
    """Write pure-dict parameters and state into ``model`` in place."""
    nnx.update(model, params)
    nnx.update(model, rest)


def train(
    model: nnx.Module,
    x: Any,
    y: Any,
    cfg: TrainConfig,
    *,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, nnx.Module, Callable[[str], None]], None] | None = None,
    loss: str = "cross_entropy",
    seed: int = 0,
    progress: Any = True,
    desc: str = "train",
    resume_from: TrainingState | None = None,
    on_save: Callable[[TrainingState, str], None] | None = None,
    curve: LossCurve | None = None,
    observe: Callable[[Observation], Any] | None = None,
    observe_at: Iterable[int] = (),
) -> TrainHistory:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps.

    Args:
        model: a flax.nnx model ``x (B, ...) -> logits (B, K)``; updated in place (its
            parameters and BatchNorm running averages). It is put in train mode
            (``model.train()``: batch statistics, BN noise on) for the updates.
        x: training inputs ``(N, ...)``.
        y: training targets ``(N,)``.
        cfg: optimizer, learning rate, batch size and number of steps.
        checkpoints: steps in ``[0, cfg.steps]`` at which ``on_checkpoint`` runs; step
            ``s`` runs after ``s`` updates (0: at initialization). With ``resume_from``,
            steps before the resumed one are skipped; the resumed step itself runs.
        on_checkpoint: ``(step, model, status) -> None``; ``model`` holds that step's
            state (it may read the model but must not change it); ``status(text)`` shows a
            short text on the progress display.
        loss: ``"cross_entropy"`` or ``"mse"`` (see :func:`hessspec.nn.objective.output_loss`).
        seed: seed of the batch order (ignored with ``resume_from``, which carries it).
        progress: a :class:`hessspec.nn.progress.Progress`, or True (bars on a terminal, log
            lines otherwise) / False (nothing) / a style name.
        desc: label of the progress display.
        resume_from: continue from this state (from ``on_save`` of an earlier call with the
            same model, data and ``cfg``) instead of the model's current state.
        on_save: ``(state, kind) -> None``, called with the state to store: ``kind`` is
            ``"checkpoint"`` at every checkpoint step (before ``on_checkpoint``),
            ``"final"`` after the last step (when it is no checkpoint) and
            ``"interrupt"`` when a ``KeyboardInterrupt`` stops the training between two
            checkpoints (then the interrupt propagates). Never called for the state
            ``resume_from`` already is.
        curve: the :class:`LossCurve` to fill (the caller keeps what was recorded however
            the training ends); a new one by default. With ``resume_from`` it is reset to
            the state's losses.
        observe, observe_at: an observer of the loop at these steps (after the checkpoint
            callback at a common step): ``observe(Observation)`` sees the parameters and
            the model's other state as pure dicts and the next batch's indices, before the
            update; what it returns is recorded (``TrainHistory.observations``) and handed
            back as ``last`` (sharpness tracking, warm-started).

    Returns:
        :class:`TrainHistory`.

    Raises:
        ValueError: a checkpoint outside ``[0, cfg.steps]``, a batch size larger than N, or
            a ``resume_from`` state that does not fit.
        TrainingDiverged: a non-finite mini-batch loss (the curve holds the losses up to
            that step).
    """
    checkpoints = sorted(set(int(s) for s in checkpoints))
    bad = [s for s in checkpoints if not 0 <= s <= cfg.steps]
    if bad:
        raise ValueError(f"checkpoints {bad} lie outside [0, {cfg.steps}].")
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    observer, observe_steps = _observer(model, checkpoints, on_checkpoint, observe, observe_at)
    # without an analysis, a state is saved at the end only (kind "checkpoint" if it is one)
    saves = checkpoints if on_checkpoint is not None else set(checkpoints) & {cfg.steps}
    result = optimize(
        model_train_loss(graphdef, loss),
        nnx.to_pure_dict(params),
        _optimizer(cfg),
        {"x": x, "y": y},
        num_steps=cfg.steps,
        batches=BatchOrder(int(np.shape(x)[0]), cfg.batch_size, seed),
        state=nnx.to_pure_dict(rest),
        resume_from=resume_from,
        observe=observer,
        observe_at=observe_steps,
        save_at=saves,
        on_save=on_save,
        curve=curve,
        progress=progress,
        desc=desc,
        divergence_hint=f"lower train.learning_rate (now {cfg.learning_rate})",
    )
    _load(model, result.params, result.state)
    return TrainHistory(
        steps=np.arange(1, result.losses.size + 1),
        losses=result.losses,
        checkpoints=tuple(s for s in result.observed if on_checkpoint and s in checkpoints),
        seconds=result.seconds,
        observations=result.observations,
    )
