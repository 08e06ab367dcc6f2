"""The memory preflight before training and the multi-process flags of the command line,
on the tiny study (stand-ins stop each run before it trains)."""

import pytest
from cli_study import TINY

from hessspec.cli.main import main
from hessspec.studies.batchnorm_spectrum.config import (
    Config,
    ConfigError,
    apply_overrides,
    validate,
)


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
