"""The command line ``python -m hessspec.run`` and its configuration, end to end on tiny
settings: one study (a BatchNorm network analysed in every mode) run once for the module,
and every way a bad input must stop before training. (Compiling the analysis programs is
what costs time here, one set per BN graph: train mode, and eval/population which share
one; the path without BN is the same code with empty statistics, run by the default
study and by tests/test_train.py.)"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hessspec.config import (
    Config,
    ConfigError,
    apply_overrides,
    checkpoint_steps,
    config_from_dict,
    load_config,
    to_toml,
    validate,
)
from hessspec.report import load_results, validate_results
from hessspec.run import EXPERIMENTS, main

ROOT = Path(__file__).resolve().parents[1]

# A study small enough to compile and run in seconds: 8 hidden units, 64 analysis
# examples, two checkpoints, a short SLQ and trace.
TINY = [
    "--no-progress",
    "--set", "data.train_size=256",
    "--set", "data.test_size=96",
    "--set", "model.hidden=[8]",
    "--set", "model.batchnorm=[true]",
    "--set", "train.steps=16",
    "--set", "train.batch_size=32",
    "--set", "train.learning_rate=0.05",
    "--set", "train.checkpoints=[0,16]",
    "--set", "analysis.size=64",
    "--set", "analysis.bn_modes=[\"train\",\"eval\",\"population\"]",
    "--set", "analysis.slq_probes=2",
    "--set", "analysis.slq_steps=12",
    "--set", "analysis.trace_matvecs=12",
    "--set", "analysis.num_minibatches=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny study, run once into a folder that already held a stale result and an
    unrelated file (so it also exercises --overwrite)."""
    out = tmp_path_factory.mktemp("study")
    (out / "results.json").write_text('{"stale": true}')
    (out / "notes.txt").write_text("mine")
    figures = out / "figures"
    figures.mkdir()
    (figures / "old.png").write_bytes(b"not a png")
    code = main([*TINY, "--out", str(out), "--overwrite"])
    return code, out


def test_tiny_study_completes_and_validates(tiny_study):
    code, out = tiny_study
    assert code == 0
    results, spectra = load_results(out)
    assert validate_results(results) == []
    assert results["status"] == "complete"
    assert results["config"]["train"]["steps"] == 16
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"mlp-bn-train", "mlp-bn-eval", "mlp-bn-population"}
    for mode in ("train", "eval", "population"):
        run = runs[f"mlp-bn-{mode}"]
        assert run["bn_mode"] == mode and run["batchnorm"] is True
    k = results["data"]["num_classes"]
    for run in runs.values():
        assert [c["step"] for c in run["checkpoints"]] == [0, 16]
        assert len(run["loss_curve"]["loss"]) == 16
        for c in run["checkpoints"]:
            assert len(c["top_eigenvalues"]) == 2 * k
            assert len(c["gradient_energy_full"]) == 2 * k
            assert all(r is not None and r >= 0 for r in c["residuals"])
            assert c["density_sigma"] > 0
            assert 0 <= c["test_accuracy"] <= 1
            for name in ("nodes", "weights", "eigenvalues", "eigenvectors", "density"):
                assert f"{run['name']}/step{c['step']}/{name}" in spectra
            key = f"{run['name']}/step{c['step']}/eigenvalues"
            np.testing.assert_allclose(spectra[key], c["top_eigenvalues"], rtol=1e-12)
            w = spectra[f"{run['name']}/step{c['step']}/weights"]
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def test_bn_modes_give_different_hessians(tiny_study):
    """Train, eval and population mode are different functions of the parameters (after
    training the running averages are not the statistics of any batch)."""
    _, out = tiny_study
    results, _ = load_results(out)
    runs = {r["name"]: r for r in results["runs"]}
    top = {m: runs[f"mlp-bn-{m}"]["checkpoints"][-1]["top_eigenvalues"][0] for m in
           ("train", "eval", "population")}  # fmt: skip
    assert len({round(v, 6) for v in top.values()}) == 3, top


