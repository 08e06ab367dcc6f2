"""Issue 13's instruments in the BatchNorm spectrum study, against references that are not
the code under test: per-layer spectra against the dense Hessian's diagonal blocks, the
weight decay as an exact shift of the dense Hessian, the headline ratio and the top-K
overlap against direct NumPy computations, the validator against broken documents.
(The command-line run of every instrument, with the report's numbers, is in
tests/test_cli.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hessspec.analysis.spectrum import density_js_distance
from hessspec.curvature.layout import flat_layout
from hessspec.nn.data import load_digits, subsample
from hessspec.nn.models import make_model
from hessspec.nn.objective import make_objective
from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer, headline_ratio
from hessspec.studies.batchnorm_spectrum.config import AnalysisConfig, TrainConfig
from hessspec.studies.batchnorm_spectrum.layers import layer_paths
from hessspec.studies.batchnorm_spectrum.results import ResultsWriter, validate_results
from hessspec.studies.batchnorm_spectrum.settings import (
    analysed_weight_decay,
    resolve_settings,
    with_weight_decay,
)
from hessspec.studies.batchnorm_spectrum.tracking import SubspaceOverlaps

K = 10
BATCH = 16


@pytest.fixture(scope="module")
def digits():
    """128 digits in float64: 40 of them are the analysis set (batches 16, 16, 8)."""
    return subsample(load_digits("train", dtype=np.float64), 128, seed=0, stratify=True)


def _objective(digits, batchnorm):
    model = make_model("mlp", digits.input_shape, K, batchnorm, seed=0, hidden=[4],
                       dtype=jnp.float64)  # fmt: skip
    return make_objective(model, bn_mode="train" if batchnorm else None)


def _dense_hessian(objective, analysis, weight_decay=0.0):
    """The dense Hessian of ``sum_b (|b|/N) L_b + (wd/2)||w||^2`` over the analysis set cut
    into batches of BATCH (each normalised with its own statistics in BN train mode), by
    ``jax.hessian`` of the flat parameters."""
    flat, unravel = ravel_pytree(objective.params)
    n = analysis.num_examples
    batches = [(analysis.x[i : i + BATCH], analysis.y[i : i + BATCH]) for i in range(0, n, BATCH)]

    def f(w):
        params = unravel(w)
        loss = sum(len(x) / n * objective.loss_fn(params, {"x": x, "y": y}) for x, y in batches)
        return loss + 0.5 * weight_decay * jnp.vdot(w, w)

    return np.asarray(jax.hessian(f)(flat)), np.asarray(flat)


def _block_mask(params, members):
    """Boolean mask over the flat parameters (ravel_pytree order) of the leaves whose path
    ``"a/b/c"`` is in ``members``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    parts = []
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        parts.append(np.full(np.size(leaf), name in members))
    return np.concatenate(parts)


def _analyzer(objective, digits, weight_decay=0.0, **analysis):
    config = AnalysisConfig(batch_size=BATCH, slq_probes=2, slq_steps=12, trace_matvecs=12,
                            num_minibatches=2, **analysis)  # fmt: skip
    train = TrainConfig(batch_size=BATCH, weight_decay=weight_decay)
    dim = ravel_pytree(objective.params)[0].size
    analysis_set = digits.take(slice(0, 40))
    settings = resolve_settings(config, train, K, dim, 40, digits.num_examples)
    return CheckpointAnalyzer(objective, analysis_set, digits, digits, K, settings), analysis_set


def test_layer_blocks_join_batchnorm_to_its_layer():
    """One block per layer, a BatchNorm's scale and shift with the layer before it: the same
    block names with and without BN, for the models of hessspec.nn.models."""

    def paths(name, bn, shape=(8, 8, 1), **kw):
        model = make_model(name, shape, K, bn, seed=0, **kw)
        bn_mode = "train" if bn else None
        return layer_paths(list(flat_layout(make_objective(model, bn_mode=bn_mode).params).paths))

    assert paths("mlp", True, hidden=[4, 4]) == {
        "linears/0": ["linears/0/kernel", "norms/0/bias", "norms/0/scale"],
        "linears/1": ["linears/1/kernel", "norms/1/bias", "norms/1/scale"],
        "head": ["head/bias", "head/kernel"],
    }
    assert list(paths("mlp", False, hidden=[4, 4])) == ["linears/0", "linears/1", "head"]
    assert list(paths("cnn", True, channels=[2, 2])) == ["convs/0", "convs/1", "head"]
    resnet = paths("resnet", True, shape=(8, 8, 3), widths=(2, 2, 4))
    assert list(resnet) == list(paths("resnet", False, shape=(8, 8, 3), widths=(2, 2, 4)))
    assert resnet["stem"] == ["stem/kernel", "stem_norm/bias", "stem_norm/scale"]
    assert resnet["blocks/1/shortcut_conv"] == [
        "blocks/1/shortcut_conv/kernel", "blocks/1/shortcut_norm/bias",
        "blocks/1/shortcut_norm/scale",
    ]  # fmt: skip
    assert list(resnet)[0] == "stem" and list(resnet)[-1] == "head"
    assert layer_paths(["x/norm/scale", "w"]) == {"w": ["w"], "x/norm": ["x/norm/scale"]}


