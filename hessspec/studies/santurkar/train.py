"""One training run of the Santurkar study, with its landscape records.

The network is trained with SGD (heavy-ball momentum as ``optax.sgd``) at one learning rate.
Every ``record_every`` steps, on the mini-batch the next update uses and in the mode that
update uses (batch statistics; for the noisy variant the noise draw of that update, held
fixed), it records :func:`hessspec.landscape_along_gradient` (loss range, gradient
predictiveness, beta-smoothness along ``-g``) and, for the main runs,
:func:`hessspec.internal_covariate_shift` per layer.

The loop is the study's own until the one optax loop of :mod:`hessspec.nn.train` takes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    from flax import nnx

    from hessspec.nn.objective import output_loss

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, batch["state"])
        return output_loss(model(batch["x"]), batch, loss)

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


def _forward_with_state(graphdef, loss: str = "cross_entropy"):
    """``f(params, state, x, y) -> (loss, new_state)``: one train-mode forward pass (batch
    statistics, BN noise on), returning the updated state (running averages, RNG count)."""
    from flax import nnx

    from hessspec.nn.objective import output_loss

    def f(params, state, x, y):
        model = nnx.merge(graphdef, params, state)
        logits = model(x)
        _, _, new_state = nnx.split(model, nnx.Param, ...)
        return output_loss(logits, {"x": x, "y": y}, loss), nnx.to_pure_dict(new_state)

    return f


def _sgd_step(graphdef):
    """A jitted SGD step (heavy-ball momentum as ``optax.sgd``: ``v <- m v + g``,
    ``p <- p - lr v``), with the learning rate and momentum traced, so one compilation
    serves every learning rate of the sweep."""
    forward = _forward_with_state(graphdef)

    @jax.jit
    def step(params, velocity, state, x, y, lr, momentum):
        (value, new_state), grads = jax.value_and_grad(forward, has_aux=True)(params, state, x, y)
        velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
        params = jax.tree.map(lambda p, v: p - lr * v, params, velocity)
        return params, velocity, new_state, value

    return step


def _compiled_for(cache: dict, variant: str, config: SanturkarConfig, graphdef) -> dict:
    """The per-variant functions (loss along the gradient, SGD step), built once per run so
    their compiled programs serve every learning rate."""
    key = (variant, config.model)
    if key not in cache:
        cache[key] = {"loss_fn": train_mode_loss(graphdef), "step": _sgd_step(graphdef)}
    return cache[key]


def _record(rec, layer_names, config, loss_fn, params, batch, lr, step, with_ics) -> None:
    """Append the landscape (and, ``with_ics``, the covariate-shift) measures at ``step``
    to the record lists ``rec``; ``layer_names`` is filled with the ICS layer names."""
    import hessspec as hs

    lo, hi = config.step_range
    lm = hs.landscape_along_gradient(
        loss_fn, params, batch, lr, step_range=(lo, hi), num_steps=config.num_step_sizes
    )
    rec["steps"].append(step)
    rec["loss"].append(lm.loss)
    rec["grad_norm"].append(lm.grad_norm)
    rec["loss_range"].append(lm.loss_range)
    rec["losses"].append(lm.losses)
    rec["gradient_predictiveness"].append(lm.gradient_predictiveness)
    rec["beta_smoothness"].append(lm.beta_smoothness)
    rec["first_order_range"].append((hi - lo) * lr * lm.grad_norm**2)
    if with_ics:
        ics = hs.internal_covariate_shift(loss_fn, params, batch, lr, layer_order_for(params))
        layer_names[:] = list(ics.layer_names)
        rec["ics_l2"].append(ics.l2)
        rec["ics_cosine"].append(ics.cosine)
        rec["ics_grad_norm"].append(ics.grad_norm)


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
        FloatingPointError: the training loss became non-finite (the message names the
            step).
    """
    from flax import nnx

    from hessspec.nn.train import batch_indices

    model = _make_model(config, variant, train_set.input_shape)
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    fns = _compiled_for(cache, variant, config, graphdef)
    velocity = jax.tree.map(jnp.zeros_like, params)
    # Seeded epoch-wise permutations cut into full batches; the record at step t uses
    # order[t], the batch of the update that follows it.
    order = batch_indices(train_set.num_examples, config.batch_size, config.steps, config.seed)
    x_all, y_all = jnp.asarray(train_set.x), jnp.asarray(train_set.y)
    dtype = jax.tree.leaves(params)[0].dtype
    lr_arr, mom_arr = jnp.asarray(lr, dtype), jnp.asarray(config.momentum, dtype)
    rec: dict[str, list] = {k: [] for k in RECORD_KEYS}
    layer_names: list[str] = []
    losses = []
    t0 = time.perf_counter()
    for t in range(config.steps):
        idx = order[t]
        if t % config.record_every == 0:
            batch = {"x": train_set.x[idx], "y": train_set.y[idx], "state": state}
            _record(rec, layer_names, config, fns["loss_fn"], params, batch, lr, t, with_ics)
        params, velocity, state, value = fns["step"](
            params, velocity, state, x_all[idx], y_all[idx], lr_arr, mom_arr
        )
        losses.append(value)
    train_losses = np.asarray(jnp.stack(losses), np.float64)
    if not np.all(np.isfinite(train_losses)):
        raise FloatingPointError(
            f"{variant} diverged at lr = {lr}: the training loss is not finite from step "
            f"{int(np.argmin(np.isfinite(train_losses))) + 1} on."
        )
    seconds = time.perf_counter() - t0
    nnx.update(model, params)
    nnx.update(model, state)
    model.eval()  # running averages, no noise
    return {
        "variant": variant,
        "learning_rate": lr,
        "records": rec,
        "layer_names": layer_names,
        "train_losses": train_losses,
        "train_accuracy": _accuracy(model, x_all, y_all),
        "test_accuracy": _accuracy(model, test_set.x, test_set.y),
        "seconds": seconds,
    }
