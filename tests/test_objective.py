"""Objectives: loss_fn against the models' own forward in every BatchNorm mode, exact
population statistics, gradients that leave the statistics alone, and the errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from hessspec import data as hd
from hessspec import models as hm
from hessspec import objective as ho

F64 = jnp.float64
CONFIGS = {
    "mlp": {"hidden": (6, 5)},
    "cnn": {"channels": (3, 3)},
    "resnet": {"widths": (3, 3)},
    "linear": {},
}


@pytest.fixture(scope="module")
def digits():
    ds = hd.load_digits("train", preprocessing="standardize", dtype=np.float64)
    return hd.subsample(ds, 40, seed=0)


def _perturb(model, seed):
    """Random non-trivial parameters (BN scale/bias included) and running averages."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(v) + 0.3 * rng.standard_normal(np.shape(v)) for v in leaves]
    ho.with_params(model, jax.tree.unflatten(tree, leaves))
    return model


@pytest.fixture(scope="module")
def models(digits):
    out = {}
    for (name, kw), bn in itertools.product(CONFIGS.items(), (False, True)):
        if name == "linear" and bn:
            continue
        m = _perturb(hm.make_model(name, (8, 8, 1), 10, bn, seed=1, dtype=F64, **kw), seed=2)
        if bn:  # running averages unlike the statistics of any batch
            rng = np.random.default_rng(3)

            def draw(path, v, rng=rng):
                if path[-1].key == "var":
                    return rng.uniform(0.5, 2.0, np.shape(v))
                return rng.normal(0.0, 0.5, np.shape(v))

            stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
            nnx.update(m, jax.tree_util.tree_map_with_path(draw, stats))
            nnx.update(m, jax.tree.map(jnp.asarray, nnx.state(m)))
            m.eval()
        out[name, bn] = m
    return out


def _reference_loss(model, x, y, mode, stats):
    """The model's own forward: train() for batch statistics, eval() for stored ones
    (the population statistics written into a copy for mode "population")."""
    m = nnx.clone(model)
    if mode == "population":
        nnx.update(m, stats)
    m.train() if mode == "train" else m.eval()
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()


CASES = [(n, False, None) for n in CONFIGS] + [
    (n, True, mode) for n in ("mlp", "cnn", "resnet") for mode in ho.BN_MODES
]


@pytest.mark.parametrize("name,bn,mode", CASES)
def test_loss_matches_model_forward_and_grad_is_clean(models, digits, name, bn, mode):
    model = models[name, bn]
    stats_before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    kw = {"population_data": digits, "population_batch_size": 16} if mode == "population" else {}
    obj = ho.make_objective(model, "cross_entropy", bn_mode=mode, **kw)
    assert obj.bn_mode == mode and obj.loss == "cross_entropy"
    batch = {"x": digits.x[:12], "y": digits.y[:12]}
    # gradients (one XLA compilation each): every model in train mode, the MLP in every
    # mode and without BN, the linear model
    with_grad = mode == "train" or name in ("mlp", "linear")
    if with_grad:
        value, grad = jax.jit(jax.value_and_grad(obj.loss_fn))(obj.params, batch)
    else:
        value = obj.loss_fn(obj.params, batch)
    assert value.shape == () and value.dtype == jnp.float64
    ref = _reference_loss(model, batch["x"], batch["y"], mode, obj.stats)
    np.testing.assert_allclose(value, ref, rtol=1e-12)
    # loss = output loss of logits
    logits = obj.logits_fn(obj.params, batch["x"])
    np.testing.assert_allclose(obj.output_loss_fn(logits, batch), value, rtol=1e-13)
    if with_grad:  # shaped like params (no statistics in it), finite, non-zero
        assert jax.tree.structure(grad) == jax.tree.structure(obj.params)
        flat, _ = ravel_pytree(grad)
        assert flat.shape == (hm.count_params(model),) and np.all(np.isfinite(flat))
        assert np.linalg.norm(flat) > 0
    # nothing was mutated: the model's statistics and the objective's
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, stats_before)
    if mode != "population":
        jax.tree.map(np.testing.assert_array_equal, obj.stats, stats_before)
    # rebuilding the model from the objective gives the same function
    np.testing.assert_allclose(obj.to_model()(batch["x"]), logits, rtol=1e-13)


