"""From a flax.nnx model to a pure loss ``loss_fn(params, batch) -> scalar``.

:func:`make_objective` splits a model with the nnx functional API into

- ``params``: the ``nnx.Param`` leaves, as a plain nested dict of arrays
  (``nnx.to_pure_dict``): the variables that are differentiated. Any pytree tool applies:
  ``jax.flatten_util.ravel_pytree(obj.params)``, optax, ``jax.tree.map``;
- ``stats``: the ``nnx.BatchStat`` leaves (BatchNorm means and variances), as a plain
  nested dict: constants of the objective, never differentiated, never updated by it;
- ``rest``: any other state (RNG streams), a plain nested dict;
- ``graphdef``: the static structure, with the BatchNorm mode baked in.

and returns ``loss_fn(params, batch)``: the MEAN loss over the examples of
``batch = {"x": (B, ...), "y": (B,)}``, a pure function that rebuilds the model with
``nnx.merge(graphdef, params, stats, rest)`` at every call. The model given is never
mutated.

BatchNorm modes (docs/design.md), chosen explicitly, never switched silently:

- ``"train"``: every call normalises with the statistics of the batch it is given (the
  function SGD descends). The loss does then not separate over examples. The running
  averages are not updated (the update happens on a throw-away copy);
- ``"eval"``: the running averages stored in the model;
- ``"population"``: statistics recomputed exactly over ``population_data`` by
  :func:`population_statistics`, then frozen.

Noise of :class:`hessspec.nn.models.NoisyBatchNorm` (and dropout) is always off inside an
objective, whatever the mode: the loss is deterministic. The objective also computes the
BN variance with the exact two-pass formula (``use_fast_variance=False``), which is the
same function as flax's one-pass formula, with fewer rounding errors.

Models whose ``__call__`` takes a training flag besides the inputs (``model(x, train=...)``,
``model(x, deterministic=...)``) name that keyword with ``train_flag=`` (a flag that is True
for training behaviour: ``train``, ``training``, ``is_training``) or ``eval_flag=`` (True for
inference behaviour: ``deterministic``, ``use_running_average``, ``inference``); the objective
then calls ``model(x, **{keyword: value})`` with the value of its BatchNorm mode (training
behaviour in ``"train"`` mode only). Inputs are cast to the model's dtype (that of its
floating parameters) before the call, so float64 data and a float32 model compute in float32.

Models of other frameworks (flax.linen, haiku, equinox) are refused with the ``loss_fn`` to
write for :func:`hessspec.hessian_operator` instead (``notebooks/05_your_own_model.ipynb``).

Getting a model back (e.g. after training the params)::

    model = obj.to_model(new_params)            # the objective's BN mode
    model = nnx.merge(obj.graphdef, new_params, obj.stats, obj.rest)   # the same
    with_params(original_model, new_params)     # write params into a model, in place
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hessspec.nn.batchnorm_stats import population_statistics
from hessspec.nn.models import batchnorm_layers, private_copy

__all__ = [
    "BN_MODES",
    "LOSSES",
    "Objective",
    "make_objective",
    "output_loss",
    "population_statistics",
    "with_params",
]

BN_MODES = ("train", "eval", "population")
LOSSES = ("cross_entropy", "mse")


class Objective(NamedTuple):
    """A model turned into pure functions of its parameters, with a fixed BatchNorm mode.

    Attributes:
        loss_fn: ``(params, batch) -> ()`` scalar mean loss over the ``B`` examples of
            ``batch = {"x": (B, ...), "y": (B,) or (B, K)}``. Equal to
            ``output_loss_fn(logits_fn(params, batch["x"]), batch)``. A
            ``jax.tree_util.Partial``: its leaves are ``stats`` and ``rest``, its static
            part the model graph and the loss, equal for every objective of one
            architecture, so :func:`hessspec.hessian_operator` at another checkpoint (or
            in another BN mode with other statistics) reuses the compiled programs.
        logits_fn: ``(params, x) -> (B, K)`` model outputs in the same BN mode (in
            ``"train"`` mode the statistics are those of ``x``); for Gauss-Newton operators.
        output_loss_fn: ``(logits, batch) -> ()`` the mean loss as a function of the
            outputs (see :func:`output_loss`).
        params: nested dict of arrays, the ``nnx.Param`` state (pure dict).
        bn_mode: ``"train"``, ``"eval"``, ``"population"``, or None for a model without BN.
        graphdef: ``nnx.GraphDef`` of the model with the mode baked in.
        stats: nested dict of arrays, the ``nnx.BatchStat`` state (``{}`` without BN); for
            ``"population"`` the recomputed statistics.
        rest: nested dict of the remaining state (RNG streams), often ``{}``.
        loss: ``"cross_entropy"`` or ``"mse"``.
    """

    loss_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array]
    logits_fn: Callable[[Any, jax.Array], jax.Array]
    output_loss_fn: Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]
    params: Any
    bn_mode: str | None
    graphdef: Any
    stats: Any
    rest: Any
    loss: str

    def to_model(self, params=None, stats=None) -> nnx.Module:
        """A fresh model ``nnx.merge(graphdef, params, stats, rest)`` in this objective's BN
        mode (noise off); ``params``/``stats`` default to the objective's."""
        return nnx.merge(
            self.graphdef,
            self.params if params is None else params,
            self.stats if stats is None else stats,
            self.rest,
        )


