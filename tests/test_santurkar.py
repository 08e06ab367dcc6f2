"""The Santurkar landscape study: config validation, the train-mode loss, layer order,
one tiny end-to-end run, and the science: with BatchNorm the loss range and the
beta-smoothness along the gradient are smaller than without, at the same learning rate."""

import json
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective
from hessspec.studies import santurkar as st
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.formatting import fmt

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "experiment": "santurkar",
    "model": "mlp",
    "hidden": [8],
    "steps": 6,
    "record_every": 3,
    "batch_size": 32,
    "num_step_sizes": 3,
    "sweep_learning_rates": [0.3],
}


# ------------------------------------------------------------------ configuration


def test_defaults_match_the_experiment_file_and_round_trip():
    with open(ROOT / "experiments" / "santurkar.toml", "rb") as f:
        from_file = st.SanturkarConfig.from_dict(tomllib.load(f))
    default = st.SanturkarConfig()
    assert from_file == default
    assert default.variants == ("standard", "batchnorm", "noisy_batchnorm")
    assert st.SanturkarConfig.from_dict(tomllib.loads(default.to_toml())) == default
    quick = st.override_config(default, st.QUICK_OVERRIDES)
    assert quick.sweep_learning_rates == () and quick.steps == default.steps


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"lr": 0.1}, "unknown config key 'lr'"),
        ({"learning_rate": "0.1"}, "config key 'learning_rate' must be a number"),
        ({"steps": 10.0}, "config key 'steps' must be an integer"),
        ({"step_range": [0.5]}, "config key 'step_range' must be a list of 2"),
        ({"step_range": [0.5, "4"]}, r"config key 'step_range\[1\]'"),
        ({"variants": ["standard", "layernorm"]}, r"config key 'variants\[1\]'"),
        ({"variants": ["standard", "standard"]}, "config key 'variants'"),
        ({"model": "resnet"}, "config key 'model'"),
        ({"learning_rate": -1.0}, "config key 'learning_rate'"),
        ({"step_range": [4.0, 0.5]}, "config key 'step_range'"),
        ({"steps": 10, "record_every": 20}, "config key 'record_every'"),
        ({"noise_scale": 0.5}, "config key 'noise_scale'"),
        ({"dtype": "float64"}, "config key 'dtype'"),
        ({"experiment": "input_bias"}, "config key 'experiment'"),
    ],
)
def test_config_errors_name_the_key(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        st.SanturkarConfig.from_dict(values)


# ------------------------------------------------------------------ pieces


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 64)).astype(np.float32), "y": rng.integers(0, 10, n)}


def test_train_mode_loss_is_the_objective_loss_for_plain_batchnorm():
    model = make_model("mlp", (64,), 10, True, hidden=(8,))
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    batch = _batch()
    loss = st.train_mode_loss(graphdef)(
        nnx.to_pure_dict(params), {**batch, "state": nnx.to_pure_dict(state)}
    )
    ref = make_objective(model, "cross_entropy", "train").loss_fn(nnx.to_pure_dict(params), batch)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)


def test_train_mode_loss_freezes_the_noise_of_a_step():
    model = make_model("mlp", (64,), 10, True, noisy_batchnorm=True, hidden=(8,))
    model.train()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    fn = st.train_mode_loss(graphdef)
    batch = {**_batch(), "state": state}
    a, b = float(fn(params, batch)), float(fn(params, batch))
    assert a == b  # the same state gives the same noise draw
    clean = make_objective(model, "cross_entropy", "train").loss_fn(params, _batch())
    assert a != pytest.approx(float(clean), rel=1e-3)  # and that draw is not zero
    model(jnp.asarray(_batch()["x"]))  # one training forward pass advances the RNG
    _, _, state2 = nnx.split(model, nnx.Param, ...)
    assert float(fn(params, {**_batch(), "state": nnx.to_pure_dict(state2)})) != a


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("bn", [False, True])
def test_layer_order(arch, bn):
    kw = {"hidden": (8, 8)} if arch == "mlp" else {"channels": (4, 4)}
    shape = (64,) if arch == "mlp" else (8, 8, 1)
    model = make_model(arch, shape, 10, bn, **kw)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stack = "linears" if arch == "mlp" else "convs"
    if bn:
        expect = [[(stack, 0), ("norms", 0)], [(stack, 1), ("norms", 1)], "head"]
    else:
        expect = [(stack, 0), (stack, 1), "head"]
    assert st.layer_order_for(params) == expect


