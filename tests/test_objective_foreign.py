"""make_objective refuses models of other frameworks (flax.linen, haiku, equinox) with the
loss_fn to write instead: that code runs as written and its operator is the dense Hessian
of the loss written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import hessspec as hs
from hessspec.nn import data as hd
from hessspec.nn import objective as ho

F64 = jnp.float64
EPS = 1e-5  # the BatchNorm epsilon of flax.linen


@pytest.fixture(scope="module")
def digits():
    ds = hd.load_digits("train", preprocessing="standardize", dtype=np.float64)
    return hd.subsample(ds, 40, seed=0)


def _snippet(message):
    """The indented code lines of a refusal message, dedented."""
    lines = [line for line in message.splitlines() if line.startswith("    ") or not line]
    code = "\n".join(line[4:] for line in lines).strip("\n")
    return code.split("\n\n(")[0]


def _check_snippet_runs(message, namespace, reference_loss):
    """The loss_fn a refusal message shows runs as written, and its operator is the dense
    float64 Hessian of ``reference_loss`` (the loss written here independently)."""
    namespace = {"hs": hs, "jax": jax, "jnp": jnp, "optax": optax, **namespace}
    exec(_snippet(message), namespace)  # noqa: S102 - the message's own code
    op = namespace["op"]
    params = namespace["variables"]["params"] if "variables" in namespace else namespace["params"]
    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.jit(jax.hessian(lambda f: reference_loss(unravel(f))))(flat))
    np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-10, atol=1e-13)


def test_linen_refused_with_the_loss_fn_to_write(digits):
    import flax.linen as nn

    class LinenBN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4, param_dtype=F64)(x.reshape(x.shape[0], -1))
            x = nn.BatchNorm(
                use_running_average=not train, use_fast_variance=False, param_dtype=F64
            )(x)
            return nn.Dense(10, param_dtype=F64)(nn.relu(x))

    model = LinenBN()
    data = {"x": digits.x[:12], "y": digits.y[:12]}
    variables = model.init(jax.random.key(0), data["x"], train=False)
    with pytest.raises(TypeError) as info:
        ho.make_objective(model, bn_mode="train")
    message = str(info.value)
    for expected in (
        "flax.linen module",
        'mutable=["batch_stats"]',
        "train=True",
        "hs.hessian_operator(loss_fn",
        "notebooks/05_your_own_model.ipynb",
    ):
        assert expected in message, message
    with pytest.raises(TypeError, match="flax.linen module"):
        ho.make_objective(nn.Dense(3))  # a library class too

    def reference(params):  # batch statistics, written out
        x = data["x"].reshape(12, -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + EPS)
        x = x * params["BatchNorm_0"]["scale"] + params["BatchNorm_0"]["bias"]
        logits = jax.nn.relu(x) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()

    _check_snippet_runs(
        message,
        {
            "model": model,
            "variables": variables,
            "batch_stats": variables["batch_stats"],
            "data": data,
        },
        reference,
    )


def test_haiku_refused_with_the_loss_fn_to_write(digits):
    hk = pytest.importorskip("haiku")

    def forward(x, is_training):
        x = hk.Linear(4)(x.reshape(x.shape[0], -1))
        x = hk.BatchNorm(True, True, 0.9)(x, is_training)
        return hk.Linear(10)(jax.nn.relu(x))

    transformed = hk.transform_with_state(forward)
    data = {"x": digits.x[:12], "y": digits.y[:12]}
    params, state = transformed.init(jax.random.key(0), data["x"], True)
    with pytest.raises(TypeError) as info:
        ho.make_objective(transformed, bn_mode="train")
    message = str(info.value)
    for expected in (
        "haiku object",
        "transformed.apply(params, state, None",
        "is_training",
        "notebooks/05_your_own_model.ipynb",
    ):
        assert expected in message, message

    def reference(p):  # haiku's BatchNorm: batch statistics, eps 1e-5
        x = data["x"].reshape(12, -1) @ p["linear"]["w"] + p["linear"]["b"]
        x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
        x = x * p["batch_norm"]["scale"] + p["batch_norm"]["offset"]
        logits = jax.nn.relu(x) @ p["linear_1"]["w"] + p["linear_1"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()

    _check_snippet_runs(
        message,
        {"transformed": transformed, "params": params, "state": state, "data": data},
        reference,
    )


def test_equinox_refused_with_the_loss_fn_to_write(digits):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(64, 10, 4, 1, key=jax.random.key(0))
    model = jax.tree.map(lambda v: v.astype(F64) if eqx.is_inexact_array(v) else v, model)
    data = {"x": digits.x[:12].reshape(12, -1), "y": digits.y[:12]}
    with pytest.raises(TypeError) as info:
        ho.make_objective(model)
    message = str(info.value)
    for expected in (
        "equinox module",
        "eqx.partition(model, eqx.is_inexact_array)",
        "eqx.combine(params, static)",
        "notebooks/05_your_own_model.ipynb",
    ):
        assert expected in message, message

    def reference(p):  # MLP: Linear -> ReLU -> Linear
        hidden = jax.nn.relu(data["x"] @ p.layers[0].weight.T + p.layers[0].bias)
        logits = hidden @ p.layers[1].weight.T + p.layers[1].bias
        return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()

    _check_snippet_runs(message, {"model": model, "eqx": eqx, "data": data}, reference)


def test_other_objects_refused():
    with pytest.raises(TypeError, match="takes a flax.nnx model, got dict.*hessian_operator"):
        ho.make_objective({"w": np.zeros(3)})
