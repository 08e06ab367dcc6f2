"""The Santurkar study: does BatchNorm make the loss landscape smoother? (Santurkar, Tsipras,
Ilyas & Madry 2018, "How does batch normalization help optimization?").

The same network on the digits is trained with plain SGD at ONE shared learning rate in
several variants: ``"standard"`` (no BatchNorm), ``"batchnorm"`` and ``"noisy_batchnorm"``
(BatchNorm followed by noise of non-zero mean and non-unit scale, redrawn at every step:
:class:`hessspec.nn.models.NoisyBatchNorm`). Every ``record_every`` steps, on the mini-batch the
next update uses and in the mode that update uses (batch statistics; for the noisy variant
the noise draw of that update, held fixed), it records

- :func:`hessspec.landscape_along_gradient`: the loss along ``-g`` for step lengths
  ``s`` in ``[lr/2, 4 lr]`` and its range, the gradient predictiveness
  ``||grad L(x) - grad L(x - s g)||`` and the effective beta-smoothness
  ``max_s ||grad L(x) - grad L(x - s g)|| / ||s g||``;
- :func:`hessspec.internal_covariate_shift` per layer: ``||G - G'||`` and ``cos(G, G')``,
  ``G'`` the layer's gradient after the earlier layers took their SGD step.

Figures follow their Fig. 4 (shaded loss range along the gradient over training; shaded
gradient predictiveness; beta-smoothness) plus the covariate shift per layer (their
Fig. 5) and the training curves. report.md compares the variants with numbers: the study's
acceptance is a smaller loss range and beta-smoothness with BatchNorm than without at the
same learning rate. An optional sweep over more learning rates (landscape only) shows where
that holds: at small steps the loss range is first order, ``~ (4 - 1/2) lr ||g||^2``, and
says more about the gradient norm than about the curvature; the comparison is about
smoothness once ``4 lr`` reaches the curvature scale ``~ 2 / beta``.

Run by :func:`run_santurkar_study`; the configuration is :class:`SanturkarConfig` (TOML:
``experiment = "santurkar"``, see ``experiments/santurkar.toml``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessspec.studies.common.config import (
    ConfigError,
    config_from_mapping,
    config_to_mapping,
    config_to_toml,
)
from hessspec.studies.input_bias.study import (
    StudyOutput,
    _check,
    _check_dtype,
    _dtype,
    _field,
    _fmt,
    _jsonable,
    _md_table,
    environment,
    new_figure,
    override_config,
)

__all__ = [
    "QUICK_OVERRIDES",
    "SanturkarConfig",
    "layer_order_for",
    "override_config",
    "plot_covariate_shift",
    "plot_landscape",
    "plot_lr_sweep",
    "plot_training",
    "run_santurkar_study",
    "summarize_records",
    "train_mode_loss",
]

EXPERIMENT = "santurkar"

#: Overrides for a cheaper run (``python -m hessspec.run --quick``): no learning-rate
#: sweep, records every 20 steps.
QUICK_OVERRIDES: tuple[str, ...] = ("sweep_learning_rates=[]", "record_every=20")
VARIANTS = ("standard", "batchnorm", "noisy_batchnorm")
_VARIANT_FLAGS = {
    "standard": (False, False),
    "batchnorm": (True, False),
    "noisy_batchnorm": (True, True),
}
_COLORS = {"standard": "C3", "batchnorm": "C0", "noisy_batchnorm": "C2"}


@dataclasses.dataclass(frozen=True)
class SanturkarConfig:
    """The Santurkar landscape study. TOML: ``experiment = "santurkar"`` and these keys."""

    seed: int = _field(0, "seed of the initialisation, the batch order and the BN noise")
    x64: bool = _field(False, "run with jax_enable_x64 on (scoped to the run)")
    title: str = _field("BatchNorm and the smoothness of the loss landscape", "title of report.md")
    model: str = _field("cnn", "'cnn' (conv stages of `channels`) or 'mlp' (of `hidden`)")
    hidden: tuple[int, ...] = _field((64, 64), "mlp: widths of the hidden layers")
    channels: tuple[int, ...] = _field((16, 32), "cnn: channels of each conv stage")
    preprocessing: str = _field(
        "unit", "digits preprocessing: 'unit', 'center', 'standardize' or 'raw'"
    )
    variants: tuple[str, ...] = _field(
        VARIANTS, "networks to train: 'standard', 'batchnorm', 'noisy_batchnorm'"
    )
    learning_rate: float = _field(0.1, "the shared learning rate (SGD)")
    momentum: float = _field(0.0, "SGD momentum (0: plain SGD, whose step is -lr g)")
    batch_size: int = _field(64, "training mini-batch size")
    steps: int = _field(600, "SGD steps")
    record_every: int = _field(10, "measure the landscape and ICS every this many steps")
    step_range: tuple[float, float] = _field(
        (0.5, 4.0), "step lengths along -g, in units of the learning rate"
    )
    num_step_sizes: int = _field(8, "step lengths evaluated in step_range")
    noise_shift: float = _field(0.5, "noisy BN: shift ~ U(-noise_shift, noise_shift)")
    noise_scale: float = _field(2.0, "noisy BN: scale ~ U(1, noise_scale)")
    sweep_learning_rates: tuple[float, ...] = _field(
        (0.05, 0.2), "further learning rates, landscape summary only (empty: none)"
    )
    dtype: str = _field("float32", "parameter dtype: float32 or float64 (needs x64 = true)")

    def __post_init__(self):
        _check(self.model in ("mlp", "cnn"), "model", "be 'mlp' or 'cnn'", self.model)
        _check(all(h >= 1 for h in self.hidden), "hidden", "hold positive widths", self.hidden)
        _check(len(self.hidden) >= 1, "hidden", "name at least one hidden layer", self.hidden)
        _check(
            all(c >= 1 for c in self.channels) and len(self.channels) >= 1,
            "channels",
            "hold at least one positive width",
            self.channels,
        )
        prep = ("unit", "center", "standardize", "raw")
        _check(
            self.preprocessing in prep,
            "preprocessing",
            f"be one of {list(prep)}",
            self.preprocessing,
        )
        _check(len(self.variants) >= 1, "variants", "name at least one variant", self.variants)
        for i, v in enumerate(self.variants):
            _check(v in VARIANTS, f"variants[{i}]", f"be one of {list(VARIANTS)}", v)
        _check(
            len(set(self.variants)) == len(self.variants),
            "variants",
            "not repeat a variant",
            list(self.variants),
        )
        _check(self.learning_rate > 0, "learning_rate", "be > 0", self.learning_rate)
        _check(0 <= self.momentum < 1, "momentum", "lie in [0, 1)", self.momentum)
        _check(
            self.batch_size >= 2, "batch_size", "be >= 2 (BatchNorm statistics)", self.batch_size
        )
        _check(self.steps >= 1, "steps", "be >= 1", self.steps)
        _check(
            1 <= self.record_every <= self.steps,
            "record_every",
            f"lie in [1, steps = {self.steps}]",
            self.record_every,
        )
        lo, hi = self.step_range
        _check(0 < lo <= hi, "step_range", "satisfy 0 < lo <= hi", list(self.step_range))
        _check(self.num_step_sizes >= 2, "num_step_sizes", "be >= 2", self.num_step_sizes)
        _check(self.noise_shift >= 0, "noise_shift", "be >= 0", self.noise_shift)
        _check(self.noise_scale >= 1, "noise_scale", "be >= 1", self.noise_scale)
        _check(
            all(lr > 0 for lr in self.sweep_learning_rates),
            "sweep_learning_rates",
            "hold positive learning rates",
            list(self.sweep_learning_rates),
        )
        _check_dtype("dtype", self.dtype)
        if self.dtype == "float64" and not self.x64:
            raise ConfigError("config key 'dtype' = 'float64' needs x64 = true.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SanturkarConfig:
        """Build from a mapping (parsed TOML), checking every key, type and value.

        Args:
            values: nested mapping; absent keys keep their defaults, a top-level
                ``experiment`` key must name this study.

        Returns:
            The validated config.

        Raises:
            ConfigError (a ValueError): unknown key, wrong type or invalid value, naming
                the key.
        """
        return config_from_mapping(cls, values, experiment=EXPERIMENT)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain dicts and lists (with ``experiment = "santurkar"``)."""
        return {"experiment": EXPERIMENT, **config_to_mapping(self)}

    def to_toml(self) -> str:
        """The config as TOML text that :meth:`from_dict` of ``tomllib.loads`` reads back."""
        return config_to_toml(self, EXPERIMENT)


