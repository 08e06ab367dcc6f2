"""The input-bias study (LeCun, Kanter & Solla): config validation, gradient descent
counting, the run folder, one tiny end-to-end run, and the science: the measured spectrum
against the input correlation matrix and LeCun's outlier N m^2 + v computed here."""

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
from hessspec.nn.data import synthetic_gaussian
from hessspec.studies import input_bias as ib
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.formatting import fmt, pct
from hessspec.studies.common.output import StudyOutput

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
    # the loss of the iterate at the stopping step: 0.5 lam_min (ratio * ||w_0 - w*||)^2
    assert out["final_loss"] == pytest.approx(0.5 * 0.5 * out["error_ratio"][-1] ** 2, rel=1e-10)
    # A budget too small reports None and stops at the budget.
    short = ib.run_gradient_descent(loss_fn, w0, {}, lr, w_star, tol=1e-3, max_steps=10, chunk=64)
    assert short["steps"] is None and len(short["error_ratio"]) == 11
    # Far above 2 / lambda_max the iterates blow up: one line naming the learning rate.
    with pytest.raises(FloatingPointError, match="gradient descent diverged at lr = 10"):
        ib.run_gradient_descent(loss_fn, w0, {}, 10.0, w_star, tol=1e-3, max_steps=1000)


def test_study_output_never_clobbers(tmp_path):
    (tmp_path / "report.md").write_text("someone else's")
    out = StudyOutput(tmp_path)
    with pytest.raises(FileExistsError, match="report.md"):
        out.claim(["results.json", "report.md"])
    with pytest.raises(FileExistsError):
        out.write_text("report.md", "mine")
    assert (tmp_path / "report.md").read_text() == "someone else's"
    out.write_json("results.json", {"a": float("nan"), "b": np.arange(2)})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": None, "b": [0, 1]}
    out.write_json("results.json", {"a": 1.0})  # a file of this run may be rewritten
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


def _write_run(folder, text: str, names=("results.json", "report.md", "figures/a.png")):
    """A run of a fake study through StudyOutput, results.json last (as the studies do)."""
    out = StudyOutput(folder, overwrite=True)
    out.claim(names)
    for name in names[1:]:
        out.write_text(name, text)
    out.write_json("results.json", {"files": list(names), "text": text})
    out.commit()


def test_study_output_replaces_a_previous_run_whole(tmp_path):
    """--overwrite: the new run is written beside the previous one and swapped in when
    complete; the previous run's files it does not write again go, a user's file stays."""
    _write_run(tmp_path, "old", ("results.json", "report.md", "figures/a.png", "figures/b.png"))
    (tmp_path / "notes.txt").write_text("mine")
    _write_run(tmp_path, "new")
    assert (tmp_path / "report.md").read_text() == "new"
    assert (tmp_path / "figures" / "a.png").read_text() == "new"
    assert not (tmp_path / "figures" / "b.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "results.json").read_text())["text"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "figures",
        "notes.txt",
        "report.md",
        "results.json",
    ]


def test_an_interrupted_replacement_leaves_the_previous_run(tmp_path):
    _write_run(tmp_path, "old")
    out = StudyOutput(tmp_path, overwrite=True)
    out.claim(["results.json", "report.md", "figures/a.png"])
    out.write_text("report.md", "new")  # the run is interrupted here, before results.json
    assert (tmp_path / "report.md").read_text() == "old"
    assert json.loads((tmp_path / "results.json").read_text())["text"] == "old"
    _write_run(tmp_path, "newer")  # the next run drops the unfinished one
    assert (tmp_path / "report.md").read_text() == "newer"
    assert not (tmp_path / ".hessspec-pending").exists()
    assert not list(tmp_path.rglob("*.tmp"))


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


def _correlation_eigenvalues(linear: dict, mean: float) -> np.ndarray:
    """Ascending eigenvalues of R = X^T X / p of the study's inputs, made again here from
    the seeded generator and diagonalised densely (the study itself measures them by
    Lanczos on Hessian-vector products)."""
    n, p = linear["num_inputs"], linear["num_samples"]
    data = synthetic_gaussian(
        p, n, mean=mean, variance=linear["variance"], seed=0, dtype=np.float64
    )
    return np.linalg.eigvalsh(data.x.T @ data.x / p)


def _outlier_tolerance(n: int, p: int, m: float, v: float) -> float:
    """How far the sample outlier may lie from N m^2 + v with p samples: along u = 1/sqrt(N)
    the mean of (u^T x)^2 over p samples has standard deviation sqrt((4 N m^2 v + 2 v^2) / p),
    and the bulk pushes the top eigenvalue up by about (N/p) v (1 + v / (N m^2))
    (Baik-Ben Arous-Peche); four standard deviations plus that shift."""
    spread = math.sqrt((4 * n * m**2 * v + 2 * v**2) / p)
    return 4 * spread + (n / p) * v * (1 + v / (n * m**2))