def output_loss(logits: jax.Array, batch: Mapping[str, jax.Array], loss: str) -> jax.Array:
    """Mean loss of outputs ``logits`` ``(B, K)`` against ``batch["y"]``.

    - ``"cross_entropy"``: :math:`\\frac1B \\sum_i -\\log \\mathrm{softmax}(z_i)_{y_i}`,
      integer labels ``(B,)`` in ``[0, K)``;
    - ``"mse"``: :math:`\\frac{1}{2B} \\sum_i \\sum_k (z_{ik} - t_{ik})^2` with
      :math:`t_i` the one-hot vector of :math:`y_i` for integer labels, else the raw
      targets: ``(B,)`` (then ``K == 1``) or ``(B, K)``.

    Returns:
        A scalar, shape ``()``.
    """
    logits = jnp.asarray(logits)
    y = jnp.asarray(batch["y"])
    if logits.ndim != 2:
        raise ValueError(f"the model outputs must have shape (B, K), got {logits.shape}.")
    b, k = logits.shape
    if y.shape[:1] != (b,):
        raise ValueError(f"batch['y'] must have leading size {b} (the batch), got {y.shape}.")
    integer = jnp.issubdtype(y.dtype, jnp.integer)
    if loss == "cross_entropy":
        if not integer or y.ndim != 1:
            raise ValueError(
                "loss='cross_entropy' needs integer class labels of shape (B,), got "
                f"{y.dtype} {y.shape}; for regression targets use loss='mse'."
            )
        value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    elif loss == "mse":
        if integer:
            if y.ndim != 1:
                raise ValueError(f"integer labels must have shape (B,), got {y.shape}.")
            targets = jax.nn.one_hot(y, k, dtype=logits.dtype)
        elif y.ndim == 1 and k == 1:
            targets = y[:, None].astype(logits.dtype)
        elif y.shape == logits.shape:
            targets = y.astype(logits.dtype)
        else:
            raise ValueError(
                f"loss='mse': regression targets of shape {y.shape} do not match the model "
                f"outputs {logits.shape} (use (B,) targets with one output, or (B, K))."
            )
        value = 0.5 * jnp.sum(jnp.square(logits - targets), axis=-1).mean()
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}.")
    if value.shape != ():
        raise ValueError(f"the loss must be a scalar, got shape {value.shape}.")
    return value


def _check_batch(batch) -> None:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise TypeError(
            'a batch must be a mapping {"x": inputs (B, ...), "y": targets (B,)}; '
            f"got {type(batch).__name__}"
            + (f" with keys {list(batch)}" if isinstance(batch, Mapping) else "")
        )


# --------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ModelLogits:
    """``(stats, rest, params, x) -> outputs`` of a model graph. Hashable by value (the
    graph and the call settings), so it is the static part of :attr:`Objective.logits_fn`.

    Attributes:
        graphdef: the model graph (BN mode baked in).
        input_dtype: name of the dtype floating inputs are cast to (the model's parameter
            dtype), or None to pass inputs as they are.
        flag_name: keyword of ``__call__`` that selects training or inference behaviour
            (``"train"``, ``"deterministic"``, ...), or None: the model is called as
            ``model(x)``.
        flag_value: the value passed for ``flag_name``.
    """

    graphdef: Any
    input_dtype: str | None = None
    flag_name: str | None = None
    flag_value: bool | None = None

    def __call__(self, stats, rest, params, x):
        model = nnx.merge(self.graphdef, params, stats, rest)
        x = jnp.asarray(x)
        if self.input_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.input_dtype)
        if self.flag_name is None:
            return model(x)
        return model(x, **{self.flag_name: self.flag_value})


