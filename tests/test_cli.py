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

import hessspec as hs
from hessspec.cli.main import main
from hessspec.cli.registry import STUDIES
from hessspec.studies.batchnorm_spectrum.config import (
    Config,
    ConfigError,
    apply_overrides,
    checkpoint_steps,
    config_from_dict,
    load_config,
    to_toml,
    validate,
)
from hessspec.studies.batchnorm_spectrum.results import load_results, validate_results
from hessspec.studies.common.formatting import fmt

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
    err = capsys.readouterr().err
    assert "hessspec: memory (" in err
    # --no-progress: log lines with the elapsed time, per training interval and per stage
    assert "]: mlp-bn (1/1): training 16 steps" in err
    assert "]: mlp-bn (1/1): step 16/16 (100%), loss " in err
    assert "]: analysing mlp-bn: step 16, population mode: top eigenpairs" in err

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
    for run in runs.values():  # the measured numbers, through the one report formatter
        last = run["checkpoints"][-1]
        numbers = [(last["top_eigenvalues"][0], 3), (last["test_accuracy"], 3),
                   (last["density_sigma"], 2)]  # fmt: skip
        for value, digits in numbers:
            assert f" {fmt(value, digits)} |" in report
    assert (out / "notes.txt").read_text() == "mine"
    assert "stale" not in (out / "results.json").read_text()
    _assert_whole(out, users_files={"notes.txt", "figures/old.png"})
    assert results["files"] == sorted(
        ["checkpoints/0/mlp-bn/", "checkpoints/16/mlp-bn/", "config.toml", "report.md",
         "results.json", "spectra.npz", *(f"figures/{p}" for p in pngs)]
    )  # fmt: skip
    checkpoint = hs.load_checkpoint(out)
    assert (checkpoint.step, checkpoint.network, checkpoint.kind) == (16, "mlp-bn", "checkpoint")
    assert results["runs"][0]["loss_curve"]["loss"] == checkpoint.loss_curve.tolist()
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
        "--coordinator", "--num-processes", "--process-id", "--resume", "--debug",
        "--no-compilation-cache", "HESSSPEC_COMPILATION_CACHE", "analyze RUN_DIR",
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
        assert experiment in STUDIES, f.name
        if experiment == "batchnorm_spectrum":
            validate(load_config(f))
        assert f"experiments/{f.name}" in readme
    for name in ("digits_mlp", "digits_cnn", "cifar10_resnet"):
        cfg = load_config(ROOT / "experiments" / f"{name}.toml")
        assert cfg.model.batchnorm == (False, True)
        assert cfg.analysis.bn_modes == ("train", "population")


def test_every_registered_study_resolves_and_is_in_the_help():
    """Each entry of the study registry names a config class whose defaults its --quick
    overrides apply to, and a runner; --help names every other study."""
    from hessspec.cli.parser import build_parser
    from hessspec.cli.registry import DEFAULT_STUDY
    from hessspec.studies.common.config import apply_overrides as apply_to

    help_text = " ".join(build_parser().format_help().split())
    assert DEFAULT_STUDY in STUDIES
    for name, study in STUDIES.items():
        config = study.attribute(study.config_class)()
        quick = apply_to(config, study.attribute(study.quick_overrides))
        assert type(quick) is type(config) and quick != config, name
        assert callable(study.attribute(study.runner)), name
        if name != DEFAULT_STUDY:
            assert f'"{name}"' in help_text and study.package in help_text, name


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


# --------------------------------------------------------------------------------------
# Runs that survive: interrupts, resume, failures, full disks, concurrent writers
# --------------------------------------------------------------------------------------

PLAIN = [*TINY, "--set", "model.batchnorm=[false]"]


