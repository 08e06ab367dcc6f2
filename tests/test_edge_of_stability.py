"""Sharpness tracking and the edge-of-stability study.

References: dense float64 Hessians (``jax.hessian``) for every tracked ``lambda_max``; the
summary on constructed sequences; the study's report read against its results.json; and the
science on a small run: without BatchNorm, full-batch gradient descent drives lambda_max to
2 / lr ((2 + 2 beta) / lr with momentum) and keeps it there (Cohen et al. 2021)."""

import json
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessspec.nn.data import load_digits, subsample
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective
from hessspec.nn.sharpness import SharpnessTracker, sharpness_observer, tracking_steps
from hessspec.nn.train import TrainConfig, train
from hessspec.studies import edge_of_stability as eos
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.formatting import fmt

ROOT = Path(__file__).resolve().parents[1]


def _dense_lambda_max(loss_fn, params, batch) -> float:
    """Largest eigenvalue of the dense float64 Hessian of ``loss_fn`` at ``params``."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = jax.hessian(lambda w: loss_fn(unravel(w), batch))(flat)
    return float(np.linalg.eigvalsh(np.asarray(hess, np.float64))[-1])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_tracked_sharpness_matches_dense_hessians(batchnorm):
    """Every lambda_max the observer records during gradient descent equals the top
    eigenvalue of the dense float64 Hessian at the parameters of that step; the warm-started
    solves (all but the first) need few matrix-vector products."""
    with jax.enable_x64(True):
        data = subsample(load_digits("train", flatten=True, dtype=np.float64), 60, seed=1)
        model = make_model(
            "mlp",
            data.input_shape,
            10,
            batchnorm,
            hidden=(6,),
            activation="tanh",
            dtype=jnp.float64,
        )
        objective = make_objective(model, "mse", bn_mode="train" if batchnorm else None)
        batch = {"x": data.x, "y": data.y}
        tracker = SharpnessTracker(objective.loss_fn, batch, tol=1e-10)
        measured, params_at = [], {}

        def observe(seen):
            params_at[seen.step] = jax.tree.map(np.asarray, seen.params)
            return sharpness_observer(tracker, measured)(seen)

        cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, momentum=0.0, batch_size=60, steps=12)
        history = train(
            model,
            data.x,
            data.y,
            cfg,
            loss="mse",
            progress=False,
            observe=observe,
            observe_at=tracking_steps(12, 5),
        )
        assert [s for s, _ in history.observations] == [0, 5, 10, 12]
        for step, estimate in measured:
            reference = _dense_lambda_max(objective.loss_fn, params_at[step], batch)
            assert abs(estimate.value - reference) <= 1e-8 * abs(reference)
            assert estimate.converged and estimate.residual <= 1e-8 * abs(reference)


def test_tracking_steps():
    assert tracking_steps(100, 20) == [0, 20, 40, 60, 80, 100]
    assert tracking_steps(10, 4) == [0, 4, 8, 10]
    with pytest.raises(ValueError, match="every >= 1"):
        tracking_steps(10, 0)


def test_summary_on_constructed_sequences():
    steps = [0, 10, 20, 30, 40, 50]
    s = eos.summarize_sharpness(steps, [1.0, 2.0, 4.1, 3.9, 4.2, 4.4], threshold=4.0)
    assert s["first_step_at_threshold"] == 20
    assert s["median_ratio_after"] == pytest.approx(np.median([4.1, 3.9, 4.2, 4.4]) / 4.0)
    assert s["max_ratio"] == pytest.approx(1.1) and s["initial_ratio"] == pytest.approx(0.25)
    never = eos.summarize_sharpness(steps, [1.0] * 6, threshold=4.0)
    assert never["first_step_at_threshold"] is None and never["median_ratio_after"] is None


def test_defaults_match_the_experiment_file():
    with open(ROOT / "experiments" / "edge_of_stability.toml", "rb") as f:
        assert eos.EdgeOfStabilityConfig.from_dict(tomllib.load(f)) == eos.EdgeOfStabilityConfig()


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"learning_rates": [0.1, -1.0]}, "'learning_rates' must hold positive"),
        ({"momentum": 1.0}, "'momentum' must lie in \\(0, 1\\)"),
        ({"track_every": 0}, "'track_every' must lie in \\[1, steps"),
        ({"activation": "swish"}, "'activation' must be one of"),
        ({"batchnorm": [True, True]}, "'batchnorm' must not repeat"),
        ({"dtype": "float64"}, "needs x64 = true"),
        ({"steps": "10"}, "'steps' must be an integer"),
    ],
)
def test_config_errors_name_the_key(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        eos.EdgeOfStabilityConfig.from_dict(values)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Gradient descent and heavy-ball momentum without BatchNorm on 300 digits for 600
    steps: long enough for progressive sharpening to reach the threshold."""
    out = tmp_path_factory.mktemp("eos")
    config = {
        "train_size": 300,
        "steps": 600,
        "learning_rates": [0.4],
        "momentum_learning_rates": [0.3],
        "momentum": 0.5,
        "batchnorm": [False],
    }
    eos.run_edge_of_stability_study(config, out, progress=False)
    return out, json.loads((out / "results.json").read_text())


