"""Matrix-free curvature operators of a dataset-mean loss: the Hessian and the Gauss-Newton.

Both operators act on flat parameter vectors (``jax.flatten_util.ravel_pytree`` order) and
are exact for the dataset mean ``L(theta) = (1/N) sum_i loss_i(theta)``: the data is cut
into ``ceil(N / batch_size)`` consecutive batches, batch ``b`` contributes
``(|b| / N) * H_b v`` where ``H_b`` is the Hessian of the batch's MEAN loss, and a ragged
last batch gets its own, smaller weight. The batch loop runs inside the compiled matvec:
a ``lax.scan`` (one compiled body for all full batches, one more for a ragged remainder).
On CPU, convolutions are computed in canonical layout (:mod:`hessspec.conv_layout`) so
that they run at full speed inside the scan and inside the solvers' loops.

For a loss that does not separate over examples (BatchNorm in train mode: the statistics of
each batch enter every example's loss) the operator is ``sum_b (|b| / N) Hess L_b`` under
this fixed partition into batches; it is the curvature of the function that mini-batch SGD
with these batches descends, and it changes with ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hessspec.conv_layout import canonical_convolutions, use_canonical_convolutions
from hessspec.linop import LinearOperator

__all__ = [
    "BatchLayout",
    "DatasetGradient",
    "batch_layout",
    "example_mesh",
    "dataset_gradient",
    "ggn_operator",
    "hessian_operator",
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


def _place(array: np.ndarray, mesh: Mesh | None, example_axis: int | None):
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


def _split_batches(data: Any, layout: BatchLayout, mesh: Mesh | None) -> tuple[Any, Any]:
    """Return (full batches stacked as (num_full_batches, batch_size, ...), ragged remainder),
    each sharded over ``mesh`` along its example axis."""
    cut = layout.num_full_batches * layout.batch_size

    def full(a):
        a = np.asarray(a)[:cut]
        return _place(
            a.reshape((layout.num_full_batches, layout.batch_size) + a.shape[1:]), mesh, 1
        )

    full_batches = jax.tree_util.tree_map(full, data) if layout.num_full_batches else None
    remainder = (
        jax.tree_util.tree_map(lambda a: _place(np.asarray(a)[cut:], mesh, 0), data)
        if layout.remainder
        else None
    )
    return full_batches, remainder


def _check_finite(tree: Any, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path) or '(root)'} has {bad} NaN/Inf "
                f"entries; the Hessian would be NaN. Fix the {what} (e.g. a diverged training "
                "run or missing values in the data) before building the operator."
            )


def _check_scalar_loss(loss_fn: Callable, params: Any, batch: Any, name: str) -> None:
    try:
        out = jax.eval_shape(loss_fn, params, batch)
    except Exception as err:  # surface the user's error with context
        raise type(err)(f"calling {name}(params, batch) failed: {err}") from err
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"{name}(params, batch) must return a scalar (the MEAN loss over the batch), got "
            f"shape {shape}. Reduce per-example losses with jnp.mean."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{name}(params, batch) must return a float, got dtype {out.dtype}.")


class _Prepared(NamedTuple):
    flat_params: jax.Array
    unravel: Callable
    ravel: Callable
    layout: BatchLayout
    full_batches: Any
    remainder: Any
    first_batch: Any
    platform: str


def _prepare(params: Any, data: Any, batch_size: int | None, devices: Any) -> _Prepared:
    flat_params, unravel = ravel_pytree(params)
    if flat_params.size == 0:
        raise ValueError("params has no entries: nothing to differentiate.")
    if not jnp.issubdtype(flat_params.dtype, jnp.floating):
        raise ValueError(f"params must be floating point, got dtype {flat_params.dtype}.")
    _check_finite(params, "parameters")
    _check_finite(data, "data")
    layout = batch_layout(data, batch_size)
    mesh = example_mesh(devices)
    full_batches, remainder = _split_batches(data, layout, mesh)
    flat_params = _place(np.asarray(flat_params), mesh, None)
    if layout.num_full_batches:
        first = jax.tree_util.tree_map(lambda a: a[0], full_batches)
    else:
        first = remainder
    dtype = flat_params.dtype

    def ravel(tree):
        flat, _ = ravel_pytree(tree)
        if flat.shape != flat_params.shape:
            raise ValueError(
                f"ravel: the pytree flattens to {flat.shape[0]} entries, the parameters to "
                f"{flat_params.shape[0]}; pass a pytree shaped like params."
            )
        return flat.astype(dtype)

    platform = next(iter(flat_params.devices())).platform
    return _Prepared(flat_params, unravel, ravel, layout, full_batches, remainder, first, platform)


def _batch_weighted_sum(
    per_batch: Callable, operand_batches: tuple[Any, Any], layout: BatchLayout, platform: str
):
    """``sum_b (|b| / N) per_batch(batch_b)``: one ``lax.scan`` over the full batches (one
    compiled body), then the ragged remainder.

    On CPU ``per_batch`` runs with :func:`hessspec.conv_layout.canonical_convolutions`, so its
    convolutions stay fast inside the scan and inside the solvers' loops (JAX #12868).
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


