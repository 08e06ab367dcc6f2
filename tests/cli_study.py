"""What the command-line tests share: the tiny study (:data:`TINY`, :data:`PLAIN`), a
stand-in analysis that costs nothing (:func:`fake_analyse`, the ``fake_analysis`` fixture),
and the check that a run folder is whole (:func:`assert_whole`). Test modules import the
fixtures by name (``from cli_study import fake_analysis, no_gc``)."""

import gc

import numpy as np
import pytest

from hessspec.studies.batchnorm_spectrum.results import load_results, validate_results

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


PLAIN = [*TINY, "--set", "model.batchnorm=[false]"]


def fake_analyse(self, objective, key, seed=0, on_stage=None):
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
        "density_sigma": 0.01, "headline_ratio": float(lam[0] / lam[self.num_classes]),
    }  # fmt: skip
    grid = np.linspace(0, 3, 50)
    arrays = {"eigenvalues": lam, "density_grid": grid, "density": np.exp(-grid)}
    return CheckpointAnalysis(record, arrays)


@pytest.fixture
def fake_analysis(monkeypatch):
    """Analyses replaced by :func:`fake_analyse`; returns the list of analysed steps'
    calls, and lets a test raise at the n-th call (``interrupt_at``)."""
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

    calls = []
    control = {"interrupt_at": None}

    def analyse(self, objective, key, seed=0, on_stage=None):
        calls.append(objective.bn_mode)
        if control["interrupt_at"] == len(calls):
            raise KeyboardInterrupt
        return fake_analyse(self, objective, key, seed, on_stage)

    monkeypatch.setattr(CheckpointAnalyzer, "analyse", analyse)
    return control


@pytest.fixture
def no_gc():
    # No garbage collection while an interrupt unwinds: jax's gc callback would otherwise
    # report it a second time as an "unraisable" exception under pytest-xdist.
    gc.disable()
    yield
    gc.enable()


def files_on_disk(folder):
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


def assert_whole(folder, users_files=()):
    """results.json names exactly the files there are, but for the user's own."""
    results, spectra = load_results(folder)
    assert validate_results(results) == []
    assert set(results["files"]) == files_on_disk(folder) - set(users_files), folder
    listed = {(r["name"], c["step"]) for r in results["runs"] for c in r["checkpoints"]}
    stored = {(k.split("/")[0], int(k.split("/")[1][4:])) for k in spectra}
    assert listed == stored
    assert not list(folder.rglob(".*.tmp"))
    return results
