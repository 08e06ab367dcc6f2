"""Which examples each optimizer step sees: mini-batches (:class:`BatchOrder`) or the whole
data set (:class:`FullBatch`, gradient descent).

A schedule answers ``batch(step)``: the ``(B,)`` int32 indices of the examples of the
``step + 1``-th update (0-based ``step``), or None for the whole data set, and ``state(step)``:
its position before that step, JSON-ready, from which :func:`schedule_from_state` rebuilds
it (a resumed training sees the same batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BatchOrder", "FullBatch", "batch_indices", "schedule_from_state"]


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


class FullBatch:
    """Every step sees all ``num_examples`` examples (full-batch gradient descent).

    Args:
        num_examples: ``N``, at least 1.
    """

    def __init__(self, num_examples: int):
        if int(num_examples) < 1:
            raise ValueError(f"a full batch needs at least one example, got {num_examples}.")
        self.num_examples = int(num_examples)
        self.batch_size = self.num_examples

    def batch(self, step: int) -> None:
        """None: the update after ``step`` uses the whole data set."""
        return None

    def state(self, step: int) -> dict[str, Any]:
        """JSON-ready: ``{"full_batch": True, "num_examples": N}`` (the same at every step)."""
        return {"full_batch": True, "num_examples": self.num_examples}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FullBatch:
        """The schedule :meth:`state` describes."""
        return cls(state["num_examples"])


def schedule_from_state(state: dict[str, Any]) -> BatchOrder | FullBatch:
    """The :class:`FullBatch` or :class:`BatchOrder` a ``state(step)`` describes."""
    if state.get("full_batch"):
        return FullBatch.from_state(state)
    return BatchOrder.from_state(state)
