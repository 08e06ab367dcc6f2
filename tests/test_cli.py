"""The command line ``python -m hessspec.run`` and its configuration, end to end on tiny
settings: one study (a BatchNorm network analysed in every mode) run once for the module,
and every way a bad input must stop before training. (Compiling the analysis programs is
what costs time here, one set per BN graph: train mode, and eval/population which share
one; the path without BN is the same code with empty statistics, run by the default
study and by tests/test_train.py.)"""

import gc
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


def test_tiny_study_end_to_end(tmp_path, capsys):
    """The tiny study, in a folder that already holds a stale result and a foreign file
    (so it also exercises --overwrite): exit 0; results.json valid against the schema with
    one run per BN mode; spectra.npz consistent with it; the three modes analyse different
    functions; figures, report.md and config.toml written; the foreign file kept. (One test,
    not several sharing a fixture: the study is the expensive part, and test workers would
    each run a shared fixture again.)"""
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_text('{"stale": true}')
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir()
    (out / "figures" / "old.png").write_bytes(b"not a png")
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 0
    assert "hessspec: memory (" in capsys.readouterr().err

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
    # train, eval and population mode are different functions of the parameters (after
    # training the running averages are not the statistics of any batch)
    top = {m: runs[f"mlp-bn-{m}"]["checkpoints"][-1]["top_eigenvalues"][0] for m in
           ("train", "eval", "population")}  # fmt: skip
    assert len({round(v, 6) for v in top.values()}) == 3, top

    pngs = sorted(p.name for p in (out / "figures").glob("*.png") if p.name != "old.png")
    assert pngs == sorted(
        ["density.png", "top_eigenvalues.png", "outlier_ratio.png", "gradient_energy.png",
         "loss_curves.png"]
    )  # fmt: skip
    for png in pngs:
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "old.png").read_bytes() == b"not a png"  # the user's own file
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
    for key in (
        "--config", "--set", "--out", "--quick", "--seed", "--overwrite", "--memory-limit",
        "--coordinator", "--num-processes", "--process-id",
    ):  # fmt: skip
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
    assert main(["--config", str(cfg), "--memory-limit", "1", "--out", str(tmp_path / "o")]) == 2
    assert "BatchNorm spectrum study only" in capsys.readouterr().err
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
    # No garbage collection while the interrupt unwinds: jax's gc callback would otherwise
    # report it a second time as an "unraisable" exception under pytest-xdist.
    gc.disable()
    try:
        code = main([*TINY, "--set", "model.batchnorm=[false]", "--out", str(out)])
    finally:
        gc.enable()
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    results, spectra = load_results(out)
    assert results["status"] == "interrupted"
    assert validate_results(results) == []
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0]
    assert "mlp/step0/density" in spectra
    assert "Status: interrupted" in (out / "report.md").read_text()
    assert (out / "figures" / "density.png").exists()


class _Stop(BaseException):
    """Raised by a stand-in to end a CLI run at a chosen point (before any training); a
    BaseException, so that the CLI's one-line error handling lets it through."""


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


