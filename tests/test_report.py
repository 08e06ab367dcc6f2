"""The output files: atomic writes, the results writer (a checkpoint is listed only once
its arrays are on disk), the results.json schema, the findings, report.md and the figures,
on constructed results (no training)."""

import errno
import json

import numpy as np
import pytest

from hessspec.studies.batchnorm_spectrum.report import findings, render_report, write_report
from hessspec.studies.batchnorm_spectrum.results import (
    ResultsWriter,
    compare_results,
    load_results,
    prepare_output_dir,
    spectra_key,
    validate_results,
)
from hessspec.studies.common.formatting import fmt
from hessspec.studies.common.runfolder import atomic_write_bytes, atomic_write_text

K = 3


def _checkpoint(step, top, energy, rng):
    """A checkpoint record with top eigenvalues ``top`` (largest first) and full-batch
    gradient energies ``energy`` (cumulative)."""
    k = len(top)
    mb = np.clip(np.asarray(energy) - 0.05, 0, 1)
    return {
        "train_loss": 1.0 / (1 + step),
        "train_accuracy": 0.5,
        "test_loss": 1.2 / (1 + step),
        "test_accuracy": 0.4 + 0.01 * step,
        "top_eigenvalues": list(top),
        "residuals": list(1e-6 * rng.random(k)),
        "relative_residuals": list(1e-7 * rng.random(k)),
        "converged": [True] * k,
        "trace": float(np.sum(top) * 3),
        "trace_stderr": 0.1,
        "num_outliers": K,
        "bulk_edge": float(top[K]),
        "outlier_ratio": float(top[0] / top[K]),
        "lambda1_over_lambdaK": float(top[0] / top[K - 1]),
        "headline_ratio": float(top[0] / top[K]),
        "top_k_overlap_with_previous": None if step == 0 else 0.75 + 0.001 * step,
        "density_sigma": 0.01,
        "gradient_energy_full": list(energy),
        "gradient_energy_minibatch_mean": list(mb),
        "gradient_energy_minibatch_std": [0.02] * k,
        "warnings": [],
    }


#: The per-layer numbers of each run (plain: index 0, BN: 1) at step 10: three layers of
#: 40 + 40 + 20 (+ 4 BatchNorm parameters in the first layer), λ1 and trace of each.
LAYERS = (
    {"sizes": [40, 40, 20], "lambda1": [8.0, 12.0, 30.0], "traces": [10.0, 20.0, 70.0]},
    {"sizes": [44, 40, 20], "lambda1": [1.5, 1.2, 2.0], "traces": [6.0, 3.0, 1.0]},
)


def _per_layer(run, grid):
    """The ``per_layer`` record and arrays of run ``run`` (0 or 1) at step 10."""
    layers = LAYERS[run]
    record = {
        "names": ["linears/0", "linears/1", "head"], "sizes": layers["sizes"],
        "parameters": [["linears/0/kernel"], ["linears/1/kernel"], ["head/kernel"]],
        "top_eigenvalues": [[v, v / 2] for v in layers["lambda1"]],
        "residuals": [[1e-7, 1e-7]] * 3, "traces": layers["traces"],
        "trace_stderrs": [0.1] * 3,
        "js_distances": [[0.0, 0.1, 0.5], [0.1, 0.0, 0.4], [0.5, 0.4, 0.0]],
        "density_sigma": 0.02,
    }  # fmt: skip
    densities = np.stack([np.exp(-((grid - c) ** 2)) + 1e-9 for c in (0.0, 1.0, 5.0)])
    return record, {"layer_density_grid": grid, "layer_densities": densities}


