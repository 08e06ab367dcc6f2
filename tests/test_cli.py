"""The command line ``python -m hessspec.run`` and its configuration, end to end on tiny
settings: one study (a BatchNorm network analysed in every mode) run once for the module,
and every way a bad input must stop before training. (Compiling the analysis programs is
what costs time here, one set per BN graph: train mode, and eval/population which share
one; the path without BN is the same code with empty statistics, run by the default
study and by tests/test_train.py.)"""

import subprocess
import sys
from pathlib import Path

import cli_study
import numpy as np
import pytest
from cli_study import TINY, assert_whole, files_on_disk

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
no_gc = cli_study.no_gc  # the fixture, under its name


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
         "loss_curves.png", "overlap.png"]
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
    assert_whole(out, users_files={"notes.txt", "figures/old.png"})
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
        digits = name.startswith("digits")
        assert cfg.analysis.per_layer == digits and (cfg.train.track_sharpness_every > 0) == digits


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
    assert set(results["files"]) == files_on_disk(out)


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