def _fake_analyse(self, objective, key, seed=0, on_stage=None):
    """A stand-in for CheckpointAnalyzer.analyse that costs nothing and still depends on
    the network: the "eigenvalues" are the parameter norm times a fixed profile, so a
    resumed run that restored other parameters would record other numbers."""
    from jax.flatten_util import ravel_pytree

    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalysis

    for stage in ("hessian", "top eigenpairs", "density", "trace", "gradients", "metrics"):
        if on_stage:
            on_stage(stage)
    norm = float(np.linalg.norm(np.asarray(ravel_pytree(objective.params)[0])))
    k = 2 * self.num_classes
    lam = norm * np.linspace(2.0, 1.0, k)
    energy = np.linspace(0.1, 1, k).tolist()
    record = {
        "train_loss": 2.0, "test_accuracy": 0.1, "top_eigenvalues": lam.tolist(),
        "residuals": [0.0] * k, "trace": 10.0 * norm, "num_outliers": 1,
        "bulk_edge": float(lam[1]), "outlier_ratio": 2.0, "gradient_energy_full": energy,
        "gradient_energy_minibatch_mean": energy, "gradient_energy_minibatch_std": [0.0] * k,
        "density_sigma": 0.01,
    }  # fmt: skip
    grid = np.linspace(0, 3, 50)
    arrays = {"eigenvalues": lam, "density_grid": grid, "density": np.exp(-grid)}
    return CheckpointAnalysis(record, arrays)


@pytest.fixture
def fake_analysis(monkeypatch):
    """Analyses replaced by :func:`_fake_analyse`; returns the list of analysed steps'
    calls, and lets a test raise at the n-th call (``interrupt_at``)."""
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

    calls = []
    control = {"interrupt_at": None}

    def analyse(self, objective, key, seed=0, on_stage=None):
        calls.append(objective.bn_mode)
        if control["interrupt_at"] == len(calls):
            raise KeyboardInterrupt
        return _fake_analyse(self, objective, key, seed, on_stage)

    monkeypatch.setattr(CheckpointAnalyzer, "analyse", analyse)
    return control


@pytest.fixture
def no_gc():
    # No garbage collection while an interrupt unwinds: jax's gc callback would otherwise
    # report it a second time as an "unraisable" exception under pytest-xdist.
    gc.disable()
    yield
    gc.enable()


def _files_on_disk(folder):
    """Every file the run folder holds, as results.json lists them (checkpoint folders as
    ``checkpoints/<step>/<network>/``)."""
    found = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if rel.parts[0] == "checkpoints":
            if len(rel.parts) == 3 and path.is_dir():
                found.add(f"{rel.as_posix()}/")
        elif path.is_file() and not rel.name.startswith("."):
            found.add(rel.as_posix())
    return found


def _assert_whole(folder, users_files=()):
    """results.json names exactly the files there are, but for the user's own."""
    results, spectra = load_results(folder)
    assert validate_results(results) == []
    assert set(results["files"]) == _files_on_disk(folder) - set(users_files), folder
    listed = {(r["name"], c["step"]) for r in results["runs"] for c in r["checkpoints"]}
    stored = {(k.split("/")[0], int(k.split("/")[1][4:])) for k in spectra}
    assert listed == stored
    assert not list(folder.rglob(".*.tmp"))
    return results


def test_the_study_runs_without_the_command_line(tmp_path, fake_analysis):
    """What a notebook does: build the config and run the whole study in one call, no
    argparse; its one-line notes go to the given log, its results are those on disk; a
    second run into the folder is refused before anything is trained."""
    from hessspec.studies.batchnorm_spectrum import build_config, run_batchnorm_spectrum_study
    from hessspec.studies.common.runfolder import OutputFolderError

    overrides = [v for flag, v in zip(PLAIN, PLAIN[1:], strict=False) if flag == "--set"]
    config = build_config(overrides=overrides)
    out, notes = tmp_path / "run", []
    results = run_batchnorm_spectrum_study(config, out, progress=False, log=notes.append)
    assert results["status"] == "complete" and results == _assert_whole(out)
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0, 16]
    assert notes[0].startswith("hessspec: memory (mlp): ")
    assert notes[1].startswith("hessspec: digits, mlp (") and f"output in {out}/" in notes[1]
    with pytest.raises(OutputFolderError, match="already holds files"):
        run_batchnorm_spectrum_study(config, out, progress=False, log=notes.append)
    assert len(notes) == 2