def _study(tmp_path):
    """A results.json and spectra.npz written by ResultsWriter for two runs: without BN
    (three clear outliers, energy concentrated) and with BN (flat top); per-layer spectra at
    the last checkpoint, the sharpness at steps 0, 5, 10."""
    rng = np.random.default_rng(0)
    writer = ResultsWriter(
        tmp_path,
        {"hessspec_version": "test", "config": {"title": "t", "train": {"steps": 10}},
         "data": {"name": "toy", "num_classes": K}, "settings": {"top_k": 2 * K},
         "checkpoint_steps": [0, 10], "command": "python -m hessspec.run"},
    )  # fmt: skip
    plain = writer.add_run({"name": "mlp", "model": "mlp", "batchnorm": False, "bn_mode": None,
                            "num_params": 100, "num_classes": K, "stability_threshold": 38.0,
                            "sharpness": []})  # fmt: skip
    bn = writer.add_run({"name": "mlp-bn-train", "model": "mlp", "batchnorm": True,
                         "bn_mode": "train", "num_params": 104, "num_classes": K,
                         "stability_threshold": 38.0, "sharpness": []})  # fmt: skip
    for step in (0, 10):
        for run, top, energy in (
            (plain, [40.0, 30.0, 20.0, 2.0, 1.9, 1.8], [0.3, 0.6, 0.9, 0.91, 0.92, 0.93]),
            (bn, [2.0, 1.9, 1.8, 1.7, 1.6, 1.5], [0.1, 0.2, 0.3, 0.35, 0.4, 0.45]),
        ):
            grid = np.linspace(-1, 45, 500)
            arrays = {
                "nodes": np.sort(rng.random((2, 5)) * top[0], axis=1),
                "weights": np.full((2, 5), 0.2),
                "eigenvalues": np.array(top),
                "density_grid": grid,
                "density": np.exp(-(grid**2)) + 1e-6,
            }
            record = _checkpoint(step, top, energy, rng)
            if step == 10:  # per-layer spectra at the last checkpoint: three layers
                record["per_layer"], layer_arrays = _per_layer(run, grid)
                arrays.update(layer_arrays)
            writer.add_checkpoint(run, step, record, arrays)
    for run, values in ((plain, [3.0, 9.0, 12.0]), (bn, [2.0, 1.5, 1.0])):
        entries = [{"step": s, "lambda_max": v} for s, v in zip((0, 5, 10), values, strict=True)]
        writer.set_sharpness(run, entries, write=False)
    writer.set_loss_curve(plain, np.arange(1, 11), np.linspace(2, 0.5, 10))
    writer.set_loss_curve(bn, np.arange(1, 11), np.linspace(2, 0.3, 10))
    writer.update(status="complete", timing={"seconds_total": 1.5})
    return writer


def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "one")
    assert path.read_text() == "one"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails while writing the temporary file
    assert path.read_text() == "one"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_prepare_output_dir(tmp_path):
    """For library use: an empty or missing folder is fine; one holding files refuses
    unless overwrite, which removes exactly the files the previous run listed (and the
    temporaries of killed runs), never the user's own."""
    from hessspec.studies.common.runfolder import OutputFolderError

    out = tmp_path / "new" / "deeper"
    assert prepare_output_dir(out, overwrite=False) == out and out.is_dir()
    assert prepare_output_dir(out, overwrite=False) == out  # empty: fine
    _study(out)
    (out / "figures").mkdir()
    (out / "figures" / "density.png").write_bytes(b"x")
    (out / "figures" / "mine.png").write_bytes(b"user")
    (out / "mine.txt").write_text("keep")
    (out / ".spectra.npz.abcd1234.tmp").write_bytes(b"half")
    writer = ResultsWriter.reopen(out)
    writer.add_files("figures/density.png")
    writer.write_json()
    with pytest.raises(OutputFolderError, match="overwrite=True"):
        prepare_output_dir(out, overwrite=False)
    assert (out / "results.json").exists()
    prepare_output_dir(out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "figures", "figures/mine.png", "mine.txt"
    ]  # fmt: skip
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        prepare_output_dir(file, overwrite=True)


