"""Loss-landscape measurements of Santurkar et al. 2018 ("How does batch normalization help
optimization?") at one training step.

Along the gradient step: for step lengths ``s`` in ``[lr/2, 4 lr]`` along ``-g``
(``g = grad L(x)`` on the batch), the loss range ``max_s L(x - s g) - min_s L(x - s g)``, the
gradient predictiveness ``||grad L(x) - grad L(x - s g)||`` and the effective
beta-smoothness ``max_s ||grad L(x) - grad L(x - s g)|| / ||s g||`` (docs/design.md).

Internal covariate shift (their Section 2.2): for layer ``i``, the gradient ``G_i`` of the
loss with respect to layer ``i``'s parameters, and ``G'_i``, the same gradient after every
earlier layer took its SGD step ``-lr * grad`` while layer ``i`` and the later ones stay put.
``||G_i - G'_i||`` and ``cos(G_i, G'_i)`` say how much the earlier layers' updates change
what layer ``i`` should do.

Parameters are any pytree of arrays, flattened with ``jax.flatten_util.ravel_pytree``; the
loss is ``loss_fn(params, batch) -> scalar``. Each measurement is one compiled program
(``loss_fn`` static, params and batch traced), reused by later calls with the same
``loss_fn`` and shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hessspec.analysis.theory import check_positive

__all__ = [
    "InternalCovariateShift",
    "LandscapeMetrics",
    "default_layer_order",
    "internal_covariate_shift",
    "landscape_along_gradient",
]


def _check_scalar_loss(loss_fn: Callable, params: Any, batch: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}.")
    out = jax.eval_shape(loss_fn, params, batch)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            "loss_fn(params, batch) must return a scalar (the mean loss over the batch), "
            f"got {'shape ' + str(shape) if shape is not None else type(out).__name__}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"loss_fn must return a floating-point scalar, got dtype {out.dtype}.")


def _flat_loss(loss_fn: Callable, params: Any, batch: Any):
    """``(x0, f)`` with ``x0`` the flat parameters and ``f(x) = loss_fn(unravel(x), batch)``."""
    x0, unravel = ravel_pytree(params)
    return x0, lambda x: loss_fn(unravel(x), batch)


# --------------------------------------------------------------------------------------
# Along the gradient
# --------------------------------------------------------------------------------------


class LandscapeMetrics(NamedTuple):
    """Santurkar et al.'s loss-landscape metrics along ``-g`` at one step.

    ``x``: flat parameters (dimension ``d``); ``g = grad L(x)`` on the batch; ``S`` step
    lengths ``s_j``. Arrays are numpy, in the dtype of the parameters.

    Attributes:
        step_sizes: ``(S,)`` ``s_j = lr * linspace(step_range[0], step_range[1], S)``.
        losses: ``(S,)`` ``L(x - s_j g)``.
        loss_range: ``max_j L(x - s_j g) - min_j L(x - s_j g)``.
        gradient_predictiveness: ``(S,)`` ``||grad L(x) - grad L(x - s_j g)||``.
        beta_smoothness: ``max_j ||grad L(x) - grad L(x - s_j g)|| / (s_j ||g||)``, the
            effective Lipschitz constant of the gradient along the step.
        grad_norm: ``||g||``.
        loss: ``L(x)``, the loss before the step.
    """

    step_sizes: np.ndarray
    losses: np.ndarray
    loss_range: float
    gradient_predictiveness: np.ndarray
    beta_smoothness: float
    grad_norm: float
    loss: float


@partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _along_gradient(loss_fn, params, batch, lr, lo, hi, *, num_steps):
    x, f = _flat_loss(loss_fn, params, batch)
    value_and_grad = jax.value_and_grad(f)
    loss0, g = value_and_grad(x)
    steps = (lr * jnp.linspace(lo, hi, num_steps)).astype(x.dtype)

    def at_step(s):
        loss_s, g_s = value_and_grad(x - s * g)
        return loss_s, jnp.linalg.norm(g - g_s)

    losses, predictiveness = jax.vmap(at_step)(steps)
    grad_norm = jnp.linalg.norm(g)
    beta = jnp.max(predictiveness / (steps * grad_norm))
    return steps, losses, predictiveness, beta, grad_norm, loss0


def landscape_along_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    lr: float,
    *,
    step_range: tuple[float, float] = (0.5, 4.0),
    num_steps: int = 8,
) -> LandscapeMetrics:
    """Loss range, gradient predictiveness and beta-smoothness along the gradient step.

    With ``x`` the flattened ``params`` and ``g = grad L(x)`` (``L = loss_fn(., batch)``),
    evaluates ``L`` and ``grad L`` at ``x - s g`` for ``s = lr * t``, ``t`` in
    ``linspace(*step_range, num_steps)`` (Santurkar et al.: ``[lr/2, 4 lr]``), all step
    lengths in one jit-compiled, vmapped program. For a quadratic ``0.5 x^T A x``:
    ``grad L(x) - grad L(x - s g) = s A g``, so predictiveness is ``s ||A g||`` and
    beta-smoothness is ``||A g|| / ||g||``, a Rayleigh-like quotient of ``A`` along ``g``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (the mean loss over the batch). It is
            a static argument of the compiled program: pass the same function object to
            reuse the compilation.
        params: pytree of float arrays (a flat array is fine).
        batch: pytree of arrays passed through to ``loss_fn``.
        lr: the learning rate of the step, > 0.
        step_range: ``(lo, hi)`` with ``0 < lo <= hi``, in units of ``lr``.
        num_steps: ``S >= 1``, the number of step lengths.

    Returns:
        A :class:`LandscapeMetrics`.

    Raises:
        ValueError: non-scalar or non-float loss, ``lr <= 0``, a bad ``step_range`` or
            ``num_steps``, or a zero gradient (``x`` is stationary: there is no step to take
            and beta-smoothness, a ratio over ``||s g||``, is undefined).
    """
    lr = check_positive("lr", lr)
    try:
        lo, hi = (float(t) for t in step_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"step_range must be a pair (lo, hi) of numbers, got {step_range!r}."
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not 0.0 < lo <= hi:
        raise ValueError(f"step_range must satisfy 0 < lo <= hi (finite), got {step_range!r}.")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or int(num_steps) < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    _check_scalar_loss(loss_fn, params, batch)

    steps, losses, predictiveness, beta, grad_norm, loss0 = _along_gradient(
        loss_fn, params, batch, lr, lo, hi, num_steps=int(num_steps)
    )
    grad_norm = float(grad_norm)
    if grad_norm == 0.0:
        raise ValueError(
            "the gradient is zero at params (a stationary point): the step -s*g does not move "
            "and beta-smoothness max_s ||grad L(x) - grad L(x - s g)|| / ||s g|| is undefined."
        )
    losses = np.asarray(losses)
    return LandscapeMetrics(
        step_sizes=np.asarray(steps),
        losses=losses,
        loss_range=float(losses.max() - losses.min()),
        gradient_predictiveness=np.asarray(predictiveness),
        beta_smoothness=float(beta),
        grad_norm=grad_norm,
        loss=float(loss0),
    )


# --------------------------------------------------------------------------------------
# Internal covariate shift
# --------------------------------------------------------------------------------------

LayerSpec = Any
"""A layer in ``layer_order``: a top-level key (``"conv1"``, ``0``), a key path as a tuple
(``("layers", 0)``), or a list of those forming one layer together (``["conv1", "bn1"]``)."""


class InternalCovariateShift(NamedTuple):
    """Santurkar et al.'s internal covariate shift, per layer in forward order.

    ``G_i``: gradient of the loss w.r.t. layer ``i``'s parameters at the current ones;
    ``G'_i``: the same after layers ``0..i-1`` took their SGD step (``k`` layers).
    Layer 0 has no earlier layers, so ``G'_0 = G_0`` (``l2 = 0``, ``cosine = 1``).

    Attributes:
        layer_names: ``k`` names (``"/"`` joins a key path, ``"+"`` a group).
        l2: ``(k,)`` ``||G_i - G'_i||``.
        cosine: ``(k,)`` ``<G_i, G'_i> / (||G_i|| ||G'_i||)``; NaN where either is zero.
        grad_norm: ``(k,)`` ``||G_i||``.
        shifted_grad_norm: ``(k,)`` ``||G'_i||``.
    """

    layer_names: tuple[str, ...]
    l2: np.ndarray
    cosine: np.ndarray
    grad_norm: np.ndarray
    shifted_grad_norm: np.ndarray


def _key_of(entry) -> Any:
    """The plain key of one ``jax.tree_util`` path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _normalize_layer(spec: LayerSpec) -> tuple[tuple, ...]:
    """A layer spec as a tuple of key paths (each a tuple of plain keys)."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError("an empty list is not a layer: a group needs at least one key.")
        return tuple(p for part in spec for p in _normalize_layer(part))
    if isinstance(spec, tuple):
        if not spec:
            raise ValueError("an empty tuple is not a key path.")
        return (spec,)
    return ((spec,),)


def _layer_name(paths: tuple[tuple, ...]) -> str:
    return "+".join("/".join(str(k) for k in path) for path in paths)


def _layer_ids(params: Any, layer_order: Sequence[LayerSpec]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per flat coordinate (``ravel_pytree`` order), the index of its layer, -1 if none."""
    if isinstance(layer_order, str | bytes) or not isinstance(layer_order, Sequence):
        raise TypeError(
            "layer_order must be a list of layers (keys, key-path tuples or lists of those), "
            f"got {layer_order!r}."
        )
    if len(layer_order) == 0:
        raise ValueError("layer_order is empty: name at least one layer.")
    layers = [_normalize_layer(spec) for spec in layer_order]
    names = tuple(_layer_name(paths) for paths in layers)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    leaf_paths = [tuple(_key_of(e) for e in path) for path, _ in leaves]
    ids, owned = [], [0] * len(layers)
    for leaf_path, (_, leaf) in zip(leaf_paths, leaves, strict=True):
        hits = [j for j, paths in enumerate(layers) if any(leaf_path[: len(p)] == p for p in paths)]
        if len(hits) > 1:
            raise ValueError(
                f"parameter {'/'.join(map(str, leaf_path))} belongs to several layers "
                f"({', '.join(names[j] for j in hits)}): layers must not overlap."
            )
        j = hits[0] if hits else -1
        if hits:
            owned[j] += 1
        ids.append(np.full(np.size(leaf), j, dtype=np.int32))
    missing = [names[j] for j, n in enumerate(owned) if n == 0]
    if missing:
        tops = sorted({str(p[0]) for p in leaf_paths if p})
        raise ValueError(
            f"layer(s) {missing} match no parameter; top-level keys of params: {tops}."
        )
    flat_ids = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
    return flat_ids, names


