"""Santurkar et al.'s landscape metrics and internal covariate shift against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from reference import matrix_with_spectrum

import hessspec as hs
from hessspec.analysis import landscape

# ------------------------------------------------------------------ along the gradient


def _quadratic_loss(params, a):
    """0.5 x^T A x with x the flattened params pytree; the batch is A."""
    x, _ = ravel_pytree(params)
    return 0.5 * x @ a @ x


@pytest.fixture
def quadratic(rng):
    eigenvalues = np.concatenate([[-0.7, 0.0], np.linspace(0.3, 9.0, 9)])  # indefinite
    a, _, _ = matrix_with_spectrum(eigenvalues, seed=3)
    x = rng.standard_normal(a.shape[0])
    params = {"w": jnp.asarray(x[:6].reshape(2, 3)), "b": jnp.asarray(x[6:])}
    flat, _ = ravel_pytree(params)
    return params, np.asarray(flat), a


def test_quadratic_metrics_equal_closed_forms(quadratic):
    params, x, a = quadratic
    lr, lo, hi, num = 0.07, 0.5, 4.0, 8
    m = hs.landscape_along_gradient(
        _quadratic_loss, params, jnp.asarray(a), lr, step_range=(lo, hi), num_steps=num
    )
    g = a @ x
    ag = a @ g
    s = lr * np.linspace(lo, hi, num)
    np.testing.assert_allclose(m.step_sizes, s, rtol=1e-15)
    expected_losses = np.array([0.5 * (x - si * g) @ a @ (x - si * g) for si in s])
    np.testing.assert_allclose(m.losses, expected_losses, rtol=1e-12)
    # L(x - s g) = L(x) - s g^T g + 0.5 s^2 g^T A g.
    closed = 0.5 * x @ a @ x - s * (g @ g) + 0.5 * s**2 * (g @ ag)
    np.testing.assert_allclose(m.loss_range, closed.max() - closed.min(), rtol=1e-12)
    np.testing.assert_allclose(m.gradient_predictiveness, s * np.linalg.norm(ag), rtol=1e-12)
    np.testing.assert_allclose(
        m.beta_smoothness, np.linalg.norm(ag) / np.linalg.norm(g), rtol=1e-12
    )
    np.testing.assert_allclose(m.grad_norm, np.linalg.norm(g), rtol=1e-14)
    np.testing.assert_allclose(m.loss, 0.5 * x @ a @ x, rtol=1e-14)
    assert m.losses.shape == m.gradient_predictiveness.shape == (num,)


def test_compiled_once_per_loss_fn(quadratic):
    params, _, a = quadratic
    batch = jnp.asarray(a)
    hs.landscape_along_gradient(_quadratic_loss, params, batch, 0.1)
    before = landscape._along_gradient._cache_size()
    hs.landscape_along_gradient(_quadratic_loss, params, 2.0 * batch, 0.3, step_range=(1.0, 2.0))
    assert landscape._along_gradient._cache_size() == before


def test_float32_params_keep_their_dtype(quadratic):
    params, _, a = quadratic
    params32 = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), params)
    m = hs.landscape_along_gradient(_quadratic_loss, params32, jnp.asarray(a, jnp.float32), 0.1)
    assert m.losses.dtype == np.float32 and m.step_sizes.dtype == np.float32
    ref = hs.landscape_along_gradient(_quadratic_loss, params, jnp.asarray(a), 0.1)
    np.testing.assert_allclose(m.beta_smoothness, ref.beta_smoothness, rtol=1e-4)


def test_along_gradient_errors(quadratic):
    params, _, a = quadratic
    batch = jnp.asarray(a)
    with pytest.raises(ValueError, match="scalar"):
        hs.landscape_along_gradient(lambda p, b: b @ ravel_pytree(p)[0], params, batch, 0.1)
    for lr in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            hs.landscape_along_gradient(_quadratic_loss, params, batch, lr)
    for bad in ((0.0, 1.0), (2.0, 1.0), (-1.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="step_range"):
            hs.landscape_along_gradient(_quadratic_loss, params, batch, 0.1, step_range=bad)
    with pytest.raises(ValueError, match="step_range"):
        hs.landscape_along_gradient(_quadratic_loss, params, batch, 0.1, step_range=(1.0,))
    with pytest.raises(ValueError, match="num_steps"):
        hs.landscape_along_gradient(_quadratic_loss, params, batch, 0.1, num_steps=0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="gradient is zero.*undefined"):
        hs.landscape_along_gradient(_quadratic_loss, zeros, batch, 0.1)


# ------------------------------------------------------------------ internal covariate shift


def _mlp_params(key, sizes=(4, 5, 3, 2)):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params[f"layer{i}"] = {
            "w": jax.random.normal(k1, (n_in, n_out)) / np.sqrt(n_in),
            "b": 0.1 * jax.random.normal(k2, (n_out,)),
        }
    return params


def _mlp_loss(params, batch):
    h = batch["x"]
    names = sorted(params)
    for name in names[:-1]:
        h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
    out = h @ params[names[-1]]["w"] + params[names[-1]]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))


@pytest.fixture
def mlp(key):
    params = _mlp_params(key)
    kx, ky = jax.random.split(jax.random.fold_in(key, 99))
    batch = {"x": jax.random.normal(kx, (16, 4)), "y": jax.random.normal(ky, (16, 2))}
    return params, batch


def _direct_ics(loss_fn, params, batch, lr, order):
    """Santurkar's definition, recomputed layer by layer on the dict (no flattening)."""
    grads = jax.grad(loss_fn)(params, batch)
    l2, cos = [], []
    for i, name in enumerate(order):
        shifted = dict(params)
        for earlier in order[:i]:
            shifted[earlier] = jax.tree_util.tree_map(
                lambda p, g: p - lr * g, params[earlier], grads[earlier]
            )
        g_i = ravel_pytree(grads[name])[0]
        g_shift = ravel_pytree(jax.grad(loss_fn)(shifted, batch)[name])[0]
        l2.append(float(jnp.linalg.norm(g_i - g_shift)))
        cos.append(float(g_i @ g_shift / (jnp.linalg.norm(g_i) * jnp.linalg.norm(g_shift))))
    return np.array(l2), np.array(cos)