@dataclasses.dataclass(frozen=True)
class _OutputLoss:
    """``(logits, batch) -> mean loss`` (:func:`output_loss`); hashable by value."""

    loss: str

    def __call__(self, logits, batch):
        return output_loss(logits, batch, self.loss)


@dataclasses.dataclass(frozen=True)
class _ModelLoss:
    """``(stats, rest, params, batch) -> mean loss`` of a model graph; hashable by value.
    ``logits`` holds the graph and how the model is called (:class:`_ModelLogits`)."""

    logits: _ModelLogits
    loss: str

    def __call__(self, stats, rest, params, batch):
        _check_batch(batch)
        return output_loss(self.logits(stats, rest, params, batch["x"]), batch, self.loss)


# --------------------------------------------------------------------------------------
# Models of other frameworks, and how a model is called
# --------------------------------------------------------------------------------------

_NOTEBOOK_05 = "notebooks/05_your_own_model.ipynb"
_FOREIGN_LOSS_FN = {
    "flax.linen": """\
    def loss_fn(params, batch):  # train mode: each batch's statistics
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    op = hs.hessian_operator(loss_fn, variables["params"], data)

(eval mode: logits = model.apply({"params": params, "batch_stats": batch_stats},
batch["x"], train=False); without BatchNorm: model.apply({"params": params}, batch["x"]))""",
    "haiku": """\
    def loss_fn(params, batch):  # transformed = hk.transform_with_state(forward)
        logits, _ = transformed.apply(params, state, None, batch["x"], True)  # is_training
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    op = hs.hessian_operator(loss_fn, params, data)

(pass is_training=False for the stored moving averages; hk.transform: apply(params, None,
batch["x"]))""",
    "equinox": """\
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        logits = jax.vmap(eqx.combine(params, static))(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    op = hs.hessian_operator(loss_fn, params, data)""",
}


def _foreign_framework(model: Any) -> str | None:
    """``"flax.linen"``, ``"haiku"`` or ``"equinox"`` when ``model`` (or a class it derives
    from) comes from that framework, else None. Looks at module names only: imports none."""
    for cls in type(model).__mro__:
        module = getattr(cls, "__module__", "") or ""
        for framework in _FOREIGN_LOSS_FN:
            if module == framework or module.startswith(framework + "."):
                return framework
    return None


def _refuse_non_nnx(model: Any) -> None:
    """Raise ``TypeError`` for anything but an ``nnx.Module``, with the ``loss_fn`` to write
    for a flax.linen, haiku or equinox model."""
    if isinstance(model, nnx.Module):
        return
    framework = _foreign_framework(model)
    name = type(model).__name__
    if framework is None:
        raise TypeError(
            f"make_objective takes a flax.nnx model, got {name}. For a model of any other "
            "kind write loss_fn(params, batch) -> mean loss and call "
            f"hs.hessian_operator(loss_fn, params, data); see {_NOTEBOOK_05}."
        )
    raise TypeError(
        f"make_objective takes flax.nnx models; {name} is a {framework} "
        f"{'module' if framework != 'haiku' else 'object'}. Write its loss yourself and give it "
        f"to hs.hessian_operator (worked examples with dense Hessian checks: {_NOTEBOOK_05}):"
        f"\n\n{_FOREIGN_LOSS_FN[framework]}"
    )


def _call_flag(model: nnx.Module, train_flag: str | None, eval_flag: str | None):
    """``(keyword, True for training)`` from ``train_flag`` / ``eval_flag``, checked against
    the signature of ``model.__call__``; ``(None, None)`` for a model called as ``model(x)``.

    Raises:
        ValueError: both flags given.
        TypeError: ``__call__`` has no such keyword, or needs an argument besides the inputs
            and no flag names it.
    """
    if train_flag is not None and eval_flag is not None:
        raise ValueError(
            f"give train_flag (True in training) or eval_flag (True in inference), not both; "
            f"got train_flag={train_flag!r}, eval_flag={eval_flag!r}."
        )
    keyword = train_flag if train_flag is not None else eval_flag
    if keyword is not None and (not isinstance(keyword, str) or not keyword.isidentifier()):
        raise TypeError(f"the flag must be the name of a keyword argument, got {keyword!r}.")
    name = type(model).__name__
    try:
        signature = inspect.signature(type(model).__call__)
    except (TypeError, ValueError):  # no Python signature: nothing to check
        return keyword, (None if keyword is None else train_flag is not None)
    parameters = list(signature.parameters.values())[1:]  # drop self
    kinds = inspect.Parameter
    positional = [
        p for p in parameters if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    inputs = positional[0].name if positional else None
    by_name = {p.name: p for p in parameters if p.kind != kinds.POSITIONAL_ONLY}
    takes_any = any(p.kind == kinds.VAR_KEYWORD for p in parameters)
    if keyword is not None and keyword not in by_name and not takes_any:
        raise TypeError(
            f"{name}.__call__ has no keyword argument {keyword!r}; its arguments are "
            f"({', '.join(p.name for p in parameters)})."
        )
    required = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        and p.name not in (inputs, keyword)
    ]
    if required:
        flag = required[0]
        raise TypeError(
            f"{name}.__call__ takes the argument{'s' if len(required) > 1 else ''} "
            f"{', '.join(map(repr, required))} besides the inputs {inputs!r}, and make_objective "
            "calls model(x) unless it is told the model's training keyword: pass "
            f"train_flag={flag!r} if {flag}=True means training behaviour (batch statistics, "
            f"dropout), or eval_flag={flag!r} if {flag}=True means inference behaviour "
            "(like deterministic=True). The objective then passes the value of its bn_mode."
        )
    return keyword, (None if keyword is None else train_flag is not None)