def test_tiny_study_writes_figures_report_and_keeps_foreign_files(tiny_study):
    _, out = tiny_study
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(
        ["density.png", "top_eigenvalues.png", "outlier_ratio.png", "gradient_energy.png",
         "loss_curves.png"]
    )  # fmt: skip
    for p in (out / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for png in pngs:
        assert f"figures/{png}" in report
    assert "σ" in report and "Findings" in report
    assert (out / "notes.txt").read_text() == "mine"
    assert "stale" not in (out / "results.json").read_text()
    assert load_config(out / "config.toml").analysis.bn_modes == ("train", "eval", "population")
    assert not list(out.glob(".*.tmp"))


def test_refuses_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert main([*TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--set", "train.steps=many"], "'train.steps' must be an integer"),
        (["--set", "analysis.bn_modes=train,sometimes"], "analysis.bn_modes[1]"),
        (["--set", "train.checkpoints=[0,99]"], "train.checkpoints"),
        (["--set", "data.name=cifar10", "--set", "data.path=/no/such/folder"], "/no/such/folder"),
        (["--set", "data.name=mnist", "--set", "data.path=/no/such/mnist"], "/no/such/mnist"),
        (["--set", "model.input_shape=[28,28,1]"], "does not fit the digits inputs of shape"),
        (
            ["--set", "model.name=cnn", "--set", "model.input_shape=[32,32,3]"],
            "(8, 8, 1)",
        ),
        (["--set", "analysis.size=5000"], "analysis.size=5000"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert main([*TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not out.exists()  # nothing was written, so nothing was trained


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nsteps = 10\n[model]\nwidth = 3\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "unknown config key 'model.width'" in err
    cfg.write_text("[train]\nsteps = '10'\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "'train.steps' must be an integer, got '10'" in capsys.readouterr().err
    cfg.write_text("[train\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_from_the_real_entry_point():
    """``python -m hessspec.run --help`` explains every option and every config field."""
    proc = subprocess.run(
        [sys.executable, "-m", "hessspec.run", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0
    for key in ("--config", "--set", "--out", "--quick", "--seed", "--overwrite"):
        assert key in proc.stdout
    for section, cls in Config.__dataclass_fields__.items():
        if section in ("data", "model", "train", "analysis"):
            for name in cls.default_factory.__dataclass_fields__:
                assert f"{section}.{name} (" in proc.stdout, f"{section}.{name}"
        else:
            assert f"{section} (" in proc.stdout


def test_show_config_applies_quick_set_and_seed(capsys):
    assert main(["--quick", "--set", "train.steps=7", "--seed", "5", "--show-config"]) == 0
    text = capsys.readouterr().out
    cfg = config_from_dict(__import__("tomllib").loads(text))
    assert cfg.train.steps == 7 and cfg.seed == 5
    assert cfg.analysis.slq_probes < Config().analysis.slq_probes


def test_config_roundtrip_and_overrides():
    cfg = apply_overrides(
        Config(),
        [
            "train.learning_rate=1",  # an integer is a fine float
            "model.hidden=[3, 4]",
            "data.path=/some/where",  # unquoted string
            "analysis.bn_modes=train,population",
            "title=my study",
            "model.batchnorm=[true]",
        ],
    )
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.hidden == (3, 4)
    assert cfg.data.path == "/some/where"
    assert cfg.analysis.bn_modes == ("train", "population")
    assert cfg.title == "my study" and cfg.model.batchnorm == (True,)
    assert config_from_dict(__import__("tomllib").loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match="must be a table"):
        config_from_dict({"train": 3})
    with pytest.raises(ConfigError, match="boolean"):
        apply_overrides(Config(), ["x64=maybe"])
    with pytest.raises(ConfigError, match="sgd"):
        validate(apply_overrides(Config(), ["train.optimizer=lbfgs"]))


def test_checkpoint_steps():
    steps = Config().train.steps
    assert checkpoint_steps(Config().train) == [0, steps // 8, steps // 4, steps // 2, steps]
    cfg = apply_overrides(Config(), ["train.checkpoints=[30,0,30,10]"])
    assert checkpoint_steps(cfg.train) == [0, 10, 30]
    cfg = apply_overrides(Config(), ["train.steps=0"])
    assert checkpoint_steps(cfg.train) == [0]


def test_experiment_configs_load(capsys):
    """Every TOML in experiments/ is a valid config of the study its ``experiment`` key
    names (the CLI resolves it without running), and the README names each one."""
    files = sorted((ROOT / "experiments").glob("*.toml"))
    assert {f.name for f in files} >= {"digits_mlp.toml", "digits_cnn.toml", "cifar10_resnet.toml"}
    readme = (ROOT / "experiments" / "README.md").read_text()
    for f in files:
        assert main(["--config", str(f), "--quick", "--show-config"]) == 0, f.name
        text = capsys.readouterr().out
        experiment = __import__("tomllib").loads(text).get("experiment")
        assert experiment in ("batchnorm_spectrum", *EXPERIMENTS), f.name
        if experiment == "batchnorm_spectrum":
            validate(load_config(f))
        assert f"experiments/{f.name}" in readme
    for name in ("digits_mlp", "digits_cnn", "cifar10_resnet"):
        cfg = load_config(ROOT / "experiments" / f"{name}.toml")
        assert cfg.model.batchnorm == (False, True)
        assert cfg.analysis.bn_modes == ("train", "population")


def test_dispatch_to_other_studies_checks_their_keys(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('experiment = "santurkar"\nseed = 1\n')
    assert main(["--config", str(cfg), "--set", "stepz=1", "--out", str(tmp_path / "o")]) == 2
    assert "stepz" in capsys.readouterr().err
    cfg.write_text('experiment = "nonsense"\n')
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "'experiment' is 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second analysis: exit status 130, results.json says
    "interrupted" and holds the first checkpoint, report.md and the figures are written."""
    from hessspec.study import CheckpointAnalysis, CheckpointAnalyzer

    calls = []

    def fake_analyse(self, objective, key, seed=0, on_stage=None):
        calls.append(objective.bn_mode)
        if len(calls) == 2:
            raise KeyboardInterrupt
        k = 2 * self.num_classes
        lam = np.linspace(2.0, 1.0, k)
        record = {
            "train_loss": 2.0, "test_accuracy": 0.1, "top_eigenvalues": lam.tolist(),
            "residuals": [0.0] * k, "trace": 10.0, "num_outliers": 1, "bulk_edge": 1.9,
            "outlier_ratio": 2.0 / 1.9, "gradient_energy_full": np.linspace(0.1, 1, k).tolist(),
            "gradient_energy_minibatch_mean": np.linspace(0.1, 1, k).tolist(),
            "gradient_energy_minibatch_std": [0.0] * k, "density_sigma": 0.01,
        }  # fmt: skip
        grid = np.linspace(0, 3, 50)
        return CheckpointAnalysis(record, {"density_grid": grid, "density": np.exp(-grid)})

    monkeypatch.setattr(CheckpointAnalyzer, "analyse", fake_analyse)
    out = tmp_path / "out"
    assert main([*TINY, "--set", "model.batchnorm=[false]", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    results, spectra = load_results(out)
    assert results["status"] == "interrupted"
    assert validate_results(results) == []
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0]
    assert "mlp/step0/density" in spectra
    assert "Status: interrupted" in (out / "report.md").read_text()
    assert (out / "figures" / "density.png").exists()