def test_ics_matches_direct_recomputation(mlp):
    params, batch = mlp
    lr = 0.5
    order = ["layer0", "layer1", "layer2"]
    assert hs.default_layer_order(params) == order
    ics = hs.internal_covariate_shift(_mlp_loss, params, batch, lr)
    l2, cos = _direct_ics(_mlp_loss, params, batch, lr, order)
    assert ics.layer_names == tuple(order)
    np.testing.assert_allclose(ics.l2, l2, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ics.cosine, cos, rtol=1e-12)
    assert ics.l2[0] == 0.0 and ics.cosine[0] == pytest.approx(1.0, abs=1e-14)
    assert np.all(ics.l2[1:] > 1e-3)  # the earlier layers' steps really shift the gradient
    grads = jax.grad(_mlp_loss)(params, batch)
    np.testing.assert_allclose(
        ics.grad_norm, [np.linalg.norm(ravel_pytree(grads[n])[0]) for n in order], rtol=1e-12
    )
    np.testing.assert_allclose(
        ics.l2**2,
        ics.grad_norm**2
        + ics.shifted_grad_norm**2
        - 2 * ics.cosine * ics.grad_norm * ics.shifted_grad_norm,
        rtol=1e-8,
        atol=1e-14,
    )


def test_ics_reverse_order_is_a_different_measurement(mlp):
    params, batch = mlp
    order = ["layer2", "layer1", "layer0"]
    ics = hs.internal_covariate_shift(_mlp_loss, params, batch, 0.5, order)
    l2, cos = _direct_ics(_mlp_loss, params, batch, 0.5, order)
    np.testing.assert_allclose(ics.l2, l2, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ics.cosine, cos, rtol=1e-12)


def test_ics_separable_loss_has_no_shift(mlp):
    params, _ = mlp

    def separable(p, batch):
        return sum(jnp.sum(jnp.sin(leaf * batch)) for leaf in jax.tree_util.tree_leaves(p))

    ics = hs.internal_covariate_shift(separable, params, jnp.asarray(1.3), 0.7)
    np.testing.assert_allclose(ics.l2, 0.0, atol=1e-14)
    np.testing.assert_allclose(ics.cosine, 1.0, rtol=1e-14)


