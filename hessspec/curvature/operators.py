"""Matrix-free curvature operators of a dataset-mean loss: the Hessian and the Gauss-Newton.

Both operators act on flat parameter vectors (``jax.flatten_util.ravel_pytree`` order) and
are exact for the dataset mean ``L(theta) = (1/N) sum_i loss_i(theta)``: the data is cut
into ``ceil(N / batch_size)`` consecutive batches, batch ``b`` contributes
``(|b| / N) * H_b v`` where ``H_b`` is the Hessian of the batch's MEAN loss, and a ragged
last batch gets its own, smaller weight. The batch loop runs inside the compiled matvec:
a ``lax.scan`` (one compiled body for all full batches, one more for a ragged remainder).
On CPU, convolutions are computed in canonical layout (:mod:`hessspec.curvature.conv_layout`)
so that they run at full speed inside the scan and inside the solvers' loops.

The parameter side (flat vectors, ``wrt=`` blocks) is :mod:`hessspec.curvature.layout`, the
data side (batches, devices, the weighted sum over batches) :mod:`hessspec.curvature.batching`;
this module builds the operators from them.

For a loss that does not separate over examples (BatchNorm in train mode: the statistics of
each batch enter every example's loss) the operator is ``sum_b (|b| / N) Hess L_b`` under
this fixed partition into batches; it is the curvature of the function that mini-batch SGD
with these batches descends, and it changes with ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hessspec.curvature.batching import (
    BatchLayout,
    batch_layout,
    batch_weighted_sum,
    example_mesh,
    place,
    split_batches,
)
from hessspec.curvature.layout import FlatLayout, flat_layout, is_array
from hessspec.linalg.linop import LinearOperator

__all__ = [
    "DatasetGradient",
    "dataset_gradient",
    "ggn_operator",
    "hessian_operator",
]


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


@dataclasses.dataclass(frozen=True)
class _Callable:
    """A user function split into its static part and its array leaves: a plain function is
    all static (compared by identity); a pytree callable such as ``jax.tree_util.Partial``
    contributes its leaves to the operand and its structure (with the function) to the
    static part, so a new Partial of the same function with new arrays compiles nothing."""

    function: Any  # the plain function, or None
    treedef: Any  # the pytree structure, or None

    def rebuild(self, leaves):
        if self.function is not None:
            return self.function
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _split_callable(fn: Callable, name: str) -> tuple[_Callable, list]:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    if len(leaves) == 1 and leaves[0] is fn:
        return _Callable(fn, None), []
    bad = [type(x).__name__ for x in leaves if not is_array(x)]
    if bad:
        raise TypeError(
            f"{name} is a pytree with non-array leaves ({', '.join(bad[:3])}); its leaves "
            "must be arrays (e.g. jax.tree_util.Partial(fn, batch_stats))."
        )
    return _Callable(None, treedef), leaves


def _check_scalar_loss(loss_fn: Callable, params: Any, batch: Any, name: str) -> None:
    try:
        out = jax.eval_shape(loss_fn, params, batch)
    except Exception as err:  # keep the user's exception, with context
        err.add_note(
            f"hessspec: raised while calling {name}(params, batch) on the first batch (traced "
            "with abstract arrays: Python control flow on array values such as `if x > 0:` "
            "needs jnp.where or lax.cond)."
        )
        raise
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"{name}(params, batch) must return a scalar (the MEAN loss over the batch), got "
            f"shape {shape}. Reduce per-example losses with jnp.mean."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{name}(params, batch) must return a float, got dtype {out.dtype}.")


class _Prepared(NamedTuple):
    """Parameters and data validated and placed on the devices, ready for an operator.

    Attributes:
        flat_params: ``(dim,)`` the selected parameter leaves as one flat vector.
        fixed: the parameter leaves outside the block, in leaf order.
        layout: the parameters' :class:`~hessspec.curvature.layout.FlatLayout`.
        batches: the :class:`~hessspec.curvature.batching.BatchLayout`.
        full_batches: the full batches stacked along a leading axis (None without any).
        remainder: the ragged last batch (None without one).
        first_batch: one batch, to check the loss on.
        platform: the devices' platform (``"cpu"``, ``"gpu"``, ...).
    """

    flat_params: jax.Array
    fixed: list
    layout: FlatLayout
    batches: BatchLayout
    full_batches: Any
    remainder: Any
    first_batch: Any
    platform: str

    def operand(self, function_leaves: Any) -> tuple:
        """The operand of an apply: ``(flat_params, fixed_leaves, function_leaves,
        (full_batches, remainder))``."""
        return (self.flat_params, self.fixed, function_leaves, (self.full_batches, self.remainder))


def _prepare(
    params: Any, data: Any, batch_size: int | None, devices: Any, wrt: Any = None
) -> _Prepared:
    layout = flat_layout(params, wrt)
    _check_finite(params, "parameters")
    _check_finite(data, "data")
    batches = batch_layout(data, batch_size)
    mesh = example_mesh(devices)
    full_batches, remainder = split_batches(data, batches, mesh)
    leaves = jax.tree_util.tree_leaves(params)
    flat = np.concatenate(
        [np.ravel(np.asarray(x)).astype(layout.dtype) for x in layout.select(leaves)]
    )
    flat_params = place(flat, mesh, None)
    fixed = [
        place(np.asarray(x), mesh, None)
        for x, keep in zip(leaves, layout.selected, strict=True)
        if not keep
    ]
    if batches.num_full_batches:
        first = jax.tree_util.tree_map(lambda a: a[0], full_batches)
    else:
        first = remainder
    platform = next(iter(flat_params.devices())).platform
    return _Prepared(flat_params, fixed, layout, batches, full_batches, remainder, first, platform)


def _prepare_loss(
    loss_fn: Callable, params: Any, data: Any, batch_size: int | None, devices: Any, wrt: Any
) -> tuple[_Callable, list, _Prepared]:
    """``loss_fn`` split into its static part and array leaves, and the prepared parameters
    and data, the loss checked to be a float scalar on the first batch."""
    static, loss_leaves = _split_callable(loss_fn, "loss_fn")
    prep = _prepare(params, data, batch_size, devices, wrt)
    _check_scalar_loss(loss_fn, params, prep.first_batch, "loss_fn")
    return static, loss_leaves, prep


@dataclasses.dataclass(frozen=True)
class _HessianApply:
    """``(v, operand) -> H v``, static and hashable by value: the loss function's static
    part, the parameter and batch layouts and the platform. ``operand`` is
    ``(flat_params, fixed_leaves, loss_leaves, (full_batches, remainder))``."""

    loss: _Callable
    layout: FlatLayout
    batches: BatchLayout
    platform: str

    def __call__(self, v, operand):
        flat_params, fixed, loss_leaves, batches = operand
        loss_fn = self.loss.rebuild(loss_leaves)
        combine = self.layout.combine

        def hvp_on(batch):
            grad_flat = jax.grad(lambda p: loss_fn(combine(p, fixed), batch))
            return jax.jvp(grad_flat, (flat_params,), (v.astype(flat_params.dtype),))[1]

        return batch_weighted_sum(hvp_on, batches, self.batches, self.platform)


@dataclasses.dataclass(frozen=True)
class _GGNApply:
    """``(v, operand) -> G v``, static and hashable by value; ``operand`` is
    ``(flat_params, fixed_leaves, (model_leaves, output_loss_leaves), (full_batches,
    remainder))``."""

    model: _Callable
    output_loss: _Callable
    layout: FlatLayout
    batches: BatchLayout
    platform: str

    def __call__(self, v, operand):
        flat_params, fixed, (model_leaves, out_leaves), batches = operand
        model_fn = self.model.rebuild(model_leaves)
        output_loss_fn = self.output_loss.rebuild(out_leaves)
        combine = self.layout.combine

        def ggn_on(batch):
            def outputs(p):
                return model_fn(combine(p, fixed), batch)

            z, jv = jax.jvp(outputs, (flat_params,), (v.astype(flat_params.dtype),))
            grad_out = jax.grad(output_loss_fn)
            h_jv = jax.jvp(lambda o: grad_out(o, batch), (z,), (jv,))[1]
            _, vjp = jax.vjp(outputs, flat_params)
            return vjp(h_jv)[0]

        return batch_weighted_sum(ggn_on, batches, self.batches, self.platform)


def _operator(apply: Callable, operand: Any, prep: _Prepared, name: str) -> LinearOperator:
    """The :class:`LinearOperator` of ``apply`` over the prepared parameters and batches."""
    batches, layout = prep.batches, prep.layout
    block = ""
    if layout.is_block:
        chosen = [p for p, keep in zip(layout.paths, layout.selected, strict=True) if keep]
        block = f", the block of {', '.join(chosen[:6])}" + (" ..." if len(chosen) > 6 else "")
    return LinearOperator(
        apply=apply,
        operand=operand,
        dim=layout.size,
        dtype=layout.dtype,
        ravel=layout.ravel,
        unravel=layout.unravel,
        description=(
            f"{name} of the mean loss over {batches.num_examples} examples "
            f"(batch size {batches.batch_size}, {layout.size} parameters{block})"
        ),
    )


def hessian_operator(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    wrt: Any = None,
    devices: Any = None,
) -> LinearOperator:
    """The Hessian of the dataset-mean loss as a matrix-free :class:`LinearOperator`.

    ``H v = sum_b (|b| / N) d/de grad L_b(theta + e v)|_{e=0}`` (forward-over-reverse:
    ``jax.jvp`` of ``jax.grad``), with batches ``b`` of ``batch_size`` consecutive examples
    and a ragged last batch weighted by its size, so ``H`` is exactly the Hessian of
    ``(1/N) sum_i loss_i`` for a loss that separates over examples. For a loss that does not
    (BatchNorm in train mode) it is ``sum_b (|b|/N) Hess L_b`` under this fixed partition.

    Compilation: the operator's ``apply`` compares equal for the same ``loss_fn`` (the same
    function object, or a ``jax.tree_util.Partial`` of the same function with arrays of the
    same shapes), the same parameter structure and the same batch layout; its operand holds
    the parameters, the data and the Partial's arrays. Every solver program compiled for one
    such operator serves the others: analysing the next checkpoint compiles nothing. Loss
    functions that close over arrays (BatchNorm statistics, say) are new functions each
    time; pass those arrays through a ``Partial`` instead (:func:`hessspec.make_objective`
    does).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, the MEAN loss over the examples in
            ``batch`` (a pytree shaped like ``data`` with fewer examples); a plain function
            or a pytree callable such as ``jax.tree_util.Partial``.
        params: pytree of floating arrays (a flat array is fine); flattened in
            ``ravel_pytree`` order, which ``op.ravel`` / ``op.unravel`` follow.
        data: pytree of arrays whose leading axis indexes the N examples.
        batch_size: examples per batch (memory bound of one HVP); None = one batch of all N.
        wrt: which parameters: None (all), a pytree of bools shaped like ``params`` or a
            prefix of it (optax's mask convention: ``{"layer1": True, "layer2": False}``), or
            a predicate on parameter paths (``lambda path: path.startswith("layer1/")``; a
            path joins the keys with ``/``, e.g. ``"linears/0/kernel"``). The operator is
            then the diagonal block of the Hessian for the selected leaves (the others held
            fixed): its vectors live in that block's flat space and ``op.unravel`` gives a
            pytree shaped like ``params`` with None outside the block; ``op.ravel`` takes
            either that or a full params-shaped pytree (a gradient, say).
        devices: devices to run on, data parallel: each batch is sharded over a one-axis
            ``Mesh("examples")`` (where the device count divides the batch; replicated
            otherwise) and XLA inserts the cross-device reduction. None = all of
            ``jax.devices()``, across every process after ``jax.distributed.initialize``.

    Returns:
        LinearOperator with ``matvec(v) -> H v`` for ``v`` of shape ``(dim,)``, ``dim`` =
        number of (selected) parameters, ``dtype`` = the parameters' dtype (HVPs run in
        it), ``ravel`` / ``unravel`` between parameter pytrees and flat vectors.

    Raises:
        ValueError: loss not a scalar, data leaves that disagree on N, bad batch_size,
            NaN/Inf in params or data, a ``wrt`` that does not fit or selects nothing.
        TypeError: non-array leaves in params (named, with the fix).
    """
    static, loss_leaves, prep = _prepare_loss(loss_fn, params, data, batch_size, devices, wrt)
    apply = _HessianApply(static, prep.layout, prep.batches, prep.platform)
    return _operator(apply, prep.operand(loss_leaves), prep, "Hessian")


def ggn_operator(
    model_fn: Callable[[Any, Any], jax.Array],
    output_loss_fn: Callable[[jax.Array, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    wrt: Any = None,
    devices: Any = None,
) -> LinearOperator:
    """The generalized Gauss-Newton ``G = sum_b (|b|/N) J_b^T H_out,b J_b`` as an operator.

    With outputs ``z = model_fn(params, batch)`` and the batch loss
    ``L_b = output_loss_fn(z, batch)``, ``J_b = dz/dparams`` and ``H_out,b = d^2 L_b / dz^2``.
    The Hessian splits as ``H = G + R`` with ``R = sum_i (dL/dz_i) Hess z_i`` (Papyan's
    decomposition): ``hessian_operator(lambda p, b: output_loss_fn(model_fn(p, b), b), ...)``
    minus this operator is ``R``. ``G`` is positive semi-definite for a convex output loss
    (cross-entropy, squared error). Compiled programs are shared as for
    :func:`hessian_operator`.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs`` (any array or pytree of arrays).
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar`` MEAN loss over the batch.
        params, data, batch_size, wrt, devices: as in :func:`hessian_operator` (``wrt``:
            the diagonal block of ``G`` for the selected leaves).

    Returns:
        LinearOperator for ``G`` on flat parameter vectors.
    """
    model_static, model_leaves = _split_callable(model_fn, "model_fn")
    out_static, out_leaves = _split_callable(output_loss_fn, "output_loss_fn")
    prep = _prepare(params, data, batch_size, devices, wrt)
    _check_scalar_loss(
        lambda p, b: output_loss_fn(model_fn(p, b), b), params, prep.first_batch, "output_loss_fn"
    )
    apply = _GGNApply(model_static, out_static, prep.layout, prep.batches, prep.platform)
    return _operator(apply, prep.operand((model_leaves, out_leaves)), prep, "Gauss-Newton")


class DatasetGradient(NamedTuple):
    """Loss and gradient of the dataset mean under a batch partition.

    Attributes:
        loss: ``sum_b (|b|/N) L_b``, a scalar.
        gradient: flat gradient of that loss, shape ``(dim,)`` (``ravel_pytree`` order).
    """

    loss: jax.Array
    gradient: jax.Array


@dataclasses.dataclass(frozen=True)
class _GradientFn:
    """``operand -> (loss, flat gradient)``; static and hashable by value."""

    loss: _Callable
    layout: FlatLayout
    batches: BatchLayout
    platform: str

    def __call__(self, operand):
        flat_params, fixed, loss_leaves, batches = operand
        loss_fn = self.loss.rebuild(loss_leaves)
        combine = self.layout.combine

        def on(batch):
            return jax.value_and_grad(lambda p: loss_fn(combine(p, fixed), batch))(flat_params)

        return batch_weighted_sum(on, batches, self.batches, self.platform)


@functools.partial(jax.jit, static_argnums=0)
def _dataset_gradient(fn: _GradientFn, operand):
    return fn(operand)


def dataset_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    batch_size: int | None = None,
    *,
    wrt: Any = None,
    devices: Any = None,
) -> DatasetGradient:
    """Loss and flat gradient of the dataset mean, batched exactly as :func:`hessian_operator`.

    The gradient is the one whose Hessian :func:`hessian_operator` returns for the same
    ``batch_size`` and ``wrt`` (the block's part of it), so gradient-energy fractions use
    consistent objects. The compiled program is shared across calls as the operators' are.
    """
    static, loss_leaves, prep = _prepare_loss(loss_fn, params, data, batch_size, devices, wrt)
    fn = _GradientFn(static, prep.layout, prep.batches, prep.platform)
    loss, grad = _dataset_gradient(fn, prep.operand(loss_leaves))
    return DatasetGradient(loss, grad)
