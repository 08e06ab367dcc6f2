"""Training with optax, with analysis checkpoints at chosen steps.

:func:`train` runs a seeded mini-batch optimizer over a flax.nnx model and calls back at the
checkpoint steps (step 0 = at initialization, before any update), with the model holding
the parameters and BatchNorm running averages of that step. It knows nothing of Hessians:
the callback does the analysis (see :mod:`hessspec.study`).

BatchNorm layers train as usual: batch statistics in the forward pass, running averages
updated at every step (so an ``"eval"``-mode analysis later sees the averages SGD left).

Mini-batches: every epoch is a fresh seeded permutation of the training set cut into
``N // batch_size`` full batches (the ragged rest of each epoch is skipped, so every step
sees the same batch size). The training set lives on the device once; a step receives only
the indices of its batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hessspec.config import TrainConfig
from hessspec.objective import output_loss

__all__ = ["TrainHistory", "batch_indices", "make_optimizer", "train"]


@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """What happened during training.

    Attributes:
        steps: ``(T,)`` step numbers ``1..T`` (step ``t`` is the ``t``-th update).
        losses: ``(T,)`` mini-batch loss at each step, computed before its update.
        checkpoints: the steps at which the callback ran.
        seconds: wall time of the updates alone (callbacks excluded).
    """

    steps: np.ndarray
    losses: np.ndarray
    checkpoints: tuple[int, ...]
    seconds: float


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer a :class:`~hessspec.config.TrainConfig` describes.

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


def batch_indices(num_examples: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """``(num_steps, batch_size)`` example indices: seeded epoch-wise permutations cut into
    full batches (the ragged rest of each epoch is skipped).

    Raises:
        ValueError: ``batch_size`` larger than the number of examples.
    """
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"train.batch_size={batch_size} must lie in [1, {num_examples}] (the number of "
            "training examples)."
        )
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    out = np.empty((num_steps, batch_size), dtype=np.int32)
    filled = 0
    while filled < num_steps:
        perm = rng.permutation(num_examples)[: per_epoch * batch_size]
        take = min(per_epoch, num_steps - filled)
        out[filled : filled + take] = perm[: take * batch_size].reshape(take, batch_size)
        filled += take
    return out


@functools.lru_cache(maxsize=32)
def _make_step(graphdef, cfg: TrainConfig, loss: str):
    """The jitted training step for a model graph, an optimizer config and a loss; cached,
    so training the same architecture again (another seed, more steps) reuses it."""
    tx = make_optimizer(cfg)

    @jax.jit
    def step(params, rest, opt_state, x_all, y_all, idx):
        batch = {"x": jnp.take(x_all, idx, axis=0), "y": jnp.take(y_all, idx, axis=0)}

        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            logits = model(batch["x"])
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return output_loss(logits, batch, loss), nnx.to_pure_dict(new_rest)

        (value, new_rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, value

    return step


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
    progress: bool = True,
    desc: str = "train",
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
            ``s`` runs after ``s`` updates (0: at initialization).
        on_checkpoint: ``(step, model, status) -> None``; ``model`` holds that step's
            state (it may read the model but must not change it); ``status(text)`` shows a
            short text on the progress bar.
        loss: ``"cross_entropy"`` or ``"mse"`` (see :func:`hessspec.objective.output_loss`).
        seed: seed of the batch order.
        progress: show a tqdm progress bar on stderr.
        desc: label of the progress bar.

    Returns:
        :class:`TrainHistory`.

    Raises:
        ValueError: a checkpoint outside ``[0, cfg.steps]`` or a batch size larger than N.
    """
    import time

    from tqdm.auto import tqdm

    checkpoints = sorted(set(int(s) for s in checkpoints))
    bad = [s for s in checkpoints if not 0 <= s <= cfg.steps]
    if bad:
        raise ValueError(f"checkpoints {bad} lie outside [0, {cfg.steps}].")
    n = int(np.shape(x)[0])
    order = batch_indices(n, cfg.batch_size, cfg.steps, seed)

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    opt_state = make_optimizer(cfg).init(params)
    # the step depends on the optimizer fields only: key the cache on those
    optimizer_only = dataclasses.replace(cfg, steps=0, checkpoints=(), num_checkpoints=1)
    step_fn = _make_step(graphdef, optimizer_only, loss)
    x_all, y_all = jnp.asarray(x), jnp.asarray(y)

    def sync_model():
        nnx.update(model, params)
        nnx.update(model, rest)

    losses: list[jax.Array] = []
    seconds = 0.0
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    try:
        for step in range(cfg.steps + 1):
            if step in checkpoints and on_checkpoint is not None:
                sync_model()
                bar.set_postfix_str(f"analysing step {step}")
                on_checkpoint(step, model, bar.set_postfix_str)
                model.train()
                bar.set_postfix_str("")
            if step == cfg.steps:
                break
            t0 = time.perf_counter()
            params, rest, opt_state, value = step_fn(
                params, rest, opt_state, x_all, y_all, order[step]
            )
            losses.append(value)
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps or step + 1 in checkpoints:
                last = float(value)  # syncs: keeps the timing honest
                if not np.isfinite(last):
                    raise FloatingPointError(
                        f"training diverged: the mini-batch loss at step {step + 1} is {last}; "
                        f"lower train.learning_rate (now {cfg.learning_rate})."
                    )
                bar.set_postfix_str(f"loss {last:.4f}")
            seconds += time.perf_counter() - t0
            bar.update(1)
    finally:
        bar.close()
    sync_model()
    loss_values = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
    return TrainHistory(
        steps=np.arange(1, len(losses) + 1),
        losses=loss_values.astype(np.float64),
        checkpoints=tuple(s for s in checkpoints if s <= cfg.steps),
        seconds=seconds,
    )