# --------------------------------------------------------------------------------------
# The loss SGD takes its step on, and the layers of a model
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# One training run with records
# --------------------------------------------------------------------------------------


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
    return make_model(
        config.model, input_shape, 10, bn, seed=config.seed, dtype=_dtype(config.dtype), **kwargs
    )


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


def _train_variant(
    config: SanturkarConfig,
    variant: str,
    lr: float,
    train_set,
    test_set,
    with_ics: bool,
    cache: dict,
) -> dict[str, Any]:
    from flax import nnx

    import hessspec as hs
    from hessspec.nn.train import batch_indices

    model = _make_model(config, variant, train_set.input_shape)
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    fns = _compiled_for(cache, variant, config, graphdef)
    loss_fn, step_fn = fns["loss_fn"], fns["step"]
    velocity = jax.tree.map(jnp.zeros_like, params)
    # Seeded epoch-wise permutations cut into full batches; the record at step t uses
    # order[t], the batch of the update that follows it.
    order = batch_indices(train_set.num_examples, config.batch_size, config.steps, config.seed)
    x_all, y_all = jnp.asarray(train_set.x), jnp.asarray(train_set.y)
    lr_arr = jnp.asarray(lr, _params_dtype(params))
    mom_arr = jnp.asarray(config.momentum, _params_dtype(params))
    rec: dict[str, list] = {
        k: []
        for k in (
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
    }
    layer_names: list[str] = []
    lo, hi = config.step_range
    losses = []
    t0 = time.perf_counter()
    for t in range(config.steps):
        idx = order[t]
        if t % config.record_every == 0:
            batch = {"x": train_set.x[idx], "y": train_set.y[idx], "state": state}
            lm = hs.landscape_along_gradient(
                loss_fn, params, batch, lr, step_range=(lo, hi), num_steps=config.num_step_sizes
            )
            rec["steps"].append(t)
            rec["loss"].append(lm.loss)
            rec["grad_norm"].append(lm.grad_norm)
            rec["loss_range"].append(lm.loss_range)
            rec["losses"].append(lm.losses)
            rec["gradient_predictiveness"].append(lm.gradient_predictiveness)
            rec["beta_smoothness"].append(lm.beta_smoothness)
            rec["first_order_range"].append((hi - lo) * lr * lm.grad_norm**2)
            if with_ics:
                ics = hs.internal_covariate_shift(
                    loss_fn, params, batch, lr, layer_order_for(params)
                )
                layer_names[:] = list(ics.layer_names)
                rec["ics_l2"].append(ics.l2)
                rec["ics_cosine"].append(ics.cosine)
                rec["ics_grad_norm"].append(ics.grad_norm)
        params, velocity, state, value = step_fn(
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
    train_acc = float(jnp.mean(jnp.argmax(model(x_all), -1) == y_all))
    test_acc = float(jnp.mean(jnp.argmax(model(jnp.asarray(test_set.x)), -1) == test_set.y))
    out = {
        "variant": variant,
        "learning_rate": lr,
        "records": rec,
        "layer_names": layer_names,
        "train_losses": train_losses,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "seconds": seconds,
    }
    out["summary"] = summarize_records(rec, lr)
    return out


def _params_dtype(params: Any):
    """The dtype of the first parameter leaf."""
    return jax.tree.leaves(params)[0].dtype


def summarize_records(records: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """Averages of the landscape records of one run.

    Args:
        records: the ``records`` of one variant (lists over recorded steps).
        lr: its learning rate.

    Returns:
        Means and medians over all records (and over the second half, ``late_``) of the loss
        range, beta-smoothness, the largest gradient predictiveness and the first-order
        range ``(hi - lo) lr ||g||^2``; the mean of ``4 lr beta`` style step-to-curvature
        ratio ``lr * beta``; and per-layer means of the covariate shift when recorded.
    """
    rng = np.asarray(records["loss_range"], np.float64)
    beta = np.asarray(records["beta_smoothness"], np.float64)
    pred = np.asarray([np.max(p) for p in records["gradient_predictiveness"]], np.float64)
    first = np.asarray(records["first_order_range"], np.float64)
    half = rng.size // 2
    out = {
        "num_records": int(rng.size),
        "loss_range_mean": float(rng.mean()),
        "loss_range_median": float(np.median(rng)),
        "loss_range_max": float(rng.max()),
        "beta_mean": float(beta.mean()),
        "beta_median": float(np.median(beta)),
        "beta_max": float(beta.max()),
        "max_predictiveness_mean": float(pred.mean()),
        "first_order_range_mean": float(first.mean()),
        "lr_times_beta_mean": float(lr * beta.mean()),
        "late_loss_range_mean": float(rng[half:].mean()),
        "late_beta_mean": float(beta[half:].mean()),
    }
    if records.get("ics_l2"):
        l2 = np.asarray(records["ics_l2"], np.float64)
        cos = np.asarray(records["ics_cosine"], np.float64)
        norm = np.asarray(records["ics_grad_norm"], np.float64)
        out["ics_l2_mean"] = l2.mean(0)
        out["ics_relative_mean"] = (l2 / np.where(norm > 0, norm, np.inf)).mean(0)
        finite = np.isfinite(cos)
        count = finite.sum(0)
        total = np.where(finite, cos, 0.0).sum(0)
        out["ics_cosine_mean"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def _comparison(runs: Mapping[str, Any]) -> dict[str, Any] | None:
    """BatchNorm against standard at one learning rate (None without both)."""
    if "standard" not in runs or "batchnorm" not in runs:
        return None
    s, b = runs["standard"]["summary"], runs["batchnorm"]["summary"]
    rs = np.asarray(runs["standard"]["records"]["loss_range"])
    rb = np.asarray(runs["batchnorm"]["records"]["loss_range"])
    bs = np.asarray(runs["standard"]["records"]["beta_smoothness"])
    bb = np.asarray(runs["batchnorm"]["records"]["beta_smoothness"])
    out = {
        "loss_range_ratio_bn_over_standard": b["loss_range_mean"] / s["loss_range_mean"],
        "beta_ratio_bn_over_standard": b["beta_mean"] / s["beta_mean"],
        "loss_range_smaller_with_bn": b["loss_range_mean"] < s["loss_range_mean"],
        "beta_smaller_with_bn": b["beta_mean"] < s["beta_mean"],
        "fraction_of_records_loss_range_smaller_with_bn": float(np.mean(rb < rs)),
        "fraction_of_records_beta_smaller_with_bn": float(np.mean(bb < bs)),
    }
    if "noisy_batchnorm" in runs:
        n = runs["noisy_batchnorm"]["summary"]
        out["noisy_loss_range_smaller_than_standard"] = n["loss_range_mean"] < s["loss_range_mean"]
        out["noisy_beta_smaller_than_standard"] = n["beta_mean"] < s["beta_mean"]
    out["acceptance"] = bool(out["loss_range_smaller_with_bn"] and out["beta_smaller_with_bn"])
    return out


# --------------------------------------------------------------------------------------
# Figures (public: notebook 04 redraws them from results.json)
# --------------------------------------------------------------------------------------


def _label(variant: str) -> str:
    return {"standard": "standard", "batchnorm": "BatchNorm", "noisy_batchnorm": "noisy BN"}[
        variant
    ]


def plot_landscape(results: Mapping[str, Any], axes=None):
    """Santurkar et al. Fig. 4: (a) the loss range along the gradient, shaded between its
    minimum and maximum over the step lengths, over training; (b) the gradient
    predictiveness ``||grad L(x) - grad L(x - s g)||``, shaded likewise; (c) the effective
    beta-smoothness. One colour per variant.

    Args:
        results: the dict :func:`run_santurkar_study` returns (or results.json).
        axes: three matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    if axes is None:
        fig, ax = new_figure(1, 3, size=(5.0, 3.8))
        axes = ax[0]
    fig = axes[0].figure
    lr = results["learning_rate"]
    for variant, run in results["runs"].items():
        rec = run["records"]
        steps = np.asarray(rec["steps"])
        losses = np.asarray(rec["losses"], np.float64)
        pred = np.asarray(rec["gradient_predictiveness"], np.float64)
        c = _COLORS[variant]
        axes[0].fill_between(
            steps, losses.min(1), losses.max(1), color=c, alpha=0.35, label=_label(variant)
        )
        axes[1].fill_between(
            steps, pred.min(1), pred.max(1), color=c, alpha=0.35, label=_label(variant)
        )
        axes[2].plot(steps, rec["beta_smoothness"], color=c, label=_label(variant))
    lo, hi = results["config"]["step_range"]
    axes[0].set_title(f"loss landscape: L(x - s g), s in [{lo:g}, {hi:g}] lr")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[1].set_title("gradient predictiveness")
    axes[1].set_ylabel("||grad L(x) - grad L(x - s g)||")
    axes[1].set_yscale("log")
    axes[2].set_title("effective beta-smoothness")
    axes[2].set_ylabel("max_s ||grad L(x) - grad L(x - s g)|| / ||s g||")
    for ax in axes:
        ax.set_xlabel(f"SGD step (lr = {lr:g})")
        ax.legend(fontsize=8)
    return fig


def plot_covariate_shift(results: Mapping[str, Any], axes=None):
    """Internal covariate shift per layer over training (their Fig. 5): the relative change
    ``||G - G'|| / ||G||`` (top row, log) and ``cos(G, G')`` (bottom row), one column per
    layer from the second on (the first has no earlier layers: ``G' = G``), one colour per
    variant.

    Args:
        results: the dict :func:`run_santurkar_study` returns (or results.json).
        axes: a ``(2, L - 1)`` array of matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    runs = results["runs"]
    first = next(iter(runs.values()))
    num_layers = len(first["layer_names"])
    if num_layers < 2:
        raise ValueError("these results hold no covariate-shift records beyond layer 1.")
    cols = list(range(1, num_layers))
    if axes is None:
        fig, axes = new_figure(2, len(cols), size=(3.8, 3.0))
    fig = axes[0][0].figure
    for variant, run in runs.items():
        rec = run["records"]
        steps = np.asarray(rec["steps"])
        l2 = np.asarray(rec["ics_l2"], np.float64)
        norm = np.asarray(rec["ics_grad_norm"], np.float64)
        cos = np.asarray(rec["ics_cosine"], np.float64)
        rel = l2 / np.where(norm > 0, norm, np.nan)
        for c, j in enumerate(cols):
            kw = {"color": _COLORS[variant], "label": _label(variant)}
            axes[0][c].semilogy(steps, rel[:, j], **kw)
            axes[1][c].plot(steps, cos[:, j], **kw)
    for c, j in enumerate(cols):
        axes[0][c].set_title(f"layer {j + 1} of {num_layers}")
        axes[1][c].set_xlabel("SGD step")
    axes[0][0].set_ylabel("||G - G'|| / ||G||")
    axes[1][0].set_ylabel("cos(G, G')")
    axes[0][0].legend(fontsize=7)
    return fig


def plot_training(results: Mapping[str, Any], ax=None):
    """Mini-batch training loss of each variant at the shared learning rate.

    Args:
        results: the dict the study returns (or its parsed results.json).
        ax: a matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    if ax is None:
        fig, axs = new_figure(1, 1, size=(6.0, 4.0))
        ax = axs[0, 0]
    fig = ax.figure
    for variant, run in results["runs"].items():
        losses = np.asarray(run["train_losses"], np.float64)
        w = max(1, losses.size // 40)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.semilogy(
            np.arange(w, losses.size + 1),
            smooth,
            color=_COLORS[variant],
            label=f"{_label(variant)} (test acc {run['test_accuracy']:.3f})",
        )
    ax.set_xlabel("SGD step")
    ax.set_ylabel("mini-batch loss (running mean)")
    ax.set_title(f"training at lr = {results['learning_rate']:g}")
    ax.legend(fontsize=8)
    return fig


def plot_lr_sweep(results: Mapping[str, Any], axes=None):
    """Mean loss range and mean beta-smoothness against the learning rate, per variant.

    Args:
        results: the dict the study returns (or its parsed results.json).
        axes: two matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    if axes is None:
        fig, ax = new_figure(1, 2, size=(5.0, 3.8))
        axes = ax[0]
    fig = axes[0].figure
    table = results["lr_table"]
    for variant in results["config"]["variants"]:
        rows = sorted(
            (r for r in table if r["variant"] == variant), key=lambda r: r["learning_rate"]
        )
        lrs = [r["learning_rate"] for r in rows]
        axes[0].loglog(
            lrs,
            [r["loss_range_mean"] for r in rows],
            "o-",
            color=_COLORS[variant],
            label=_label(variant),
        )
        axes[1].loglog(
            lrs, [r["beta_mean"] for r in rows], "o-", color=_COLORS[variant], label=_label(variant)
        )
    axes[0].set_ylabel("mean loss range along the gradient")
    axes[1].set_ylabel("mean effective beta-smoothness")
    for ax in axes:
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _report(results: Mapping[str, Any], config: SanturkarConfig) -> str:
    runs = results["runs"]
    lr = results["learning_rate"]
    arch = (
        f"CNN (conv channels {list(config.channels)})"
        if config.model == "cnn"
        else f"MLP (hidden {list(config.hidden)})"
    )
    lines = [
        f"# {config.title}",
        "",
        "Santurkar et al. (2018) argue that BatchNorm helps because it makes the loss "
        "landscape smoother (smaller loss changes and more predictive gradients along the "
        "step), not because it reduces internal covariate shift. Here: digits, "
        f"{arch}, preprocessing '{config.preprocessing}', plain SGD (momentum "
        f"{_fmt(config.momentum)}) at the same lr = {_fmt(lr)} for every variant, batch "
        f"{config.batch_size}, {config.steps} steps; every {config.record_every} steps, on "
        "the batch of the next update and with the statistics (and for noisy BN the noise) "
        f"of that update, step lengths s in [{_fmt(config.step_range[0])}, "
        f"{_fmt(config.step_range[1])}] x lr ({config.num_step_sizes} values) along -g.",
        "",
        f"Wall time: {results['timing']['total_s']:.1f} s (main runs "
        f"{results['timing']['main_s']:.1f} s, learning-rate sweep "
        f"{results['timing']['sweep_s']:.1f} s) on {', '.join(results['environment']['devices'])}.",
        "",
        "## Landscape along the gradient (means over all records)",
        "",
        _md_table(
            [
                "variant",
                "loss range (mean)",
                "loss range (median)",
                "beta (mean)",
                "beta (median)",
                "max grad. predictiveness (mean)",
                "first-order range (mean)",
                "final train loss",
                "train acc.",
                "test acc.",
                "seconds",
            ],
            [
                [
                    _label(v),
                    r["summary"]["loss_range_mean"],
                    r["summary"]["loss_range_median"],
                    r["summary"]["beta_mean"],
                    r["summary"]["beta_median"],
                    r["summary"]["max_predictiveness_mean"],
                    r["summary"]["first_order_range_mean"],
                    float(np.mean(r["train_losses"][-max(1, len(r["train_losses"]) // 20) :])),
                    r["train_accuracy"],
                    r["test_accuracy"],
                    r["seconds"],
                ]
                for v, r in runs.items()
            ],
        ),
        "",
        "First-order range: (hi - lo) lr ||g||^2, what the loss range would be if the loss "
        "were linear along the step. Curvature along the step makes the two differ; when "
        "lr x beta is small they nearly agree and the range then measures ||g||^2 more than "
        "the smoothness.",
    ]
    cmp = results["comparison"]
    if cmp is not None:
        verdict = "holds" if cmp["acceptance"] else "does NOT hold"
        lines += [
            "",
            "## BatchNorm against standard at the same learning rate",
            "",
            f"- Loss range: BN / standard = {_fmt(cmp['loss_range_ratio_bn_over_standard'])} "
            f"(smaller with BN: {_fmt(cmp['loss_range_smaller_with_bn'])}; at "
            f"{_fmt(100 * cmp['fraction_of_records_loss_range_smaller_with_bn'], 3)} % of the "
            "recorded steps).",
            f"- Beta-smoothness: BN / standard = {_fmt(cmp['beta_ratio_bn_over_standard'])} "
            f"(smaller with BN: {_fmt(cmp['beta_smaller_with_bn'])}; at "
            f"{_fmt(100 * cmp['fraction_of_records_beta_smaller_with_bn'], 3)} % of the "
            "recorded steps).",
        ]
        if "noisy_loss_range_smaller_than_standard" in cmp:
            lines.append(
                "- Noisy BatchNorm (more distribution shift) against standard: loss range "
                f"smaller: {_fmt(cmp['noisy_loss_range_smaller_than_standard'])}, beta smaller: "
                f"{_fmt(cmp['noisy_beta_smaller_than_standard'])}."
            )
        lines += [
            "",
            f"Acceptance (smaller loss range AND beta with BN at lr = {_fmt(lr)}): **{verdict}**.",
        ]
    lines += [
        "",
        "![Landscape](figures/landscape.png)",
        "",
        "## Internal covariate shift per layer (means over all records)",
        "",
        "||G - G'|| and cos(G, G'), G the layer's gradient, G' the same after the earlier "
        "layers took their SGD step (layer 1 has no earlier layers: G' = G).",
        "",
    ]
    lines.append(
        _md_table(
            ["variant", "layer", "parameters", "||G - G'||", "||G - G'|| / ||G||", "cos(G, G')"],
            [
                [
                    _label(v),
                    str(j + 1),
                    name,
                    r["summary"]["ics_l2_mean"][j],
                    r["summary"]["ics_relative_mean"][j],
                    r["summary"]["ics_cosine_mean"][j],
                ]
                for v, r in runs.items()
                for j, name in enumerate(r["layer_names"])
            ],
        )
    )
    lines += [
        "",
        "![Covariate shift](figures/ics.png)",
        "",
        "![Training](figures/training.png)",
    ]
    if results["lr_table"] and len({r["learning_rate"] for r in results["lr_table"]}) > 1:
        lines += [
            "",
            "## Learning-rate sweep (landscape means)",
            "",
            _md_table(
                [
                    "lr",
                    "variant",
                    "loss range (mean)",
                    "beta (mean)",
                    "lr x beta (mean)",
                    "first-order range (mean)",
                    "final train loss",
                    "test acc.",
                ],
                [
                    [
                        _fmt(r["learning_rate"]),
                        _label(r["variant"]),
                        r["loss_range_mean"],
                        r["beta_mean"],
                        r["lr_times_beta_mean"],
                        r["first_order_range_mean"],
                        r["final_train_loss"],
                        r["test_accuracy"],
                    ]
                    for r in sorted(
                        results["lr_table"], key=lambda r: (r["learning_rate"], r["variant"])
                    )
                ],
            ),
            "",
        ]
        for row in results["lr_comparisons"]:
            c = row["comparison"]
            if c is None:
                continue
            lines.append(
                f"- lr = {_fmt(row['learning_rate'])}: loss range BN / standard = "
                f"{_fmt(c['loss_range_ratio_bn_over_standard'])}, beta BN / standard = "
                f"{_fmt(c['beta_ratio_bn_over_standard'])}."
            )
        lines += [
            "",
            "Where lr x beta is small the loss along the step is nearly linear and its range "
            "is about the first-order range (hi - lo) lr ||g||^2, which measures the gradient "
            "norm rather than the smoothness; beta-smoothness compares smoothness at every "
            "learning rate.",
            "",
            "![Learning-rate sweep](figures/lr_sweep.png)",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _figure_names(config: SanturkarConfig) -> list[str]:
    names = ["figures/landscape.png", "figures/ics.png", "figures/training.png"]
    if config.sweep_learning_rates:
        names.append("figures/lr_sweep.png")
    return names


def _lr_row(run: Mapping[str, Any]) -> dict[str, Any]:
    s = run["summary"]
    losses = np.asarray(run["train_losses"], np.float64)
    return {
        "learning_rate": run["learning_rate"],
        "variant": run["variant"],
        "loss_range_mean": s["loss_range_mean"],
        "beta_mean": s["beta_mean"],
        "lr_times_beta_mean": s["lr_times_beta_mean"],
        "first_order_range_mean": s["first_order_range_mean"],
        "final_train_loss": float(losses[-max(1, losses.size // 20) :].mean()),
        "test_accuracy": run["test_accuracy"],
    }


def run_santurkar_study(
    config: SanturkarConfig, out_dir: Path, progress: bool = True, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run the Santurkar landscape study and write results.json, figures/*.png, report.md.

    Args:
        config: a :class:`SanturkarConfig` (or a mapping, read with
            :meth:`SanturkarConfig.from_dict`).
        out_dir: output folder, created if missing. Files already there are never
            overwritten: FileExistsError if one of this study's file names is taken.
        progress: show a tqdm progress bar on stderr.
        overwrite: replace this study's own output files (results.json, report.md,
            config.toml, its figures) if present; other files are never touched.

    Returns:
        The results dict (what results.json holds): ``experiment``, ``config``,
        ``learning_rate``, ``runs`` (per variant: the records over training, the layer
        names, training losses, accuracies, ``summary``), ``comparison`` (BN against
        standard, with ``acceptance``), ``lr_table`` and ``lr_comparisons`` (the main and
        the sweep learning rates), ``timing``, ``environment`` and ``files``.
    """
    from tqdm.auto import tqdm

    from hessspec.nn.data import load_digits

    if isinstance(config, Mapping):
        config = SanturkarConfig.from_dict(config)
    if not isinstance(config, SanturkarConfig):
        raise TypeError(f"config must be a SanturkarConfig, got {type(config).__name__}.")
    output = StudyOutput(Path(out_dir), overwrite=overwrite)
    figures = _figure_names(config)
    files = ["results.json", "report.md", "config.toml", *figures]
    output.claim(files)

    t_start = time.perf_counter()
    flatten = config.model == "mlp"
    dtype = np.dtype(_dtype(config.dtype))
    sweep = [lr for lr in config.sweep_learning_rates if lr != config.learning_rate]
    total = len(config.variants) * (1 + len(sweep))
    bar = tqdm(total=total, desc="santurkar", disable=not progress, dynamic_ncols=True)
    cache: dict = {}
    try:
        with jax.enable_x64(config.x64):
            env = environment()
            kw = dict(
                preprocessing=config.preprocessing, flatten=flatten, seed=config.seed, dtype=dtype
            )
            train_set = load_digits("train", **kw)
            test_set = load_digits("test", **kw)
            if config.batch_size > train_set.num_examples:
                raise ConfigError(
                    f"config key 'batch_size' = {config.batch_size} exceeds the "
                    f"{train_set.num_examples} training examples."
                )
            runs = {}
            t0 = time.perf_counter()
            for variant in config.variants:
                bar.set_postfix_str(f"{variant} lr={config.learning_rate:g}")
                runs[variant] = _train_variant(
                    config, variant, config.learning_rate, train_set, test_set, True, cache
                )
                bar.update(1)
            t_main = time.perf_counter() - t0
            t0 = time.perf_counter()
            sweep_runs = []
            for lr in sweep:
                by_variant = {}
                for variant in config.variants:
                    bar.set_postfix_str(f"{variant} lr={lr:g}")
                    by_variant[variant] = _train_variant(
                        config, variant, lr, train_set, test_set, False, cache
                    )
                    bar.update(1)
                sweep_runs.append((lr, by_variant))
            t_sweep = time.perf_counter() - t0
    finally:
        bar.close()

    lr_table = [_lr_row(r) for r in runs.values()]
    lr_comparisons = [{"learning_rate": config.learning_rate, "comparison": _comparison(runs)}]
    for lr, by_variant in sweep_runs:
        lr_table += [_lr_row(r) for r in by_variant.values()]
        lr_comparisons.append({"learning_rate": lr, "comparison": _comparison(by_variant)})
    results: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "config": config.to_dict(),
        "learning_rate": config.learning_rate,
        "runs": runs,
        "comparison": _comparison(runs),
        "lr_table": lr_table,
        "lr_comparisons": lr_comparisons,
        "environment": env,
        "timing": {"main_s": t_main, "sweep_s": t_sweep, "total_s": 0.0},
        "files": files,
    }
    results = _jsonable(results)
    output.write_text("config.toml", config.to_toml())
    output.save_figure("figures/landscape.png", plot_landscape(results))
    output.save_figure("figures/ics.png", plot_covariate_shift(results))
    output.save_figure("figures/training.png", plot_training(results))
    if config.sweep_learning_rates:
        output.save_figure("figures/lr_sweep.png", plot_lr_sweep(results))
    results["timing"]["total_s"] = time.perf_counter() - t_start
    output.write_text("report.md", _report(results, config))
    output.write_json("results.json", results)
    return results