def test_interrupted_run_keeps_what_it_measured_and_resumes(tmp_path, fake_analysis, capsys,
                                                            no_gc):  # fmt: skip
    """Ctrl-C during the second analysis: exit 130 at once, results.json says
    "interrupted" during "analysis" with the first checkpoint and the loss curve; the
    training state of the second checkpoint is saved; --resume analyses it and completes
    without training again."""
    out = tmp_path / "out"
    fake_analysis["interrupt_at"] = 2
    assert main([*PLAIN, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; what was measured is in {out}/; continue with --resume" in err
    assert "Traceback" not in err
    results = _assert_whole(out)
    assert (results["status"], results["stopped_during"]) == ("interrupted", "analysis")
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0]
    assert len(results["runs"][0]["loss_curve"]["loss"]) == 16
    assert sorted(results["files"]) == sorted(["checkpoints/0/mlp/", "checkpoints/16/mlp/",
        "config.toml", "results.json", "spectra.npz"])  # fmt: skip
    assert not (out / "report.md").exists()  # the report comes when the run completes

    fake_analysis["interrupt_at"] = None
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mlp: resuming at step 16 (saved training state)" in err
    results = _assert_whole(out)
    assert results["status"] == "complete" and results["stopped_during"] is None
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0, 16]
    assert [s["trained"] for s in results["sessions"]] == [{"mlp": [0, 16]}, {"mlp": [16, 16]}]
    assert "Status" not in (out / "report.md").read_text()
    # a complete run: --resume has nothing to do
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    assert "trained and analysed already" in capsys.readouterr().err
    # --resume takes its config from the folder
    assert main(["--resume", "--set", "train.steps=3", "--out", str(out)]) == 2
    assert "leave out --set" in capsys.readouterr().err