def test_a_checkpoint_is_listed_only_when_its_arrays_are_on_disk(tmp_path, monkeypatch):
    """A full disk while spectra.npz is written: nothing changes (results.json still lists
    the steps spectra.npz holds, in memory and on disk); the error names the file."""
    from hessspec.studies.common import runfolder

    writer = _study(tmp_path)
    before = (tmp_path / "results.json").read_text()
    real = runfolder.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)
    record = _checkpoint(20, [2.0, 1.9, 1.8, 1.7, 1.6, 1.5], [0.1] * 6, np.random.default_rng(1))
    with pytest.raises(runfolder.OutputWriteError, match="no space left.*spectra.npz"):
        writer.add_checkpoint(0, 20, record, {"eigenvalues": np.ones(6)})
    monkeypatch.setattr(runfolder.os, "fsync", real)
    assert [c["step"] for c in writer.results["runs"][0]["checkpoints"]] == [0, 10]
    assert not any("step20" in k for k in writer.arrays)
    assert (tmp_path / "results.json").read_text() == before
    results, spectra = load_results(tmp_path)
    listed = {(r["name"], c["step"]) for r in results["runs"] for c in r["checkpoints"]}
    stored = {(k.split("/")[0], int(k.split("/")[1][4:])) for k in spectra}
    assert listed == stored
    assert not list(tmp_path.glob(".*.tmp"))
    # the next write lists every file, results.json included
    writer.add_files("figures/density.png")
    writer.write_json()
    assert json.loads((tmp_path / "results.json").read_text())["files"] == [
        "figures/density.png", "results.json", "spectra.npz"
    ]  # fmt: skip


def test_reopen_keeps_listed_checkpoints_only(tmp_path):
    """A run continued from its folder gets back its results and exactly the arrays of the
    checkpoints results.json lists (a failed write may have left more in spectra.npz)."""
    writer = _study(tmp_path)
    writer.arrays[spectra_key("mlp", 20, "eigenvalues")] = np.ones(3)  # not listed
    writer.write_npz()
    again = ResultsWriter.reopen(tmp_path)
    assert again.results["runs"] == json.loads(json.dumps(writer.results["runs"]))
    assert set(again.arrays) == set(writer.arrays) - {spectra_key("mlp", 20, "eigenvalues")}
    assert again.run_index("mlp-bn-train") == 1 and again.analysed_steps(1) == {0, 10}
    assert again.add_run({"name": "mlp", "batchnorm": False, "bn_mode": None}) == 0


def test_compare_results(tmp_path):
    results, _ = load_results(_study(tmp_path).out_dir)
    other = json.loads(json.dumps(results))
    assert compare_results(results, other) == []
    other["runs"][0]["checkpoints"][1]["top_eigenvalues"][2] *= 1 + 1e-7
    other["runs"][0]["checkpoints"][1]["seconds"] = 99.0  # timings are not compared
    assert compare_results(results, other, rtol=1e-6) == []
    other["runs"][0]["checkpoints"][1]["top_eigenvalues"][2] *= 1 + 1e-5
    (problem,) = compare_results(results, other, rtol=1e-6)
    assert problem.startswith("mlp step 10 top_eigenvalues[2]:")
    other["runs"][1]["loss_curve"]["loss"].pop()
    assert "mlp-bn-train loss_curve loss: 10 vs 9 entries" in compare_results(results, other)


