"""Training with optax, with analysis checkpoints at chosen steps, that can stop and resume.

:func:`train` runs a seeded mini-batch optimizer over a flax.nnx model and calls back at the
checkpoint steps (step 0 = at initialization, before any update), with the model holding
the parameters and BatchNorm running averages of that step. It knows nothing of Hessians
(the callback analyses, see :mod:`hessspec.studies.batchnorm_spectrum.analyzer`) nor of files
(``on_save`` receives the
:class:`TrainingState` to store, see :mod:`hessspec.studies.common.checkpoint`).

BatchNorm layers train as usual: batch statistics in the forward pass, running averages
updated at every step (so an ``"eval"``-mode analysis later sees the averages SGD left).

Mini-batches (:class:`BatchOrder`): every epoch is a fresh seeded permutation of the
training set cut into ``N // batch_size`` full batches (the ragged rest of each epoch is
skipped, so every step sees the same batch size). The training set lives on the device
once; a step receives only the indices of its batch.

The loss curve (:class:`LossCurve`) is streamed to the host every few steps (about four
times a second, at most every 512 steps), so memory stays bounded however long the run and
the device never runs far ahead of the host: an interrupt waits for a quarter of a second of
queued steps at most. A non-finite loss stops the training (:class:`TrainingDiverged`)
naming the first step where it appeared.

Stopping and resuming: ``on_save`` receives the state at every checkpoint step (before its
analysis), at the last step, and, when the training is interrupted (``KeyboardInterrupt``
between steps), at the step reached. ``resume_from`` continues from such a state: the same
parameters, BatchNorm statistics, optimizer state and batch order, so the resumed training
takes exactly the steps an uninterrupted one would have taken, none of them twice.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hessspec.nn.objective import output_loss

__all__ = [
    "BatchOrder",
    "LossCurve",
    "TrainHistory",
    "TrainingDiverged",
    "TrainingState",
    "batch_indices",
    "make_optimizer",
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
    """

    steps: np.ndarray
    losses: np.ndarray
    checkpoints: tuple[int, ...]
    seconds: float


class TrainingDiverged(FloatingPointError):
    """The mini-batch loss became non-finite.

    Attributes:
        step: the first step (1-based update count) whose loss is not finite.
        value: that loss (``nan`` or ``inf``).
    """

    def __init__(self, message: str, *, step: int, value: float):
        super().__init__(message)
        self.step = step
        self.value = value


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """Everything needed to continue a training exactly where it stopped.

    Attributes:
        step: updates applied so far.
        params: the model's ``nnx.Param`` state as a pure dict (``nnx.to_pure_dict``).
        rest: the model's other state (BatchNorm running averages, ...) as a pure dict.
        opt_state: the optax state of :func:`make_optimizer` over ``params``.
        data_order: :meth:`BatchOrder.state` at ``step`` (JSON-ready dict).
        losses: ``(step,)`` the mini-batch loss of every step so far (float64).
        seconds: training wall time so far (all sessions).
    """

    step: int
    params: Any
    rest: Any
    opt_state: Any
    data_order: dict[str, Any]
    losses: np.ndarray
    seconds: float


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


