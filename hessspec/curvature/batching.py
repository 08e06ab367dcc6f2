"""The data side of a curvature operator: the partition of a dataset into batches, their
placement on the devices, and the batch-weighted sum a matvec computes.

The data is cut into ``ceil(N / batch_size)`` consecutive batches (:class:`BatchLayout`);
the full ones are stacked as ``(num_full_batches, batch_size, ...)`` so one ``lax.scan``
body serves them all, and a ragged remainder gets its own call. Over several devices each
batch is sharded along its example axis on a one-axis ``Mesh("examples")`` (data parallel;
XLA inserts the reduction). :func:`batch_weighted_sum` evaluates
``sum_b (|b| / N) f(batch_b)`` inside a compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hessspec.curvature.conv_layout import canonical_convolutions, use_canonical_convolutions

__all__ = [
    "BatchLayout",
    "batch_layout",
    "batch_weighted_sum",
    "example_mesh",
    "place",
    "split_batches",
]


class BatchLayout(NamedTuple):
    """How ``num_examples`` examples are cut into batches.

    Attributes:
        num_examples: N, the number of examples.
        batch_size: examples per full batch.
        num_full_batches: ``N // batch_size``.
        remainder: ``N - num_full_batches * batch_size`` examples in a ragged last batch (0
            when ``batch_size`` divides N).
    """

    num_examples: int
    batch_size: int
    num_full_batches: int
    remainder: int


def _num_examples(data: Any) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(
            "data is empty: pass a pytree of arrays whose leading axis indexes examples."
        )
    sizes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading "
                "axis that indexes examples."
            )
        sizes[jax.tree_util.keystr(path) or "data"] = shape[0]
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"data leaves disagree on the number of examples (leading axis): {listing}. "
            "Every leaf must have the same leading dimension."
        )
    n = next(iter(sizes.values()))
    if n < 1:
        raise ValueError("data has 0 examples.")
    return int(n)


def batch_layout(data: Any, batch_size: int | None) -> BatchLayout:
    """Validate ``data`` and ``batch_size`` and return the :class:`BatchLayout`.

    Raises:
        ValueError: leaves disagree on the leading axis, no examples, or a batch_size that is
            not a positive integer.
    """
    n = _num_examples(data)
    if batch_size is None:
        batch_size = n
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    batch_size = min(int(batch_size), n)
    return BatchLayout(n, batch_size, n // batch_size, n % batch_size)


def example_mesh(devices: Any = None) -> Mesh | None:
    """A one-axis ``Mesh`` named ``"examples"`` over ``devices`` (default: all of
    ``jax.devices()``, every process's included), or None for a single device."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) < 1:
        raise ValueError("devices is empty: pass None (all devices) or a list of jax devices.")
    if len(devices) == 1:
        return None
    return Mesh(np.array(devices), ("examples",))


def place(array: np.ndarray, mesh: Mesh | None, example_axis: int | None):
    """Put a host array on the mesh, sharded along ``example_axis`` where the mesh size divides
    it (data parallel; XLA does the reduction), replicated otherwise."""
    if mesh is None:
        return jnp.asarray(array)
    spec = P()
    if example_axis is not None and array.shape[example_axis] % mesh.size == 0:
        spec = P(*([None] * example_axis + ["examples"]))
    return jax.make_array_from_callback(
        array.shape, NamedSharding(mesh, spec), lambda index: array[index]
    )


def split_batches(data: Any, layout: BatchLayout, mesh: Mesh | None) -> tuple[Any, Any]:
    """Return (full batches stacked as (num_full_batches, batch_size, ...), ragged remainder),
    each sharded over ``mesh`` along its example axis."""
    cut = layout.num_full_batches * layout.batch_size

    def full(a):
        a = np.asarray(a)[:cut]
        return place(a.reshape((layout.num_full_batches, layout.batch_size) + a.shape[1:]), mesh, 1)

    full_batches = jax.tree_util.tree_map(full, data) if layout.num_full_batches else None
    remainder = (
        jax.tree_util.tree_map(lambda a: place(np.asarray(a)[cut:], mesh, 0), data)
        if layout.remainder
        else None
    )
    return full_batches, remainder


def batch_weighted_sum(
    per_batch: Callable, operand_batches: tuple[Any, Any], layout: BatchLayout, platform: str
):
    """``sum_b (|b| / N) per_batch(batch_b)``: one ``lax.scan`` over the full batches (one
    compiled body), then the ragged remainder.

    On CPU ``per_batch`` runs with
    :func:`hessspec.curvature.conv_layout.canonical_convolutions`, so its convolutions stay
    fast inside the scan and inside the solvers' loops (JAX #12868).
    """
    full_batches, remainder = operand_batches
    if use_canonical_convolutions(platform):
        per_batch = canonical_convolutions(per_batch)
    n = layout.num_examples
    total = None
    if layout.num_full_batches:
        if layout.num_full_batches == 1:
            summed = per_batch(jax.tree_util.tree_map(lambda a: a[0], full_batches))
        else:

            def body(acc, batch):
                return jax.tree_util.tree_map(jnp.add, acc, per_batch(batch)), None

            first = jax.tree_util.tree_map(lambda a: a[0], full_batches)
            shape = jax.eval_shape(per_batch, first)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
            summed, _ = jax.lax.scan(body, zeros, full_batches)
        w = layout.batch_size / n
        total = jax.tree_util.tree_map(lambda s: s * jnp.asarray(w, s.dtype), summed)
    if layout.remainder:
        out = per_batch(remainder)
        w = layout.remainder / n
        out = jax.tree_util.tree_map(lambda s: s * jnp.asarray(w, s.dtype), out)
        total = out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
    return total