def test_writer_files_roundtrip_and_validate(tmp_path):
    writer = _study(tmp_path)
    results, spectra = load_results(tmp_path)
    assert results == json.loads(json.dumps(writer.results))
    assert validate_results(results) == []
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0, 10]
    np.testing.assert_array_equal(
        spectra[spectra_key("mlp-bn-train", 10, "eigenvalues")], [2.0, 1.9, 1.8, 1.7, 1.6, 1.5]
    )
    assert results["runs"][1]["loss_curve"]["loss"][-1] == pytest.approx(0.3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_numbers_become_null(tmp_path):
    writer = ResultsWriter(tmp_path, {"hessspec_version": "x", "config": {}, "nan": np.nan})
    writer.update(value=np.float32(np.inf), count=np.int64(3), flag=np.bool_(True))
    text = (tmp_path / "results.json").read_text()
    data = json.loads(text)
    assert data["nan"] is None and data["value"] is None
    assert data["count"] == 3 and data["flag"] is True


def test_validate_results_finds_problems(tmp_path):
    results, _ = load_results(_study(tmp_path).out_dir)
    bad = json.loads(json.dumps(results))
    del bad["runs"][0]["checkpoints"][0]["trace"]
    bad["runs"][0]["checkpoints"][1]["top_eigenvalues"].reverse()
    bad["runs"][1]["bn_mode"] = None
    bad["runs"][1]["checkpoints"][0]["gradient_energy_full"] = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    bad["runs"][0]["num_params"] = "100"
    problems = "\n".join(validate_results(bad))
    assert "missing key 'trace'" in problems
    assert "not sorted largest first" in problems
    assert "a BN run needs train/eval/population" in problems
    assert "not non-decreasing" in problems
    assert "runs[0].num_params" in problems
    assert validate_results({"runs": []})  # no version, config, status


def test_findings_and_report_state_measured_numbers(tmp_path):
    results, spectra = load_results(_study(tmp_path).out_dir)
    (f,) = findings(results)
    assert f["step"] == 10 and f["bn_mode"] == "train"
    assert f["outlier_ratio_plain"] == pytest.approx(20.0)
    assert f["outlier_ratio_bn"] == pytest.approx(2.0 / 1.7)
    assert f["outlier_ratio_quotient"] == pytest.approx(20.0 / (2.0 / 1.7))
    assert f["energy_topK_plain"] == pytest.approx(0.9)
    assert f["energy_topK_difference"] == pytest.approx(0.6)
    text = render_report(results, {"Density": "figures/density.png"})
    assert "17 times larger without BN" in text  # 20 / (2.0 / 1.7) = 17.0
    assert "0.9 without BN, 0.3 with BN (difference 0.6)" in text
    assert "This run shows" in text
    assert "![Density](figures/density.png)" in text
    assert "σ" in text


def _table_rows(text, first_cell):
    """The cells of the report's table rows whose first cell starts with ``first_cell``."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_report_numbers_are_the_results_numbers(tmp_path):
    """Every number in report.md is the results.json number through the one formatter of
    every study (``fmt``): the last-checkpoint row of each run, each row over training, the
    findings; some checked against the constructed values themselves."""
    results, _ = load_results(_study(tmp_path).out_dir)
    text = render_report(results, {})
    for run in results["runs"]:
        k, c = run["num_classes"], run["checkpoints"][-1]
        rel = max(c["relative_residuals"])
        (row,) = _table_rows(text, f"{run['name']} (")
        assert row[1:] == [
            fmt(c["step"]), fmt(run["num_params"]), fmt(c["top_eigenvalues"][0]),
            fmt(c["headline_ratio"]), fmt(c["bulk_edge"]), f"{fmt(c['num_outliers'])} ({k})",
            fmt(c["outlier_ratio"]),
            fmt(c["lambda1_over_lambdaK"]), f"{fmt(c['trace'])} ± {fmt(c['trace_stderr'], 2)}",
            fmt(c["gradient_energy_full"][k - 1]),
            f"{fmt(c['gradient_energy_minibatch_mean'][k - 1])} ± "
            f"{fmt(c['gradient_energy_minibatch_std'][k - 1], 2)}",
            fmt(rel, 2), fmt(c["train_loss"]), fmt(c["test_accuracy"]),
        ]  # fmt: skip
    # the run without BN at step 10: lambda_1 = 40, headline lambda_1/lambda_4 = 40/2, bulk
    # edge 2, ratio 20, lambda_1/lambda_K = 40/20, trace 3 * 95.7, 0.9 of the gradient in
    # the top-3 space, 0.5 test accuracy
    (row,) = _table_rows(text, "mlp (no BN)")
    assert row[1:9] == ["10", "100", "40", "20", "2", "3 (3)", "20", "2"]
    assert row[9].startswith("287 ± ") and row[10] == "0.9" and row[-1] == "0.5"
    for run in results["runs"]:
        section = text.split(f"## {run['name']} (", 1)[1].split("\n## ", 1)[0]
        rows = _table_rows(section, "")[1:]  # below the header
        k = run["num_classes"]
        assert rows == [
            [
                fmt(c["step"]), fmt(c["train_loss"]), fmt(c["test_accuracy"]),
                fmt(c["top_eigenvalues"][0]), fmt(c["headline_ratio"]), fmt(c["num_outliers"]),
                fmt(c["outlier_ratio"]), fmt(c["lambda1_over_lambdaK"]),
                fmt(c["top_k_overlap_with_previous"]), fmt(c["gradient_energy_full"][k - 1]),
                fmt(c["gradient_energy_minibatch_mean"][k - 1]), fmt(c["density_sigma"], 2),
            ]
            for c in run["checkpoints"]
        ]  # fmt: skip
    (f,) = findings(results)
    for key in ("headline_ratio_plain", "headline_ratio_bn", "headline_ratio_quotient",
                "outlier_ratio_plain", "outlier_ratio_bn", "outlier_ratio_quotient",
                "energy_topK_plain", "energy_topK_bn", "energy_topK_difference",
                "minibatch_energy_topK_plain", "minibatch_energy_topK_bn"):  # fmt: skip
        assert fmt(f[key]) in text, key
    assert f"{fmt(results['timing']['seconds_total'])} s in all" in text


def test_per_layer_table_and_sharpness_state_the_results_numbers(tmp_path):
    """The per-layer table: one row per layer and run at the last checkpoint, its size, λ1,
    trace and share of the summed traces (against the constructed values, e.g. the head of
    the run without BN: 70 of 100); the Jensen-Shannon distances; the sharpness line of
    each network with its largest λmax and the threshold; the weight-decay line."""
    results, _ = load_results(_study(tmp_path).out_dir)
    text = render_report(results, {})
    section = text.split("## Per layer at the last checkpoint", 1)[1].split("\n## ", 1)[0]
    rows = _table_rows(section, "")[1:]
    expected = []
    for name, i in (("linears/0", 0), ("linears/1", 1), ("head", 2)):
        for run, layers in zip(results["runs"], LAYERS, strict=True):
            label = next(r[0] for r in _table_rows(text, f"{run['name']} ("))
            share = layers["traces"][i] / sum(layers["traces"])
            numbers = [layers["sizes"][i], layers["lambda1"][i], layers["traces"][i], share]
            expected.append([name, label, "10", *map(fmt, numbers)])
    assert rows == expected
    assert ["head", "mlp (no BN)", "10", "20", "30", "70", "0.7"] in rows
    assert "mlp (no BN), step 10: linears/0–linears/1 0.1, linears/0–head 0.5" in section
    sharp = text.split("## Sharpness during training", 1)[1].split("\n## ", 1)[0]
    assert "- mlp: λmax 3 at step 0, 12 at step 10, largest 12 at step 10; stability " \
           "threshold 38, the largest λmax is 0.316 of it." in sharp  # fmt: skip
    assert "- mlp + BN: λmax 2 at step 0, 1 at step 10, largest 2 at step 0" in sharp
    assert "- Weight decay: none in the training, none in the analysed objective." in text


def test_write_report_draws_every_figure(tmp_path):
    _study(tmp_path)
    figures = write_report(tmp_path)
    assert len(figures) == 8
    assert {rel.split("/")[1] for rel in figures.values()} >= {
        "per_layer_density.png", "overlap.png", "sharpness.png"
    }  # fmt: skip
    for rel in figures.values():
        data = (tmp_path / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    report = (tmp_path / "report.md").read_text()
    assert all(rel in report for rel in figures.values())


def test_report_of_an_interrupted_run(tmp_path):
    writer = ResultsWriter(tmp_path, {"hessspec_version": "x", "config": {}, "status": "running"})
    writer.add_run({"name": "mlp", "model": "mlp", "batchnorm": False, "bn_mode": None,
                    "num_params": 1, "num_classes": K})  # fmt: skip
    writer.update(status="interrupted", stopped_during="analysis")
    results, _ = load_results(tmp_path)
    text = render_report(results, {})
    assert "Status: interrupted during analysis" in text and "no comparison" in text
    writer.update(status="failed", stopped_during="training", error="training diverged")
    text = render_report(load_results(tmp_path)[0], {})
    assert "Status: failed during training" in text and "Error: training diverged" in text
