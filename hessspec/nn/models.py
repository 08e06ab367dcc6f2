"""Small flax.nnx models for Hessian studies: MLP, CNN, ResNet and a linear model.

Every model maps a batch of inputs to outputs (logits) of shape ``(N, num_classes)``:

- :class:`MLP` and :class:`LinearModel` flatten any ``(N, ...)`` input to ``(N, D)``;
- :class:`CNN` and :class:`ResNet` take images ``(N, H, W, C)`` (channels last) or their
  flattened form ``(N, H*W*C)``.

BatchNorm (``batchnorm=True``) sits after every linear/convolution layer except the
output layer, before the nonlinearity; those layers then have no bias (a bias before BN
is cancelled by the mean subtraction: it would only add exactly flat directions to the
Hessian). BN layers are :class:`~hessspec.nn.layers.BatchNorm`, an ``nnx.BatchNorm`` that
computes the exact two-pass variance :math:`\\mathbb E[(x - \\mathbb E x)^2]` (flax's
default :math:`\\mathbb E[x^2] - (\\mathbb E x)^2` loses digits) with momentum 0.9 by
default. ``noisy_batchnorm=True`` uses :class:`~hessspec.nn.layers.NoisyBatchNorm` instead
(Santurkar et al. 2018). The norm options every model with BN takes, as keywords:
``bn_momentum``, ``bn_epsilon``, ``noise_shift``, ``noise_scale``, ``noise_per_example``
(:class:`~hessspec.nn.layers.NormSpec`). The layers themselves live in
:mod:`hessspec.nn.layers` (and are importable from here too).

Modes follow nnx: ``model.train()`` makes BN use batch statistics (and update its running
averages) and switches BN noise on; ``model.eval()`` makes BN use the running averages and
switches noise off. For Hessians use :func:`hessspec.nn.objective.make_objective`, which
fixes the BN mode explicitly and never mutates the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hessspec.nn.layers import (
    BatchNorm,
    Identity,
    NoisyBatchNorm,
    NormSpec,
    activation_fn,
    conv,
    dense,
    fan_in_normal,
    kernel_init,
    record_input_stats,
)

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
    "private_copy",
    "record_input_stats",
]


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
        **norm_options: ``bn_momentum``, ``bn_epsilon`` (BN running-average momentum and
            epsilon), ``noise_shift``, ``noise_scale``, ``noise_per_example`` (see
            :class:`NoisyBatchNorm`).
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
        **norm_options,
    ):
        norm = NormSpec.of("MLP", batchnorm, noisy_batchnorm, **norm_options)
        activation_fn(activation)
        self.in_features = int(in_features)
        self.num_classes = _check_classes("MLP", num_classes)
        self.activation = activation
        widths = [self.in_features, *[int(h) for h in hidden]]
        init = kernel_init(activation)
        self.linears = nnx.List(
            [
                dense(a, b, bias=not batchnorm, init=init, rngs=rngs, dtype=dtype)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.norms = nnx.List([norm.layer(b, rngs=rngs, dtype=dtype) for b in widths[1:]])
        self.head = dense(widths[-1], self.num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        """Logits ``(N, K)`` for inputs ``(N, D)`` (or ``(N, ...)`` with ``D`` values each)."""
        act = activation_fn(self.activation)
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
        **norm_options: as in :class:`MLP`.
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
        **norm_options,
    ):
        norm = NormSpec.of("CNN", batchnorm, noisy_batchnorm, **norm_options)
        self.in_shape = _check_in_shape("CNN", in_shape)
        self.num_classes = _check_classes("CNN", num_classes)
        h, w, c = self.in_shape
        convs, norms, pools = [], [], []
        for out in channels:
            out = int(out)
            convs.append(conv(c, out, bias=not batchnorm, rngs=rngs, dtype=dtype))
            norms.append(norm.layer(out, rngs=rngs, dtype=dtype))
            pool = h >= 2 and w >= 2
            pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
            c = out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.pools = tuple(pools)
        self.head = dense(h * w * c, self.num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        """Logits ``(N, K)`` for images ``(N, H, W, C)`` or vectors ``(N, H*W*C)``."""
        h = _as_images(x, self.in_shape, "CNN")
        for conv_layer, norm, pool in zip(self.convs, self.norms, self.pools, strict=True):
            h = jax.nn.relu(norm(conv_layer(h)))
            if pool:
                h = nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        return self.head(h.reshape(h.shape[0], -1))


class BasicBlock(nnx.Module):
    """Post-activation residual block (He et al. 2016):
    :math:`\\mathrm{relu}(\\mathrm{norm}_2(\\mathrm{conv}_2(\\mathrm{relu}(\\mathrm{norm}_1
    (\\mathrm{conv}_1 x)))) + s(x))`, with :math:`s` the identity, or a 1x1 convolution and
    norm when the stride or the width changes.

    Args:
        c_in, c_out: input and output channels.
        stride: stride of the first convolution (and of the projection).
        norm: the norm after every convolution (:class:`NormSpec`).
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormSpec, *, rngs, dtype):
        bias = not norm.batchnorm
        self.conv1 = conv(c_in, c_out, stride=stride, bias=bias, rngs=rngs, dtype=dtype)
        self.norm1 = norm.layer(c_out, rngs=rngs, dtype=dtype)
        self.conv2 = conv(c_out, c_out, bias=bias, rngs=rngs, dtype=dtype)
        self.norm2 = norm.layer(c_out, rngs=rngs, dtype=dtype)
        self.project = stride != 1 or c_in != c_out
        if self.project:
            self.shortcut_conv = conv(
                c_in, c_out, kernel=1, stride=stride, bias=bias, rngs=rngs, dtype=dtype
            )
            self.shortcut_norm = norm.layer(c_out, rngs=rngs, dtype=dtype)

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
        **norm_options: as in :class:`MLP`.
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
        **norm_options,
    ):
        norm = NormSpec.of("ResNet", batchnorm, noisy_batchnorm, **norm_options)
        self.in_shape = _check_in_shape("ResNet", in_shape)
        self.num_classes = _check_classes("ResNet", num_classes)
        if not widths or blocks_per_stage < 1:
            raise ValueError("ResNet needs at least one width and blocks_per_stage >= 1.")
        h, w, c = self.in_shape
        widths = [int(v) for v in widths]
        self.stem = conv(c, widths[0], bias=not batchnorm, rngs=rngs, dtype=dtype)
        self.stem_norm = norm.layer(widths[0], rngs=rngs, dtype=dtype)
        blocks = []
        c = widths[0]
        for i, width in enumerate(widths):
            for b in range(int(blocks_per_stage)):
                stride = 2 if (i > 0 and b == 0 and h >= 2 and w >= 2) else 1
                if stride == 2:
                    h, w = (h + 1) // 2, (w + 1) // 2
                blocks.append(BasicBlock(c, width, stride, norm, rngs=rngs, dtype=dtype))
                c = width
        self.blocks = nnx.List(blocks)
        self.head = dense(c, self.num_classes, rngs=rngs, dtype=dtype)

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
        self.linear = dense(
            self.in_features, self.num_classes, bias=use_bias, rngs=rngs, dtype=dtype
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


def private_copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` that shares no array with it, every leaf a jax array (numpy
    leaves would be shared by ``nnx.clone`` and written in place by BatchNorm updates)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))