def test_per_layer_spectra_are_the_dense_diagonal_blocks(digits):
    """BN train mode, float64: each block's top eigenvalues are those of the dense Hessian's
    diagonal block over the same batches; the head's trace (a block small enough for
    Hutch++ to be exact) is the dense block's; the sizes add up to the network's; the
    Jensen-Shannon matrix is symmetric with a zero diagonal."""
    objective = _objective(digits, batchnorm=True)
    az, analysis_set = _analyzer(objective, digits, per_layer=True, per_layer_top_k=3,
                                 per_layer_trace_matvecs=150)  # fmt: skip
    result = az.analyse(objective, jax.random.key(0))
    layers = result.record["per_layer"]
    dense, _ = _dense_hessian(objective, analysis_set)
    assert layers["names"] == ["linears/0", "head"]
    assert sum(layers["sizes"]) == dense.shape[0]
    for i, members in enumerate(layers["parameters"]):
        mask = _block_mask(objective.params, set(members))
        block = dense[np.ix_(mask, mask)]
        assert layers["sizes"][i] == block.shape[0]
        top = np.linalg.eigvalsh(block)[::-1][:3]
        np.testing.assert_allclose(layers["top_eigenvalues"][i], top, rtol=1e-6, atol=1e-10)
        assert max(layers["residuals"][i]) < 1e-6 * abs(top[0])
        if layers["names"][i] == "head":
            np.testing.assert_allclose(layers["traces"][i], np.trace(block), rtol=1e-8)
        else:
            assert abs(layers["traces"][i] - np.trace(block)) <= 4 * layers["trace_stderrs"][i]
    js = np.asarray(layers["js_distances"])
    np.testing.assert_array_equal(js, js.T)
    assert np.all(np.diag(js) == 0) and 0 < js[0, 1] <= 1
    assert result.arrays["layer_densities"].shape == (2, result.arrays["layer_density_grid"].size)
    np.testing.assert_allclose(headline_ratio(result.record["top_eigenvalues"], K),
                               result.record["top_eigenvalues"][0]
                               / result.record["top_eigenvalues"][K])  # fmt: skip