class BatchOrder:
    """The example indices of every training step: seeded epoch-wise permutations of the
    ``num_examples`` examples, each cut into ``num_examples // batch_size`` full batches (the
    ragged rest of each epoch is skipped).

    Steps are read in increasing order (:meth:`batch`); only the current epoch's
    permutation is held, so memory does not grow with the number of steps.
    :meth:`state` / :meth:`from_state` save and restore the position (the generator state
    at the start of an epoch) so that a resumed training sees the same batches.

    Args:
        num_examples: ``N``.
        batch_size: ``B``, ``1 <= B <= N``.
        seed: seed of the permutations.

    Raises:
        ValueError: ``batch_size`` outside ``[1, N]``.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"train.batch_size={batch_size} must lie in [1, {num_examples}] (the number "
                "of training examples)."
            )
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.per_epoch = self.num_examples // self.batch_size
        self._rng = np.random.default_rng(self.seed)
        self._epoch = -1
        self._epoch_start_state: dict[str, Any] | None = None
        self._batches: np.ndarray | None = None

    def _advance_to(self, epoch: int) -> None:
        if epoch < self._epoch:  # going back: replay from the seed
            self._rng = np.random.default_rng(self.seed)
            self._epoch = -1
        while self._epoch < epoch:
            self._epoch_start_state = self._rng.bit_generator.state
            perm = self._rng.permutation(self.num_examples)[: self.per_epoch * self.batch_size]
            self._batches = perm.reshape(self.per_epoch, self.batch_size).astype(np.int32)
            self._epoch += 1

    def batch(self, step: int) -> np.ndarray:
        """``(batch_size,)`` int32 indices of the examples of step ``step`` (0-based: the
        batch of the ``step + 1``-th update)."""
        epoch, position = divmod(int(step), self.per_epoch)
        self._advance_to(epoch)
        return self._batches[position]

    def state(self, step: int) -> dict[str, Any]:
        """The position before step ``step``, JSON-ready: sizes, seed, epoch and the
        generator state at the start of that epoch."""
        epoch = int(step) // self.per_epoch
        self._advance_to(epoch)
        return {
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": epoch,
            "rng_state": self._epoch_start_state,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BatchOrder:
        """The order :meth:`state` describes, positioned at that epoch (without replaying
        the epochs before it)."""
        order = cls(state["num_examples"], state["batch_size"], state["seed"])
        order._rng.bit_generator.state = state["rng_state"]
        order._epoch = int(state["epoch"]) - 1
        order._advance_to(int(state["epoch"]))
        return order


def batch_indices(num_examples: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """``(num_steps, batch_size)`` example indices of the first ``num_steps`` steps of
    :class:`BatchOrder` (seeded epoch-wise permutations cut into full batches).

    Raises:
        ValueError: ``batch_size`` larger than the number of examples.
    """
    order = BatchOrder(num_examples, batch_size, seed)
    out = np.empty((num_steps, batch_size), dtype=np.int32)
    for start in range(0, num_steps, order.per_epoch):
        take = min(order.per_epoch, num_steps - start)
        order.batch(start)
        out[start : start + take] = order._batches[:take]
    return out


class LossCurve:
    """The mini-batch loss of every training step, on the host, in bounded memory.

    The training appends each step's loss as a device scalar (no synchronisation); every
    few steps :meth:`flush` copies the pending scalars to the host in one transfer and
    drops them, so the device keeps at most a few hundred scalars and the host 8 bytes per
    step. Every change replaces the whole state in one assignment, so an interrupt (a
    ``KeyboardInterrupt`` raised anywhere) never loses or duplicates a loss.

    Args:
        losses: losses of the steps already taken (a resumed training).
        seconds: training time already spent on them.

    Attributes:
        seconds: training wall time spent producing these losses (kept by :func:`train`).
    """

    def __init__(self, losses: Any = (), seconds: float = 0.0):
        self.reset(losses, seconds)

    def reset(self, losses: Any = (), seconds: float = 0.0) -> None:
        """Start over from ``losses`` (the pending device values are dropped)."""
        initial = np.asarray(losses, dtype=np.float64).reshape(-1)
        # (host chunks, number of host losses, pending device scalars)
        self._state: tuple[tuple[np.ndarray, ...], int, list] = (
            (initial,) if initial.size else (),
            int(initial.size),
            [],
        )
        self._cache: np.ndarray | None = None
        self.seconds = float(seconds)

    def __len__(self) -> int:
        """Steps recorded (flushed or pending)."""
        _, flushed, pending = self._state
        return flushed + len(pending)

    @property
    def pending(self) -> int:
        """Steps whose loss is still on the device."""
        return len(self._state[2])

    @property
    def num_flushed(self) -> int:
        """Steps whose loss is on the host."""
        return self._state[1]

    def append(self, value: jax.Array) -> None:
        """Record the loss of the next step (a device scalar; not synchronised)."""
        self._state[2].append(value)

    def flush(self) -> np.ndarray:
        """Copy the pending losses to the host (waits for their steps); returns them."""
        chunks, flushed, pending = self._state
        if not pending:
            return np.zeros(0)
        jax.block_until_ready(pending)  # a wait Ctrl-C can interrupt (device_get's cannot)
        values = np.asarray(jax.device_get(pending), dtype=np.float64).reshape(-1)
        chunks = chunks + (values,)
        if len(chunks) > 64:  # keep the chunk list short
            chunks = (np.concatenate(chunks),)
        self._state = (chunks, flushed + values.size, [])
        return values

    def truncate(self, num_steps: int) -> None:
        """Keep the losses of the first ``num_steps`` steps only."""
        if num_steps >= len(self):
            return
        self.flush()
        kept = self.host_losses()[:num_steps].copy()
        self._state = ((kept,) if kept.size else (), int(kept.size), [])

    def host_losses(self) -> np.ndarray:
        """``(F,)`` the losses already on the host (no device access: safe from any
        thread)."""
        chunks, flushed, _ = self._state
        cache = self._cache
        if cache is None or cache.size != flushed:
            cache = np.concatenate(chunks) if chunks else np.zeros(0)
            self._cache = cache
        return cache

    def losses(self) -> np.ndarray:
        """``(T,)`` every loss (flushes first)."""
        self.flush()
        return self.host_losses()


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


_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _compiled(step_fn, *args):
    """``step_fn`` compiled ahead of time for arguments shaped like ``args`` (cached), so
    the compilation happens before the first step instead of inside it."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    signature = tuple(
        (np.shape(a), str(getattr(a, "dtype", None) or np.asarray(a).dtype)) for a in leaves
    )
    key = (step_fn, treedef, signature)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = step_fn.lower(*args).compile()
    _COMPILED[key] = compiled
    if len(_COMPILED) > 32:
        _COMPILED.popitem(last=False)
    return compiled


