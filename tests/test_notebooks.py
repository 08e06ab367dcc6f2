"""Every notebook executes end to end on tiny settings (HESSSPEC_NOTEBOOK_QUICK=1), is saved
without outputs, and holds no library logic (no function or class definitions)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = [
    "01_quickstart",
    "02_batchnorm_spectra",
    "03_input_bias_theory",
    "04_landscape_smoothness",
]

# A BN spectrum run about as small as the CLI allows: one BN network (train mode), two
# checkpoints.
TINY_CLI = [
    "--quick",
    "--no-progress",
    "--set", "data.train_size=128",
    "--set", "model.hidden=[8]",
    "--set", "model.batchnorm=[true]",
    "--set", "train.steps=4",
    "--set", "train.batch_size=32",
    "--set", "train.num_checkpoints=2",
    "--set", "analysis.size=48",
    "--set", "analysis.top_k=10",
    "--set", "analysis.slq_probes=2",
    "--set", "analysis.slq_steps=16",
    "--set", "analysis.trace_matvecs=12",
    "--set", "analysis.num_minibatches=2",
]  # fmt: skip


def _read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_saved_without_outputs_and_without_library_logic(name):
    book = _read(name)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, name
    assert any("parameters" in c.metadata.get("tags", []) for c in code), name
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, name
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith("%")
        )  # IPython magics are not Python
        tree = ast.parse(source)
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defs, f"{name}: library logic belongs in hessspec, not in a notebook"
        assert "import hessspec" in "".join(c.source for c in code) or "from hessspec" in (
            "".join(c.source for c in code)
        )


@pytest.fixture(scope="module")
def tiny_bn_run(tmp_path_factory):
    """A finished BN spectrum run, produced by the CLI, for notebook 02."""
    out = tmp_path_factory.mktemp("bn_run") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hessspec.run", *TINY_CLI, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "results.json").is_file()
    return out


def _execute(name, tmp_path, extra_env=None):
    book = _read(name)
    env_before = dict(os.environ)
    os.environ.update(
        {
            "HESSSPEC_NOTEBOOK_QUICK": "1",
            "HESSSPEC_NOTEBOOK_OUT_DIR": str(tmp_path),
            "MPLBACKEND": "Agg",
            **(extra_env or {}),
        }
    )
    try:
        client = nbclient.NotebookClient(
            book,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return book


def _images(book):
    return sum(
        1
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    )


def test_01_quickstart_executes(tmp_path):
    book = _execute("01_quickstart", tmp_path)
    assert _images(book) >= 1


def test_02_batchnorm_spectra_executes(tmp_path, tiny_bn_run):
    book = _execute(
        "02_batchnorm_spectra", tmp_path, {"HESSSPEC_NOTEBOOK_RUN_DIR": str(tiny_bn_run)}
    )
    assert _images(book) >= 5


def test_03_input_bias_theory_executes(tmp_path, tmp_path_factory):
    # The tiny study run of tests/test_input_bias.py (made here if that module did not run
    # in this session): the notebook redraws it; the run itself is tested there.
    from test_input_bias import shared_tiny_run

    run = shared_tiny_run(tmp_path_factory)
    book = _execute(
        "03_input_bias_theory", tmp_path, {"HESSSPEC_NOTEBOOK_INPUT_BIAS_DIR": str(run)}
    )
    assert _images(book) >= 4  # MP check, study density, GD, MLP figures


def test_04_landscape_smoothness_executes(tmp_path, tmp_path_factory):
    from test_santurkar import shared_tiny_run

    run = shared_tiny_run(tmp_path_factory)
    book = _execute(
        "04_landscape_smoothness", tmp_path, {"HESSSPEC_NOTEBOOK_SANTURKAR_DIR": str(run)}
    )
    assert _images(book) >= 4  # landscape, covariate shift, training, lr sweep
