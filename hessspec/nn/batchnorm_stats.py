"""Exact BatchNorm statistics over a whole dataset (the ``"population"`` BN mode).

:func:`population_statistics` recomputes, layer after layer, the mean and biased variance
of every BatchNorm layer's input over all examples, with the earlier layers already
normalising with their own population statistics; :func:`hessspec.nn.objective.make_objective`
freezes them into a ``bn_mode="population"`` objective.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hessspec.nn.layers import BatchNorm, record_input_stats
from hessspec.nn.models import batchnorm_layers, private_copy

__all__ = ["population_statistics"]


def _inputs_of(data) -> Any:
    """Inputs ``x`` of a Dataset, a ``{"x": ...}`` mapping, or an array."""
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x
    if isinstance(data, Mapping):
        if "x" not in data:
            raise TypeError(f"population data mapping needs an 'x' entry, got keys {list(data)}.")
        return data["x"]
    return data


_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of a foreign ``nnx.BatchNorm`` class that records its input statistics."""
    if cls not in _RECORDING_CLASSES:

        def __call__(self, x, *args, mask=None, **kwargs):
            if getattr(self, "record_input_stats", False):
                record_input_stats(self, x, mask)
            return cls.__call__(self, x, *args, mask=mask, **kwargs)

        _RECORDING_CLASSES[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING_CLASSES[cls]


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def _recorded_input_stats(graphdef, paths, params, stats, rest, xb):
    """One forward pass with frozen statistics; per BN path, the sown ``(mean, var)`` of
    its input over the batch ``xb`` (None for a layer the pass does not call)."""
    model = nnx.merge(graphdef, params, stats, rest)
    _, captured = nnx.capture(model, nnx.Intermediate)(xb)
    flat = dict(nnx.to_flat_state(captured))
    out = []
    for p in paths:
        var = flat.get((*p, "input_stats"))
        calls = () if var is None else var.get_value()
        if len(calls) > 1:
            raise ValueError(
                f"BatchNorm layer {'/'.join(map(str, p))} is called {len(calls)} times per "
                "forward pass: its population statistics are ambiguous."
            )
        out.append(calls[0] if calls else None)
    return out


def _recording_copy(model: nnx.Module):
    """A private copy of ``model`` whose BN layers record their input statistics and
    normalise with frozen statistics, split into ``(work, graphdef, params, stats, rest,
    paths, out_dtypes)``: pure dicts of jax arrays, the BN paths, and per path the dtype
    of its statistics (at least the BN parameter dtype)."""
    work = private_copy(model)
    layers = batchnorm_layers(work)
    if not layers:
        raise ValueError("population_statistics: the model has no BatchNorm layer.")
    for _, bn in layers:
        if not isinstance(bn, BatchNorm):
            bn.__class__ = _recording_class(type(bn))
        bn.record_input_stats = True
    work.set_attributes(use_running_average=True, deterministic=True, raise_if_not_found=False)
    graphdef, params, stats_state, rest = nnx.split(work, nnx.Param, nnx.BatchStat, ...)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    rest = jax.tree.map(jnp.asarray, nnx.to_pure_dict(rest))
    stats = jax.tree.map(jnp.asarray, nnx.to_pure_dict(stats_state))
    paths = tuple(p for p, _ in layers)
    out_dtypes = {
        p: jnp.promote_types(_get_path(stats, p)["mean"].dtype, bn.param_dtype) for p, bn in layers
    }
    for p in paths:  # compute with statistics in the output dtype
        entry = _get_path(stats, p)
        entry["mean"] = jnp.asarray(entry["mean"], out_dtypes[p])
        entry["var"] = jnp.asarray(entry["var"], out_dtypes[p])
    return work, graphdef, params, stats, rest, paths, out_dtypes


def _batch_moments(graphdef, paths, params, stats, rest, x, batch_size: int) -> list:
    """One pass over ``x``: per BN path, the list of ``(n_b, m_b, v_b)`` (batch size, exact
    mean and biased variance of the layer input, float64) of every batch, or None for a
    layer the forward pass does not call."""
    moments: list = [None] * len(paths)
    for start in range(0, int(np.shape(x)[0]), batch_size):
        xb = jnp.asarray(x[start : start + batch_size])
        recorded = _recorded_input_stats(graphdef, paths, params, stats, rest, xb)
        for i, rec in enumerate(recorded):
            if rec is None:
                continue
            m_b, v_b = np.asarray(rec[0], np.float64), np.asarray(rec[1], np.float64)
            moments[i] = [*(moments[i] or []), (xb.shape[0], m_b, v_b)]
    return moments


def _combined(parts: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance over ``n`` examples from per-batch ``(n_b, m_b, v_b)``
    (law of total variance): :math:`\\mu = \\sum_b n_b m_b / N`,
    :math:`\\sigma^2 = \\sum_b n_b (v_b + (m_b - \\mu)^2) / N`."""
    counts = np.array([c for c, _, _ in parts], np.float64)[:, None]
    means = np.stack([m for _, m, _ in parts])
    variances = np.stack([v for _, _, v in parts])
    mu = (counts * means).sum(0) / n
    return mu, (counts * (variances + np.square(means - mu))).sum(0) / n


def population_statistics(model: nnx.Module, x, batch_size: int | None = None) -> nnx.State:
    """Exact BatchNorm statistics over a whole dataset, layer after layer.

    For BN layer :math:`l` with input :math:`a_l(x)` of shape ``(..., F)`` the population
    statistics are the mean and biased variance over all ``N`` examples (and positions):

    .. math:: \\mu_l = \\mathbb E_{x}[a_l(x)], \\qquad
        \\sigma_l^2 = \\mathbb E_{x}[(a_l(x) - \\mu_l)^2],

    where :math:`a_l` is computed with every earlier BN layer already normalising with its
    own population statistics (then frozen). Each pass over the data runs the model with
    the current statistics frozen and records, per batch ``b`` of ``n_b`` examples, the
    exact two-pass mean :math:`m_b` and variance :math:`v_b` of every BN input; batches
    are combined exactly (law of total variance, no momentum):
    :math:`\\mu = \\sum_b n_b m_b / N`,
    :math:`\\sigma^2 = \\sum_b n_b (v_b + (m_b - \\mu)^2) / N`. After pass ``t`` the layers
    at depth ``<= t`` are exact, so at most ``L`` passes are run for ``L`` BN layers, fewer
    when a pass reproduces the previous one bit for bit (a fixed point). The result does
    not depend on ``batch_size`` beyond rounding.

    Args:
        model: an nnx model with ``nnx.BatchNorm`` layers (not mutated). Each BN layer
            must be called once per forward pass and normalise over all axes but the
            feature axes.
        x: inputs ``(N, ...)``: an array, a :class:`hessspec.nn.data.Dataset`, or a mapping
            with ``"x"``.
        batch_size: examples per forward pass; None: all ``N`` at once.

    Returns:
        ``nnx.State`` of the model's ``nnx.BatchStat`` variables (same structure as
        ``nnx.state(model, nnx.BatchStat)``) holding the population means and variances,
        in the BN parameter dtype (at least float32). Apply with ``nnx.update(model,
        stats)``; ``nnx.to_pure_dict(stats)`` gives a plain dict.

    Raises:
        ValueError: the model has no BatchNorm, ``x`` is empty, a BN layer is called more
            than once per forward pass.
    """
    x = _inputs_of(x)
    n = int(np.shape(x)[0])
    if n < 1:
        raise ValueError("population_statistics needs at least one example.")
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")

    work, graphdef, params, stats, rest, paths, out_dtypes = _recording_copy(model)
    previous = None
    for _ in range(len(paths)):
        moments = _batch_moments(graphdef, paths, params, stats, rest, x, batch_size)
        current = []
        for p, parts in zip(paths, moments, strict=True):
            entry = _get_path(stats, p)
            if parts is not None:  # else the forward pass skips it: keep its statistics
                mu, var = _combined(parts, n)
                entry["mean"] = jnp.asarray(mu, out_dtypes[p])
                entry["var"] = jnp.asarray(var, out_dtypes[p])
            current.append((np.asarray(entry["mean"]), np.asarray(entry["var"])))
        if previous is not None and all(
            np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            for a, b in zip(current, previous, strict=True)
        ):
            break
        previous = current

    result = nnx.state(work, nnx.BatchStat)  # the copy's variables: the model is untouched
    nnx.replace_by_pure_dict(result, stats)
    return result
