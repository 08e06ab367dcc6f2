"""The input-bias study (LeCun, Kanter & Solla): config validation, gradient descent
counting, compiled-program reuse, and one tiny end-to-end run."""

import json
import math
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessspec as hs
from hessspec.analysis.theory import gd_steps_to_tolerance
from hessspec.studies.batchnorm_spectrum.config import ConfigError
from hessspec.studies.input_bias import study as ib

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "experiment": "input_bias",
    "linear": {"num_inputs": 40, "num_samples": 400, "slq_probes": 3, "slq_steps": 30},
    "mlp": {
        "hidden": 8,
        "analysis_size": 60,
        "top_k": 10,
        "train_steps": 5,
        "batch_size": 32,
        "slq_probes": 2,
        "slq_steps": 20,
        "bn_modes": ["train"],
    },
}


# ------------------------------------------------------------------ configuration


def test_defaults_match_the_experiment_file_and_round_trip():
    with open(ROOT / "experiments" / "input_bias.toml", "rb") as f:
        from_file = ib.InputBiasConfig.from_dict(tomllib.load(f))
    default = ib.InputBiasConfig()
    assert from_file == default
    assert default.linear.num_inputs == 200 and default.linear.num_samples == 2000
    assert ib.InputBiasConfig.from_dict(tomllib.loads(default.to_toml())) == default
    assert ib.InputBiasConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize(
    "values, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"linear": {"num_input": 10}}, "linear.num_input"),
        ({"mlp": {"hiden": 4}}, "mlp.hiden"),
    ],
)
def test_unknown_keys_are_named(values, key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        ib.InputBiasConfig.from_dict(values)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"seed": 1.5}, "seed"),
        ({"x64": 1}, "x64"),
        ({"linear": {"num_inputs": "200"}}, "linear.num_inputs"),
        ({"linear": {"variance": True}}, "linear.variance"),
        ({"mlp": {"bn_modes": "train"}}, "mlp.bn_modes"),
        ({"mlp": {"bn_modes": ["train", 3]}}, r"mlp.bn_modes\[1\]"),
        ({"linear": 3}, "linear"),
    ],
)
def test_wrong_types_are_named(values, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        ib.InputBiasConfig.from_dict(values)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"linear": {"tolerance": 1.5}}, "linear.tolerance"),
        ({"linear": {"mean": 0.0}}, "linear.mean"),
        ({"linear": {"num_inputs": 50, "slq_steps": 90}}, "linear.slq_steps"),
        ({"mlp": {"bn_modes": ["train", "bogus"]}}, r"mlp.bn_modes\[1\]"),
        ({"mlp": {"raw_preprocessing": "center"}}, "mlp.raw_preprocessing"),
        ({"mlp": {"top_k": 5}}, "mlp.top_k"),
        ({"x64": False}, "linear.dtype"),
        ({"experiment": "santurkar"}, "experiment"),
    ],
)
def test_invalid_values_are_named(values, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        ib.InputBiasConfig.from_dict(values)


def test_overrides():
    cfg = ib.override_config(ib.InputBiasConfig(), ["linear.num_inputs=100", "seed=3"])
    assert cfg.linear.num_inputs == 100 and cfg.seed == 3
    quick = ib.override_config(cfg, ib.QUICK_OVERRIDES)
    assert quick.mlp.bn_modes == ("train",) and quick.linear.num_inputs == 100
    with pytest.raises(ConfigError, match="linear.nope"):
        ib.override_config(cfg, ["linear.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        ib.override_config(cfg, ["seed"])


# ------------------------------------------------------------------ pieces


def test_gradient_descent_count_matches_the_worst_case_bound_exactly():
    """On 0.5 (w - w*)^T diag(lam) (w - w*) started along the slowest eigenvector the
    error ratio is exactly |1 - lr lam_min|^t: the counted steps equal the bound."""
    lam = jnp.array([0.5, 1.0, 4.0, 10.0])
    w_star = jnp.array([1.0, -2.0, 0.5, 3.0])

    def loss_fn(w, batch):
        del batch
        return 0.5 * jnp.sum(lam * (w - w_star) ** 2)

    w0 = w_star.at[0].add(1.0)  # error along lambda_min only
    lr = 1.0 / float(lam.max())
    out = ib.run_gradient_descent(loss_fn, w0, {}, lr, w_star, tol=1e-3, max_steps=1000, chunk=64)
    bound = gd_steps_to_tolerance(np.asarray(lam), lr, 1e-3)
    assert out["steps"] == bound.steps
    t = np.arange(len(out["error_ratio"]))
    np.testing.assert_allclose(out["error_ratio"], bound.rate**t, rtol=1e-10)
    # A budget too small reports None and stops at the budget.
    short = ib.run_gradient_descent(loss_fn, w0, {}, lr, w_star, tol=1e-3, max_steps=10, chunk=64)
    assert short["steps"] is None and len(short["error_ratio"]) == 11


def test_study_output_never_clobbers(tmp_path):
    (tmp_path / "report.md").write_text("someone else's")
    out = ib.StudyOutput(tmp_path)
    with pytest.raises(FileExistsError, match="report.md"):
        out.claim(["results.json", "report.md"])
    with pytest.raises(FileExistsError):
        out.write_text("report.md", "mine")
    assert (tmp_path / "report.md").read_text() == "someone else's"
    out.write_json("results.json", {"a": float("nan"), "b": np.arange(2)})
    out.write_json("results.json", {"a": 1.0})  # a file of this run may be rewritten
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


# ------------------------------------------------------------------ end to end


def shared_tiny_run(tmp_path_factory) -> Path:
    """The tiny run's folder, made once per test session (tests/test_notebooks.py redraws
    it in notebook 03 instead of paying for a second run)."""
    out = tmp_path_factory.getbasetemp() / "shared_input_bias_tiny"
    if not (out / "results.json").is_file():
        ib.run_input_bias_study(ib.InputBiasConfig.from_dict(TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = shared_tiny_run(tmp_path_factory)
    return out, json.loads((out / "results.json").read_text())


def test_end_to_end_outputs(tiny_run):
    out, results = tiny_run
    assert results["config"] == ib.InputBiasConfig.from_dict(TINY).to_dict()
    assert set(results) >= {"experiment", "config", "linear", "mlp", "timing", "environment"}
    assert results["experiment"] == "input_bias"
    for name in results["files"]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ib.InputBiasConfig.from_dict(tomllib.loads((out / "config.toml").read_text())) == (
        ib.InputBiasConfig.from_dict(TINY)
    )
    assert not [p for p in out.rglob("*.tmp")]


def test_end_to_end_linear_numbers(tiny_run):
    _, results = tiny_run
    lin = results["linear"]
    b, c = lin["variants"]["biased"], lin["variants"]["centered"]
    n = 40
    assert b["prediction"]["outlier"] == pytest.approx(n * 1.0 + 1.0)
    assert len(lin["agreements"]) == 5
    for a in lin["agreements"]:
        assert a["relative_error"] == pytest.approx(
            abs(a["measured"] - a["predicted"]) / a["predicted"]
        )
        assert a["within_tolerance"] == (a["relative_error"] <= 0.05)
    # Lanczos on the operator agrees with the dense spectrum of the same operator.
    for v in (b, c):
        assert v["dense"]["max_abs_diff_lanczos"] < 1e-6 * v["lambda_max"]
    # The outlier is there with a mean and gone without, relative errors are small.
    assert b["lambda_max"] > 10 * c["lambda_max"]
    assert abs(b["lambda_max"] / (n + 1.0) - 1) < 0.1
    # GD: the outlier costs steps; the run never exceeds the worst-case bound.
    for v in (b, c):
        gd = v["gd"]
        assert gd["steps"] is not None
        assert gd["steps"] <= gd["bound_from_measured_eigenvalues"]["steps"]
        assert gd["error_ratio"][-1] <= 1e-3 < gd["error_ratio"][-2]
        assert gd["learning_rate"] == pytest.approx(1.0 / v["lambda_max"])
    assert b["gd"]["steps"] > 5 * c["gd"]["steps"]
    assert lin["gd_steps_ratio_biased_over_centered"] == b["gd"]["steps"] / c["gd"]["steps"]
    assert math.isclose(sum(np.asarray(b["slq"]["weights"]).sum(1)), 3.0, rel_tol=1e-9)


def test_end_to_end_mlp_and_report(tiny_run):
    out, results = tiny_run
    mlp = results["mlp"]
    assert mlp["phases"] == [0, 5]
    assert set(mlp["variants"]) == {"raw", "centered", "batchnorm"}
    for name, var in mlp["variants"].items():
        for step in ("0", "5"):
            for mode, res in var["analyses"][step].items():
                assert mode == ("train" if name == "batchnorm" else "None")
                assert len(res["top_values"]) == 10
                assert res["lambda_max"] == res["top_values"][0]
                assert 0.0 <= res["top_vector_mean_overlap"] <= 1.0 + 1e-9
    report = (out / "report.md").read_text()
    for a in results["linear"]["agreements"]:
        assert ib._pct(a["relative_error"]) in report
        assert ib._fmt(a["measured"]) in report
    lin = results["linear"]["variants"]
    assert f"| biased | {ib._fmt(lin['biased']['gd']['learning_rate'])} | " in report
    assert str(lin["centered"]["gd"]["steps"]) in report
    assert "Wall time" in report and "figures/linear_density.png" in report
    raw0 = mlp["variants"]["raw"]["analyses"]["0"]["None"]
    assert ib._fmt(raw0["lambda_max"]) in report


def test_refuses_to_overwrite_an_earlier_run(tiny_run):
    out, _ = tiny_run
    before = (out / "report.md").read_text()
    with pytest.raises(FileExistsError):
        ib.run_input_bias_study(ib.InputBiasConfig.from_dict(TINY), out, progress=False)
    assert (out / "report.md").read_text() == before


def test_defaults_meet_the_five_percent_agreements(tmp_path):
    """The acceptance: at the default linear settings (N = 200, p = 2000, v = 1, m = 1 vs 0)
    every Lanczos-measured eigenvalue is within 5 % of its theory (the MLP part and the
    dense check are switched off to keep this fast)."""
    cfg = ib.InputBiasConfig.from_dict(
        {"mlp": {"enabled": False}, "linear": {"dense_check": False}}
    )
    assert cfg.linear == ib.LinearSettings(dense_check=False)
    results = ib.run_input_bias_study(cfg, tmp_path, progress=False)
    lin = results["linear"]
    errors = {(a["variant"], a["quantity"]): a["relative_error"] for a in lin["agreements"]}
    assert lin["all_within_tolerance"], errors
    assert max(errors.values()) <= 0.05
    b, c = lin["variants"]["biased"]["gd"], lin["variants"]["centered"]["gd"]
    assert b["steps"] > 50 * c["steps"]  # the outlier's cost at lr = 1 / lambda_max
    report = (tmp_path / "report.md").read_text()
    assert "All agreements within 5.00 %: **yes**" in report


def test_run_accepts_a_mapping_and_checks_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'linear.foo'"):
        ib.run_input_bias_study({"linear": {"foo": 1}}, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_hessian_of_linear_model_is_the_correlation_matrix():
    """The operator the study measures is R = X^T X / p exactly (float64)."""
    from hessspec.nn.data import synthetic_gaussian
    from hessspec.nn.models import make_model
    from hessspec.nn.objective import make_objective

    data = synthetic_gaussian(50, 7, mean=1.0, seed=1, dtype=np.float64)
    model = make_model("linear", (7,), 0, False, dtype=jnp.float64, use_bias=False)
    obj = make_objective(model, "mse")
    op = hs.hessian_operator(obj.loss_fn, obj.params, data.batch)
    assert jax.config.jax_enable_x64
    np.testing.assert_allclose(op.to_dense(), data.x.T @ data.x / 50, rtol=1e-12, atol=1e-12)