#: Streaming the loss: aim at this many seconds of steps between two host copies.
_FLUSH_SECONDS = 0.25
_MAX_PENDING = 512


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

    Returns:
        :class:`TrainHistory`.

    Raises:
        ValueError: a checkpoint outside ``[0, cfg.steps]``, a batch size larger than N, or
            a ``resume_from`` state that does not fit.
        TrainingDiverged: a non-finite mini-batch loss (the curve holds the losses up to
            that step).
    """
    from hessspec.nn.progress import Progress

    checkpoints = sorted(set(int(s) for s in checkpoints))
    bad = [s for s in checkpoints if not 0 <= s <= cfg.steps]
    if bad:
        raise ValueError(f"checkpoints {bad} lie outside [0, {cfg.steps}].")
    n = int(np.shape(x)[0])

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = make_optimizer(cfg)
    if resume_from is None:
        order = BatchOrder(n, cfg.batch_size, seed)
        opt_state = tx.init(params)
        start = 0
        curve = curve if curve is not None else LossCurve()
        curve.reset()
    else:
        order = BatchOrder.from_state(resume_from.data_order)
        if (order.num_examples, order.batch_size) != (n, cfg.batch_size):
            raise ValueError(
                f"the saved training state is for {order.num_examples} examples in batches "
                f"of {order.batch_size}; this training has {n} in batches of {cfg.batch_size}."
            )
        start = int(resume_from.step)
        if not 0 <= start <= cfg.steps:
            raise ValueError(f"the saved training state is at step {start}, past {cfg.steps}.")
        params = jax.tree_util.tree_map(jnp.asarray, resume_from.params)
        rest = jax.tree_util.tree_map(jnp.asarray, resume_from.rest)
        opt_state = jax.tree_util.tree_map(jnp.asarray, resume_from.opt_state)
        losses = np.asarray(resume_from.losses, dtype=np.float64)[:start]
        curve = curve if curve is not None else LossCurve()
        curve.reset(losses, resume_from.seconds)
    # the step depends on the optimizer fields only: key the cache on those
    optimizer_only = dataclasses.replace(cfg, steps=0, checkpoints=(), num_checkpoints=1)
    x_all, y_all = jnp.asarray(x), jnp.asarray(y)
    step_fn = None
    if start < cfg.steps:
        step_fn = _compiled(
            _make_step(graphdef, optimizer_only, loss),
            params,
            rest,
            opt_state,
            x_all,
            y_all,
            order.batch(start),
        )

    # ``cursor`` is the one truth of where the training is: (updates applied, params, rest,
    # opt_state), replaced in one assignment after each step, so an interrupt anywhere
    # leaves a consistent state (the curve may hold one loss more: cut at save time).
    cursor = (start, params, rest, opt_state)
    saved_step = start if resume_from is not None else -1
    flush_every = 4
    since_flush = time.perf_counter()
    steps_at_flush = start
    report = Progress.of(progress).training(desc, cfg.steps, start)

    def sync_model(state):
        nnx.update(model, state[1])
        nnx.update(model, state[2])

    def flush(step_now: int) -> None:
        values = curve.flush()
        if values.size and not np.all(np.isfinite(values)):
            first = int(np.argmax(~np.isfinite(values)))
            bad_step = step_now - values.size + first + 1
            curve.truncate(bad_step)
            raise TrainingDiverged(
                f"training diverged: the mini-batch loss at step {bad_step} is "
                f"{values[first]}; lower train.learning_rate (now {cfg.learning_rate}).",
                step=bad_step,
                value=float(values[first]),
            )
        report.advance(step_now - report.step, float(values[-1]) if values.size else None)

    def state_at(state) -> TrainingState:
        curve.truncate(state[0])
        losses = curve.losses()
        return TrainingState(
            step=state[0],
            params=jax.tree_util.tree_map(np.asarray, state[1]),
            rest=jax.tree_util.tree_map(np.asarray, state[2]),
            opt_state=jax.tree_util.tree_map(np.asarray, state[3]),
            data_order=order.state(state[0]),
            losses=losses,
            seconds=curve.seconds,
        )

    ran = []
    try:
        while True:
            step = cursor[0]
            at_checkpoint = step in checkpoints and on_checkpoint is not None
            if at_checkpoint or step == cfg.steps:  # the last loss is checked here too
                curve.seconds += time.perf_counter() - since_flush
                flush(step)
                report.pause(f"analysing step {step}" if at_checkpoint else "saving")
                if on_save is not None and step != saved_step:
                    on_save(state_at(cursor), "checkpoint" if step in checkpoints else "final")
                    saved_step = step
                if at_checkpoint:
                    sync_model(cursor)
                    on_checkpoint(step, model, lambda text: report.pause(text))
                    ran.append(step)
                    model.train()
                report.resume()
                since_flush = time.perf_counter()
                steps_at_flush = step
            if step >= cfg.steps:
                break
            out = step_fn(cursor[1], cursor[2], cursor[3], x_all, y_all, order.batch(step))
            curve.append(out[3])
            cursor = (step + 1, out[0], out[1], out[2])
            if curve.pending >= flush_every:
                now = time.perf_counter()
                curve.seconds += now - since_flush
                flush(cursor[0])
                done = time.perf_counter()
                per_step = (done - since_flush) / max(cursor[0] - steps_at_flush, 1)
                flush_every = int(np.clip(_FLUSH_SECONDS / max(per_step, 1e-7), 1, _MAX_PENDING))
                since_flush, steps_at_flush = done, cursor[0]
    except KeyboardInterrupt:
        # between two steps, or while saving a checkpoint (during an analysis the state of
        # its step is saved already): keep the state reached, so no step is taken twice
        if on_save is not None and cursor[0] != saved_step:
            curve.seconds += time.perf_counter() - since_flush
            on_save(state_at(cursor), "interrupt")
        raise
    finally:
        report.close()
    sync_model(cursor)
    losses = curve.losses()
    return TrainHistory(
        steps=np.arange(1, losses.size + 1),
        losses=losses,
        checkpoints=tuple(ran),
        seconds=curve.seconds,
    )