def test_modes_differ_and_train_mode_uses_each_batch(models, digits):
    model = models["mlp", True]
    b = {"x": digits.x[:12], "y": digits.y[:12]}
    pop = {"population_data": digits, "population_batch_size": 16}
    values = {}
    for mode in ho.BN_MODES:
        obj = ho.make_objective(model, bn_mode=mode, **(pop if mode == "population" else {}))
        values[mode] = float(obj.loss_fn(obj.params, b))
    assert len({round(v, 10) for v in values.values()}) == 3
    # train mode: the loss of a batch depends on the other examples of the batch
    obj = ho.make_objective(model, bn_mode="train")
    one = obj.logits_fn(obj.params, digits.x[:12])[0]
    other = obj.logits_fn(obj.params, np.concatenate([digits.x[:1], digits.x[20:31]]))[0]
    assert not np.allclose(one, other)
    ev = ho.make_objective(model, bn_mode="eval")
    np.testing.assert_allclose(
        ev.logits_fn(ev.params, digits.x[:12])[0],
        ev.logits_fn(ev.params, np.concatenate([digits.x[:1], digits.x[20:31]]))[0],
        rtol=1e-13,
    )


def _numpy_mlp_population(model, x):
    """Population mean/var of each BN input of a BN MLP, in numpy float64."""
    h = np.asarray(x).reshape(len(x), -1)
    out = []
    for lin, norm in zip(model.linears, model.norms, strict=True):
        a = h @ np.asarray(lin.kernel[...])
        mu, var = a.mean(0), ((a - a.mean(0)) ** 2).mean(0)
        out.append((mu, var))
        z = (a - mu) / np.sqrt(var + norm.epsilon)
        h = np.maximum(np.asarray(norm.scale[...]) * z + np.asarray(norm.bias[...]), 0.0)
    return out


def test_population_statistics_exact_mlp(models, digits):
    model = models["mlp", True]
    expected = _numpy_mlp_population(model, digits.x)
    for batch_size in (None, 16, 7):
        stats = ho.population_statistics(model, digits.x, batch_size=batch_size)
        assert isinstance(stats, nnx.State)
        for i, (mu, var) in enumerate(expected):
            np.testing.assert_allclose(stats["norms"][i]["mean"][...], mu, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(stats["norms"][i]["var"][...], var, rtol=1e-12)
    # the running averages differed: the test is not vacuous
    assert not np.allclose(model.norms[1].mean[...], expected[1][0], atol=1e-3)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_population_statistics_equal_full_batch_statistics(models, digits, name):
    """Population statistics are the batch statistics of the whole set as one batch:
    a train-mode pass with momentum 0 over all examples writes them into the layers."""
    model = models[name, True]
    ref = nnx.clone(model)
    ref.set_attributes(momentum=0.0, raise_if_not_found=False)
    ref.train()
    full_logits = ref(digits.x)
    expected = nnx.to_pure_dict(nnx.state(ref, nnx.BatchStat))
    stats = nnx.to_pure_dict(ho.population_statistics(model, digits, batch_size=16))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13), stats, expected
    )
    # hence the population-mode loss of the whole set equals the train-mode loss of it
    pop = ho.make_objective(
        model, bn_mode="population", population_data=digits.x, population_batch_size=16
    )
    np.testing.assert_allclose(
        pop.logits_fn(pop.params, digits.x), full_logits, rtol=1e-10, atol=1e-12
    )


