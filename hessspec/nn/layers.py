"""Building blocks of the models: activations, the fan-in initializer, BatchNorm layers.

- :func:`activation_fn`, :func:`fan_in_normal` (He / LeCun initialization compiled once per
  size bucket), :func:`dense` and :func:`conv` (the layer constructors every model uses);
- :class:`BatchNorm`: ``nnx.BatchNorm`` with the exact two-pass variance, statistics in the
  parameter dtype, and optional recording of its input statistics
  (:func:`record_input_stats`, for :func:`hessspec.nn.objective.population_statistics`);
- :class:`NoisyBatchNorm`: BatchNorm followed by time-varying noise (Santurkar et al. 2018);
- :class:`NormSpec`: which norm follows a hidden layer (none, BN, noisy BN) and its options,
  as the models take them (``bn_momentum=``, ``noise_shift=``, ...).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "NORM_OPTIONS",
    "BatchNorm",
    "Identity",
    "NoisyBatchNorm",
    "NormSpec",
    "activation_fn",
    "conv",
    "dense",
    "fan_in_normal",
    "kernel_init",
    "record_input_stats",
]

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def activation_fn(name: str):
    """The elementwise nonlinearity called ``name``: ``"relu"``, ``"tanh"``, ``"gelu"``,
    ``"softplus"``, ``"sigmoid"`` or ``"identity"``."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}."
        ) from None


_MIN_BUCKET = 4096