def test_without_batchnorm_sharpness_reaches_and_hovers_at_the_threshold(small_run):
    """Cohen et al. 2021: each run without BN starts below its threshold, reaches it, and
    its median lambda_max afterwards lies within 0.9-1.2 times 2 / lr (gradient descent) or
    (2 + 2 beta) / lr (heavy ball), thresholds computed here from the config."""
    _, results = small_run
    runs = [r for r in results["runs"] if not r["batchnorm"]]
    assert [(r["learning_rate"], r["momentum"]) for r in runs] == [(0.4, 0.0), (0.3, 0.5)]
    for run, threshold in zip(runs, [2 / 0.4, (2 + 2 * 0.5) / 0.3], strict=True):
        assert run["stability_threshold"] == pytest.approx(threshold)
        values = np.array([p["lambda_max"] for p in run["sharpness"]])
        steps = [p["step"] for p in run["sharpness"]]
        assert steps == list(range(0, 601, 20)) and run["diverged_at"] is None
        assert values[0] < 0.9 * threshold  # progressive sharpening starts below
        first = int(np.argmax(values >= threshold))
        assert values[first] >= threshold and run["first_step_at_threshold"] == steps[first]
        assert 0.9 <= np.median(values[first:] / threshold) <= 1.2
    assert eos.verdict(results, "mlp")["holds"]


def test_report_states_the_results(small_run):
    """Every run's threshold, first step at it and median ratio appear in report.md as the
    shared formatter writes the results.json values; the figures exist."""
    out, results = small_run
    text = (out / "report.md").read_text()
    for run in results["runs"]:
        row = (
            f"| {'BN' if run['batchnorm'] else 'no BN'} | {fmt(run['learning_rate'])} | "
            f"{fmt(run['momentum'])} | {fmt(run['stability_threshold'])} |"
        )
        assert row in text
        if run["median_ratio_after"] is not None:
            assert fmt(run["median_ratio_after"]) in text
    assert set(results["files"]) >= {"figures/sharpness.png", "figures/loss.png", "report.md"}
    assert all((out / name).stat().st_size > 0 for name in results["files"])


@pytest.mark.parametrize("flags", [["--no-progress"], []], ids=["no-progress", "not-a-terminal"])
def test_command_line_logs_one_line_per_run(tmp_path, capsys, flags):
    """Through ``python -m hessspec.run``, in a log (stderr not a terminal) or with
    --no-progress: one line per run as it starts, numbered and with the elapsed time, so a
    batch job shows where it is; the results are those of the runs named."""
    from hessspec.cli.main import main

    config = tmp_path / "eos.toml"
    config.write_text(
        'experiment = "edge_of_stability"\ntrain_size = 60\nhidden = [8]\nsteps = 20\n'
        "learning_rates = [0.1, 0.2]\nmomentum_learning_rates = [0.1]\nbatchnorm = [false]\n"
        "track_every = 10\n"
    )
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out), *flags]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "edge_of_stability " in line]
    assert len(lines) == 3, lines
    for i, (line, name) in enumerate(
        zip(lines, ["lr=0.1 momentum=0", "lr=0.2 momentum=0", "lr=0.1 momentum=0.5"], strict=True)
    ):
        assert line.startswith("hessspec [") and line.endswith(
            f"edge_of_stability {i + 1}/3: {name}"
        )
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["learning_rate"], r["momentum"]) for r in runs] == [(0.1, 0), (0.2, 0), (0.1, 0.5)]