def test_resume_after_interrupts_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys,
                                                             no_gc):  # fmt: skip
    """The Done-means of issue 10 on a tiny BN network analysed in eval mode (so the
    restored running averages matter), real analyses throughout:

    - an uninterrupted run A;
    - the same run interrupted in training (before step 12: the state of step 11 is saved),
      resumed and interrupted again during the third checkpoint's analysis, resumed again:
      its results.json equals A's to 1e-6 relative (every checkpoint number and the loss
      curve), and the sessions trained steps 0-11 and 11-16, none twice;
    - ``analyze`` of A with ``analysis.top_k=30`` writes 30 eigenvalues per checkpoint
      without training, the top ones those of A."""
    import importlib

    htrain = importlib.import_module("hessspec.nn.train")  # the module, not the function
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer
    from hessspec.studies.batchnorm_spectrum.results import compare_results

    args = [*TINY, "--set", "analysis.bn_modes=[\"eval\"]", "--set",
            "train.checkpoints=[0,8,16]"]  # fmt: skip
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    assert main([*args, "--out", str(ref)]) == 0
    reference = _assert_whole(ref)

    steps_run = []  # one loss per update the optimizer takes
    real_append, real_batch = htrain.LossCurve.append, htrain.BatchOrder.batch

    def counting_append(self, value):
        steps_run.append(len(self))
        real_append(self, value)

    def interrupting_batch(self, step):
        if step == interrupting_batch.stop_at:
            raise KeyboardInterrupt  # Ctrl-C between two steps
        return real_batch(self, step)

    interrupting_batch.stop_at = 11
    monkeypatch.setattr(htrain.LossCurve, "append", counting_append)
    monkeypatch.setattr(htrain.BatchOrder, "batch", interrupting_batch)
    assert main([*args, "--out", str(out)]) == 130
    first = load_results(out)[0]
    assert (first["status"], first["stopped_during"]) == ("interrupted", "training")

    interrupting_batch.stop_at = None
    real_analyse = CheckpointAnalyzer.analyse

    def interrupted_analysis(self, objective, key, seed=0, on_stage=None):
        raise KeyboardInterrupt

    # steps 0 and 8 were analysed before the interrupt at step 11: the resumed run trains
    # on to 16 and is interrupted in the third checkpoint's analysis, its first
    monkeypatch.setattr(CheckpointAnalyzer, "analyse", interrupted_analysis)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 130
    second = load_results(out)[0]
    assert (second["status"], second["stopped_during"]) == ("interrupted", "analysis")
    assert [c["step"] for c in second["runs"][0]["checkpoints"]] == [0, 8]
    monkeypatch.setattr(CheckpointAnalyzer, "analyse", real_analyse)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mlp-bn: resuming at step 16 (saved training state)" in err
    resumed = _assert_whole(out)
    assert compare_results(reference, resumed, rtol=1e-6) == []
    assert steps_run == list(range(16))  # every training step once, in order
    assert [s["trained"] for s in resumed["sessions"]] == [
        {"mlp-bn": [0, 11]}, {"mlp-bn": [11, 16]}, {"mlp-bn": [16, 16]}
    ]  # fmt: skip

    def no_training(*a, **k):
        raise AssertionError("analyze trained")

    monkeypatch.setattr(htrain, "train", no_training)
    monkeypatch.setattr(htrain.BatchOrder, "batch", no_training)
    top30 = tmp_path / "top30"
    assert main(["analyze", str(ref), "--out", str(top30), "--set", "analysis.top_k=30",
                 "--no-progress"]) == 0  # fmt: skip
    again = _assert_whole(top30)
    assert again["source"]["run_dir"] == str(ref.absolute())
    assert "top 30 eigenpairs" in (top30 / "report.md").read_text()
    for run_a, run_b in zip(reference["runs"], again["runs"], strict=True):
        assert run_a["loss_curve"] == run_b["loss_curve"]
        assert [c["step"] for c in run_b["checkpoints"]] == [0, 8, 16]
        for ca, cb in zip(run_a["checkpoints"], run_b["checkpoints"], strict=True):
            assert len(cb["top_eigenvalues"]) == 30
            np.testing.assert_allclose(cb["top_eigenvalues"][0], ca["top_eigenvalues"][0],
                                       rtol=1e-4)  # fmt: skip