def test_ics_groups_paths_and_unlisted_params(mlp):
    params, batch = mlp
    # A group is one layer: layers 0 and 1 move together, so layer 2 sees both steps.
    grouped = hs.internal_covariate_shift(
        _mlp_loss, params, batch, 0.5, [["layer0", "layer1"], "layer2"]
    )
    plain = hs.internal_covariate_shift(_mlp_loss, params, batch, 0.5)
    assert grouped.layer_names == ("layer0+layer1", "layer2")
    np.testing.assert_allclose(grouped.l2[1], plain.l2[2], rtol=1e-12)
    # Key paths: the weights of layer0 alone are one layer; unlisted params never move.
    paths = hs.internal_covariate_shift(_mlp_loss, params, batch, 0.5, [("layer0", "w"), "layer2"])
    assert paths.layer_names == ("layer0/w", "layer2")
    p = dict(params)
    grads = jax.grad(_mlp_loss)(params, batch)
    p["layer0"] = {
        "w": params["layer0"]["w"] - 0.5 * grads["layer0"]["w"],
        "b": params["layer0"]["b"],
    }
    g_shift = ravel_pytree(jax.grad(_mlp_loss)(p, batch)["layer2"])[0]
    expected = jnp.linalg.norm(ravel_pytree(grads["layer2"])[0] - g_shift)
    np.testing.assert_allclose(paths.l2[1], expected, rtol=1e-10)


def test_ics_on_nnx_state(key):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jnp.tanh(self.layers[0](x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))

    def loss(state, batch):
        return jnp.mean((nnx.merge(graphdef, state)(batch["x"]) - batch["y"]) ** 2)

    batch = {"x": jax.random.normal(key, (8, 3)), "y": jnp.ones((8, 2))}
    order = hs.default_layer_order(state)
    assert order == [("layers", 0), ("layers", 1)]
    ics = hs.internal_covariate_shift(loss, state, batch, 0.3)
    assert ics.layer_names == ("layers/0", "layers/1")
    assert ics.l2[0] == 0.0 and ics.l2[1] > 0.0

    # Same numbers as the plain-dict network with the same weights.
    plain = {
        f"layer{i}": {
            "w": state["layers"][i]["kernel"][...],
            "b": state["layers"][i]["bias"][...],
        }
        for i in range(2)
    }

    def plain_loss(p, batch):
        h = jnp.tanh(batch["x"] @ p["layer0"]["w"] + p["layer0"]["b"])
        return jnp.mean((h @ p["layer1"]["w"] + p["layer1"]["b"] - batch["y"]) ** 2)

    ref = hs.internal_covariate_shift(plain_loss, plain, batch, 0.3)
    np.testing.assert_allclose(ics.l2, ref.l2, rtol=1e-10, atol=1e-15)


def test_default_layer_order():
    leaf = jnp.zeros(2)
    assert hs.default_layer_order({f"layer{i}": {"w": leaf} for i in (10, 2, 9)}) == [
        "layer2",
        "layer9",
        "layer10",
    ]
    # A convolution and its BatchNorm share an index: one layer.
    params = {"conv1": {"w": leaf}, "bn1": {"s": leaf}, "conv2": {"w": leaf}, "fc3": {"w": leaf}}
    assert hs.default_layer_order(params) == [["bn1", "conv1"], "conv2", "fc3"]
    assert hs.default_layer_order([{"w": leaf}, {"w": leaf}]) == [0, 1]
    assert hs.default_layer_order({"blocks": [{"w": leaf}, {"w": leaf}]}) == [
        ("blocks", 0),
        ("blocks", 1),
    ]
    assert hs.default_layer_order({"layer0": [leaf, leaf], "layer1": [leaf]}) == [
        "layer0",
        "layer1",
    ]
    with pytest.raises(ValueError, match="explicitly"):
        hs.default_layer_order({"conv1": {"w": leaf}, "head": {"w": leaf}})
    with pytest.raises(TypeError, match="explicitly"):
        hs.default_layer_order(leaf)


def test_ics_errors(mlp):
    params, batch = mlp
    with pytest.raises(ValueError, match="empty"):
        hs.internal_covariate_shift(_mlp_loss, params, batch, 0.1, [])
    with pytest.raises(ValueError, match="match no parameter"):
        hs.internal_covariate_shift(_mlp_loss, params, batch, 0.1, ["layer0", "nope"])
    with pytest.raises(ValueError, match="overlap"):
        hs.internal_covariate_shift(_mlp_loss, params, batch, 0.1, ["layer0", ("layer0", "w")])
    with pytest.raises(ValueError, match="lr"):
        hs.internal_covariate_shift(_mlp_loss, params, batch, 0.0)
    with pytest.raises(ValueError, match="scalar"):
        hs.internal_covariate_shift(lambda p, b: p["layer0"]["b"], params, batch, 0.1)