def test_summaries_on_known_records():
    rec = {
        "loss_range": [1.0, 3.0, 2.0, 6.0],
        "beta_smoothness": [2.0, 2.0, 4.0, 4.0],
        "gradient_predictiveness": [[0.1, 0.5], [0.2, 0.3], [1.0, 0.0], [0.4, 0.4]],
        "first_order_range": [1.0, 1.0, 1.0, 1.0],
        "ics_l2": [[0.0, 1.0], [0.0, 3.0]],
        "ics_cosine": [[1.0, 0.5], [1.0, float("nan")]],
        "ics_grad_norm": [[1.0, 2.0], [1.0, 3.0]],
    }
    s = st.summarize_records(rec, lr=0.5)
    assert s["loss_range_mean"] == 3.0 and s["loss_range_median"] == 2.5
    assert s["beta_mean"] == 3.0 and s["lr_times_beta_mean"] == 1.5
    assert s["late_loss_range_mean"] == 4.0 and s["late_beta_mean"] == 4.0
    assert s["max_predictiveness_mean"] == pytest.approx((0.5 + 0.3 + 1.0 + 0.4) / 4)
    np.testing.assert_allclose(s["ics_l2_mean"], [0.0, 2.0])
    np.testing.assert_allclose(s["ics_relative_mean"], [0.0, 0.75])
    np.testing.assert_allclose(s["ics_cosine_mean"], [1.0, 0.5])  # NaN records skipped


# ------------------------------------------------------------------ end to end