def _parameter_dtype(params) -> str | None:
    """Name of the common dtype of the floating parameter leaves (None if there are none)."""
    floating = [
        jnp.result_type(v) for v in jax.tree.leaves(params) if jnp.issubdtype(v.dtype, jnp.floating)
    ]
    return None if not floating else jnp.result_type(*floating).name


def _at_least(value: jax.Array, dtype: str) -> jax.Array:
    """A floating ``value`` promoted to at least ``dtype`` (exact); other values as given."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return value
    return value.astype(jnp.promote_types(value.dtype, dtype))


class _CalledWithFlag(nnx.Module):
    """``model(x, **{flag_name: flag_value})`` as a one-argument model, for
    :func:`population_statistics` (which calls ``model(x)``). Holds ``model`` itself: an
    update of this wrapper's statistics writes into ``model``."""

    def __init__(self, model: nnx.Module, flag_name: str, flag_value: bool):
        self.model = model
        self.flag_name = flag_name
        self.flag_value = flag_value

    def __call__(self, x):
        return self.model(x, **{self.flag_name: self.flag_value})


def make_objective(
    model: nnx.Module,
    loss: str = "cross_entropy",
    bn_mode: str | None = None,
    population_data=None,
    population_batch_size: int | None = None,
    *,
    train_flag: str | None = None,
    eval_flag: str | None = None,
) -> Objective:
    """Pure loss, logits and output-loss functions of a model's parameters.

    Args:
        model: an nnx model mapping ``x`` ``(B, ...)`` to outputs ``(B, K)``; not mutated
            (the objective works on a copy). Floating inputs are cast to the dtype of its
            floating parameters before every call (float64 data, float32 model: float32),
            and its BatchNorm statistics are kept in at least that dtype (``nnx.BatchNorm``
            stores float32 statistics whatever its ``param_dtype``; a float64 model's become
            float64, exactly), so that train mode computes in one dtype without warnings.
        loss: ``"cross_entropy"`` (integer labels) or ``"mse"`` (see :func:`output_loss`).
        bn_mode: for a model with BatchNorm, one of ``"train"``, ``"eval"``,
            ``"population"`` (required: no default); for a model without, None.
        population_data: for ``"population"``: the inputs over which to recompute the
            statistics (array ``(N, ...)``, Dataset or ``{"x": ...}``), usually the whole
            training set.
        population_batch_size: batch size of that computation (None: all at once).
        train_flag: for a model whose ``__call__`` takes a training flag besides the inputs:
            the name of that keyword when True means training behaviour (``"train"``,
            ``"training"``, ``"is_training"``). The objective calls
            ``model(x, **{train_flag: bn_mode == "train"})``: True in ``"train"`` mode, False
            in ``"eval"`` and ``"population"`` mode and for a model without BatchNorm.
        eval_flag: the same when True means inference behaviour (``"deterministic"``,
            ``"use_running_average"``, ``"inference"``): ``model(x, **{eval_flag: bn_mode !=
            "train"})``. At most one of the two. Whatever the flag, dropout layers
            (``nnx.Dropout``) are switched off (rate 0): an objective is deterministic.

    Returns:
        :class:`Objective`. ``loss_fn(params, batch)`` is the mean loss over the batch;
        ``jax.grad(loss_fn)`` is a pytree shaped like ``params``.

    Raises:
        TypeError: ``model`` is not an ``nnx.Module`` (for flax.linen, haiku and equinox
            models the message shows the ``loss_fn`` to write for
            :func:`hessspec.hessian_operator` instead); ``model.__call__`` needs an argument
            besides the inputs that no flag names, or has no keyword named by a flag.
        ValueError: unknown loss or mode; a BN model without ``bn_mode``; a mode for a
            model without BN; ``population_data`` missing for, or given without,
            ``"population"``; both ``train_flag`` and ``eval_flag``.
    """
    _refuse_non_nnx(model)
    flag_name, flag_means_training = _call_flag(model, train_flag, eval_flag)
    has_bn = _check_mode(model, loss, bn_mode, population_data, population_batch_size)
    flag_value = None if flag_name is None else ((bn_mode == "train") == flag_means_training)
    work = _deterministic_copy(model, bn_mode if has_bn else None)
    if bn_mode == "population":
        # population_statistics calls model(x): through a wrapper that passes the flag
        target = work if flag_name is None else _CalledWithFlag(work, flag_name, flag_value)
        nnx.update(target, population_statistics(target, population_data, population_batch_size))

    graphdef, params_state, stats_state, rest_state = nnx.split(work, nnx.Param, nnx.BatchStat, ...)
    # jax arrays throughout (a model may hold numpy arrays, which cannot take traced updates)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params_state))
    stats = jax.tree.map(jnp.asarray, nnx.to_pure_dict(stats_state))
    rest = jax.tree.map(jnp.asarray, nnx.to_pure_dict(rest_state))
    model_dtype = _parameter_dtype(params)
    if model_dtype is not None:  # nnx.BatchNorm keeps float32 statistics whatever its dtype
        stats = jax.tree.map(lambda v: _at_least(v, model_dtype), stats)
    logits = _ModelLogits(graphdef, model_dtype, flag_name, flag_value)

    # pytrees: the statistics and RNG state are leaves, the graph, the call settings and the
    # loss the static part (equal for every checkpoint of one model), so jitted solvers
    # reuse compiled programs
    return Objective(
        loss_fn=jax.tree_util.Partial(_ModelLoss(logits, loss), stats, rest),
        logits_fn=jax.tree_util.Partial(logits, stats, rest),
        output_loss_fn=_OutputLoss(loss),
        params=params,
        bn_mode=bn_mode,
        graphdef=graphdef,
        stats=stats,
        rest=rest,
        loss=loss,
    )


