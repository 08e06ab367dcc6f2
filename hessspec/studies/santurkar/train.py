"""One training run of the Santurkar study, with its landscape records.

The network is trained by the one optimization loop, :func:`hessspec.nn.loop.optimize`,
with ``optax.sgd`` (heavy-ball momentum ``v <- m v + g``, ``w <- w - lr v``) on seeded
mini-batches at one learning rate; the learning rate and the momentum sit in the optimizer
state (``optax.inject_hyperparams``), so one compiled program per variant serves the whole
sweep. Every ``record_every`` steps the loop's observer, before the update, on the
mini-batch that update uses and in its mode (batch statistics; for the noisy variant the
noise draw of that update, held fixed), records :func:`hessspec.landscape_along_gradient`
(loss range, gradient predictiveness, beta-smoothness along ``-g``) and, for the main runs,
:func:`hessspec.internal_covariate_shift` per layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from hessspec.studies.common.checks import dtype_of
from hessspec.studies.santurkar.config import SanturkarConfig

__all__ = ["RECORD_KEYS", "layer_order_for", "train_mode_loss", "train_variant"]

#: ``(batchnorm, noisy)`` of each variant.
_VARIANT_FLAGS = {
    "standard": (False, False),
    "batchnorm": (True, False),
    "noisy_batchnorm": (True, True),
}

#: The lists of a run's ``records``, one entry per recorded step.
RECORD_KEYS = (
    "steps",
    "loss",
    "grad_norm",
    "loss_range",
    "losses",
    "gradient_predictiveness",
    "beta_smoothness",
    "first_order_range",
    "ics_l2",
    "ics_cosine",
    "ics_grad_norm",
)


def train_mode_loss(graphdef, loss: str = "cross_entropy"):
    """The mini-batch loss an SGD step descends, as ``loss_fn(params, batch)``.

    ``batch = {"x", "y", "state"}`` with ``state`` the model's non-parameter state (BN
    running averages, RNG streams) as a pure dict (``nnx.split(model, nnx.Param, ...)``):
    the model is rebuilt from ``graphdef`` (in train mode: batch statistics, BN noise on),
    ``params`` and that state, so for a noisy BatchNorm the noise is the draw the state's
    RNG gives, the same for every call (the loss is a deterministic function of ``params``,
    which is what landscape metrics need). Passing the state inside the batch keeps it
    traced: one compiled program serves every step.

    Args:
        graphdef: ``nnx.GraphDef`` of the model in train mode.
        loss: ``"cross_entropy"`` or ``"mse"``.

    Returns:
        ``loss_fn(params, batch) -> scalar`` mean loss.
    """
    from hessspec.nn.train import model_train_loss

    forward = model_train_loss(graphdef, loss)  # (params, state, batch) -> (loss, new state)

    def loss_fn(params, batch):
        return forward(params, batch["state"], batch)[0]

    return loss_fn


def layer_order_for(params: Mapping[str, Any]) -> list[Any]:
    """Forward-order layers of an MLP or CNN params dict for the covariate-shift measure.

    Hidden layer ``i`` is its linear/conv weights together with its BatchNorm parameters
    (``[("linears", i), ("norms", i)]``, or ``("convs", i)`` for a CNN), then the head.

    Args:
        params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of a
            :class:`hessspec.nn.models.MLP` or :class:`hessspec.nn.models.CNN`.

    Returns:
        A ``layer_order`` for :func:`hessspec.internal_covariate_shift`.
    """
    stack = "linears" if "linears" in params else "convs"
    norms = params.get("norms", {})
    order: list[Any] = []
    for i in sorted(params[stack].keys()):
        if norms.get(i):
            order.append([(stack, i), ("norms", i)])
        else:
            order.append((stack, i))
    order.append("head")
    return order


def _make_model(config: SanturkarConfig, variant: str, input_shape):
    from hessspec.nn.models import make_model

    bn, noisy = _VARIANT_FLAGS[variant]
    kwargs: dict[str, Any] = {"noisy_batchnorm": noisy}
    if noisy:
        kwargs.update(noise_shift=config.noise_shift, noise_scale=config.noise_scale)
    if config.model == "mlp":
        kwargs["hidden"] = tuple(config.hidden)
    else:
        kwargs["channels"] = tuple(config.channels)
    dtype = dtype_of(config.dtype)
    return make_model(config.model, input_shape, 10, bn, seed=config.seed, dtype=dtype, **kwargs)


def _compiled_for(cache: dict, variant: str, config: SanturkarConfig, graphdef) -> dict:
    """The per-variant functions (the loss along the gradient, the loss the loop descends)
    and the one optimizer, built once per study so that their compiled programs serve
    every learning rate of the sweep."""
    import optax

    from hessspec.nn.train import model_train_loss

    if "sgd" not in cache:  # lr and momentum live in the optimizer state
        cache["sgd"] = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.0)
    key = (variant, config.model)
    if key not in cache:
        cache[key] = {
            "loss_fn": train_mode_loss(graphdef),
            "forward": model_train_loss(graphdef, "cross_entropy"),
        }
    return {**cache[key], "sgd": cache["sgd"]}


def _sgd_state(sgd, params, lr: float, momentum: float):
    """The optimizer state of ``sgd`` (``optax.inject_hyperparams(optax.sgd)``) at learning
    rate ``lr`` and heavy-ball momentum ``momentum`` (``v <- m v + g``, ``p <- p - lr v``),
    both in the parameters' dtype."""
    opt_state = sgd.init(params)
    dtype = jax.tree.leaves(params)[0].dtype
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype)
    opt_state.hyperparams["momentum"] = jnp.asarray(momentum, dtype)
    return opt_state