def _assert_outlier_is_lecuns(results: dict) -> None:
    lin = results["linear"]
    n, p, v, m = (lin[k] for k in ("num_inputs", "num_samples", "variance", "biased_mean"))
    lecun = n * m**2 + v
    measured = lin["variants"]["biased"]["lambda_max"]
    assert abs(measured - lecun) <= _outlier_tolerance(n, p, m, v), (measured, lecun)


def test_end_to_end_linear_numbers_against_the_correlation_matrix(tiny_run):
    _, results = tiny_run
    lin = results["linear"]
    n, p, v, m = 40, 400, 1.0, 1.0  # TINY's N and p; v and m at their defaults
    keys = ("num_inputs", "num_samples", "variance", "biased_mean")
    assert [lin[k] for k in keys] == [n, p, v, m]
    exact = {
        "biased": _correlation_eigenvalues(lin, m),
        "centered": _correlation_eigenvalues(lin, 0),
    }
    for name, eig in exact.items():
        var = lin["variants"][name]
        measured = [var["lambda_max"], var["lambda_2"], var["lambda_min"]]
        np.testing.assert_allclose(measured, [eig[-1], eig[-2], eig[0]], rtol=1e-6)
        assert var["dense"]["max_abs_diff_lanczos"] < 1e-6 * var["lambda_max"]
    # theory, computed here from N, p, m, v
    edges = {
        "upper_edge": v * (1 + math.sqrt(n / p)) ** 2,
        "lower_edge": v * (1 - math.sqrt(n / p)) ** 2,
    }
    theory = {("biased", "outlier"): n * m**2 + v}
    theory.update({(name, e): x for name in exact for e, x in edges.items()})
    for (name, quantity), value in theory.items():
        assert lin["variants"][name]["prediction"][quantity] == pytest.approx(value, rel=1e-12)
    expected = [
        ("biased", exact["biased"][-1], theory["biased", "outlier"]),
        ("biased", exact["biased"][-2], edges["upper_edge"]),
        ("biased", exact["biased"][0], edges["lower_edge"]),
        ("centered", exact["centered"][-1], edges["upper_edge"]),
        ("centered", exact["centered"][0], edges["lower_edge"]),
    ]
    assert len(lin["agreements"]) == len(expected)
    for a, (name, eig, predicted) in zip(lin["agreements"], expected, strict=True):
        assert a["variant"] == name
        assert a["predicted"] == pytest.approx(predicted, rel=1e-12)
        error = abs(eig - predicted) / predicted
        assert a["relative_error"] == pytest.approx(error, rel=1e-5, abs=1e-9)
        assert a["within_tolerance"] == (error <= 0.05)
    # the outlier is LeCun's N m^2 + v within what p samples allow, and gone without a mean
    _assert_outlier_is_lecuns(results)
    assert lin["variants"]["centered"]["lambda_max"] < 2 * edges["upper_edge"]
    # GD: the outlier costs steps; the run never exceeds the worst-case bound.
    b, c = lin["variants"]["biased"], lin["variants"]["centered"]
    for var in (b, c):
        gd = var["gd"]
        assert gd["steps"] is not None
        assert gd["steps"] <= gd["bound_from_measured_eigenvalues"]["steps"]
        assert gd["error_ratio"][-1] <= 1e-3 < gd["error_ratio"][-2]
        assert gd["steps"] == len(gd["error_ratio"]) - 1
        assert gd["learning_rate"] == pytest.approx(1.0 / var["lambda_max"])
    assert b["gd"]["steps"] > 5 * c["gd"]["steps"]
    assert lin["gd_steps_ratio_biased_over_centered"] == b["gd"]["steps"] / c["gd"]["steps"]
    assert math.isclose(sum(np.asarray(b["slq"]["weights"]).sum(1)), 3.0, rel_tol=1e-9)


def test_end_to_end_mlp(tiny_run):
    _, results = tiny_run
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


def test_end_to_end_report_states_the_numbers(tiny_run):
    out, results = tiny_run
    report = (out / "report.md").read_text()
    for a in results["linear"]["agreements"]:
        row = [a["variant"], a["quantity"], fmt(a["measured"]), fmt(a["predicted"])]
        row += [pct(a["relative_error"]), fmt(a["within_tolerance"])]
        assert "| " + " | ".join(row) + " |" in report
    lin = results["linear"]["variants"]
    for name in ("biased", "centered"):
        gd = lin[name]["gd"]
        row = [name, fmt(gd["learning_rate"]), fmt(gd["steps"])]
        row += [fmt(gd["bound_from_measured_eigenvalues"]["steps"])]
        assert "| " + " | ".join(row) + " |" in report
    assert f"lambda_max falls from {fmt(lin['biased']['lambda_max'])} to " in report
    for var in results["mlp"]["variants"].values():
        for analyses in var["analyses"].values():
            for res in analyses.values():
                assert f" | {fmt(res['lambda_max'])} | {fmt(res['ratio_to_kth'])} | " in report
    assert "Wall time" in report and "figures/linear_density.png" in report


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
    _assert_outlier_is_lecuns(results)  # N = 200, p = 2000: within 1.3 % of N m^2 + v
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
