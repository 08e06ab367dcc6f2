"""The in-memory :class:`Dataset` every loader returns, and what works on any dataset:
:func:`subsample` (a fixed random subset, optionally stratified) and :func:`batches` (one
epoch in batches).

A :class:`Dataset` holds inputs ``x`` of shape ``(N, H, W, C)`` (images, channels last) or
``(N, D)`` (vectors), targets ``y`` of shape ``(N,)`` (``int32`` class indices, or floating
regression targets), ``num_classes`` (0 for regression) and a name. ``dataset.batch`` is
the dict ``{"x": x, "y": y}``, the batch format every loss in hessspec takes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Dataset", "batches", "default_data_dir", "subsample"]

#: The split names of every loader: ``"all"`` is train then test.
SPLITS = ("train", "test", "all")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset of ``N`` examples.

    Attributes:
        x: inputs, shape ``(N, H, W, C)`` for images (channels last) or ``(N, D)`` for
            vectors; floating dtype.
        y: targets, shape ``(N,)``: ``int32`` class indices in ``[0, num_classes)`` for
            classification, floating values for regression (``num_classes == 0``).
        num_classes: number of classes ``K``; 0 for regression.
        name: short description, e.g. ``"digits/train"``.
        info: free-form metadata (preprocessing statistics, teacher weights, source path).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim < 2:
            raise ValueError(
                f"Dataset {self.name!r}: x must have shape (N, D) or (N, H, W, C), "
                f"got shape {x.shape}."
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: y must have shape (N,) with N = {x.shape[0]} "
                f"(the leading axis of x), got shape {y.shape}."
            )
        num_classes = int(self.num_classes)
        if num_classes < 0:
            raise ValueError(f"Dataset {self.name!r}: num_classes must be >= 0, got {num_classes}.")
        if num_classes > 0:
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"Dataset {self.name!r}: classification labels must be integers, "
                    f"got dtype {y.dtype}."
                )
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: labels must lie in [0, {num_classes}), "
                    f"got range [{y.min()}, {y.max()}]."
                )
            y = y.astype(np.int32)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "info", dict(self.info))

    @property
    def batch(self) -> dict[str, np.ndarray]:
        """The whole dataset as one batch ``{"x": x, "y": y}``."""
        return {"x": self.x, "y": self.y}

    @property
    def num_examples(self) -> int:
        """``N``, the number of examples."""
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``x.shape[1:]``: ``(H, W, C)`` or ``(D,)``."""
        return tuple(self.x.shape[1:])

    @property
    def is_classification(self) -> bool:
        """True when ``num_classes > 0``."""
        return self.num_classes > 0

    def __len__(self) -> int:
        return self.num_examples

    def take(self, indices, name: str | None = None) -> Dataset:
        """The examples at ``indices`` (an integer array or slice), as a new dataset."""
        if isinstance(indices, slice):
            x, y = self.x[indices], self.y[indices]
        else:
            idx = np.asarray(indices)
            x, y = self.x[idx], self.y[idx]
        return dataclasses.replace(self, x=x, y=y, name=name or self.name)

    def flatten(self) -> Dataset:
        """The same dataset with inputs reshaped to vectors ``(N, prod(input_shape))``."""
        return dataclasses.replace(self, x=self.x.reshape(self.num_examples, -1))

    def astype(self, dtype) -> Dataset:
        """The same dataset with inputs cast to ``dtype`` (targets keep their dtype unless
        they are regression targets, which are cast too)."""
        y = self.y if self.is_classification else self.y.astype(dtype)
        return dataclasses.replace(self, x=self.x.astype(dtype), y=y)


def check_split(split: str, allowed=SPLITS) -> None:
    """Raise for a split name outside ``allowed``."""
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}.")


def check_float_dtype(dtype) -> np.dtype:
    """``dtype`` as a numpy floating dtype (raise for any other)."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    return dtype


def default_data_dir() -> Path:
    """Root folder for on-disk datasets: ``$HESSSPEC_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("HESSSPEC_DATA", "data"))


def subsample(dataset: Dataset, n: int, seed: int = 0, stratify: bool = False) -> Dataset:
    """A fixed random subset of ``n`` examples, without replacement, in original order.

    Args:
        dataset: the dataset.
        n: subset size, ``1 <= n <= N``; ``n == N`` returns every example.
        seed: seed of the choice (deterministic).
        stratify: for classification, keep the class proportions (rounded so that the
            sizes sum to ``n``; ``sklearn.model_selection.train_test_split``). ``n`` must
            be at least the number of classes; when fewer than that many examples are left
            out, they are chosen at random instead.

    Raises:
        ValueError: ``n`` outside ``[1, N]``, or a stratified ``n`` below the number of
            classes.

    Returns:
        Dataset of ``n`` examples; ``info["indices"]`` holds their indices in ``dataset``.
    """
    total = dataset.num_examples
    if not 1 <= n <= total:
        raise ValueError(f"n must lie in [1, {total}], got {n}.")
    if n == total:
        idx = np.arange(total)
    elif stratify:
        if not dataset.is_classification:
            raise ValueError("stratify=True needs a classification dataset.")
        classes = int(np.unique(dataset.y).size)
        if n < classes:
            raise ValueError(
                f"a stratified subset of {n} examples cannot hold one example of each of the "
                f"{classes} classes; take at least {classes}."
            )
        if total - n < classes:  # sklearn needs a class-complete rest too: drop at random
            drop = np.random.default_rng(seed).choice(total, size=total - n, replace=False)
            idx = np.setdiff1d(np.arange(total), drop)
            sub = dataset.take(idx, name=f"{dataset.name}[{n}]")
            return dataclasses.replace(sub, info={**dataset.info, "indices": idx})
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(
            np.arange(total), train_size=n, random_state=seed, stratify=dataset.y
        )
        idx = np.sort(idx)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    sub = dataset.take(idx, name=f"{dataset.name}[{n}]")
    return dataclasses.replace(sub, info={**dataset.info, "indices": idx})


def batches(
    dataset: Dataset, batch_size: int, seed: int | None = None, drop_remainder: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over one epoch in batches ``{"x": (B, ...), "y": (B,)}``.

    Args:
        dataset: the dataset.
        batch_size: examples per batch ``B``.
        seed: shuffle with this seed; ``None`` keeps the order.
        drop_remainder: drop the last, smaller batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    n = dataset.num_examples
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {"x": dataset.x[idx], "y": dataset.y[idx]}
