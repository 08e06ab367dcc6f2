"""The notebooks: committed with the outputs of one full execution (figures included), and
executed end to end on tiny settings (HESSSPEC_NOTEBOOK_QUICK=1). They hold no library
logic: no function or class definitions, except the user-side model and loss code that
notebook 05 is about.

Re-execute every notebook in place with its committed (full) settings, from the repository
root (a few minutes on 2 cores)::

    jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb
"""

import ast
import os
import re
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
    "05_your_own_model",
]
#: figures each notebook shows at full settings (the committed outputs)
MIN_FIGURES = {
    "01_quickstart": 3,
    "02_batchnorm_spectra": 5,
    "03_input_bias_theory": 4,
    "04_landscape_smoothness": 4,
    "05_your_own_model": 2,
}
#: notebook 05 shows the code a user writes for a model of their own: these definitions, and
#: no other, are allowed there (models, their losses, a training step)
USER_CODE = {
    "05_your_own_model": {
        "FlagMLP",
        "LinenCNN",
        "__init__",
        "__call__",
        "linen_train_step",
        "loss_and_new_stats",
        "linen_train_loss",
        "linen_eval_loss",
        "haiku_forward",
        "haiku_train_loss",
        "haiku_eval_loss",
        "eqx_loss",
        "linen_train_loss_with_stats",
        "hvp_of_loss",
    }
}


def _read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code_cells(book):
    return [c for c in book.cells if c.cell_type == "code"]


def _figures(book):
    return sum(
        1
        for c in _code_cells(book)
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    )


def _text(book):
    """Every text output (streams, markdown, plain text), in order."""
    parts = []
    for c in _code_cells(book):
        for o in c.outputs:
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o:
                parts.append(o["data"].get("text/markdown", o["data"].get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NAMES)
def test_no_library_logic(name):
    book = _read(name)
    code = _code_cells(book)
    assert any("parameters" in c.metadata.get("tags", []) for c in code), name
    sources = "\n".join(c.source for c in code)
    assert "import hessspec" in sources or "from hessspec" in sources, name
    for cell in code:
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith("%")
        )  # IPython magics are not Python
        defined = {
            n.name
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef | ast.ClassDef)
        }
        extra = defined - USER_CODE.get(name, set())
        assert not extra, f"{name}: library logic belongs in hessspec, not here: {extra}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_the_outputs_of_one_full_execution(name):
    """Every code cell ran, in order, in one kernel session, at the full settings; no cell
    failed or wrote to stderr; the figures are in the file."""
    book = _read(name)
    code = _code_cells(book)
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: execution counts {counts}"
    for i, cell in enumerate(code):
        for out in cell.outputs:
            assert out.output_type != "error", f"{name}, code cell {i}: {out.get('ename')}"
            assert not (out.output_type == "stream" and out.name == "stderr"), (
                f"{name}, code cell {i} wrote to stderr: {out.text[:300]}"
            )
            widgets = [k for k in out.get("data", {}) if "widget" in k]
            assert not widgets, f"{name}, code cell {i}: a widget (progress bar?) {widgets}"
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    printed = "".join(o.get("text", "") for o in parameters.outputs)
    assert "settings: full" in printed, f"{name}: not executed at full settings: {printed!r}"
    assert _figures(book) >= MIN_FIGURES[name], name
    assert book.metadata.get("kernelspec", {}).get("name") == "python3", name


def _execute(name, tmp_path, extra_env=None):
    """Execute a notebook at the test settings in a fresh kernel (which inherits this
    process's environment), working directory notebooks/."""
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
    assert "settings: quick (test)" in _text(book)
    return book


def test_01_quickstart_executes(tmp_path):
    book = _execute("01_quickstart", tmp_path)
    assert _figures(book) >= 3
    text = _text(book)
    assert "| Hutch++ |" in text and "| SLQ (3 Rademacher probes) |" in text
    assert re.search(r"difference [-+]\S+ = [-+]\d+\.\d+ combined standard errors", text)


def test_02_batchnorm_spectra_runs_its_own_study_then_reads_a_run(tmp_path):
    """As shipped (no run folder) the notebook runs the study itself; given the folder it
    wrote, it reads it instead."""
    book = _execute("02_batchnorm_spectra", tmp_path)
    run_dir = tmp_path / "bn_spectrum"
    assert (run_dir / "results.json").is_file() and (run_dir / "report.md").is_file()
    assert _figures(book) >= 5
    assert "status: complete" in _text(book)
    assert "mlp-bn-train against mlp" in _text(book)  # the BN vs no-BN comparison
    again = _execute("02_batchnorm_spectra", tmp_path, {"HESSSPEC_NOTEBOOK_RUN_DIR": str(run_dir)})
    assert "reading the finished run" in _text(again)
    assert _figures(again) >= 5


def test_03_input_bias_theory_executes(tmp_path, tmp_path_factory):
    # The tiny study run of tests/test_input_bias.py (made here if that module did not run
    # in this session): the notebook redraws it; the run itself is tested there.
    from test_input_bias import shared_tiny_run

    run = shared_tiny_run(tmp_path_factory)
    book = _execute(
        "03_input_bias_theory", tmp_path, {"HESSSPEC_NOTEBOOK_INPUT_BIAS_DIR": str(run)}
    )
    assert _figures(book) >= 4  # MP check, study density, GD, MLP figures


def test_04_landscape_smoothness_executes(tmp_path, tmp_path_factory):
    from test_santurkar import shared_tiny_run

    run = shared_tiny_run(tmp_path_factory)
    book = _execute(
        "04_landscape_smoothness", tmp_path, {"HESSSPEC_NOTEBOOK_SANTURKAR_DIR": str(run)}
    )
    assert _figures(book) >= 4  # landscape, covariate shift, training, lr sweep


def test_05_your_own_model_executes(tmp_path):
    pytest.importorskip("haiku")
    pytest.importorskip("equinox")
    book = _execute("05_your_own_model", tmp_path)
    assert _figures(book) >= 1  # the Lanczos-vs-dense figure needs LANCZOS_IN_DENSE_CHECKS
    text = _text(book)
    # every operator equals its dense float64 Hessian, in all six cases
    worst = float(re.search(r"largest relative matrix error over all cases: (\S+)", text)[1])
    assert worst < 1e-12
    assert len(re.findall(r"^\| (nnx|flax|haiku|equinox)", text, re.M)) == 6
    # statistics as leaves: one trace for two checkpoints; closures: one per checkpoint
    assert (
        "Partial (statistics as leaves): the loss was traced (and the program compiled) 1" in text
    )
    assert (
        "closures (statistics as constants): the loss was traced (and the program compiled) 2"
        in text
    )
    assert "make_objective takes flax.nnx models; Dense is a flax.linen module" in text
    partial = re.search(r"its operator against the dense Hessian above, relative error (\S+)", text)
    assert float(partial[1]) < 1e-12