def test_analyze_parameters_trained_elsewhere(tmp_path, fake_analysis, capsys):
    """``analyze --params FILE --config CFG``: the parameters of the file are the ones
    analysed (the stand-in analysis measures their norm: it finds the trained network's
    numbers, not the initial network's), recorded as step 0 without a loss curve."""
    from hessspec.studies.common.params_file import save_params

    run = tmp_path / "run"
    assert main([*PLAIN, "--out", str(run)]) == 0
    params = save_params(tmp_path / "last.npz", hs.load_checkpoint(run).model())
    out = tmp_path / "from-params"
    assert main(["analyze", "--params", str(params), "--config", str(run / "config.toml"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    (analysed,) = _assert_whole(out)["runs"]
    trained = load_results(run)[0]["runs"][0]["checkpoints"]
    assert analysed["checkpoints"][0]["step"] == 0 and analysed["loss_curve"]["loss"] == []
    assert analysed["checkpoints"][0]["top_eigenvalues"] == trained[-1]["top_eigenvalues"]
    assert analysed["checkpoints"][0]["top_eigenvalues"] != trained[0]["top_eigenvalues"]
    assert load_results(out)[0]["source"]["params_file"] == str(params.absolute())


def test_interrupt_while_writing_the_output_is_recorded(tmp_path, fake_analysis, monkeypatch,
                                                        capsys, no_gc):  # fmt: skip
    """SIGTERM while the figures are drawn: results.json says "interrupted" while "writing
    the output" and lists the figures already written (never "complete" with files
    missing); --resume writes the rest."""
    from hessspec.studies.batchnorm_spectrum import plots

    real = plots.draw_all

    class OneThenInterrupt(dict):
        def items(self):
            first = next(iter(super().items()))
            yield first
            raise KeyboardInterrupt

    monkeypatch.setattr(plots, "draw_all", lambda *a: OneThenInterrupt(real(*a)))
    out = tmp_path / "out"
    assert main([*PLAIN, "--out", str(out)]) == 130
    results = _assert_whole(out)
    assert (results["status"], results["stopped_during"]) == ("interrupted", "writing the output")
    assert [f for f in results["files"] if f.startswith("figures/")] == ["figures/density.png"]
    assert not (out / "report.md").exists()
    monkeypatch.setattr(plots, "draw_all", real)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    results = _assert_whole(out)
    assert results["status"] == "complete" and (out / "report.md").exists()
    assert len([f for f in results["files"] if f.startswith("figures/")]) == 5


def test_full_disk_leaves_a_consistent_folder(tmp_path, fake_analysis, monkeypatch, capsys):
    """The disk fills up while spectra.npz is rewritten after the second checkpoint: exit 1
    with one line that says so; results.json lists exactly the checkpoints spectra.npz
    holds; once there is room again --resume completes the run."""
    import errno

    from hessspec.studies.batchnorm_spectrum.results import ResultsWriter
    from hessspec.studies.common.runfolder import OutputWriteError

    real = ResultsWriter._write_npz
    writes = []

    def full_on_second(self, arrays):
        writes.append(len(arrays))
        if len(writes) == 2:
            raise OutputWriteError(errno.ENOSPC, f"no space left on the device while writing "
                                   f"{self.out_dir / 'spectra.npz'}; free some space")  # fmt: skip
        real(self, arrays)

    monkeypatch.setattr(ResultsWriter, "_write_npz", full_on_second)
    out = tmp_path / "out"
    assert main([*PLAIN, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("hessspec.run: error: no space left on the device")
    results = _assert_whole(out)
    assert results["status"] == "failed" and results["stopped_during"] == "analysis"
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0]
    monkeypatch.setattr(ResultsWriter, "_write_npz", real)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    assert [c["step"] for c in _assert_whole(out)["runs"][0]["checkpoints"]] == [0, 16]


def test_overwrite_replaces_only_after_success(tmp_path, fake_analysis, capsys):
    """--overwrite over a complete run: a new run that diverges leaves the previous one
    byte for byte (the failed one waits in .hessspec-pending); a new run that completes
    replaces exactly the files the previous one wrote (its checkpoints included) and keeps
    the user's files."""
    out = tmp_path / "out"
    assert main([*PLAIN, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "mine.png").write_bytes(b"my own figure")
    capsys.readouterr()

    diverge = ["--set", "train.learning_rate=1e30", "--set", "train.checkpoints=[16]"]
    assert main([*PLAIN, *diverge, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert "training mlp diverged: the mini-batch loss became" in line and "at step" in line
    assert "lower train.learning_rate" in line and "previous run in" in line
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before
    failed = load_results(out / ".hessspec-pending")[0]
    assert failed["status"] == "failed" and failed["stopped_during"] == "training"
    assert 1 <= len(failed["runs"][0]["loss_curve"]["loss"]) <= 16

    args = ["--set", "train.checkpoints=[0,8]", "--seed", "1"]
    assert main([*PLAIN, *args, "--out", str(out), "--overwrite"]) == 0
    results = _assert_whole(out, users_files={"notes.txt", "figures/mine.png"})
    assert results["config"]["seed"] == 1
    assert not (out / ".hessspec-pending").exists()
    # the previous run's analysis checkpoint at 16 is replaced by the new run's final state
    final = hs.load_checkpoint(out / "checkpoints" / "16" / "mlp")
    assert final.kind == "final" and final.config.seed == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0", "16", "8"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "figures" / "mine.png").read_bytes() == b"my own figure"


def test_a_second_writer_is_refused(tmp_path, fake_analysis, capsys):
    """While a run holds the folder, another run into it (with --overwrite or --resume) is
    refused with exit 2 and changes nothing."""
    from hessspec.studies.common.runfolder import FolderLock

    out = tmp_path / "out"
    assert main([*PLAIN, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with FolderLock(out, command="python -m hessspec.run --out out"):
        for flags in (["--overwrite"], []):
            args = [*PLAIN, *flags] if flags else ["--resume"]
            assert main([*args, "--out", str(out)]) == 2
            line = capsys.readouterr().err.splitlines()[-1]
            assert "is being written by another hessspec run (process" in line, line
        assert main(["analyze", str(out), "--out", str(tmp_path / "again")]) == 2
        assert "being written by another hessspec run" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_stale_temporaries_and_file_modes(tmp_path, fake_analysis, capsys, no_gc):
    """Temporaries a killed run left are removed when the folder is opened again; files
    get the umask's mode (not mkstemp's 0600)."""
    import os
    import stat

    out = tmp_path / "out"
    fake_analysis["interrupt_at"] = 2
    old = os.umask(0o027)
    try:
        assert main([*PLAIN, "--out", str(out)]) == 130
        stale = [out / ".spectra.npz.a1b2c3d4.tmp", out / "checkpoints" / "16" /
                 "mlp.orbax-checkpoint-tmp-99"]  # fmt: skip
        stale[0].write_bytes(b"half a file")
        stale[1].mkdir()
        fake_analysis["interrupt_at"] = None
        assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
        assert "removed" in capsys.readouterr().err
        assert not any(p.exists() for p in stale)
        for name in ("results.json", "spectra.npz", "config.toml", "report.md"):
            assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    finally:
        os.umask(old)
    _assert_whole(out)


def _write_cifar_folder(folder, poison):
    """CIFAR-10 python batches in ``folder``, ``data_batch_1`` replaced by ``poison``."""
    import pickle

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
             b"labels": list(range(10)) * 2}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(d))
    (folder / "data_batch_1").write_bytes(poison)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("config folder", "is a folder; pass a TOML file"),
        ("config not utf-8", "is not UTF-8 text (byte 13 is 0xff)"),
        ("negative seed", "config key 'seed' must lie in [0, 4294967295], got -1"),
        ("fewer examples than classes", "data.train_size=5 is smaller than the 10 classes"),
        ("read-only output", "cannot write to"),
        ("cifar pickle naming a module", "names posix.system, which a CIFAR-10 batch never"),
        ("ctrl-c during start-up", "interrupted before the run started; nothing was written"),
    ],
)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, case, needle, no_gc):
    """Every bad input of issue 10 ends in exactly one line on stderr (exit 2; 130 for the
    interrupt), with no traceback and nothing written."""
    import pickle

    out = tmp_path / "out"
    args = [*TINY, "--out", str(out)]
    status = 2
    if case == "config folder":
        args += ["--config", str(tmp_path)]
    elif case == "config not utf-8":
        (tmp_path / "c.toml").write_bytes(b"[train]\nsteps\xff = 3\n")
        args += ["--config", str(tmp_path / "c.toml")]
    elif case == "negative seed":
        args += ["--seed", "-1"]
    elif case == "fewer examples than classes":
        args += ["--set", "data.train_size=5"]
    elif case == "read-only output":
        import tempfile

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        out.mkdir()
        monkeypatch.setattr(tempfile, "mkstemp", denied)  # as root, chmod would not stop us
    elif case == "cifar pickle naming a module":
        poison = pickle.dumps(__import__("os").system)  # refers to posix.system
        _write_cifar_folder(tmp_path / "cifar", poison)
        args += ["--set", "data.name=cifar10", "--set", f"data.path={tmp_path / 'cifar'}",
                 "--set", "model.name=mlp"]  # fmt: skip
    elif case == "ctrl-c during start-up":
        import hessspec.studies.batchnorm_spectrum.study

        def interrupted(config):
            raise KeyboardInterrupt

        monkeypatch.setattr(hessspec.studies.batchnorm_spectrum.study, "prepare_study", interrupted)
        status = 130
    assert main(args) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hessspec.run")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists() or not any(out.iterdir())


def test_sigterm_in_training_acts_at_once(tmp_path):
    """The real signal path (one subprocess): SIGTERM while the training runs ends the
    process with status 130 within seconds (the state it reached saved, the folder whole:
    results.json says where it stopped and holds the loss curve up to that step)."""
    import json
    import os
    import signal
    import time

    out = tmp_path / "out"
    args = [*TINY, "--set", "model.batchnorm=[false]", "--set", "train.steps=1000000",
            "--set", "train.checkpoints=[1000000]", "--no-compilation-cache"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "hessspec.run", *args, "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "mlp (1/1): training" in line:  # the training starts (compiled already)
            break
    time.sleep(0.5)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    latency = time.perf_counter() - sent
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert latency < 5.0, latency  # typically 0.1-0.3 s
    assert "interrupted; what was measured is in" in err and "Traceback" not in err
    results = json.loads((out / "results.json").read_text())
    assert (results["status"], results["stopped_during"]) == ("interrupted", "training")
    reached = results["sessions"][0]["trained"]["mlp"][1]
    assert 0 < reached < 1000000
    assert len(results["runs"][0]["loss_curve"]["loss"]) == reached
    assert results["timing"]["seconds_training"] > 0
    assert f"checkpoints/{reached}/mlp/" in results["files"], err
    assert set(results["files"]) == _files_on_disk(out)


def test_compilation_cache_is_on_unless_switched_off(monkeypatch, capsys):
    """The CLI enables JAX's persistent compilation cache (issue 9) unless
    --no-compilation-cache; a cache folder that cannot be used is refused in one line."""
    import hessspec.compilation_cache

    calls = []
    monkeypatch.setattr(
        hessspec.compilation_cache, "enable_compilation_cache", lambda: calls.append(1)
    )
    assert main(["--show-config"]) == 0 and calls == [1]
    assert main(["--show-config", "--no-compilation-cache"]) == 0 and calls == [1]

    def unusable():
        raise ValueError("compilation cache: /x exists and is not a folder; set ...=off.")

    monkeypatch.setattr(hessspec.compilation_cache, "enable_compilation_cache", unusable)
    assert main(["--show-config"]) == 2
    assert "error: compilation cache: /x exists" in capsys.readouterr().err


def test_startup_guard_only_for_the_command(monkeypatch):
    """Ctrl-C while ``python -m hessspec.run`` imports the package ends in one line; the
    guard is installed for that command only, never when hessspec is imported."""
    from hessspec import _startup

    monkeypatch.setattr(sys, "argv", ["-m", "--quick"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "hessspec.run", "--quick"])
    assert _startup.started_as_command()
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest"])
    assert not _startup.started_as_command()
    monkeypatch.setattr(sys, "argv", ["script.py"])
    assert not _startup.started_as_command()


def test_analyze_bad_input(tmp_path, fake_analysis, capsys):
    """``analyze`` refuses, in one line with exit status 2 and before writing anything,
    every way of asking for what cannot be analysed (one finished run serves every case)."""
    run = tmp_path / "run"
    assert main([*PLAIN, "--out", str(run)]) == 0
    capsys.readouterr()
    cases = [
        ([], "needs either RUN_DIR"),
        ([run, "--set", "train.steps=3"], "changes analysis settings only"),
        ([run, "--config", "x.toml"], "uses the run's own config"),
        ([run, "--steps", "4"], "no saved checkpoint of mlp at step(s) [4]"),
        ([run, "--steps", "a,b"], "--steps must be comma-separated"),
        ([run, "--out", str(run)], "--out must not be RUN_DIR"),
        ([tmp_path], "is not a run folder"),
        (["--params", "missing.npz"], "--params holds one network"),
        (["--params", "missing.npz", "--set", "model.batchnorm=[true]"], "does not exist"),
    ]
    for args, needle in cases:
        new = tmp_path / "new"
        out = [] if "--out" in args else ["--out", str(new)]
        assert main(["analyze", *map(str, args), *out]) == 2, args
        err = capsys.readouterr().err
        assert "Traceback" not in err and needle in err.splitlines()[-1], err
        assert not new.exists()


class _Stop(BaseException):
    """Raised by a stand-in to end a CLI run at a chosen point (before any training); a
    BaseException, so that the CLI's one-line error handling lets it through."""


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


def test_memory_line_before_training(tmp_path, monkeypatch, capsys):
    """A run prints the memory its analysis needs and what is available, before training
    (and before it writes anything)."""
    import hessspec.studies.batchnorm_spectrum.study

    def stop(setup, out_dir, **kwargs):
        raise _Stop

    monkeypatch.setattr(hessspec.studies.batchnorm_spectrum.study, "run_study", stop)
    with pytest.raises(_Stop):
        main([*TINY, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("hessspec: memory ("))
    assert "this run needs about" in line and "(peak in top_eigenpairs: basis" in line
    assert "available (host RAM)" in line or "available (free on" in line


def test_memory_limit_refuses_before_training(tmp_path, monkeypatch, capsys):
    """A budget below the estimate: exit status 2 before any training, with what the
    analysis needs, what is available and the options that lower the need; nothing written."""
    import importlib

    htrain = importlib.import_module("hessspec.nn.train")  # the module, not the function

    monkeypatch.setattr(htrain, "train", _no_training)
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
    # the tiny run's basis has the smallest size (128 rows): fewer steps would not help
    assert "analysis.lanczos_steps" not in message and "--memory-limit" in message
    assert "size=N with N < 64 (fewer analysis examples)" in message
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

    import hessspec.studies.batchnorm_spectrum.analyzer
    from hessspec.nn.objective import make_objective
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer
    from hessspec.studies.batchnorm_spectrum.preflight import memory_preflight
    from hessspec.studies.batchnorm_spectrum.setup import analysis_settings, prepare_study

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
    assert all(b64 > 0 for _, b64, _ in bases)

    calls = {}

    def fake_top_eigenpairs(op, k, **kwargs):
        calls.update(kwargs)
        raise _Stop

    monkeypatch.setattr(
        hessspec.studies.batchnorm_spectrum.analyzer, "top_eigenpairs", fake_top_eigenpairs
    )
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
    """--coordinator/--num-processes/--process-id reach hessspec.curvature.distributed.initialize,
    which runs before the data is loaded; a failure to join stops with a clear message."""
    import hessspec.curvature.distributed
    import hessspec.studies.batchnorm_spectrum.study

    order = []
    monkeypatch.setattr(
        hessspec.curvature.distributed, "initialize", lambda *a: order.append(("initialize", a))
    )

    def prepare(config):
        order.append(("prepare_study",))
        raise _Stop

    monkeypatch.setattr(hessspec.studies.batchnorm_spectrum.study, "prepare_study", prepare)
    out = tmp_path / "out"
    flags = ["--coordinator", "localhost:23456", "--num-processes", "2", "--process-id", "1"]
    with pytest.raises(_Stop):
        main([*TINY, *flags, "--out", str(out)])
    assert order == [("initialize", ("localhost:23456", 2, 1)), ("prepare_study",)]
    assert not out.exists()  # process 1 never touches the output folder

    def refuse(*args):
        raise RuntimeError("connection refused")

    monkeypatch.setattr(hessspec.curvature.distributed, "initialize", refuse)
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
    import hessspec.curvature.distributed

    monkeypatch.setattr(hessspec.curvature.distributed, "initialize", _no_training)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
