"""Runs that survive, through the command line on the tiny study: interrupts and
``--resume``, failures, full disks, concurrent writers, ``analyze`` of saved networks."""

import os
import stat

import cli_study
import numpy as np
import pytest
from cli_study import PLAIN, TINY, assert_whole

import hessspec as hs
from hessspec.cli.main import main
from hessspec.studies.batchnorm_spectrum.results import load_results

fake_analysis = cli_study.fake_analysis  # the fixtures, under their names
no_gc = cli_study.no_gc


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
    assert results["status"] == "complete" and results == assert_whole(out)
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
    results = assert_whole(out)
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
    results = assert_whole(out)
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
    restored running averages matter), real analyses throughout, per-layer spectra too:

    - an uninterrupted run A;
    - the same run interrupted in training (before step 12: the state of step 11 is saved),
      resumed and interrupted again during the third checkpoint's analysis, resumed again:
      its results.json equals A's to 1e-6 relative (every checkpoint number, the per-layer
      spectra, the top-K overlap with the previous checkpoint (read back from spectra.npz
      after the resume), and the loss curve), and the sessions trained steps 0-11 and
      11-16, none twice;
    - ``analyze`` of A with ``analysis.top_k=30`` writes 30 eigenvalues per checkpoint
      without training, the top ones those of A."""
    import importlib

    htrain = importlib.import_module("hessspec.nn.train")  # the module, not the function
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer
    from hessspec.studies.batchnorm_spectrum.results import compare_results

    args = [*TINY, "--set", "analysis.bn_modes=[\"eval\"]", "--set",
            "train.checkpoints=[0,8,16]", "--set", "analysis.per_layer=true"]  # fmt: skip
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    assert main([*args, "--out", str(ref)]) == 0
    reference = assert_whole(ref)
    checkpoints = reference["runs"][0]["checkpoints"]
    assert all(c["per_layer"]["names"] == ["linears/0", "head"] for c in checkpoints)
    assert [c["top_k_overlap_with_previous"] is None for c in checkpoints] == [True, False, False]

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
    resumed = assert_whole(out)
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
    again = assert_whole(top30)
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
    (analysed,) = assert_whole(out)["runs"]
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
    results = assert_whole(out)
    assert (results["status"], results["stopped_during"]) == ("interrupted", "writing the output")
    assert [f for f in results["files"] if f.startswith("figures/")] == ["figures/density.png"]
    assert not (out / "report.md").exists()
    monkeypatch.setattr(plots, "draw_all", real)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    results = assert_whole(out)
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
    results = assert_whole(out)
    assert results["status"] == "failed" and results["stopped_during"] == "analysis"
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0]
    monkeypatch.setattr(ResultsWriter, "_write_npz", real)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    assert [c["step"] for c in assert_whole(out)["runs"][0]["checkpoints"]] == [0, 16]


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
    results = assert_whole(out, users_files={"notes.txt", "figures/mine.png"})
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
    assert_whole(out)


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


def test_sharpness_survives_an_interrupted_training(tmp_path, fake_analysis, monkeypatch,
                                                    capsys, no_gc):  # fmt: skip
    """λmax every 4 steps of the plain tiny network: the training interrupted before step 11
    keeps the measurements of steps 0, 4 and 8 in results.json; ``--resume`` measures 12 and
    16 (a cold start after the resume, warm-started before) and keeps the first three as
    they were; every entry is an uninterrupted run's, exactly before the interrupt and to
    the solver's tolerance after it; ``analyze`` of the run keeps them."""
    import importlib

    htrain = importlib.import_module("hessspec.nn.train")  # the module, not the function
    args = [*PLAIN, "--set", "train.track_sharpness_every=4"]
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    assert main([*args, "--out", str(ref)]) == 0
    reference = assert_whole(ref)["runs"][0]["sharpness"]
    assert [e["step"] for e in reference] == [0, 4, 8, 12, 16]

    real_batch = htrain.BatchOrder.batch

    def interrupting_batch(self, step):
        if step == 11:
            raise KeyboardInterrupt  # Ctrl-C between two steps
        return real_batch(self, step)

    monkeypatch.setattr(htrain.BatchOrder, "batch", interrupting_batch)
    assert main([*args, "--out", str(out)]) == 130
    first = assert_whole(out)["runs"][0]["sharpness"]
    assert first == reference[:3]
    monkeypatch.setattr(htrain.BatchOrder, "batch", real_batch)
    assert main(["--resume", "--no-progress", "--out", str(out)]) == 0
    assert "mlp: resuming at step 11" in capsys.readouterr().err
    resumed = assert_whole(out)["runs"][0]["sharpness"]
    assert resumed[:3] == first and [e["step"] for e in resumed] == [0, 4, 8, 12, 16]
    np.testing.assert_allclose([e["lambda_max"] for e in resumed[3:]],
                               [e["lambda_max"] for e in reference[3:]], rtol=1e-4)  # fmt: skip
    # a re-analysis of the run keeps what its training measured
    again = tmp_path / "again"
    assert main(["analyze", str(ref), "--out", str(again), "--no-progress"]) == 0
    assert assert_whole(again)["runs"][0]["sharpness"] == reference