def shared_tiny_run(tmp_path_factory) -> Path:
    """The tiny run's folder, made once per test session (tests/test_notebooks.py redraws
    it in notebook 04 instead of paying for a second run)."""
    out = tmp_path_factory.getbasetemp() / "shared_santurkar_tiny"
    if not (out / "results.json").is_file():
        st.run_santurkar_study(st.SanturkarConfig.from_dict(TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = shared_tiny_run(tmp_path_factory)
    return out, json.loads((out / "results.json").read_text())


def test_end_to_end_outputs(tiny_run):
    out, results = tiny_run
    assert results["config"] == st.SanturkarConfig.from_dict(TINY).to_dict()
    assert set(results) >= {
        "experiment",
        "config",
        "learning_rate",
        "runs",
        "comparison",
        "lr_table",
        "lr_comparisons",
        "timing",
        "environment",
        "files",
    }
    assert set(results["files"]) == {
        "results.json",
        "report.md",
        "config.toml",
        "figures/landscape.png",
        "figures/ics.png",
        "figures/training.png",
        "figures/lr_sweep.png",
    }
    for name in results["files"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with pytest.raises(FileExistsError):
        st.run_santurkar_study(st.SanturkarConfig.from_dict(TINY), out, progress=False)


def test_end_to_end_records(tiny_run):
    _, results = tiny_run
    assert set(results["runs"]) == {"standard", "batchnorm", "noisy_batchnorm"}
    for run in results["runs"].values():
        rec = run["records"]
        assert rec["steps"] == [0, 3]
        assert np.asarray(rec["losses"]).shape == (2, 3)
        assert np.asarray(rec["gradient_predictiveness"]).shape == (2, 3)
        ranges = np.ptp(np.asarray(rec["losses"]), axis=1)
        np.testing.assert_allclose(rec["loss_range"], ranges, rtol=1e-6)
        assert np.asarray(rec["ics_l2"]).shape == (2, 2)  # hidden layer and head
        np.testing.assert_allclose(np.asarray(rec["ics_l2"])[:, 0], 0.0, atol=1e-6)
        assert len(run["train_losses"]) == 6
        # a record is taken before the update that follows it, on that update's batch (and
        # noise draw): its loss is the training loss of that update
        losses = np.asarray(run["train_losses"])[rec["steps"]]
        np.testing.assert_allclose(rec["loss"], losses, rtol=1e-6)
    assert len(results["lr_table"]) == 6
    assert [c["learning_rate"] for c in results["lr_comparisons"]] == [0.1, 0.3]
    for run in results["runs"].values():
        rec, summary = run["records"], run["summary"]
        assert summary["loss_range_mean"] == pytest.approx(np.mean(rec["loss_range"]))
        assert summary["beta_mean"] == pytest.approx(np.mean(rec["beta_smoothness"]))


def test_one_compiled_program_trains_every_learning_rate(caplog):
    """The sweep: learning rate and momentum sit in the optimizer state, so a second
    learning rate compiles nothing; and each run is heavy-ball SGD at its own learning rate
    on the seeded batches, the losses of :func:`hessspec.nn.train.train` with
    ``optax.sgd(lr, momentum)`` on the same model and seed."""
    import logging

    import jax

    from hessspec.nn.data import load_digits
    from hessspec.nn.train import TrainConfig, train
    from hessspec.studies.santurkar.train import train_variant

    config = st.SanturkarConfig.from_dict({**TINY, "hidden": [5, 3], "momentum": 0.9})
    kw = {"preprocessing": "unit", "flatten": True, "dtype": np.float32}
    data = load_digits("train", **kw), load_digits("test", **kw)
    cache, compiled = {}, []
    for lr in (0.1, 0.3):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles():
            run = train_variant(config, "batchnorm", lr, *data, False, cache)
        compiled.append([r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()])
        model = make_model("mlp", (64,), 10, True, hidden=(5, 3), seed=0, dtype=jnp.float32)
        cfg = TrainConfig(learning_rate=lr, momentum=0.9, batch_size=32, steps=6)
        ref = train(model, data[0].x, data[0].y, cfg, seed=config.seed, progress=False)
        np.testing.assert_allclose(run["train_losses"], ref.losses, rtol=1e-6)
    assert compiled[0] and not compiled[1], compiled[1]


#: A small run where BatchNorm's smoothing shows at the shared learning rate: two-layer MLP,
#: lr = 0.3, 40 steps, 8 records (seed 0). At much smaller steps the loss range is first
#: order, (hi - lo) lr ||g||^2, and measures the gradient norm instead (see the module).
SCIENCE = {
    "experiment": "santurkar",
    "model": "mlp",
    "hidden": [16, 16],
    "learning_rate": 0.3,
    "steps": 40,
    "record_every": 5,
    "batch_size": 32,
    "num_step_sizes": 4,
    "variants": ["standard", "batchnorm"],
    "sweep_learning_rates": [],
}


def test_batchnorm_smooths_the_landscape(tmp_path):
    """Santurkar et al.: at the same learning rate the loss changes less along the
    gradient step and the gradient changes less per unit step (effective beta-smoothness)
    with BatchNorm than without, here by at least a quarter on average over training."""
    st.run_santurkar_study(SCIENCE, tmp_path, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    standard, bn = results["runs"]["standard"]["records"], results["runs"]["batchnorm"]["records"]
    assert standard["steps"] == bn["steps"] == list(range(0, 40, 5))
    cmp = results["comparison"]
    for key, ratio in (("loss_range", "loss_range"), ("beta_smoothness", "beta")):
        assert np.mean(bn[key]) < 0.75 * np.mean(standard[key]), key
        reported = cmp[f"{ratio}_ratio_bn_over_standard"]
        assert reported == pytest.approx(np.mean(bn[key]) / np.mean(standard[key]))
    assert cmp["acceptance"] is True
    assert "**holds**" in (tmp_path / "report.md").read_text()


def _row(*cells) -> str:
    """The start of a Markdown table row with these cells."""
    return "| " + " | ".join(cells) + " |"


def test_end_to_end_report_states_the_numbers(tiny_run):
    out, results = tiny_run
    report = (out / "report.md").read_text()
    labels = {"standard": "standard", "batchnorm": "BatchNorm", "noisy_batchnorm": "noisy BN"}
    for variant, run in results["runs"].items():
        s, label = run["summary"], labels[variant]
        ranges = (s["loss_range_mean"], s["loss_range_median"], s["beta_mean"], s["beta_median"])
        assert _row(label, *map(fmt, ranges)) in report
        for j, name in enumerate(run["layer_names"]):
            assert _row(label, str(j + 1), name, fmt(s["ics_l2_mean"][j])) in report
    cmp = results["comparison"]
    ratio = fmt(cmp["loss_range_ratio_bn_over_standard"])
    assert f"Loss range: BN / standard = {ratio} (" in report
    ratio = fmt(cmp["beta_ratio_bn_over_standard"])
    assert f"Beta-smoothness: BN / standard = {ratio} (" in report
    assert ("**holds**" if cmp["acceptance"] else "**does NOT hold**") in report
    for row in results["lr_table"]:
        lr, label = fmt(row["learning_rate"]), labels[row["variant"]]
        assert _row(lr, label, fmt(row["loss_range_mean"]), fmt(row["beta_mean"])) in report
    assert "Wall time" in report and "figures/landscape.png" in report