@partial(jax.jit, static_argnames=("loss_fn", "num_layers"))
def _covariate_shift(loss_fn, params, batch, lr, layer_id, *, num_layers):
    x, f = _flat_loss(loss_fn, params, batch)
    grad = jax.grad(f)
    g = grad(x)

    def for_layer(i):
        earlier = (layer_id >= 0) & (layer_id < i)
        this = layer_id == i
        shifted = grad(x - lr * jnp.where(earlier, g, 0.0))
        gi = jnp.where(this, g, 0.0)
        gi_shift = jnp.where(this, shifted, 0.0)
        n, n_shift = jnp.linalg.norm(gi), jnp.linalg.norm(gi_shift)
        denom = n * n_shift
        cos = jnp.where(denom > 0, jnp.vdot(gi, gi_shift) / jnp.where(denom > 0, denom, 1), jnp.nan)
        return jnp.linalg.norm(gi - gi_shift), cos, n, n_shift

    return jax.lax.map(for_layer, jnp.arange(num_layers))


def internal_covariate_shift(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    lr: float,
    layer_order: Sequence[LayerSpec] | None = None,
) -> InternalCovariateShift:
    """Santurkar et al.'s internal covariate shift of every layer at one SGD step.

    For layer ``i`` (``layer_order[i]``), with ``W`` the current parameters and
    ``grad_j`` the gradient w.r.t. layer ``j`` at ``W`` (all on ``batch``):

        G_i  = grad_{W_i} L(W_1, ..., W_k),
        G'_i = grad_{W_i} L(W_1 - lr grad_1, ..., W_{i-1} - lr grad_{i-1}, W_i, ..., W_k),

    and reports ``||G_i - G'_i||`` and ``cos(G_i, G'_i)``. Parameters in no listed layer
    keep their values throughout. The ``k`` shifted gradients are one compiled program
    (``lax.map``: one gradient's memory at a time).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``; static in the compiled program.
        params: pytree of float arrays whose parts name the layers (dicts, ``nnx.State``,
            lists of dicts).
        batch: pytree of arrays passed through to ``loss_fn``.
        lr: the SGD learning rate, > 0.
        layer_order: the layers in forward order; each entry a top-level key, a key path
            tuple (``("layers", 0)``, prefix of the leaves' paths in
            ``jax.tree_util.tree_flatten_with_path``, ``nnx`` ``.value`` suffixes
            included automatically), or a list of those forming one layer. None:
            :func:`default_layer_order` (read its assumption).

    Returns:
        An :class:`InternalCovariateShift`.

    Raises:
        ValueError: non-scalar loss, ``lr <= 0``, an empty ``layer_order``, a layer that
            matches no parameter, or overlapping layers.
    """
    lr = check_positive("lr", lr)
    if layer_order is None:
        layer_order = default_layer_order(params)
    layer_id, names = _layer_ids(params, layer_order)
    _check_scalar_loss(loss_fn, params, batch)
    l2, cos, n, n_shift = _covariate_shift(
        loss_fn, params, batch, lr, jnp.asarray(layer_id), num_layers=len(names)
    )
    return InternalCovariateShift(
        layer_names=names,
        l2=np.asarray(l2),
        cosine=np.asarray(cos),
        grad_norm=np.asarray(n),
        shifted_grad_norm=np.asarray(n_shift),
    )


