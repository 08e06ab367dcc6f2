"""Objectives: loss_fn against the models' own forward in every BatchNorm mode, exact
population statistics, gradients that leave the statistics alone, and the errors."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import hessspec as hs
from hessspec.nn import data as hd
from hessspec.nn import models as hm
from hessspec.nn import objective as ho

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


# --------------------------------------------------------------------------------------
# Models called with a training flag; inputs cast to the model's dtype; foreign models
# --------------------------------------------------------------------------------------

EPS = 1e-5  # nnx.BatchNorm's default epsilon


class FlagMLP(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, driven by ``train``: batch
    statistics and dropout when True (the usual nnx pattern of call-time flags)."""

    def __init__(self, dtype=F64, seed=0):
        rngs = nnx.Rngs(seed)
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.lin = nnx.Linear(64, 5, **kw)
        self.bn = nnx.BatchNorm(5, **kw)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(5, 10, **kw)

    def __call__(self, x, train: bool):
        h = self.bn(self.lin(x.reshape(x.shape[0], -1)), use_running_average=not train)
        return self.out(self.drop(jax.nn.relu(h), deterministic=not train))


class DeterministicMLP(FlagMLP):
    """The same network with the inverse flag: ``deterministic=True`` is inference."""

    def __call__(self, x, deterministic: bool = False):
        return super().__call__(x, train=not deterministic)


def _flag_model(cls, dtype=F64):
    """A model with non-trivial parameters and running averages unlike any batch's."""
    model = cls(dtype=dtype)
    rng = np.random.default_rng(5)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.update(
        model, jax.tree.map(lambda v: v + 0.3 * rng.standard_normal(v.shape).astype(dtype), params)
    )
    stats = {"mean": rng.normal(0.0, 0.5, 5), "var": rng.uniform(0.5, 2.0, 5)}
    nnx.update(model, {"bn": jax.tree.map(lambda v: jnp.asarray(v, dtype), stats)})
    return model


def _reference_flag_loss(params, batch, mean=None, var=None):
    """The FlagMLP's mean cross-entropy written out in jnp from the parameter dict: BN with
    the given statistics, or (None) the batch's own (biased variance); dropout off."""
    x = batch["x"].reshape(batch["x"].shape[0], -1)
    h = x @ params["lin"]["kernel"] + params["lin"]["bias"]
    if mean is None:
        mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    h = (h - mean) / jnp.sqrt(var + EPS) * params["bn"]["scale"] + params["bn"]["bias"]
    logits = jax.nn.relu(h) @ params["out"]["kernel"] + params["out"]["bias"]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, batch["y"][:, None], axis=1).mean()


@jax.jit
def _loss(loss_fn, params, batch):
    """An objective's loss, compiled (flax models run slowly op by op)."""
    return loss_fn(params, batch)


@pytest.mark.parametrize("mode", ho.BN_MODES)
def test_train_flag_model_hessian_against_dense_reference(digits, mode):
    """A model called as model(x, train=...): loss and Hessian operator (ragged batches)
    against the dense float64 jax.hessian of the loss written out by hand, in every BatchNorm
    mode; dropout stays off. The same network called as model(x, deterministic=...) with
    eval_flag gives the same objective."""
    model = _flag_model(FlagMLP)
    population = digits.x  # 40 examples: their statistics differ from those of the subset
    kw = {"population_data": population, "population_batch_size": 7} if mode == "population" else {}
    obj = ho.make_objective(model, bn_mode=mode, train_flag="train", **kw)
    data = {"x": digits.x[:23], "y": digits.y[:23]}

    p0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if mode == "eval":
        stats = (model.bn.mean[...], model.bn.var[...])
        assert stats[0].dtype == F64
    elif mode == "population":
        h = np.asarray(population).reshape(len(population), -1) @ np.asarray(p0["lin"]["kernel"])
        h = h + np.asarray(p0["lin"]["bias"])
        stats = (h.mean(0), h.var(0))
        np.testing.assert_allclose(obj.stats["bn"]["mean"], stats[0], rtol=1e-12)
        np.testing.assert_allclose(obj.stats["bn"]["var"], stats[1], rtol=1e-12)
    else:
        stats = (None, None)

    value = _loss(obj.loss_fn, obj.params, data)
    assert value == _loss(obj.loss_fn, obj.params, data)  # dropout off: deterministic
    np.testing.assert_allclose(value, _reference_flag_loss(p0, data, *stats), rtol=1e-12)

    # the inverse flag: deterministic = not train
    inverse = ho.make_objective(
        _flag_model(DeterministicMLP), bn_mode=mode, eval_flag="deterministic", **kw
    )
    assert inverse.logits_fn.func.flag_value == (mode != "train")
    np.testing.assert_allclose(_loss(inverse.loss_fn, inverse.params, data), value, rtol=1e-14)

    # the operator over batches of 10, 10, 3 against sum_b (|b|/N) dense Hess L_b
    flat0, unravel = ravel_pytree(p0)
    ref_hessian = jax.jit(jax.hessian(lambda f, b: _reference_flag_loss(unravel(f), b, *stats)))
    dense = sum(
        (len(b["y"]) / 23) * np.asarray(ref_hessian(flat0, b))
        for b in ({k: v[s : s + 10] for k, v in data.items()} for s in (0, 10, 20))
    )
    op = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=10)
    assert op.dim == flat0.size
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-9, atol=1e-12 * np.abs(dense).max())
    assert np.linalg.eigvalsh(dense)[-1] > 0.1  # a non-trivial curvature


