"""Small flax.nnx models for Hessian studies: MLP, CNN, ResNet and a linear model.

Every model maps a batch of inputs to outputs (logits) of shape ``(N, num_classes)``:

- :class:`MLP` and :class:`LinearModel` flatten any ``(N, ...)`` input to ``(N, D)``;
- :class:`CNN` and :class:`ResNet` take images ``(N, H, W, C)`` (channels last) or their
  flattened form ``(N, H*W*C)``.

BatchNorm (``batchnorm=True``) sits after every linear/convolution layer except the
output layer, before the nonlinearity; those layers then have no bias (a bias before BN
is cancelled by the mean subtraction: it would only add exactly flat directions to the
Hessian). BN layers are :class:`BatchNorm`, an ``nnx.BatchNorm`` that computes the exact
two-pass variance :math:`\\mathbb E[(x - \\mathbb E x)^2]` (flax's default
:math:`\\mathbb E[x^2] - (\\mathbb E x)^2` loses digits) with momentum 0.9 by default.
``noisy_batchnorm=True`` uses :class:`NoisyBatchNorm` instead (Santurkar et al. 2018).

Modes follow nnx: ``model.train()`` makes BN use batch statistics (and update its running
averages) and switches BN noise on; ``model.eval()`` makes BN use the running averages and
switches noise off. For Hessians use :func:`hessspec.nn.objective.make_objective`, which
fixes the BN mode explicitly and never mutates the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CNN",
    "MLP",
    "BatchNorm",
    "Identity",
    "LinearModel",
    "NoisyBatchNorm",
    "ResNet",
    "batchnorm_layers",
    "count_params",
    "fan_in_normal",
    "make_model",
]

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def _activation(name: str):
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


def _kernel_init(activation: str):
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


def _norm(num_features: int, batchnorm: bool, noisy: bool, rngs, dtype, bn_kwargs, noise_kwargs):
    if noisy:
        return NoisyBatchNorm(num_features, rngs=rngs, dtype=dtype, **bn_kwargs, **noise_kwargs)
    if batchnorm:
        return BatchNorm(num_features, rngs=rngs, dtype=dtype, **bn_kwargs)
    return Identity()


def _check_norm_flags(model: str, batchnorm: bool, noisy_batchnorm: bool) -> None:
    if noisy_batchnorm and not batchnorm:
        raise ValueError(
            f"{model}: noisy_batchnorm=True needs batchnorm=True (the noise follows a BN layer)."
        )


def _check_classes(model: str, num_classes: int) -> int:
    if int(num_classes) < 1:
        raise ValueError(
            f"{model}: num_classes (the number of outputs) must be >= 1, got {num_classes}."
        )
    return int(num_classes)


def _as_vectors(x: jax.Array, in_features: int, model: str) -> jax.Array:
    if x.ndim < 2 or math.prod(x.shape[1:]) != in_features:
        raise ValueError(
            f"{model} expects inputs of shape (N, {in_features}) (or (N, ...) with "
            f"{in_features} values per example), got shape {tuple(x.shape)}."
        )
    return x.reshape(x.shape[0], in_features)


def _as_images(x: jax.Array, in_shape: tuple[int, ...], model: str) -> jax.Array:
    if tuple(x.shape[1:]) == in_shape:
        return x
    if x.ndim == 2 and x.shape[1] == math.prod(in_shape):
        return x.reshape((x.shape[0], *in_shape))
    raise ValueError(
        f"{model} expects images of shape (N, {', '.join(map(str, in_shape))}) or their "
        f"flattened form (N, {math.prod(in_shape)}), got shape {tuple(x.shape)}."
    )


def _check_in_shape(model: str, in_shape) -> tuple[int, int, int]:
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(
            f"{model} expects image inputs of shape (H, W, C), got input shape {in_shape}; "
            "load images without flatten=True, or use the 'mlp' model for vectors."
        )
    return in_shape


class MLP(nnx.Module):
    """Fully connected network ``D -> hidden[0] -> ... -> hidden[-1] -> K``.

    Hidden layer ``l``: :math:`h_l = \\phi(\\mathrm{norm}(W_l h_{l-1} + b_l))` (no
    :math:`b_l` with BN; norm the identity without BN); output :math:`W_o h_L + b_o`.

    Args:
        in_features: ``D``; inputs ``(N, D)`` or anything reshaping to it.
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: ``K``, the output width.
        batchnorm: BN after every hidden linear layer, before the nonlinearity.
        noisy_batchnorm: use :class:`NoisyBatchNorm` (needs ``batchnorm=True``).
        activation: ``"relu"``, ``"tanh"``, ``"gelu"``, ``"softplus"``, ``"sigmoid"`` or
            ``"identity"``.
        rngs: ``nnx.Rngs`` for initialization (and the ``"noise"`` stream).
        dtype: parameter and computation dtype.
        bn_momentum, bn_epsilon: BN running-average momentum and epsilon.
        noise_shift, noise_scale, noise_per_example: see :class:`NoisyBatchNorm`.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        num_classes: int = 10,
        batchnorm: bool = False,
        noisy_batchnorm: bool = False,
        activation: str = "relu",
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        noise_shift: float = 0.5,
        noise_scale: float = 2.0,
        noise_per_example: bool = False,
    ):
        _check_norm_flags("MLP", batchnorm, noisy_batchnorm)
        _activation(activation)
        self.in_features = int(in_features)
        self.num_classes = _check_classes("MLP", num_classes)
        self.activation = activation
        bn_kw = {"momentum": bn_momentum, "epsilon": bn_epsilon}
        noise_kw = {
            "noise_shift": noise_shift,
            "noise_scale": noise_scale,
            "per_example": noise_per_example,
        }
        widths = [self.in_features, *[int(h) for h in hidden]]
        init = _kernel_init(activation)
        self.linears = nnx.List(
            [
                nnx.Linear(
                    a,
                    b,
                    use_bias=not batchnorm,
                    kernel_init=init,
                    dtype=dtype,
                    param_dtype=dtype,
                    rngs=rngs,
                )
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.norms = nnx.List(
            [_norm(b, batchnorm, noisy_batchnorm, rngs, dtype, bn_kw, noise_kw) for b in widths[1:]]
        )
        self.head = nnx.Linear(
            widths[-1],
            self.num_classes,
            kernel_init=fan_in_normal(1.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        """Logits ``(N, K)`` for inputs ``(N, D)`` (or ``(N, ...)`` with ``D`` values each)."""
        act = _activation(self.activation)
        h = _as_vectors(x, self.in_features, "MLP")
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = act(norm(linear(h)))
        return self.head(h)


class CNN(nnx.Module):
    """Small convolutional network for ``(H, W, C)`` images.

    Stage ``l`` (one per entry of ``channels``): 3x3 convolution (SAME padding, stride 1),
    norm, ReLU, then 2x2 average pooling with stride 2 while both spatial sizes are at
    least 2 (8x8 inputs with two stages end at 2x2). Then flatten and a linear layer to
    ``K`` outputs.

    Args:
        in_shape: ``(H, W, C)``.
        channels: output channels of each stage.
        num_classes: ``K``.
        batchnorm: BN after every convolution, before ReLU.
        noisy_batchnorm: use :class:`NoisyBatchNorm` (needs ``batchnorm=True``).
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
        bn_momentum, bn_epsilon, noise_shift, noise_scale, noise_per_example: as in
            :class:`MLP`.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (8, 8, 1),
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        batchnorm: bool = False,
        noisy_batchnorm: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        noise_shift: float = 0.5,
        noise_scale: float = 2.0,
        noise_per_example: bool = False,
    ):
        _check_norm_flags("CNN", batchnorm, noisy_batchnorm)
        self.in_shape = _check_in_shape("CNN", in_shape)
        self.num_classes = _check_classes("CNN", num_classes)
        bn_kw = {"momentum": bn_momentum, "epsilon": bn_epsilon}
        noise_kw = {
            "noise_shift": noise_shift,
            "noise_scale": noise_scale,
            "per_example": noise_per_example,
        }
        h, w, c = self.in_shape
        convs, norms, pools = [], [], []
        for out in channels:
            out = int(out)
            convs.append(
                nnx.Conv(
                    c,
                    out,
                    kernel_size=(3, 3),
                    padding="SAME",
                    use_bias=not batchnorm,
                    kernel_init=fan_in_normal(2.0),
                    dtype=dtype,
                    param_dtype=dtype,
                    rngs=rngs,
                )
            )
            norms.append(_norm(out, batchnorm, noisy_batchnorm, rngs, dtype, bn_kw, noise_kw))
            pool = h >= 2 and w >= 2
            pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
            c = out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.pools = tuple(pools)
        self.head = nnx.Linear(
            h * w * c,
            self.num_classes,
            kernel_init=fan_in_normal(1.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        """Logits ``(N, K)`` for images ``(N, H, W, C)`` or vectors ``(N, H*W*C)``."""
        h = _as_images(x, self.in_shape, "CNN")
        for conv, norm, pool in zip(self.convs, self.norms, self.pools, strict=True):
            h = jax.nn.relu(norm(conv(h)))
            if pool:
                h = nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        return self.head(h.reshape(h.shape[0], -1))


class BasicBlock(nnx.Module):
    """Post-activation residual block (He et al. 2016):
    :math:`\\mathrm{relu}(\\mathrm{norm}_2(\\mathrm{conv}_2(\\mathrm{relu}(\\mathrm{norm}_1
    (\\mathrm{conv}_1 x)))) + s(x))`, with :math:`s` the identity, or a 1x1 convolution and
    norm when the stride or the width changes."""

    def __init__(self, c_in, c_out, stride, batchnorm, noisy, *, rngs, dtype, bn_kw, noise_kw):
        def conv(a, b, k, s):
            return nnx.Conv(
                a,
                b,
                kernel_size=(k, k),
                strides=(s, s),
                padding="SAME",
                use_bias=not batchnorm,
                kernel_init=fan_in_normal(2.0),
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )

        self.conv1 = conv(c_in, c_out, 3, stride)
        self.norm1 = _norm(c_out, batchnorm, noisy, rngs, dtype, bn_kw, noise_kw)
        self.conv2 = conv(c_out, c_out, 3, 1)
        self.norm2 = _norm(c_out, batchnorm, noisy, rngs, dtype, bn_kw, noise_kw)
        self.project = stride != 1 or c_in != c_out
        if self.project:
            self.shortcut_conv = conv(c_in, c_out, 1, stride)
            self.shortcut_norm = _norm(c_out, batchnorm, noisy, rngs, dtype, bn_kw, noise_kw)

    def __call__(self, x):
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        s = self.shortcut_norm(self.shortcut_conv(x)) if self.project else x
        return jax.nn.relu(h + s)


class ResNet(nnx.Module):
    """Small post-activation ResNet for 8x8x1 digits or 32x32x3 CIFAR images.

    Stem: 3x3 convolution to ``widths[0]``, norm, ReLU. Then one stage per width of
    ``blocks_per_stage`` :class:`BasicBlock` s; the first block of every stage after the
    first has stride 2 (halving the spatial size while it is at least 2). Then global
    average pooling and a linear layer to ``K`` outputs. Without BN the norms are the
    identity and the convolutions have biases.

    Args:
        in_shape: ``(H, W, C)``.
        widths: channels of each stage.
        blocks_per_stage: residual blocks per stage.
        num_classes: ``K``.
        batchnorm: BN after every convolution (default True, as usual for ResNets).
        noisy_batchnorm: use :class:`NoisyBatchNorm` (needs ``batchnorm=True``).
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
        bn_momentum, bn_epsilon, noise_shift, noise_scale, noise_per_example: as in
            :class:`MLP`.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (8, 8, 1),
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        num_classes: int = 10,
        batchnorm: bool = True,
        noisy_batchnorm: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        noise_shift: float = 0.5,
        noise_scale: float = 2.0,
        noise_per_example: bool = False,
    ):
        _check_norm_flags("ResNet", batchnorm, noisy_batchnorm)
        self.in_shape = _check_in_shape("ResNet", in_shape)
        self.num_classes = _check_classes("ResNet", num_classes)
        if not widths or blocks_per_stage < 1:
            raise ValueError("ResNet needs at least one width and blocks_per_stage >= 1.")
        bn_kw = {"momentum": bn_momentum, "epsilon": bn_epsilon}
        noise_kw = {
            "noise_shift": noise_shift,
            "noise_scale": noise_scale,
            "per_example": noise_per_example,
        }
        h, w, c = self.in_shape
        widths = [int(v) for v in widths]
        self.stem = nnx.Conv(
            c,
            widths[0],
            kernel_size=(3, 3),
            padding="SAME",
            use_bias=not batchnorm,
            kernel_init=fan_in_normal(2.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.stem_norm = _norm(widths[0], batchnorm, noisy_batchnorm, rngs, dtype, bn_kw, noise_kw)
        blocks = []
        c = widths[0]
        for i, width in enumerate(widths):
            for b in range(int(blocks_per_stage)):
                stride = 2 if (i > 0 and b == 0 and h >= 2 and w >= 2) else 1
                if stride == 2:
                    h, w = (h + 1) // 2, (w + 1) // 2
                blocks.append(
                    BasicBlock(
                        c,
                        width,
                        stride,
                        batchnorm,
                        noisy_batchnorm,
                        rngs=rngs,
                        dtype=dtype,
                        bn_kw=bn_kw,
                        noise_kw=noise_kw,
                    )
                )
                c = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(
            c,
            self.num_classes,
            kernel_init=fan_in_normal(1.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        """Logits ``(N, K)`` for images ``(N, H, W, C)`` or vectors ``(N, H*W*C)``."""
        h = _as_images(x, self.in_shape, "ResNet")
        h = jax.nn.relu(self.stem_norm(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(axis=(1, 2)))


class LinearModel(nnx.Module):
    """Linear model :math:`f(x) = W^\\top x + b`, outputs ``(N, out_features)``.

    With squared loss :math:`\\frac{1}{2N}\\sum_i \\|f(x_i) - y_i\\|^2` its Hessian with
    respect to :math:`W` (one output, no bias) is the input correlation matrix
    :math:`X^\\top X / N` (LeCun, Kanter & Solla 1991).

    Args:
        in_features: ``D``; inputs ``(N, D)`` or anything reshaping to it.
        out_features: number of outputs.
        use_bias: include :math:`b`.
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        use_bias: bool = True,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.in_features = int(in_features)
        self.num_classes = _check_classes("LinearModel", out_features)
        self.linear = nnx.Linear(
            self.in_features,
            self.num_classes,
            use_bias=use_bias,
            kernel_init=fan_in_normal(1.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        """Outputs ``(N, out_features)`` for inputs ``(N, D)``."""
        return self.linear(_as_vectors(x, self.in_features, "LinearModel"))


_MODELS = ("mlp", "cnn", "resnet", "linear")


def make_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    batchnorm: bool,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    **kwargs,
) -> nnx.Module:
    """Build a model by name.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"resnet"`` or ``"linear"``.
        input_shape: shape of ONE input, without the batch axis: ``(D,)`` or ``(H, W, C)``
            (``Dataset.input_shape``). ``"mlp"``/``"linear"`` take any shape (flattened);
            ``"cnn"``/``"resnet"`` need ``(H, W, C)``.
        num_classes: number of outputs; 0 (a regression dataset) gives 1 output.
        batchnorm: BN layers (``"linear"`` has none: True is an error).
        seed: initialization seed (``nnx.Rngs(seed, noise=seed + 1)``).
        dtype: parameter and computation dtype (float64 needs ``jax_enable_x64``).
        **kwargs: passed to the model class (``hidden``, ``channels``, ``widths``,
            ``blocks_per_stage``, ``activation``, ``noisy_batchnorm``, ``bn_momentum``, ...).

    Raises:
        ValueError: unknown name, an input shape the model cannot take, BN for the linear
            model, or float64 without x64.
    """
    key = str(name).lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {_MODELS}.")
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(
            f"model {key!r}: input_shape must be non-empty and positive, got {input_shape}."
        )
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype=float64 needs jax.config.update('jax_enable_x64', True) before building "
            "the model."
        )
    outputs = max(int(num_classes), 1)
    rngs = nnx.Rngs(seed, noise=seed + 1)
    if key in ("cnn", "resnet") and len(input_shape) != 3:
        raise ValueError(
            f"model {key!r} expects image inputs of shape (H, W, C), got input shape "
            f"{input_shape}; load images without flatten=True, or use 'mlp' for vectors."
        )
    if key == "mlp":
        return MLP(
            math.prod(input_shape),
            num_classes=outputs,
            batchnorm=batchnorm,
            rngs=rngs,
            dtype=dtype,
            **kwargs,
        )
    if key == "linear":
        if batchnorm:
            raise ValueError("model 'linear' has no BatchNorm layers: pass batchnorm=False.")
        return LinearModel(math.prod(input_shape), outputs, rngs=rngs, dtype=dtype, **kwargs)
    if key == "cnn":
        return CNN(
            input_shape, num_classes=outputs, batchnorm=batchnorm, rngs=rngs, dtype=dtype, **kwargs
        )
    return ResNet(
        input_shape, num_classes=outputs, batchnorm=batchnorm, rngs=rngs, dtype=dtype, **kwargs
    )


def count_params(model_or_params) -> int:
    """Number of trainable scalars.

    An ``nnx.Module`` counts its ``nnx.Param`` entries; anything else is taken as a pytree
    of parameters (flax.linen ``variables["params"]``, haiku ``params``, an equinox model or
    its ``eqx.partition``-ed arrays, a plain dict or array) and counts the entries of its
    array leaves (non-array leaves such as activation functions count 0).
    """
    if isinstance(model_or_params, nnx.Module):
        leaves = jax.tree.leaves(nnx.state(model_or_params, nnx.Param))
    else:
        leaves = jax.tree.leaves(model_or_params)
    return int(sum(np.size(v) for v in leaves if isinstance(v, jax.Array | np.ndarray)))


def batchnorm_layers(model: nnx.Module) -> list[tuple[tuple, nnx.BatchNorm]]:
    """``(path, layer)`` for every ``nnx.BatchNorm`` in ``model`` (graph order)."""
    return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
