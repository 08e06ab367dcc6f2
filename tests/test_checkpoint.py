"""Checkpoints on disk (orbax): a training state saved and loaded back exactly, with the
config that rebuilds its model; parameter files trained elsewhere (.npz, orbax) checked
against the model. Tiny models, a few training steps."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import hessspec as hs
from hessspec.nn.data import load_digits, subsample
from hessspec.nn.train import train
from hessspec.studies.batchnorm_spectrum.config import Config, apply_overrides
from hessspec.studies.common.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_path,
    restore_state,
    save_checkpoint,
    saved_checkpoints,
)
from hessspec.studies.common.params_file import load_params, save_params

CONFIG = apply_overrides(
    Config(), ["model.hidden=[8]", "train.steps=12", "train.batch_size=16", "seed=3"]
)


@pytest.fixture(scope="module")
def digits():
    return subsample(load_digits("train"), 96, seed=0, stratify=True)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(folder, state, network, batchnorm, kind="checkpoint", config=CONFIG, digits=None):
    return save_checkpoint(
        checkpoint_path(folder, state.step, network),
        state,
        network=network,
        batchnorm=batchnorm,
        kind=kind,
        config=config,
        input_shape=digits.input_shape,
        num_classes=10,
    )


def test_a_saved_state_loads_back_exactly(tmp_path, digits):
    """Parameters, BN statistics, optimizer state, batch order and loss curve come back
    bit for bit; the model the checkpoint rebuilds computes what the trained one does; the
    folder is found from the run, the step or the checkpoint folder."""
    model = build_model(CONFIG, input_shape=digits.input_shape, num_classes=10, batchnorm=True)
    states = {}
    train(model, digits.x, digits.y, CONFIG.train, checkpoints=[0, 6], seed=CONFIG.seed,
          progress=False, on_checkpoint=lambda *a: None,
          on_save=lambda s, kind: states.setdefault(s.step, (s, kind)))  # fmt: skip
    assert sorted(states) == [0, 6, 12] and states[12][1] == "final"
    for state, kind in states.values():
        _save(tmp_path, state, "mlp-bn", True, kind, digits=digits)
    plain = build_model(CONFIG, input_shape=digits.input_shape, num_classes=10, batchnorm=False)

    def save_plain(state, kind):
        _save(tmp_path, state, "mlp", False, kind, digits=digits)

    three = dataclasses.replace(CONFIG.train, steps=3)
    train(plain, digits.x, digits.y, three, progress=False, on_save=save_plain)
    assert {k: sorted(v) for k, v in saved_checkpoints(tmp_path).items()} == {
        "mlp-bn": [0, 6, 12], "mlp": [3]
    }  # fmt: skip

    ck = hs.load_checkpoint(checkpoint_path(tmp_path, 6, "mlp-bn"))
    state = states[6][0]
    assert (ck.step, ck.network, ck.batchnorm, ck.kind) == (6, "mlp-bn", True, "checkpoint")
    assert ck.config == CONFIG and ck.input_shape == digits.input_shape
    _leaves_equal(ck.params, state.params)
    _leaves_equal(ck.batch_stats, state.rest)
    _leaves_equal(ck.opt_state, state.opt_state)
    assert type(ck.opt_state) is type(state.opt_state)  # the optax structure, not lists
    np.testing.assert_array_equal(ck.loss_curve, state.losses)
    assert ck.data_order == state.data_order
    final = hs.load_checkpoint(tmp_path, network="mlp-bn")  # the latest step of a run folder
    assert final.step == 12 and final.kind == "final"
    rebuilt = final.model()
    rebuilt.eval()
    model.eval()
    np.testing.assert_array_equal(rebuilt(digits.x[:5]), model(digits.x[:5]))
    assert hs.load_checkpoint(tmp_path / "checkpoints" / "3").network == "mlp"
    with pytest.raises(CheckpointError, match="several networks"):
        hs.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"saved steps: \[0, 6, 12\]"):
        hs.load_checkpoint(tmp_path, network="mlp-bn", step=5)
    with pytest.raises(CheckpointError, match="does not exist"):
        hs.load_checkpoint(tmp_path / "nowhere")


def test_random_key_state_round_trips(tmp_path, digits):
    """A model whose state holds PRNG keys (noisy BatchNorm) saves and loads them."""
    from hessspec.nn.models import make_model
    from hessspec.nn.train import TrainingState, make_optimizer

    model = make_model("mlp", digits.input_shape, 10, True, seed=0, hidden=[8],
                       noisy_batchnorm=True)  # fmt: skip
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    state = TrainingState(0, params, rest, make_optimizer(CONFIG.train).init(params),
                          {"seed": 0}, np.zeros(0), 0.0)  # fmt: skip
    path = _save(tmp_path, state, "mlp-bn", True, digits=digits)
    template = {"params": params, "rest": rest, "opt_state": state.opt_state}
    restored = restore_state(path, template)
    _leaves_equal(restored["rest"], rest)
    key = restored["rest"]["norms"][0]["rngs"]["key"]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def test_parameter_files(tmp_path, digits):
    """save_params' .npz (and a checkpoint folder) load into a fresh model; missing,
    unknown or misshapen arrays and missing BN statistics are refused by name."""
    trained = build_model(CONFIG, input_shape=digits.input_shape, num_classes=10, batchnorm=True)
    saved = {}

    def save(state, kind):
        saved["path"] = _save(tmp_path / "run", state, "mlp-bn", True, kind, digits=digits)

    train(trained, digits.x, digits.y, CONFIG.train, progress=False, on_save=save)
    npz = save_params(tmp_path / "params", trained)
    assert npz.name == "params.npz"

    def fresh():
        return build_model(CONFIG, input_shape=digits.input_shape, num_classes=10, batchnorm=True)

    for source in (npz, saved["path"]):
        model = fresh()
        assert load_params(source, model, need_statistics=True) is True
        _leaves_equal(nnx.state(model), nnx.state(trained))

    arrays = dict(np.load(npz))
    only_params = {k: v for k, v in arrays.items() if not k.endswith(("mean", "var"))}
    np.savez(tmp_path / "p.npz", **only_params)
    model = fresh()
    assert load_params(tmp_path / "p.npz", model) is False  # train/population mode: fine
    with pytest.raises(CheckpointError, match="no BatchNorm running averages"):
        load_params(tmp_path / "p.npz", fresh(), need_statistics=True)
    prefixed = {f"params/{k}": v for k, v in only_params.items()}
    np.savez(tmp_path / "prefixed.npz", **prefixed)
    load_params(tmp_path / "prefixed.npz", fresh())
    missing = {k: v for k, v in arrays.items() if k != "head/kernel"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match="lacks parameters of the model: head/kernel"):
        load_params(tmp_path / "missing.npz", fresh())
    np.savez(tmp_path / "extra.npz", **arrays, **{"head/weight": np.ones(3)})
    with pytest.raises(CheckpointError, match="does not have: head/weight"):
        load_params(tmp_path / "extra.npz", fresh())
    np.savez(tmp_path / "shape.npz", **{**arrays, "head/bias": np.ones(7)})
    with pytest.raises(CheckpointError, match=r"'head/bias' has shape \(7,\)"):
        load_params(tmp_path / "shape.npz", fresh())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_params(tmp_path / "junk.npz", fresh())
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(CheckpointError, match="must be an .npz"):
        load_params(tmp_path / "junk.txt", fresh())