def test_population_statistics_foreign_batchnorm():
    """A plain nnx.BatchNorm (fast variance, float32 statistics) is handled too."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, dtype=F64, param_dtype=F64, rngs=rngs)
            self.bn = nnx.BatchNorm(4, dtype=F64, param_dtype=F64, rngs=rngs)
            self.out = nnx.Linear(4, 2, dtype=F64, param_dtype=F64, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.lin(x))))

    net = Net(nnx.Rngs(0))
    x = np.random.default_rng(0).normal(5.0, 2.0, size=(30, 3))
    a = x @ np.asarray(net.lin.kernel[...]) + np.asarray(net.lin.bias[...])
    stats = ho.population_statistics(net, x, batch_size=8)
    np.testing.assert_allclose(stats["bn"]["mean"][...], a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["bn"]["var"][...], a.var(0), rtol=1e-12)
    assert type(net.bn) is nnx.BatchNorm and np.all(net.bn.mean[...] == 0)
    obj = ho.make_objective(net, "mse", bn_mode="population", population_data=x)
    y = np.zeros(30, np.int32)
    assert np.isfinite(obj.loss_fn(obj.params, {"x": x, "y": y}))


def test_noise_is_off_inside_objectives(digits):
    model = hm.make_model(
        "mlp", (8, 8, 1), 10, True, noisy_batchnorm=True, hidden=(6, 5), dtype=F64, seed=1
    )
    obj = ho.make_objective(model, bn_mode="train")
    b = {"x": digits.x[:12], "y": digits.y[:12]}
    first, second = obj.loss_fn(obj.params, b), obj.loss_fn(obj.params, b)
    assert first == second
    ref = nnx.clone(model)
    ref.train()
    ref.set_attributes(noise=False, raise_if_not_found=False)
    expected = optax.softmax_cross_entropy_with_integer_labels(ref(b["x"]), b["y"]).mean()
    np.testing.assert_allclose(first, expected, rtol=1e-13)
    model.train()  # the model itself stays noisy
    assert not np.allclose(model(b["x"]), model(b["x"]))


def test_mse_losses_and_linear_regression():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3))
    y = np.array([0, 2, 1, 1, 0], np.int32)
    onehot = np.eye(3)[y]
    np.testing.assert_allclose(
        ho.output_loss(logits, {"y": y}, "mse"), 0.5 * ((logits - onehot) ** 2).sum(1).mean()
    )
    targets = rng.normal(size=(5, 3))
    np.testing.assert_allclose(
        ho.output_loss(logits, {"y": targets}, "mse"), 0.5 * ((logits - targets) ** 2).sum(1).mean()
    )
    with pytest.raises(ValueError, match="integer class labels"):
        ho.output_loss(logits, {"y": targets[:, 0]}, "cross_entropy")
    with pytest.raises(ValueError, match="do not match"):
        ho.output_loss(logits, {"y": targets[:, 0]}, "mse")
    with pytest.raises(ValueError, match="unknown loss"):
        ho.output_loss(logits, {"y": y}, "hinge")

    ds = hd.synthetic_gaussian(30, 4, mean=1.0, seed=0, noise_std=0.1, dtype=np.float64)
    lin = hm.make_model("linear", ds.input_shape, ds.num_classes, False, dtype=F64)
    obj = ho.make_objective(lin, "mse")
    assert obj.bn_mode is None and obj.stats == {}
    w = np.asarray(lin.linear.kernel[...])[:, 0]
    b = float(lin.linear.bias[...][0])
    expected = 0.5 * np.mean((ds.x @ w + b - ds.y) ** 2)
    np.testing.assert_allclose(obj.loss_fn(obj.params, ds.batch), expected, rtol=1e-13)
    # the Hessian of a linear model with squared loss is the (augmented) input correlation
    hess = jax.jit(jax.hessian(obj.loss_fn))(obj.params, ds.batch)
    np.testing.assert_allclose(
        np.asarray(hess["linear"]["kernel"]["linear"]["kernel"]).reshape(4, 4),
        ds.x.T @ ds.x / 30,
        rtol=1e-12,
    )


def test_with_params_round_trip(models, digits):
    model = models["cnn", True]
    obj = ho.make_objective(model, bn_mode="eval")
    doubled = jax.tree.map(lambda v: 2 * v, obj.params)
    copy = ho.with_params(nnx.clone(model), doubled)
    got = nnx.to_pure_dict(nnx.state(copy, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, doubled)
    copy.eval()
    np.testing.assert_allclose(copy(digits.x[:5]), obj.logits_fn(doubled, digits.x[:5]), rtol=1e-13)
    np.testing.assert_allclose(
        obj.to_model(doubled)(digits.x[:5]), obj.logits_fn(doubled, digits.x[:5]), rtol=1e-13
    )
    assert ravel_pytree(obj.params)[0].shape == (hm.count_params(model),)


def test_objective_errors(models, digits):
    bn, plain = models["mlp", True], models["mlp", False]
    with pytest.raises(ValueError, match="choose bn_mode explicitly"):
        ho.make_objective(bn)
    with pytest.raises(ValueError, match="no BatchNorm"):
        ho.make_objective(plain, bn_mode="eval")
    with pytest.raises(ValueError, match="unknown loss"):
        ho.make_objective(plain, loss="hinge")
    with pytest.raises(ValueError, match="unknown bn_mode"):
        ho.make_objective(bn, bn_mode="running")
    with pytest.raises(ValueError, match="needs population_data"):
        ho.make_objective(bn, bn_mode="population")
    with pytest.raises(ValueError, match="only used with bn_mode='population'"):
        ho.make_objective(bn, bn_mode="eval", population_data=digits)
    with pytest.raises(ValueError, match="no BatchNorm"):
        ho.population_statistics(plain, digits.x)
    obj = ho.make_objective(plain)
    with pytest.raises(TypeError, match="batch must be a mapping"):
        obj.loss_fn(obj.params, (digits.x, digits.y))
    with pytest.raises(ValueError, match="integer class labels"):
        obj.loss_fn(obj.params, {"x": digits.x, "y": digits.y.astype(np.float64)})
