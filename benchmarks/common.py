"""Shared pieces of the benchmarks: models sized by parameter count, timing, peak memory.

Run the benchmarks from the repository root (``python benchmarks/<name>.py``); this module is
imported from the scripts' own directory.

Model families on digits (8x8x1 images, 10 classes):

- ``mlp``: :class:`hessspec.nn.models.MLP` with two equal hidden layers of width ``h``
  (``64 h + h^2 + 10 h`` weights plus biases).
- ``cnn``: :class:`WideHeadCNN`, the bundled CNN's convolutional trunk (3x3 convolutions with
  16 and 32 channels, ReLU, 2x2 average pooling, as :class:`hessspec.nn.models.CNN`) followed
  by two dense hidden layers of width ``h`` and the output layer. The parameter count grows
  through the dense head: XLA's CPU convolutions are slow on 8x8 images (a pure-convolution
  CNN with channels (64, 128), 8e4 parameters, takes ~0.7 s per HVP over 1437 digits on 2
  cores), so a 1e6-parameter CNN whose parameters sit in convolutions cannot meet a
  10-minute budget on this hardware. ``h = 0`` gives the bundled CNN exactly (6.1k).
"""

from __future__ import annotations

import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hessspec.nn.models import CNN, MLP

__all__ = [
    "WideHeadCNN",
    "build_model",
    "in_loop_hvp_seconds",
    "median_seconds",
    "peak_rss_bytes",
    "width_for_params",
]


class WideHeadCNN(nnx.Module):
    """The bundled CNN's convolutional trunk, then a dense head with hidden layers.

    Trunk: :class:`hessspec.nn.models.CNN` with ``channels`` (3x3 convolutions, ReLU, 2x2
    average pooling; 8x8 digits end at 2x2x32 features), whose linear "head" maps those
    features to ``hidden[0]``; then ``ReLU -> Dense(hidden[1]) -> ... -> Dense(K)``.

    Args:
        in_shape: ``(H, W, C)``.
        hidden: widths of the dense hidden layers (empty: the bundled CNN).
        num_classes: ``K``.
        channels: convolution channels of the trunk.
        rngs: ``nnx.Rngs``.
        dtype: parameter and computation dtype.
    """

    def __init__(
        self,
        in_shape=(8, 8, 1),
        hidden=(),
        num_classes: int = 10,
        channels=(16, 32),
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        hidden = tuple(int(h) for h in hidden)
        self.num_hidden = len(hidden)
        outputs = hidden[0] if hidden else num_classes
        self.trunk = CNN(in_shape, channels, outputs, rngs=rngs, dtype=dtype)
        if hidden:
            self.head = MLP(hidden[0], hidden[1:], num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = self.trunk(x)
        if not self.num_hidden:
            return h
        return self.head(jax.nn.relu(h))


def _mlp_params(h: int, d: int = 64, k: int = 10) -> int:
    return d * h + h + h * h + h + h * k + k


def _cnn_params(h: int, k: int = 10) -> int:
    trunk = 9 * 16 + 16 + 9 * 16 * 32 + 32  # two conv layers
    feat = 2 * 2 * 32
    if h == 0:
        return trunk + feat * k + k
    return trunk + feat * h + h + h * h + h + h * k + k


def width_for_params(family: str, target: int) -> int:
    """Hidden width ``h`` whose model has the parameter count closest to ``target``."""
    count = _mlp_params if family == "mlp" else _cnn_params
    hi = 1
    while count(hi) < target:
        hi *= 2
    return int(min(range(max(1, hi // 2), hi + 1), key=lambda h: abs(count(h) - target)))


def build_model(family: str, width: int, dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """``mlp`` (:class:`hessspec.nn.models.MLP`, two hidden layers of ``width``) or ``cnn``
    (:class:`WideHeadCNN` with two dense hidden layers of ``width``; 0: the bundled CNN)."""
    rngs = nnx.Rngs(seed)
    if family == "mlp":
        return MLP(64, (width, width), 10, rngs=rngs, dtype=dtype)
    if family == "cnn":
        hidden = (width, width) if width else ()
        return WideHeadCNN((8, 8, 1), hidden, 10, rngs=rngs, dtype=dtype)
    raise ValueError(f"unknown family {family!r}")


def median_seconds(fn, repeats: int, warmup: int = 1, min_sample: float = 0.05) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready).

    Each of the ``repeats`` samples times enough back-to-back calls to last at least
    ``min_sample`` seconds (calibrated on the warm-up), so millisecond calls are not
    dominated by timer and scheduler noise.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = (time.perf_counter() - start) / max(warmup, 1)
    calls = 1
    if first < min_sample:  # the warm-up included compilation: calibrate on a second call
        start = time.perf_counter()
        fn()
        calls = max(1, int(np.ceil(min_sample / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def in_loop_hvp_seconds(op, num: int, repeats: int) -> float:
    """Seconds per HVP when ``num`` of them run in one compiled loop (``v <- H v / ||H v||``):
    the floor a Lanczos step cannot beat (no Python dispatch between products)."""

    @jax.jit
    def chain(v, operand):
        def body(_, v):
            w = op.apply(v, operand)
            return w / jnp.linalg.norm(w)

        return jax.lax.fori_loop(0, num, body, v)

    v = jax.random.normal(jax.random.key(3), (op.dim,), op.dtype)
    return median_seconds(lambda: chain(v, op.operand).block_until_ready(), repeats) / num


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def fmt_params(n: int) -> str:
    """``1.04e6``-style parameter count."""
    e = int(math.floor(math.log10(max(n, 1))))
    return f"{n / 10**e:.2f}e{e}"
