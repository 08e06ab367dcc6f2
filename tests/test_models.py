"""Models: output shapes, input handling, BatchNorm placement and exactness, noisy BN,
the factory and its errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hessspec.nn import models as hm

F64 = jnp.float64
_forward = nnx.jit(lambda model, x: model(x))  # one compilation per model, not per op


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(6, 8, 8, 1))


def test_mlp_shapes_params_and_bn_placement(images):
    m = hm.MLP(64, hidden=(5, 4), num_classes=3, rngs=nnx.Rngs(0), dtype=F64)
    assert m(images).shape == (6, 3) and m(images.reshape(6, -1)).shape == (6, 3)
    assert hm.count_params(m) == (64 * 5 + 5) + (5 * 4 + 4) + (4 * 3 + 3)
    assert hm.batchnorm_layers(m) == []
    bn = hm.MLP(64, hidden=(5, 4), num_classes=3, batchnorm=True, rngs=nnx.Rngs(0), dtype=F64)
    # no bias before BN; BN has scale and bias per feature
    assert hm.count_params(bn) == 64 * 5 + 2 * 5 + 5 * 4 + 2 * 4 + 4 * 3 + 3
    layers = hm.batchnorm_layers(bn)
    assert [p for p, _ in layers] == [("norms", 0), ("norms", 1)]
    for _, layer in layers:
        assert not layer.use_fast_variance and layer.momentum == 0.9
        assert layer.mean[...].dtype == np.float64 and layer.var[...].dtype == np.float64
    with pytest.raises(ValueError, match=r"MLP expects inputs of shape \(N, 64\).*\(6, 10\)"):
        m(np.zeros((6, 10)))


def test_bn_train_uses_batch_stats_exactly_and_updates_running(images):
    m = hm.MLP(64, hidden=(5,), num_classes=2, batchnorm=True, rngs=nnx.Rngs(1), dtype=F64)
    x = images.reshape(6, -1) * 3.0 + 1e4  # large mean: the one-pass variance would lose digits
    w = np.asarray(m.linears[0].kernel[...])
    h = x @ w
    mu, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    m.train()
    out = m(x)
    z = np.maximum((h - mu) / np.sqrt(var + 1e-5), 0.0)
    ref = z @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-12)
    layer = m.norms[0]
    np.testing.assert_allclose(np.asarray(layer.mean[...]), 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(layer.var[...]), 0.9 + 0.1 * var, rtol=1e-12)
    m.eval()  # eval uses the running averages
    z = np.maximum((h - 0.1 * mu) / np.sqrt(0.9 + 0.1 * var + 1e-5), 0.0)
    ref = z @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
    np.testing.assert_allclose(np.asarray(m(x)), ref, rtol=1e-10, atol=1e-12)


def test_cnn_and_resnet_shapes(images):
    cnn = hm.CNN((8, 8, 1), channels=(3, 4), num_classes=5, rngs=nnx.Rngs(0), dtype=F64)
    assert cnn(images).shape == (6, 5) and cnn(images.reshape(6, -1)).shape == (6, 5)
    # conv 3x3x1x3 + b, conv 3x3x3x4 + b, then 2x2x4 -> 5
    assert hm.count_params(cnn) == (9 * 3 + 3) + (9 * 3 * 4 + 4) + (16 * 5 + 5)
    with pytest.raises(ValueError, match=r"CNN expects images of shape \(N, 8, 8, 1\)"):
        cnn(np.zeros((6, 8, 8, 3)))
    cnn_bn = hm.CNN((8, 8, 1), channels=(3, 4), batchnorm=True, rngs=nnx.Rngs(0), dtype=F64)
    assert len(hm.batchnorm_layers(cnn_bn)) == 2
    res = hm.ResNet((8, 8, 1), widths=(3, 4), num_classes=5, rngs=nnx.Rngs(0), dtype=F64)
    assert _forward(res, images).shape == (6, 5)
    # stem + 2 per block + projection shortcut in the 2nd stage
    assert len(hm.batchnorm_layers(res)) == 1 + 2 + 3
    plain = hm.ResNet((8, 8, 1), widths=(3, 4), batchnorm=False, rngs=nnx.Rngs(0), dtype=F64)
    assert hm.batchnorm_layers(plain) == [] and _forward(plain, images).shape == (6, 10)
    cifar = hm.ResNet((32, 32, 3), widths=(2, 2, 2), num_classes=10, rngs=nnx.Rngs(0))
    assert _forward(cifar, jnp.zeros((2, 32, 32, 3))).shape == (2, 10)


def test_linear_model_is_affine():
    lin = hm.LinearModel(4, 2, rngs=nnx.Rngs(0), dtype=F64)
    x = np.random.default_rng(1).normal(size=(3, 4))
    ref = x @ np.asarray(lin.linear.kernel[...]) + np.asarray(lin.linear.bias[...])
    np.testing.assert_allclose(np.asarray(lin(x)), ref, rtol=1e-14)
    assert hm.count_params(hm.LinearModel(4, use_bias=False, rngs=nnx.Rngs(0))) == 4


def test_make_model_factory_and_errors():
    m = hm.make_model("mlp", (8, 8, 1), 10, False, hidden=(3,))
    assert isinstance(m, hm.MLP) and m(jnp.zeros((2, 64))).shape == (2, 10)
    assert m.linears[0].kernel[...].dtype == jnp.float32
    a = hm.make_model("cnn", (8, 8, 1), 4, True, seed=3, channels=(2,), dtype=F64)
    b = hm.make_model("CNN", (8, 8, 1), 4, True, seed=3, channels=(2,), dtype=F64)
    np.testing.assert_array_equal(a.convs[0].kernel[...], b.convs[0].kernel[...])
    lin = hm.make_model("linear", (5,), 0, False)  # regression: one output
    assert lin(jnp.zeros((2, 5))).shape == (2, 1)
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        hm.make_model("vit", (8, 8, 1), 10, False)
    with pytest.raises(ValueError) as e:
        hm.make_model("cnn", (64,), 10, False)
    assert "'cnn'" in str(e.value) and "(H, W, C)" in str(e.value) and "(64,)" in str(e.value)
    with pytest.raises(ValueError, match="'resnet'.*\\(8, 8\\)"):
        hm.make_model("resnet", (8, 8), 10, True)
    with pytest.raises(ValueError, match="no BatchNorm"):
        hm.make_model("linear", (5,), 1, True)
    with pytest.raises(ValueError, match="noisy_batchnorm=True needs batchnorm=True"):
        hm.make_model("mlp", (5,), 2, False, noisy_batchnorm=True)
    with pytest.raises(ValueError, match="unknown activation"):
        hm.make_model("mlp", (5,), 2, False, activation="swish7")
    with pytest.raises(TypeError, match=r"CNN: unknown keyword argument\(s\) \['bn_momentom'\]"):
        hm.make_model("cnn", (8, 8, 1), 2, True, bn_momentom=0.5)
    # the norm options reach every BN layer
    res = hm.make_model("resnet", (8, 8, 1), 2, True, widths=(2, 3), bn_momentum=0.5)
    assert {layer.momentum for _, layer in hm.batchnorm_layers(res)} == {0.5}


def test_noisy_batchnorm_shifts_and_scales_in_train_mode():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(400, 6)))
    noisy = hm.NoisyBatchNorm(6, noise_shift=0.7, noise_scale=2.5, rngs=nnx.Rngs(0), dtype=F64)
    noisy.train()
    y1 = np.asarray(noisy(x))
    y2 = np.asarray(noisy(x))  # fresh noise at every call
    assert not np.allclose(y1, y2)
    inner = np.asarray((x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5))
    for y in (y1, y2):
        mean, std = y.mean(0), y.std(0)
        assert np.all(np.abs(mean) <= 0.7) and np.abs(mean).max() > 0.05
        assert np.all(std >= 1.0 - 1e-5) and np.all(std <= 2.5) and std.max() > 1.05
        # per feature: y = scale * BN(x) + shift exactly
        scale = std / inner.std(0)
        np.testing.assert_allclose(y, inner * scale + mean, rtol=1e-10, atol=1e-10)
    noisy.eval()  # deterministic: exactly the inner BN (running averages)
    np.testing.assert_array_equal(np.asarray(noisy(x)), np.asarray(noisy.bn(x)))
    noisy.train()
    noisy.noise = False
    expected = np.asarray((x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5))
    np.testing.assert_allclose(np.asarray(noisy(x)), expected, rtol=1e-12, atol=1e-12)
    per = hm.NoisyBatchNorm(6, per_example=True, rngs=nnx.Rngs(1), dtype=F64)
    per.train()
    d = np.asarray(per(x)) - np.asarray(per.bn(x))
    assert np.unique(np.round(d[:, 0], 12)).size > 100  # different noise per example
    with pytest.raises(ValueError, match="noise_scale"):
        hm.NoisyBatchNorm(3, noise_scale=0.5, rngs=nnx.Rngs(0))


def test_noisy_models_switch_with_train_eval(images):
    m = hm.make_model("cnn", (8, 8, 1), 3, True, noisy_batchnorm=True, channels=(2,), dtype=F64)
    assert all(isinstance(n, hm.NoisyBatchNorm) for n in m.norms)
    m.train()
    assert not np.allclose(m(images), m(images))
    m.eval()
    np.testing.assert_array_equal(m(images), m(images))
    assert math.isfinite(float(jnp.sum(m(images))))