def test_train_flag_errors(digits):
    model = _flag_model(FlagMLP)
    with pytest.raises(TypeError, match="argument 'train' besides the inputs 'x'.*train_flag="):
        ho.make_objective(model, bn_mode="train")
    with pytest.raises(TypeError, match="no keyword argument 'training'; its arguments are"):
        ho.make_objective(model, bn_mode="train", train_flag="training")
    with pytest.raises(ValueError, match="not both"):
        ho.make_objective(model, bn_mode="train", train_flag="train", eval_flag="train")
    # a flag with a default may be left out: the model is then called as model(x)
    obj = ho.make_objective(_flag_model(DeterministicMLP), bn_mode="train")
    assert np.isfinite(obj.loss_fn(obj.params, {"x": digits.x[:8], "y": digits.y[:8]}))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float64_data_float32_model_computes_in_float32_without_warning(digits, mode):
    """flax warns (FutureWarning, scatter of float64 into float32) when float64 inputs reach
    a float32 BatchNorm in train mode: the objective casts inputs to the model's dtype."""
    model = _flag_model(FlagMLP, dtype=jnp.float32)
    x64 = np.asarray(digits.x[:16], np.float64)
    batch = {"x": x64, "y": digits.y[:16]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj = ho.make_objective(model, bn_mode=mode, train_flag="train")
        value, grad = jax.jit(jax.value_and_grad(obj.loss_fn))(obj.params, batch)
        logits = jax.jit(obj.logits_fn)(obj.params, x64)
    assert value.dtype == jnp.float32 and logits.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad))
    # the same numbers as float32 inputs
    batch32 = {"x": x64.astype(np.float32), "y": batch["y"]}
    assert jax.jit(obj.loss_fn)(obj.params, batch32) == value
    # and the float64 reference of the float32 parameters agrees to float32 accuracy
    p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), obj.params)
    stats = (None, None) if mode == "train" else (model.bn.mean[...], model.bn.var[...])
    ref = _reference_flag_loss(
        p64, batch32 | {"x": x64.astype(np.float32).astype(np.float64)}, *stats
    )
    np.testing.assert_allclose(value, ref, rtol=1e-5)


def test_float64_model_with_float32_flax_statistics(digits):
    """nnx.BatchNorm stores float32 statistics even with param_dtype=float64: the objective
    keeps them in float64 (exactly), so train mode raises no FutureWarning and eval mode
    equals the model's own forward."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(64, 4, param_dtype=F64, rngs=rngs)
            self.bn = nnx.BatchNorm(4, param_dtype=F64, rngs=rngs)
            self.out = nnx.Linear(4, 10, param_dtype=F64, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.lin(x.reshape(x.shape[0], -1)))))

    net = Net(nnx.Rngs(0))
    net.train()
    with pytest.warns(FutureWarning, match="float64 to dtype=float32"):  # the model itself
        net(digits.x[:20])  # running averages with float32 rounding, not the initial 0 and 1
    assert net.bn.mean[...].dtype == jnp.float32
    batch = {"x": digits.x[:16], "y": digits.y[:16]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = ho.make_objective(net, bn_mode="train")
        assert train.stats["bn"]["mean"].dtype == F64
        value = jax.jit(jax.value_and_grad(train.loss_fn))(train.params, batch)[0]
        evaluate = ho.make_objective(net, bn_mode="eval")
        eval_value = _loss(evaluate.loss_fn, evaluate.params, batch)
    np.testing.assert_array_equal(evaluate.stats["bn"]["mean"], net.bn.mean[...])
    net.eval()
    expected = optax.softmax_cross_entropy_with_integer_labels(net(batch["x"]), batch["y"]).mean()
    np.testing.assert_allclose(eval_value, expected, rtol=1e-13)
    assert value.dtype == F64 and not np.isclose(value, eval_value)