def _measures(config, loss_fn, params, batch, lr, with_ics) -> dict[str, Any]:
    """The landscape (and, ``with_ics``, the covariate-shift) measures on ``batch``: one
    entry of each record list of :data:`RECORD_KEYS` but ``steps``, and ``layer_names``
    with the ICS."""
    import hessspec as hs

    lo, hi = config.step_range
    lm = hs.landscape_along_gradient(
        loss_fn, params, batch, lr, step_range=(lo, hi), num_steps=config.num_step_sizes
    )
    out = {
        "loss": lm.loss,
        "grad_norm": lm.grad_norm,
        "loss_range": lm.loss_range,
        "losses": lm.losses,
        "gradient_predictiveness": lm.gradient_predictiveness,
        "beta_smoothness": lm.beta_smoothness,
        "first_order_range": (hi - lo) * lr * lm.grad_norm**2,
    }
    if with_ics:
        ics = hs.internal_covariate_shift(loss_fn, params, batch, lr, layer_order_for(params))
        out.update(
            ics_l2=ics.l2,
            ics_cosine=ics.cosine,
            ics_grad_norm=ics.grad_norm,
            layer_names=list(ics.layer_names),
        )
    return out


def _observer(config, loss_fn, train_set, lr, with_ics):
    """The loop's observer: the measures at a recorded step on the mini-batch the next
    update uses, in its mode (batch statistics; for the noisy variant that update's noise
    draw, held fixed through the step's state)."""

    def observe(seen) -> dict[str, Any]:
        idx = seen.indices
        batch = {"x": train_set.x[idx], "y": train_set.y[idx], "state": seen.state}
        return _measures(config, loss_fn, seen.params, batch, lr, with_ics)

    return observe


def _records(observations) -> tuple[dict[str, list], list[str]]:
    """The record lists (keys :data:`RECORD_KEYS`, the ICS ones empty without it) and the
    ICS layer names of the observations ``(step, measures)``."""
    rec: dict[str, list] = {k: [] for k in RECORD_KEYS}
    layer_names: list[str] = []
    for step, measures in observations:
        rec["steps"].append(step)
        for k, value in measures.items():
            if k == "layer_names":
                layer_names = value
            else:
                rec[k].append(value)
    return rec, layer_names


def _accuracy(model, x, y) -> float:
    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == jnp.asarray(y)))


def train_variant(
    config: SanturkarConfig,
    variant: str,
    lr: float,
    train_set,
    test_set,
    with_ics: bool,
    cache: dict,
) -> dict[str, Any]:
    """Train ``variant`` at learning rate ``lr`` for ``config.steps`` steps, recording the
    landscape every ``config.record_every`` steps.

    Args:
        config: the study's config.
        variant: one of :data:`hessspec.studies.santurkar.config.VARIANTS`.
        lr: the learning rate.
        train_set, test_set: digits :class:`hessspec.nn.data.Dataset`.
        with_ics: also record the internal covariate shift per layer.
        cache: compiled functions by variant, shared between the runs of one study.

    Returns:
        ``variant``, ``learning_rate``, ``records`` (lists over recorded steps, keys
        :data:`RECORD_KEYS`), ``layer_names``, ``train_losses`` ``(steps,)``,
        ``train_accuracy``, ``test_accuracy`` (eval mode: running averages, no noise) and
        ``seconds``.

    Raises:
        hessspec.nn.records.TrainingDiverged: (a FloatingPointError) the mini-batch loss
            became non-finite; the message names the step, the variant and the learning
            rate.
    """
    from flax import nnx

    from hessspec.nn.loop import optimize
    from hessspec.nn.schedule import BatchOrder

    model = _make_model(config, variant, train_set.input_shape)
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    fns = _compiled_for(cache, variant, config, graphdef)
    t0 = time.perf_counter()
    # Seeded epoch-wise permutations cut into full batches; the record at step t is taken
    # before the update t + 1, on its batch.
    result = optimize(
        fns["forward"],
        params,
        fns["sgd"],
        {"x": train_set.x, "y": train_set.y},
        num_steps=config.steps,
        batches=BatchOrder(train_set.num_examples, config.batch_size, config.seed),
        state=state,
        opt_state=_sgd_state(fns["sgd"], params, lr, config.momentum),
        observe=_observer(config, fns["loss_fn"], train_set, lr, with_ics),
        observe_at=range(0, config.steps, config.record_every),
        divergence_hint=f"{variant} at learning rate {lr}; lower config key "
        "'learning_rate' or 'sweep_learning_rates'",
    )
    seconds = time.perf_counter() - t0
    rec, layer_names = _records(result.observations)
    nnx.update(model, result.params)
    nnx.update(model, result.state)
    model.eval()  # running averages, no noise
    return {
        "variant": variant,
        "learning_rate": lr,
        "records": rec,
        "layer_names": layer_names,
        "train_losses": result.losses,
        "train_accuracy": _accuracy(model, train_set.x, train_set.y),
        "test_accuracy": _accuracy(model, test_set.x, test_set.y),
        "seconds": seconds,
    }