def test_weight_decay_shifts_the_spectrum_by_exactly_wd(digits):
    """train.weight_decay = 0.1 with SGD: the analysed Hessian is H + 0.1 I (its top
    eigenvalues 0.1 above those without the term, and those of the dense H + 0.1 I), its
    gradient g + 0.1 w, its value L + 0.05 ||w||^2; per layer the same shift."""
    objective = _objective(digits, batchnorm=False)
    with_wd, analysis_set = _analyzer(objective, digits, 0.1, per_layer=True)
    without, _ = _analyzer(objective, digits, 0.1, per_layer=True, include_weight_decay=False)
    assert (with_wd.settings.weight_decay, without.settings.weight_decay) == (0.1, 0.0)
    a = with_wd.analyse(objective, jax.random.key(0)).record
    b = without.analyse(objective, jax.random.key(0)).record
    np.testing.assert_allclose(np.subtract(a["top_eigenvalues"], b["top_eigenvalues"]), 0.1,
                               rtol=0, atol=1e-9)  # fmt: skip
    dense, w = _dense_hessian(objective, analysis_set, weight_decay=0.1)
    top = np.linalg.eigvalsh(dense)[::-1][: len(a["top_eigenvalues"])]
    np.testing.assert_allclose(a["top_eigenvalues"], top, rtol=1e-7)
    for la, lb in zip(a["per_layer"]["top_eigenvalues"], b["per_layer"]["top_eigenvalues"],
                      strict=True):  # fmt: skip
        np.testing.assert_allclose(np.subtract(la, lb), 0.1, rtol=0, atol=1e-9)
    loss_a, g_a = with_wd.full_gradient(objective)
    loss_b, g_b = without.full_gradient(objective)
    np.testing.assert_allclose(g_a - g_b, 0.1 * w, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(loss_a - loss_b, 0.05 * np.dot(w, w), rtol=1e-10)
    mb_a = with_wd.minibatch_gradients(objective, 3)
    mb_b = without.minibatch_gradients(objective, 3)
    np.testing.assert_allclose(mb_a - mb_b, np.broadcast_to(0.1 * w, mb_a.shape), atol=1e-14)


def test_which_weight_decay_is_analysed():
    """SGD's L2 term when asked for; never Adam's decoupled decay; none when switched off."""
    sgd = TrainConfig(optimizer="sgd", weight_decay=5e-4)
    assert analysed_weight_decay(AnalysisConfig(), sgd) == 5e-4
    assert analysed_weight_decay(AnalysisConfig(include_weight_decay=False), sgd) == 0.0
    adam = TrainConfig(optimizer="adam", weight_decay=5e-4)
    assert analysed_weight_decay(AnalysisConfig(), adam) == 0.0
    loss = jax.tree_util.Partial(lambda p, b: jnp.sum(p["w"] ** 3) * b)
    assert with_weight_decay(loss, 0.0) is loss
    # one function per wd: operators of later checkpoints compare equal (compile once)
    assert with_weight_decay(loss, 0.5).func is with_weight_decay(loss, 0.5).func
    w = {"w": jnp.array([1.0, -2.0])}
    assert float(with_weight_decay(loss, 0.5)(w, 1.0)) == pytest.approx(-7.0 + 0.25 * 5.0)


def test_headline_ratio():
    lam = [12.0, 6.0, 5.0, 3.0, 2.0]
    assert headline_ratio(lam, 2) == 12.0 / 5.0
    assert headline_ratio(lam, 1) == 2.0
    assert headline_ratio(lam, 4) == 6.0
    assert headline_ratio(lam, 5) is None  # no lambda_{K+1}
    assert headline_ratio([3.0, -1.0], 1) is None  # lambda_{K+1} <= 0


def _writer_with_run(tmp_path, name="mlp"):
    writer = ResultsWriter(tmp_path, {"hessspec_version": "x", "config": {}})
    index = writer.add_run({"name": name, "batchnorm": False, "bn_mode": None,
                            "num_params": 6, "num_classes": 2})  # fmt: skip
    return writer, index


def test_subspace_overlap_of_successive_checkpoints(tmp_path):
    """None at the first checkpoint; 1 for identical eigenvectors; otherwise
    ||Q_a^T Q_b||_F^2 / K of the float32 eigenvectors as stored, the same when the previous
    checkpoint comes from spectra.npz (a later session) as from memory."""
    rng = np.random.default_rng(0)
    q = [np.linalg.qr(rng.standard_normal((6, 4)))[0].T for _ in range(3)]  # (4, 6) rows
    writer, run = _writer_with_run(tmp_path)
    overlaps = SubspaceOverlaps(writer)
    assert overlaps.overlap("mlp", 0, q[0], 2) is None
    writer.add_checkpoint(run, 0, {}, {"eigenvectors": q[0].astype(np.float32)})
    assert overlaps.overlap("mlp", 5, q[0], 2) == pytest.approx(1.0, abs=1e-6)
    writer.add_checkpoint(run, 5, {}, {"eigenvectors": q[0].astype(np.float32)})
    value = overlaps.overlap("mlp", 9, q[1], 2)
    a, b = q[0][:2].astype(np.float32), q[1][:2].astype(np.float32)
    direct = np.sum((a.astype(np.float64) @ b.T.astype(np.float64)) ** 2) / 2
    assert value == pytest.approx(direct, rel=1e-12) and 0 < value < 1
    # a new session: the previous checkpoint (step 5) from the arrays, as stored
    assert SubspaceOverlaps(ResultsWriter.reopen(tmp_path)).overlap("mlp", 9, q[1], 2) == value
    assert overlaps.overlap("mlp", 12, None, 2) is None  # no eigenvectors: no overlap


def test_js_distance_of_densities_with_subnormal_tails():
    """Densities whose far tails are subnormal numbers (Gaussian smoothing) get a finite
    distance (they made the Jensen-Shannon divergence infinite)."""
    grid = np.linspace(0, 10, 2001)
    a = np.exp(-((grid - 1) ** 2) / (2 * 0.05**2))  # underflows through subnormals
    b = np.exp(-((grid - 3) ** 2) / (2 * 0.05**2))
    assert np.any((a > 0) & (a < np.finfo(np.float64).tiny))
    d = density_js_distance(np.stack([a, b]), grid)
    assert np.isfinite(d).all() and d[0, 1] == pytest.approx(1.0, abs=1e-9)


def _valid_results():
    run = {
        "name": "mlp",
        "batchnorm": False,
        "bn_mode": None,
        "num_params": 6,
        "num_classes": 2,
        "stability_threshold": 40.0,
        "sharpness": [{"step": 0, "lambda_max": 3.0}, {"step": 5, "lambda_max": 4.0}],
    }
    checkpoint = {"train_loss": 1.0, "test_accuracy": 0.5, "top_eigenvalues": [8.0, 4.0, 2.0],
                  "residuals": [0.0] * 3, "trace": 20.0, "headline_ratio": 4.0,
                  "num_outliers": 1, "bulk_edge": 4.0, "outlier_ratio": 2.0,
                  "gradient_energy_full": [0.5, 0.7, 0.8],
                  "gradient_energy_minibatch_mean": [0.4, 0.6, 0.7],
                  "gradient_energy_minibatch_std": [0.1] * 3,
                  "top_k_overlap_with_previous": None,
                  "per_layer": {"names": ["a", "b"], "sizes": [4, 2],
                                "top_eigenvalues": [[5.0, 1.0], [2.0, 1.0]],
                                "residuals": [[0.0, 0.0], [0.0, 0.0]], "traces": [9.0, 3.0],
                                "js_distances": [[0.0, 0.3], [0.3, 0.0]],
                                "density_sigma": 0.01}}  # fmt: skip
    later = {**checkpoint, "step": 5, "top_k_overlap_with_previous": 0.9}
    run["checkpoints"] = [{**checkpoint, "step": 0}, later]
    return {"hessspec_version": "x", "config": {}, "status": "complete", "runs": [run]}


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("checkpoints", 1, "headline_ratio"), 2.0, "headline_ratio: 2.0, but λ1/λ(K+1) = 4.0"),
        (("checkpoints", 0, "top_k_overlap_with_previous"), 0.5, "at a first checkpoint"),
        (("checkpoints", 1, "top_k_overlap_with_previous"), 1.5, "outside [0, 1]"),
        (("checkpoints", 1, "per_layer", "sizes"), [4, 3], "add up to 7, not 6"),
        (("checkpoints", 1, "per_layer", "traces"), [9.0], "1 entries for 2 blocks"),
        (("checkpoints", 1, "per_layer", "js_distances"), [[0.0, 0.3], [0.2, 0.0]],
         "not symmetric"),
        (("checkpoints", 1, "per_layer", "top_eigenvalues"), [[1.0, 5.0], [2.0, 1.0]],
         "per_layer.top_eigenvalues[0]: not sorted"),
        (("sharpness",), [{"step": 5, "lambda_max": 1.0}, {"step": 0, "lambda_max": 1.0}],
         "sharpness: steps not increasing"),
        (("sharpness",), [{"lambda_max": 1.0}], "sharpness[0]: expected"),
        (("stability_threshold",), "2/lr", "runs[0].stability_threshold: expected"),
    ],
)  # fmt: skip
def test_validator_knows_the_new_fields(path, value, needle):
    results = _valid_results()
    assert validate_results(results) == []
    target = results["runs"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = "\n".join(validate_results(json.loads(json.dumps(results))))
    assert needle in problems, problems


def test_top_k_needs_k_plus_one(tmp_path, capsys):
    """analysis.top_k below K + 1 cannot give the headline ratio: refused before training
    with one line naming the key and the fix."""
    from hessspec.cli.main import main

    out = tmp_path / "out"
    assert main(["--set", "analysis.top_k=10", "--set", "train.steps=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "analysis.top_k=10 is below K + 1 = 11" in err[0]
    assert "set analysis.top_k to at least 11, or 0 for 2K = 20" in err[0]
    assert not out.exists()


def _report_rows(text, first_cell):
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_every_instrument_through_the_command_line(tmp_path):
    """The tiny study without and with BN (train mode), weight decay 0.01, per-layer
    spectra, sharpness every 8 steps: results.json valid; each headline ratio is
    λ1/λ(K+1) of its own eigenvalues; each overlap is ||Q_a^T Q_b||_F^2 / K of the top-K
    eigenvectors in spectra.npz; λmax at step 0 is the dense Hessian's of the training
    objective (batches of 32, BN in train mode, + 0.005 ||w||^2); the stability threshold
    (2 + 2 · 0.9) / 0.05; report.md states these numbers and the figures exist."""
    from cli_study import TINY

    from hessspec.cli.main import main
    from hessspec.studies.batchnorm_spectrum.config import load_config
    from hessspec.studies.batchnorm_spectrum.results import load_results
    from hessspec.studies.batchnorm_spectrum.setup import prepare_study
    from hessspec.studies.common.checkpoint import checkpoint_path, load_checkpoint
    from hessspec.studies.common.formatting import fmt

    out = tmp_path / "run"
    args = ["--set", "model.batchnorm=[false,true]", "--set", 'analysis.bn_modes=["train"]',
            "--set", "analysis.per_layer=true", "--set", "train.track_sharpness_every=8",
            "--set", "train.weight_decay=0.01", "--set", "train.checkpoints=[0,8,16]"]  # fmt: skip
    assert main([*TINY, *args, "--out", str(out)]) == 0
    results, spectra = load_results(out)
    assert validate_results(results) == [] and results["settings"]["weight_decay"] == 0.01
    k = results["data"]["num_classes"]
    for run in results["runs"]:
        assert run["stability_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.05, rel=1e-12)
        assert [e["step"] for e in run["sharpness"]] == [0, 8, 16]
        previous = None
        for c in run["checkpoints"]:
            lam = c["top_eigenvalues"]
            assert c["headline_ratio"] == pytest.approx(lam[0] / lam[k], rel=1e-12)
            q = spectra[f"{run['name']}/step{c['step']}/eigenvectors"][:k].astype(np.float64)
            if previous is None:
                assert c["top_k_overlap_with_previous"] is None
            else:
                direct = np.sum((previous @ q.T) ** 2) / k
                assert c["top_k_overlap_with_previous"] == pytest.approx(direct, rel=1e-10)
            previous = q
            layers = c["per_layer"]
            assert sum(layers["sizes"]) == run["num_params"]
            densities = spectra[f"{run['name']}/step{c['step']}/layer_densities"]
            assert densities.shape[0] == len(layers["names"]) == 2

    setup = prepare_study(load_config(out / "config.toml"))
    analysis = setup.analysis_set
    for run in results["runs"]:
        network = "mlp-bn" if run["batchnorm"] else "mlp"
        model = load_checkpoint(checkpoint_path(out, 0, network)).model()
        objective = make_objective(model, bn_mode="train" if run["batchnorm"] else None)
        flat, unravel = ravel_pytree(objective.params)
        n = analysis.num_examples
        batches = [(analysis.x[i : i + 32], analysis.y[i : i + 32]) for i in range(0, n, 32)]

        def f(w, loss_fn=objective.loss_fn, unravel=unravel, batches=batches, n=n):
            data = sum(len(x) / n * loss_fn(unravel(w), {"x": x, "y": y}) for x, y in batches)
            return data + 0.005 * jnp.vdot(w, w)

        dense = np.asarray(jax.hessian(f)(flat), np.float64)
        top = np.linalg.eigvalsh((dense + dense.T) / 2)[-1]
        assert run["sharpness"][0]["lambda_max"] == pytest.approx(top, rel=1e-4)

    report = (out / "report.md").read_text()
    assert "weight decay 0.01" in report and "with wd = 0.01 on every parameter" in report
    for run in results["runs"]:
        c, label = run["checkpoints"][-1], f"{run['name']} ("
        (row,) = _report_rows(report, label)
        assert row[4] == fmt(c["headline_ratio"])
        rows = _report_rows(report.split("## Per layer", 1)[1], "")
        layers = c["per_layer"]
        total = sum(layers["traces"])
        for i, name in enumerate(layers["names"]):
            expected = [name, row[0], fmt(c["step"]), fmt(layers["sizes"][i]),
                        fmt(layers["top_eigenvalues"][i][0]), fmt(layers["traces"][i]),
                        fmt(layers["traces"][i] / total)]  # fmt: skip
            assert expected in rows, expected
        over = report.split(f"## {row[0]} over training", 1)[1].split("\n## ", 1)[0]
        overlaps = [r[8] for r in _report_rows(over, "")[1:]]
        assert overlaps == [fmt(x["top_k_overlap_with_previous"]) for x in run["checkpoints"]]
        top = max(run["sharpness"], key=lambda e: e["lambda_max"])
        network = f"- {run['model']}{' + BN' if run['batchnorm'] else ''}: λmax"
        line = next(x for x in report.splitlines() if x.startswith(network))
        assert f"largest {fmt(top['lambda_max'])} at step {top['step']}" in line
        assert f"stability threshold {fmt(run['stability_threshold'])}" in line
    for png in ("per_layer_density.png", "overlap.png", "sharpness.png"):
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