def _operator(apply: Callable, prep: _Prepared, name: str) -> LinearOperator:
    """The :class:`LinearOperator` of ``apply`` over the prepared parameters and batches."""
    layout = prep.layout
    return LinearOperator(
        apply=apply,
        operand=(prep.flat_params, (prep.full_batches, prep.remainder)),
        dim=prep.flat_params.size,
        dtype=prep.flat_params.dtype,
        ravel=prep.ravel,
        unravel=prep.unravel,
        description=(
            f"{name} of the mean loss over {layout.num_examples} examples "
            f"(batch size {layout.batch_size}, {prep.flat_params.size} parameters)"
        ),
    )


def hessian_operator(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    devices: Any = None,
) -> LinearOperator:
    """The Hessian of the dataset-mean loss as a matrix-free :class:`LinearOperator`.

    ``H v = sum_b (|b| / N) d/de grad L_b(theta + e v)|_{e=0}`` (forward-over-reverse:
    ``jax.jvp`` of ``jax.grad``), with batches ``b`` of ``batch_size`` consecutive examples
    and a ragged last batch weighted by its size, so ``H`` is exactly the Hessian of
    ``(1/N) sum_i loss_i`` for a loss that separates over examples. For a loss that does not
    (BatchNorm in train mode) it is ``sum_b (|b|/N) Hess L_b`` under this fixed partition.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, the MEAN loss over the examples in
            ``batch`` (a pytree shaped like ``data`` with fewer examples).
        params: pytree of floating arrays (a flat array is fine); flattened with
            ``ravel_pytree``, whose order ``op.ravel`` / ``op.unravel`` follow.
        data: pytree of arrays whose leading axis indexes the N examples.
        batch_size: examples per batch (memory bound of one HVP); None = one batch of all N.
        devices: devices to run on, data parallel: each batch is sharded over a one-axis
            ``Mesh("examples")`` (where the device count divides the batch; replicated
            otherwise) and XLA inserts the cross-device reduction. None = all of
            ``jax.devices()``, across every process after ``jax.distributed.initialize``.

    Returns:
        LinearOperator with ``matvec(v) -> H v`` for ``v`` of shape ``(dim,)``, ``dim`` =
        number of parameters, ``dtype`` = the parameters' dtype (HVPs run in it),
        ``ravel`` / ``unravel`` between parameter pytrees and flat vectors.

    Raises:
        ValueError: loss not a scalar, data leaves that disagree on N, bad batch_size,
            NaN/Inf in params or data.
    """
    prep = _prepare(params, data, batch_size, devices)
    _check_scalar_loss(loss_fn, params, prep.first_batch, "loss_fn")
    unravel, layout = prep.unravel, prep.layout

    def apply(v, operand):
        flat_params, batches = operand

        def hvp_on(batch):
            def grad_flat(p):
                return ravel_pytree(jax.grad(loss_fn)(unravel(p), batch))[0]

            return jax.jvp(grad_flat, (flat_params,), (v.astype(flat_params.dtype),))[1]

        return _batch_weighted_sum(hvp_on, batches, layout, prep.platform)

    return _operator(apply, prep, "Hessian")