def test_memory_line_before_training(tmp_path, monkeypatch, capsys):
    """A run prints the memory its analysis needs and what is available, before training
    (and before it writes anything)."""
    import hessspec.run

    def stop(setup, out_dir, **kwargs):
        raise _Stop

    monkeypatch.setattr(hessspec.run, "run_study", stop)
    with pytest.raises(_Stop):
        main([*TINY, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("hessspec: memory ("))
    assert "this run needs about" in line and "(peak in top_eigenpairs: basis" in line
    assert "available (host RAM)" in line or "available (free on" in line


def test_memory_limit_refuses_before_training(tmp_path, monkeypatch, capsys):
    """A budget below the estimate: exit status 2 before any training, with what the
    analysis needs, what is available and the options that lower the need; nothing written."""
    import hessspec.train

    monkeypatch.setattr(hessspec.train, "train", _no_training)
    out = tmp_path / "out"
    assert main([*TINY, "--memory-limit", "1e-5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hessspec: memory (" in err  # the estimate line comes first
    message = err.splitlines()[-1]
    assert message.startswith("hessspec.run: error: not enough memory for the analysis")
    assert "top_eigenpairs on mlp-bn" in message and "needs about" in message
    assert "but only 10.5 KiB is available (analysis.memory_limit_gib = 1e-05)" in message
    assert "Nothing was trained" in message
    assert "--set analysis.basis_dtype=float32" in message
    assert "analysis.lanczos_steps" in message and "--memory-limit" in message
    assert not out.exists()  # no results.json, no checkpoint, no folder
    # the same through the config field, with a float32 basis: the option is then gone
    args = ["--set", "analysis.memory_limit_gib=0.00001", "--set", "analysis.basis_dtype=float32"]
    assert main([*TINY, *args, "--out", str(out)]) == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert "not enough memory" in message and "basis_dtype" not in message
    assert not out.exists()


def test_memory_preflight_and_basis_dtype_reach_the_solvers(monkeypatch):
    """The preflight estimates every analysed graph (BN train mode; eval and population share
    one); a float32 basis halves the Krylov basis of the estimate; the config's basis dtype
    and budget reach top_eigenpairs."""
    import jax

    import hessspec.study
    from hessspec.objective import make_objective
    from hessspec.run import analysis_settings, memory_preflight, prepare_study
    from hessspec.study import CheckpointAnalyzer

    jax.config.update("jax_enable_x64", True)
    args = ["model.hidden=[8]", "model.batchnorm=[true]", "analysis.size=64",
            "data.train_size=256", "analysis.bn_modes=train,eval,population"]  # fmt: skip
    config = validate(apply_overrides(Config(), args))
    setup = prepare_study(config)
    full = memory_preflight(setup)
    assert sorted({label for label, _ in full.estimates}) == [
        "mlp-bn, BN eval/population mode",
        "mlp-bn, BN train mode",
    ]
    assert [e.solver for _, e in full.estimates[:3]] == [
        "top_eigenpairs", "spectral_density", "trace"
    ]  # fmt: skip
    assert full.fits and full.needed == max(e.total for _, e in full.estimates)
    setup32 = prepare_study(
        apply_overrides(config, ["analysis.basis_dtype=float32", "analysis.basis_memory=host"])
    )
    half = memory_preflight(setup32)
    bases = [(e64.solver, e64.basis, e32.basis) for (_, e64), (_, e32) in
             zip(full.estimates, half.estimates, strict=True)]  # fmt: skip
    assert all(b32 * 2 == b64 for _, b64, b32 in bases)
    assert all(b64 > 0 for solver, b64, _ in bases if solver != "trace")

    calls = {}

    def fake_top_eigenpairs(op, k, **kwargs):
        calls.update(kwargs)
        raise _Stop

    monkeypatch.setattr(hessspec.study, "top_eigenpairs", fake_top_eigenpairs)
    net = setup32.networks[0]
    obj = make_objective(net.model, config.model.loss, bn_mode="train")
    settings = analysis_settings(setup32)[net.name]
    assert settings.basis_dtype == "float32" and settings.basis_memory == "host"
    tr, an = setup32.train_set, setup32.analysis_set
    analyzer = CheckpointAnalyzer(obj, an, tr, tr, 10, settings, check_memory=2.0**30)
    with pytest.raises(_Stop):
        analyzer.analyse(obj, jax.random.key(0))
    assert calls["basis_dtype"] == "float32" and calls["check_memory"] == 2.0**30
    assert calls["basis_memory"] == "host"


def test_basis_dtype_and_memory_limit_config():
    cfg = validate(apply_overrides(Config(), ["analysis.basis_dtype=float32"]))
    assert cfg.analysis.basis_dtype == "float32"
    assert validate(apply_overrides(Config(), ["analysis.basis_dtype="])).analysis.basis_dtype == ""
    with pytest.raises(ConfigError, match="'analysis.basis_dtype' must be one of"):
        validate(apply_overrides(Config(), ["analysis.basis_dtype=float16"]))
    with pytest.raises(ConfigError, match="needs x64 = true"):
        validate(apply_overrides(Config(), ["x64=false", "analysis.basis_dtype=float64"]))
    with pytest.raises(ConfigError, match="'analysis.basis_memory' must be one of"):
        validate(apply_overrides(Config(), ["analysis.basis_memory=disk"]))
    with pytest.raises(ConfigError, match="'analysis.memory_limit_gib' must be >= 0"):
        validate(apply_overrides(Config(), ["analysis.memory_limit_gib=-1"]))


def test_multi_process_flags_reach_initialize_first(tmp_path, monkeypatch, capsys):
    """--coordinator/--num-processes/--process-id reach hessspec.distributed.initialize,
    which runs before the data is loaded; a failure to join stops with a clear message."""
    import hessspec.distributed
    import hessspec.run

    order = []
    monkeypatch.setattr(
        hessspec.distributed, "initialize", lambda *a: order.append(("initialize", a))
    )

    def prepare(config):
        order.append(("prepare_study",))
        raise _Stop

    monkeypatch.setattr(hessspec.run, "prepare_study", prepare)
    out = tmp_path / "out"
    flags = ["--coordinator", "localhost:23456", "--num-processes", "2", "--process-id", "1"]
    with pytest.raises(_Stop):
        main([*TINY, *flags, "--out", str(out)])
    assert order == [("initialize", ("localhost:23456", 2, 1)), ("prepare_study",)]
    assert not out.exists()  # process 1 never touches the output folder

    def refuse(*args):
        raise RuntimeError("connection refused")

    monkeypatch.setattr(hessspec.distributed, "initialize", refuse)
    assert main([*TINY, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "(process 1 of 2): error: could not join the multi-process job at" in err
    assert "localhost:23456" in err and "connection refused" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--coordinator", "localhost:23456"],
         "--coordinator given without --num-processes and --process-id"),
        (["--num-processes", "2", "--process-id", "0"],
         "--num-processes and --process-id given without --coordinator"),
        (["--coordinator", "localhost:23456", "--num-processes", "0", "--process-id", "0"],
         "--num-processes must be at least 1, got 0"),
        (["--coordinator", "localhost:23456", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be in 0..1 for --num-processes 2, got 2"),
        (["--coordinator", "localhost:23456", "--num-processes", "2", "--process-id", "-1"],
         "--process-id must be in 0..1 for --num-processes 2, got -1"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
         "must be 'host:port'"),
    ],
)  # fmt: skip
def test_bad_multi_process_flags(tmp_path, monkeypatch, capsys, flags, needle):
    import hessspec.distributed

    monkeypatch.setattr(hessspec.distributed, "initialize", _no_training)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