def _is_sequence_node(node: Any) -> bool:
    """A stack of layers: a non-empty list/tuple, or mapping whose keys are all ints
    (``nnx.List``), whose elements are containers (a list of arrays is one layer's params)."""
    if isinstance(node, list | tuple):
        children = list(node)
    elif isinstance(node, Mapping) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in node.keys()
    ):
        children = list(node.values())
    else:
        return False
    return bool(children) and all(isinstance(c, Mapping | list | tuple) for c in children)


def _indices_in(key: Any) -> tuple[int, ...] | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return (key,)
    found = re.findall(r"\d+", str(key))
    return tuple(int(d) for d in found) if found else None


def default_layer_order(params: Any) -> list[LayerSpec]:
    """Layers of a params pytree in forward order, inferred from its keys.

    Assumption: the top-level keys carry the layer's position in the forward pass as an
    integer in their names (``layer0, layer1``; ``conv1, bn1, conv2, bn2, fc3``;
    ``Dense_0, Dense_1``). Keys are ordered by the integers in their names (numerically,
    so ``layer10`` follows ``layer9``), and keys with the same integers form one layer
    (``["bn1", "conv1"]``: a convolution and its BatchNorm are updated together). A key
    whose value is a stack of layers (a list/tuple, or ``nnx.List`` / int-keyed mapping)
    contributes its elements ``(key, 0), (key, 1), ...`` in index order. A params
    list/tuple is itself a stack: ``[0, 1, ...]``. Anything else is ambiguous: pass
    ``layer_order`` explicitly. Note linen's per-type counters (``Conv_0, Dense_0``) break
    the assumption; flax's ``nnx.State`` sorts its keys, so attribute order is lost.

    Args:
        params: a mapping (dict, ``nnx.State``) or list/tuple of layer parameters.

    Returns:
        A ``layer_order`` list for :func:`internal_covariate_shift`.

    Raises:
        TypeError: ``params`` is neither a mapping nor a list/tuple.
        ValueError: no keys, or some top-level key has no integer in its name while there
            are several.
    """
    if isinstance(params, list | tuple):
        if not params:
            raise ValueError("params is empty: there are no layers.")
        return list(range(len(params)))
    if not isinstance(params, Mapping):
        raise TypeError(
            f"default_layer_order needs a mapping (dict, nnx.State) or a list of layers, got "
            f"{type(params).__name__}; pass layer_order explicitly."
        )
    keys = list(params.keys())
    if not keys:
        raise ValueError("params is empty: there are no layers.")

    def expand(key) -> list[LayerSpec]:
        node = params[key]
        if _is_sequence_node(node):
            idx = range(len(node)) if isinstance(node, list | tuple) else sorted(node.keys())
            return [(key, i) for i in idx]
        return [key]

    if len(keys) == 1:
        return expand(keys[0])
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
        return sorted(keys)  # an int-keyed mapping is a stack itself
    indices = {k: _indices_in(k) for k in keys}
    unnumbered = [k for k, i in indices.items() if i is None]
    if unnumbered:
        raise ValueError(
            f"cannot infer the forward order of params keys {keys}: {unnumbered} carry no "
            "layer index in their names. Pass layer_order explicitly, e.g. "
            f"layer_order={keys!r} reordered to the forward pass."
        )
    groups: dict[tuple[int, ...], list] = {}
    for k in sorted(keys, key=lambda k: (indices[k], str(k))):
        groups.setdefault(indices[k], []).append(k)
    order: list[LayerSpec] = []
    for members in groups.values():
        if len(members) == 1:
            order.extend(expand(members[0]))
        else:
            order.append(members)
    return order
