"""What a training run records: its loss curve, its saved state, its divergence.

- :class:`LossCurve`: a per-step scalar streamed from the device to the host in bounded
  memory, consistent under interrupts;
- :class:`TrainingState`: everything needed to continue a run exactly where it stopped
  (what :func:`hessspec.nn.loop.optimize` hands to ``on_save`` and takes as ``resume_from``);
- :class:`TrainingDiverged`: the error of a non-finite loss, naming its first step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

__all__ = ["LossCurve", "TrainingDiverged", "TrainingState"]


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
        params: the parameters (for :func:`hessspec.nn.train.train`: the model's
            ``nnx.Param`` state as a pure dict, ``nnx.to_pure_dict``), numpy leaves.
        rest: the state the loss updates (BatchNorm running averages, ...), or None.
        opt_state: the optax state over ``params``.
        data_order: the schedule's ``state(step)`` (JSON-ready dict).
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


class LossCurve:
    """A per-step scalar of a run (the mini-batch loss), on the host, in bounded memory.

    The loop appends each chunk of steps' values as a device array (a scalar or a ``(k,)``
    vector; no synchronisation); every few steps :meth:`flush` copies the pending values to
    the host in one transfer and drops them, so the device keeps at most a few hundred
    values and the host 8 bytes per step. Every change replaces the whole state in one
    assignment, so an interrupt (a ``KeyboardInterrupt`` raised anywhere) never loses or
    duplicates a value.

    Args:
        losses: values of the steps already taken (a resumed training).
        seconds: training time already spent on them.

    Attributes:
        seconds: training wall time spent producing these values (kept by the loop).
    """

    def __init__(self, losses: Any = (), seconds: float = 0.0):
        self.reset(losses, seconds)

    def reset(self, losses: Any = (), seconds: float = 0.0) -> None:
        """Start over from ``losses`` (the pending device values are dropped)."""
        initial = np.asarray(losses, dtype=np.float64).reshape(-1)
        # (host chunks, number of host values, pending (device array, steps pending up to
        # and including it)), the list appended to in place: one atomic change per append
        self._state: tuple[tuple[np.ndarray, ...], int, list] = (
            (initial,) if initial.size else (),
            int(initial.size),
            [],
        )
        self._cache: np.ndarray | None = None
        self.seconds = float(seconds)

    def __len__(self) -> int:
        """Steps recorded (flushed or pending)."""
        return self._state[1] + self.pending

    @property
    def pending(self) -> int:
        """Steps whose value is still on the device."""
        pending = self._state[2]
        return pending[-1][1] if pending else 0

    @property
    def num_flushed(self) -> int:
        """Steps whose value is on the host."""
        return self._state[1]

    def append(self, value: jax.Array) -> None:
        """Record the values of the next steps: a device scalar (one step) or a ``(k,)``
        vector (``k`` steps); not synchronised."""
        pending = self._state[2]
        steps = max(int(getattr(value, "size", 1)), 1)  # the shape only: no synchronisation
        pending.append((value, (pending[-1][1] if pending else 0) + steps))

    def flush(self) -> np.ndarray:
        """Copy the pending values to the host (waits for their steps); returns them."""
        chunks, flushed, pending = self._state
        if not pending:
            return np.zeros(0)
        arrays = [v for v, _ in pending]
        jax.block_until_ready(arrays)  # a wait Ctrl-C can interrupt (device_get's cannot)
        values = np.concatenate(
            [np.asarray(v, dtype=np.float64).reshape(-1) for v in jax.device_get(arrays)]
        )
        chunks = chunks + (values,)
        if len(chunks) > 64:  # keep the chunk list short
            chunks = (np.concatenate(chunks),)
        self._state = (chunks, flushed + values.size, [])
        return values

    def truncate(self, num_steps: int) -> None:
        """Keep the values of the first ``num_steps`` steps only."""
        if num_steps >= len(self):
            return
        self.flush()
        kept = self.host_losses()[:num_steps].copy()
        self._state = ((kept,) if kept.size else (), int(kept.size), [])

    def host_losses(self) -> np.ndarray:
        """``(F,)`` the values already on the host (no device access: safe from any
        thread)."""
        chunks, flushed, _ = self._state
        cache = self._cache
        if cache is None or cache.size != flushed:
            cache = np.concatenate(chunks) if chunks else np.zeros(0)
            self._cache = cache
        return cache

    def losses(self) -> np.ndarray:
        """``(T,)`` every value (flushes first)."""
        self.flush()
        return self.host_losses()