@functools.partial(jax.jit, static_argnums=(1,))
def _standard_normal(key: jax.Array, size: int) -> jax.Array:
    return jax.random.normal(key, (size,), jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _scaled_head(flat: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    return flat[: math.prod(shape)].reshape(shape).astype(dtype) * jnp.asarray(std, dtype)


def fan_in_normal(gain: float = 1.0):
    """Initializer drawing :math:`W \\sim \\mathcal N(0, \\text{gain} / \\text{fan\\_in})` i.i.d.

    ``fan_in = prod(shape[:-1])`` (inputs of a dense kernel ``(D_in, D_out)``; receptive
    field times input channels of a conv kernel ``(kh, kw, C_in, C_out)``). ``gain = 2``
    is He initialization (ReLU), ``gain = 1`` LeCun.

    The draws are the first ``prod(shape)`` entries of a float32 standard normal vector
    whose length is rounded up to a power of two (at least 4096), cast to ``dtype`` and
    scaled. So the random-number program is compiled once per size bucket rather than
    once per parameter shape (XLA compilation of a random kernel costs about a second on
    CPU), a given key gives the same weights in float32 and float64 models (up to the
    final rounding), and the values are identical eagerly and under ``jit``.

    Returns:
        ``init(key, shape, dtype) -> array``, an ``nnx``/``jax.nn`` initializer.
    """

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(s) for s in shape)
        fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
        size = max(math.prod(shape), 1)
        bucket = max(1 << (size - 1).bit_length(), _MIN_BUCKET)
        flat = _standard_normal(key, bucket)
        return _scaled_head(flat, shape, math.sqrt(gain / fan_in), jnp.dtype(dtype))

    return init


def kernel_init(activation: str):
    """He (fan-in, variance 2/fan_in) for ReLU-like units, LeCun (1/fan_in) otherwise."""
    if activation in ("relu", "gelu", "softplus"):
        return fan_in_normal(2.0)
    return fan_in_normal(1.0)


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` over the last axis with exact variance and momentum 0.9 by default.

    For an input ``x`` of shape ``(N, ..., F)`` in train mode (``use_running_average``
    False) the output is :math:`\\gamma (x - \\mu_B)/\\sqrt{\\sigma_B^2 + \\epsilon} + \\beta`
    with :math:`\\mu_B, \\sigma_B^2` of shape ``(F,)`` the mean and biased variance over all
    axes but the last (two-pass: :math:`\\sigma_B^2 = \\mathbb E[(x-\\mu_B)^2]`), and the
    running averages are updated as :math:`m \\leftarrow \\rho m + (1-\\rho)\\mu_B`. In eval
    mode the running averages replace :math:`\\mu_B, \\sigma_B^2`. The running averages are
    kept in the parameter dtype (at least float32); ``nnx.BatchNorm`` itself always uses
    float32 for them.

    Setting the attribute ``record_input_stats = True`` makes each call also ``sow`` the
    pair :math:`(\\mu_B, \\sigma_B^2)` of its input as an ``nnx.Intermediate`` named
    ``"input_stats"`` (used by :func:`hessspec.nn.objective.population_statistics`).

    Args:
        num_features: ``F``.
        momentum: :math:`\\rho` of the running averages.
        epsilon: :math:`\\epsilon`.
        use_fast_variance: flax's one-pass variance (off by default).
        rngs: ``nnx.Rngs``.
        dtype: dtype of the computation and of the parameters/statistics.
        **kwargs: passed to ``nnx.BatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_fast_variance: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        **kwargs,
    ):
        kwargs.setdefault("param_dtype", dtype)
        super().__init__(
            num_features,
            momentum=momentum,
            epsilon=epsilon,
            use_fast_variance=use_fast_variance,
            dtype=dtype,
            rngs=rngs,
            **kwargs,
        )
        # nnx.BatchNorm keeps its statistics in float32 whatever param_dtype is: keep them
        # in (at least float32 and) the parameter dtype, so float64 models are exact.
        stat_dtype = jnp.promote_types(kwargs["param_dtype"], jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stat_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stat_dtype))
        self.record_input_stats = False

    def __call__(self, x, use_running_average=None, *, mask=None):
        if getattr(self, "record_input_stats", False):
            record_input_stats(self, x, mask)
        return super().__call__(x, use_running_average, mask=mask)


def record_input_stats(bn: nnx.BatchNorm, x: jax.Array, mask=None) -> None:
    """Sow the exact mean and biased variance of ``x`` over the reduction axes of ``bn``.

    Stored as ``nnx.Intermediate`` ``"input_stats"`` on ``bn``: a tuple of ``(mean, var)``
    pairs, each of shape ``(F,)``, one per call, computed in at least float32 (float64 for
    float64 inputs).
    """
    if mask is not None:
        raise ValueError("recording BatchNorm input statistics does not support a mask.")
    feature_axes = {a % x.ndim for a in np.atleast_1d(bn.axis)}
    axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    xd = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
    mean = xd.mean(axes)
    var = jnp.square(xd - jnp.expand_dims(mean, axes)).mean(axes)
    bn.sow(nnx.Intermediate, "input_stats", (mean, var))


class NoisyBatchNorm(nnx.Module):
    """BatchNorm followed by time-varying noise with non-zero mean and non-unit scale.

    The "noisy BatchNorm" of Santurkar et al. 2018 (How does batch normalization help
    optimization?): the BN output is perturbed so that the activation distribution shifts
    at every step, re-introducing internal covariate shift after BN. At every call in train
    mode, for each feature ``j`` (``F`` features) fresh draws

    .. math:: \\text{shift}_j \\sim U(-n_m, n_m), \\qquad \\text{scale}_j \\sim U(1, n_s)

    give :math:`y_{\\cdot j} = \\text{scale}_j \\, \\mathrm{BN}(x)_{\\cdot j} + \\text{shift}_j`:
    with BN's own :math:`\\gamma = 1, \\beta = 0` the batch mean of feature ``j`` becomes
    :math:`\\text{shift}_j` and its standard deviation about :math:`\\text{scale}_j`
    (exactly :math:`\\text{scale}_j \\sqrt{\\sigma^2_B/(\\sigma^2_B + \\epsilon)}`). With
    ``per_example=True`` the draws are made independently for every element of ``x``
    (every example and position) instead of once per feature.

    No noise (the output is exactly the inner BN's) when ``deterministic`` is True (set by
    ``model.eval()``) or ``noise`` is False. Randomness comes from the ``rng_collection``
    stream of the ``rngs`` given at construction (``"noise"``, falling back to
    ``"default"``), advanced at each noisy call.

    Args:
        num_features: ``F``.
        noise_shift: :math:`n_m \\ge 0`.
        noise_scale: :math:`n_s \\ge 1`.
        per_example: draw noise per element instead of per feature.
        momentum, epsilon: of the inner :class:`BatchNorm`.
        rngs: ``nnx.Rngs``.
        dtype: dtype of computation and parameters.
        rng_collection: name of the RNG stream for the noise.
    """

    def __init__(
        self,
        num_features: int,
        *,
        noise_shift: float = 0.5,
        noise_scale: float = 2.0,
        per_example: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        rng_collection: str = "noise",
    ):
        if noise_shift < 0:
            raise ValueError(f"noise_shift must be >= 0, got {noise_shift}.")
        if noise_scale < 1:
            raise ValueError(f"noise_scale must be >= 1, got {noise_scale}.")
        self.bn = BatchNorm(
            num_features, momentum=momentum, epsilon=epsilon, rngs=rngs, dtype=dtype
        )
        self.noise_shift = float(noise_shift)
        self.noise_scale = float(noise_scale)
        self.per_example = bool(per_example)
        self.noise = True
        self.deterministic = False
        self.rngs = rngs[rng_collection].fork()

    def __call__(self, x):
        y = self.bn(x)
        if self.deterministic or not self.noise:
            return y
        shape = y.shape if self.per_example else y.shape[-1:]
        k_shift, k_scale = jax.random.split(self.rngs())
        shift = jax.random.uniform(
            k_shift, shape, y.dtype, minval=-self.noise_shift, maxval=self.noise_shift
        )
        scale = jax.random.uniform(k_scale, shape, y.dtype, minval=1.0, maxval=self.noise_scale)
        return y * scale + shift


class Identity(nnx.Module):
    """The identity map (the "norm" of a model without BatchNorm)."""

    def __call__(self, x):
        return x


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, bias: bool = True, init=None):
    """``nnx.Linear(d_in, d_out)`` in ``dtype``, kernel drawn by ``init`` (default
    :func:`fan_in_normal` with gain 1: LeCun)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=fan_in_normal(1.0) if init is None else init,
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


def conv(
    c_in: int, c_out: int, *, rngs: nnx.Rngs, dtype, bias: bool, kernel: int = 3, stride: int = 1
):
    """``kernel x kernel`` convolution ``c_in -> c_out`` with SAME padding and He
    initialization (:func:`fan_in_normal` with gain 2), in ``dtype``."""
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=bias,
        kernel_init=fan_in_normal(2.0),
        dtype=dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


#: The norm options every model takes (keyword), with their :class:`NormSpec` fields.
NORM_OPTIONS = {
    "bn_momentum": "momentum",
    "bn_epsilon": "epsilon",
    "noise_shift": "noise_shift",
    "noise_scale": "noise_scale",
    "noise_per_example": "per_example",
}


class NormSpec(NamedTuple):
    """The norm after every hidden linear/convolution layer of a model, and its options.

    Attributes:
        batchnorm: BatchNorm (:class:`BatchNorm`); False: no norm (:class:`Identity`).
        noisy: :class:`NoisyBatchNorm` instead (needs ``batchnorm``).
        momentum: :math:`\\rho` of the running averages (``bn_momentum=`` of the models).
        epsilon: BN's :math:`\\epsilon` (``bn_epsilon=``).
        noise_shift, noise_scale, per_example: of :class:`NoisyBatchNorm` (``noise_shift=``,
            ``noise_scale=``, ``noise_per_example=``).
    """

    batchnorm: bool = False
    noisy: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    noise_shift: float = 0.5
    noise_scale: float = 2.0
    per_example: bool = False

    @classmethod
    def of(cls, model: str, batchnorm: bool, noisy_batchnorm: bool, **options: Any) -> NormSpec:
        """The spec of a model's ``batchnorm``/``noisy_batchnorm`` flags and its norm
        options (the keys of :data:`NORM_OPTIONS`).

        Raises:
            TypeError: an option that is not a norm option.
            ValueError: ``noisy_batchnorm`` without ``batchnorm``.
        """
        unknown = sorted(set(options) - set(NORM_OPTIONS))
        if unknown:
            raise TypeError(
                f"{model}: unknown keyword argument(s) {unknown}; the norm options are "
                f"{sorted(NORM_OPTIONS)}."
            )
        if noisy_batchnorm and not batchnorm:
            raise ValueError(
                f"{model}: noisy_batchnorm=True needs batchnorm=True (the noise follows a BN "
                "layer)."
            )
        fields = {NORM_OPTIONS[k]: v for k, v in options.items()}
        return cls(batchnorm=bool(batchnorm), noisy=bool(noisy_batchnorm), **fields)

    def layer(self, num_features: int, *, rngs: nnx.Rngs, dtype) -> nnx.Module:
        """A fresh norm layer over ``num_features`` features."""
        bn_kw = {"momentum": self.momentum, "epsilon": self.epsilon, "rngs": rngs, "dtype": dtype}
        if self.noisy:
            return NoisyBatchNorm(
                num_features,
                noise_shift=self.noise_shift,
                noise_scale=self.noise_scale,
                per_example=self.per_example,
                **bn_kw,
            )
        if self.batchnorm:
            return BatchNorm(num_features, **bn_kw)
        return Identity()