def _check_mode(model, loss, bn_mode, population_data, population_batch_size) -> bool:
    """Whether ``model`` has BatchNorm layers, after checking that the loss, the BN mode
    and the population arguments fit it (the errors of :func:`make_objective`)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}.")
    if bn_mode is not None and bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {BN_MODES} (or None).")
    has_bn = bool(batchnorm_layers(model))
    if has_bn and bn_mode is None:
        raise ValueError(
            "the model has BatchNorm layers: choose bn_mode explicitly: 'train' (batch "
            "statistics of each batch), 'eval' (stored running averages) or 'population' "
            "(statistics recomputed over population_data)."
        )
    if not has_bn and bn_mode is not None:
        raise ValueError(
            f"bn_mode={bn_mode!r} was given, but the model has no BatchNorm layer: pass "
            "bn_mode=None."
        )
    if bn_mode == "population" and population_data is None:
        raise ValueError("bn_mode='population' needs population_data (e.g. the training set).")
    if bn_mode != "population" and (
        population_data is not None or population_batch_size is not None
    ):
        raise ValueError(
            "population_data/population_batch_size are only used with bn_mode='population', "
            f"got bn_mode={bn_mode!r}."
        )
    return has_bn


def _deterministic_copy(model: nnx.Module, bn_mode: str | None) -> nnx.Module:
    """A private copy of ``model`` with noise and dropout off and, for a BN mode, BatchNorm
    set to it: batch statistics in ``"train"`` mode, frozen statistics otherwise; exact
    two-pass variance; input recording off."""
    work = private_copy(model)
    work.set_attributes(deterministic=True, raise_if_not_found=False)
    for _, layer in nnx.iter_graph(work):
        if isinstance(layer, nnx.Dropout):  # off even where the flag would switch it on
            layer.rate = 0.0
    if bn_mode is not None:
        work.set_attributes(
            use_running_average=bn_mode != "train",
            use_fast_variance=False,
            record_input_stats=False,
            raise_if_not_found=False,
        )
    return work


def with_params(model: nnx.Module, params) -> nnx.Module:
    """Write ``params`` (a pure dict as in :attr:`Objective.params`, or an ``nnx.State``)
    into ``model`` in place and return it. Statistics and modes are left as they are."""
    nnx.update(model, params)
    return model