def ggn_operator(
    model_fn: Callable[[Any, Any], jax.Array],
    output_loss_fn: Callable[[jax.Array, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    devices: Any = None,
) -> LinearOperator:
    """The generalized Gauss-Newton ``G = sum_b (|b|/N) J_b^T H_out,b J_b`` as an operator.

    With outputs ``z = model_fn(params, batch)`` and the batch loss
    ``L_b = output_loss_fn(z, batch)``, ``J_b = dz/dparams`` and ``H_out,b = d^2 L_b / dz^2``.
    The Hessian splits as ``H = G + R`` with ``R = sum_i (dL/dz_i) Hess z_i`` (Papyan's
    decomposition): ``hessian_operator(lambda p, b: output_loss_fn(model_fn(p, b), b), ...)``
    minus this operator is ``R``. ``G`` is positive semi-definite for a convex output loss
    (cross-entropy, squared error).

    Args:
        model_fn: ``model_fn(params, batch) -> outputs`` (any array or pytree of arrays).
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar`` MEAN loss over the batch.
        params, data, batch_size, devices: as in :func:`hessian_operator`.

    Returns:
        LinearOperator for ``G`` on flat parameter vectors.
    """
    prep = _prepare(params, data, batch_size, devices)
    _check_scalar_loss(
        lambda p, b: output_loss_fn(model_fn(p, b), b), params, prep.first_batch, "output_loss_fn"
    )
    unravel, layout = prep.unravel, prep.layout

    def apply(v, operand):
        flat_params, batches = operand

        def ggn_on(batch):
            def outputs(p):
                return model_fn(unravel(p), batch)

            z, jv = jax.jvp(outputs, (flat_params,), (v.astype(flat_params.dtype),))
            grad_out = jax.grad(output_loss_fn)
            h_jv = jax.jvp(lambda o: grad_out(o, batch), (z,), (jv,))[1]
            _, vjp = jax.vjp(outputs, flat_params)
            return vjp(h_jv)[0]

        return _batch_weighted_sum(ggn_on, batches, layout, prep.platform)

    return _operator(apply, prep, "Gauss-Newton")


class DatasetGradient(NamedTuple):
    """Loss and gradient of the dataset mean under a batch partition.

    Attributes:
        loss: ``sum_b (|b|/N) L_b``, a scalar.
        gradient: flat gradient of that loss, shape ``(dim,)`` (``ravel_pytree`` order).
    """

    loss: jax.Array
    gradient: jax.Array


def dataset_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    devices: Any = None,
) -> DatasetGradient:
    """Loss and flat gradient of the dataset mean, batched exactly as :func:`hessian_operator`.

    The gradient is the one whose Hessian :func:`hessian_operator` returns for the same
    ``batch_size``, so gradient-energy fractions use consistent objects.
    """
    prep = _prepare(params, data, batch_size, devices)
    _check_scalar_loss(loss_fn, params, prep.first_batch, "loss_fn")
    unravel, layout = prep.unravel, prep.layout

    @jax.jit
    def run(flat_params, batches):
        def on(batch):
            loss, grad = jax.value_and_grad(lambda p: loss_fn(unravel(p), batch))(flat_params)
            return loss, grad

        return _batch_weighted_sum(on, batches, layout, prep.platform)

    loss, grad = run(prep.flat_params, (prep.full_batches, prep.remainder))
    return DatasetGradient(loss, grad)
