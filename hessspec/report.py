"""The output folder of a study: results.json, spectra.npz, figures/*.png and report.md.

Every file is written atomically (to a temporary file in the same folder, flushed, then
``os.replace``), so a reader or an interrupted run never sees a half-written file, and
``results.json`` / ``spectra.npz`` are rewritten after every checkpoint: an interrupted run
keeps everything it measured.

``results.json`` (see :data:`RESULTS_SCHEMA` and :func:`validate_results`)::

    {"hessspec_version": str, "status": "running" | "complete" | "interrupted" | "failed",
     "config": {...the whole config...}, "data": {...}, "settings": {...},
     "runs": [{"name": str, "model": str, "batchnorm": bool,
               "bn_mode": "train" | "eval" | "population" | null,
               "num_params": int, "num_classes": int,
               "loss_curve": {"step": [...], "loss": [...]},
               "checkpoints": [{"step": int, "train_loss": float, "test_accuracy": float,
                                "top_eigenvalues": [...largest first], "residuals": [...],
                                "trace": float, "num_outliers": int, "bulk_edge": float,
                                "outlier_ratio": float, "lambda1_over_lambdaK": float,
                                "gradient_energy_full": [k = 1..2K],
                                "gradient_energy_minibatch_mean": [...],
                                "gradient_energy_minibatch_std": [...],
                                "density_sigma": float, ...}]}],
     "timing": {...}}

Non-finite numbers are written as ``null``. ``spectra.npz`` holds, per run and checkpoint,
the arrays named ``"<run>/step<step>/<array>"`` (``nodes``, ``weights``, ``eigenvalues``,
``residuals``, ``eigenvectors``, ``density_grid``, ``density``,
``gradient_energy_minibatch``); :func:`spectra_key` builds the names.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OUTPUT_FILES",
    "OutputFolderError",
    "RESULTS_SCHEMA",
    "ResultsWriter",
    "atomic_write_bytes",
    "atomic_write_text",
    "findings",
    "load_results",
    "prepare_output_dir",
    "spectra_key",
    "validate_results",
    "write_report",
]

#: Files (and the figures folder) a study writes; ``--overwrite`` removes exactly these.
OUTPUT_FILES = ("results.json", "spectra.npz", "report.md", "config.toml")
FIGURES_DIR = "figures"


class OutputFolderError(RuntimeError):
    """The output folder exists and holds files, and overwriting was not asked for."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync,
    ``os.replace``. A crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_ready(x: Any) -> Any:
    """Numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(x, Mapping):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def spectra_key(run: str, step: int, name: str) -> str:
    """Name of an array in spectra.npz: ``"<run>/step<step>/<name>"``."""
    return f"{run}/step{int(step)}/{name}"


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Make sure ``path`` can receive a study's output.

    A missing or empty folder is fine (created). A folder holding anything refuses, unless
    ``overwrite``: then the files a study writes (:data:`OUTPUT_FILES` and the figures
    folder's PNGs) are removed and anything else is left alone.

    Raises:
        OutputFolderError: non-empty folder without ``overwrite``, or ``path`` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"output path {str(path)!r} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputFolderError(
                f"output folder {str(path)!r} already holds files; pass --overwrite to replace "
                "a previous study's output there, or choose another folder with --out."
            )
        for name in OUTPUT_FILES:
            (path / name).unlink(missing_ok=True)
        figures = path / FIGURES_DIR
        if figures.is_dir():
            for png in figures.glob("*.png"):
                png.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


class ResultsWriter:
    """Accumulates runs and checkpoints and rewrites results.json and spectra.npz after
    each change (atomically).

    Args:
        out_dir: the output folder (already prepared).
        header: top-level entries of results.json (version, config, data, settings, ...).
        write: False keeps everything in memory and writes no file (the processes other
            than process 0 of a multi-process run, which compute the same results).
    """

    def __init__(self, out_dir: str | Path, header: Mapping[str, Any], *, write: bool = True):
        self.out_dir = Path(out_dir)
        self.write = bool(write)
        self.results: dict[str, Any] = {**_json_ready(dict(header)), "runs": []}
        self.results.setdefault("status", "running")
        self.arrays: dict[str, np.ndarray] = {}

    def add_run(self, run: Mapping[str, Any]) -> int:
        """Append a run (``name``, ``batchnorm``, ``bn_mode``, ...); returns its index."""
        entry = {**_json_ready(dict(run)), "checkpoints": []}
        entry.setdefault("loss_curve", {"step": [], "loss": []})
        self.results["runs"].append(entry)
        return len(self.results["runs"]) - 1

    def add_checkpoint(
        self, run_index: int, step: int, record: Mapping[str, Any], arrays: Mapping[str, Any]
    ) -> None:
        """Record one checkpoint of a run and write both files."""
        run = self.results["runs"][run_index]
        run["checkpoints"].append({"step": int(step), **_json_ready(dict(record))})
        for name, value in arrays.items():
            self.arrays[spectra_key(run["name"], step, name)] = np.asarray(value)
        self.flush()

    def set_loss_curve(self, run_index: int, steps: Any, losses: Any) -> None:
        """Store a run's training loss curve (mini-batch loss per step) and write."""
        self.results["runs"][run_index]["loss_curve"] = {
            "step": _json_ready(np.asarray(steps).astype(int)),
            "loss": _json_ready(np.asarray(losses, dtype=np.float64)),
        }
        self.write_json()

    def update(self, **entries: Any) -> None:
        """Set top-level entries of results.json and write it."""
        self.results.update(_json_ready(entries))
        self.write_json()

    def write_json(self) -> None:
        """Write results.json (atomically; nothing when ``write`` is off)."""
        if not self.write:
            return
        text = json.dumps(self.results, indent=1, allow_nan=False)
        atomic_write_text(self.out_dir / "results.json", text + "\n")

    def write_npz(self) -> None:
        """Write spectra.npz (atomically; nothing when ``write`` is off)."""
        if not self.write:
            return
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        atomic_write_bytes(self.out_dir / "spectra.npz", buf.getvalue())

    def flush(self) -> None:
        """Write both files."""
        self.write_npz()
        self.write_json()


def load_results(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(results, spectra)`` of an output folder: the parsed results.json and the arrays
    of spectra.npz (a dict; empty if the file is missing)."""
    out_dir = Path(out_dir)
    with open(out_dir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    spectra: dict[str, np.ndarray] = {}
    if (out_dir / "spectra.npz").exists():
        with np.load(out_dir / "spectra.npz") as z:
            spectra = {k: z[k] for k in z.files}
    return results, spectra


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

#: Required keys and their JSON types: top level, each run, each checkpoint.
RESULTS_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "top": {"hessspec_version": (str,), "config": (dict,), "runs": (list,), "status": (str,)},
    "run": {
        "name": (str,),
        "batchnorm": (bool,),
        "bn_mode": (str, type(None)),
        "num_params": (int,),
        "num_classes": (int,),
        "checkpoints": (list,),
    },
    "checkpoint": {
        "step": (int,),
        "train_loss": _OPT_NUM,
        "test_accuracy": _OPT_NUM,
        "top_eigenvalues": (list,),
        "residuals": (list,),
        "trace": _OPT_NUM,
        "num_outliers": (int,),
        "bulk_edge": _OPT_NUM,
        "outlier_ratio": _OPT_NUM,
        "gradient_energy_full": (list,),
        "gradient_energy_minibatch_mean": (list,),
        "gradient_energy_minibatch_std": (list,),
    },
}


def _check_keys(obj: Any, kind: str, where: str, problems: list[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    for key, types in RESULTS_SCHEMA[kind].items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) and bool not in types:
            problems.append(f"{where}.{key}: expected {types}, got a boolean")
        elif not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
    return True


def validate_results(results: Mapping[str, Any]) -> list[str]:
    """Problems of a results.json document against :data:`RESULTS_SCHEMA` (empty: valid).

    Besides the keys and types: ``bn_mode`` is null exactly for runs without BatchNorm and
    one of train/eval/population otherwise; top eigenvalues are sorted largest first and
    have one residual each; the gradient-energy lists have one entry per eigenvalue, lie in
    ``[0, 1]`` and are non-decreasing (full batch and mini-batch mean).
    """
    problems: list[str] = []
    if not _check_keys(results, "top", "results", problems):
        return problems
    for i, run in enumerate(results.get("runs", [])):
        where = f"runs[{i}]"
        if not _check_keys(run, "run", where, problems):
            continue
        mode = run.get("bn_mode")
        if run.get("batchnorm") is True and mode not in ("train", "eval", "population"):
            problems.append(f"{where}.bn_mode: a BN run needs train/eval/population, got {mode!r}")
        if run.get("batchnorm") is False and mode is not None:
            problems.append(f"{where}.bn_mode: a run without BN needs null, got {mode!r}")
        for j, ck in enumerate(run.get("checkpoints", [])):
            cw = f"{where}.checkpoints[{j}]"
            if not _check_keys(ck, "checkpoint", cw, problems):
                continue
            lam = ck.get("top_eigenvalues") or []
            if not all(isinstance(v, _NUM) for v in lam):
                problems.append(f"{cw}.top_eigenvalues: non-numeric entries")
                continue
            if any(a < b for a, b in zip(lam, lam[1:], strict=False)):
                problems.append(f"{cw}.top_eigenvalues: not sorted largest first")
            if len(ck.get("residuals") or []) != len(lam):
                problems.append(f"{cw}.residuals: {len(ck['residuals'])} for {len(lam)} values")
            for key in (
                "gradient_energy_full",
                "gradient_energy_minibatch_mean",
                "gradient_energy_minibatch_std",
            ):
                vals = ck.get(key) or []
                if len(vals) != len(lam):
                    problems.append(f"{cw}.{key}: {len(vals)} entries for {len(lam)} eigenvalues")
                    continue
                if not all(isinstance(v, _NUM) for v in vals):
                    problems.append(f"{cw}.{key}: non-numeric entries")
                    continue
                if key == "gradient_energy_minibatch_std":
                    continue
                if any(v < -1e-9 or v > 1 + 1e-9 for v in vals):
                    problems.append(f"{cw}.{key}: entries outside [0, 1]")
                if any(b < a - 1e-9 for a, b in zip(vals, vals[1:], strict=False)):
                    problems.append(f"{cw}.{key}: not non-decreasing in k")
    return problems


# --------------------------------------------------------------------------------------
# Findings and report.md
# --------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _at(values: list | None, index: int) -> float | None:
    if not values or index >= len(values):
        return None
    return values[index]


def findings(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compare, at the last checkpoint, every BN run with the run without BN of the same
    model: outlier ratios and their quotient, and the full-batch gradient energy in the
    top-``K`` eigenspace and its difference.

    Returns:
        One dict per BN run with a no-BN partner: ``model``, ``bn_run``, ``plain_run``,
        ``bn_mode``, ``step``, ``outlier_ratio_plain``, ``outlier_ratio_bn``,
        ``outlier_ratio_quotient``, ``energy_topK_plain``, ``energy_topK_bn``,
        ``energy_topK_difference``, ``num_classes`` (all numbers as measured).
    """
    runs = results.get("runs", [])
    out = []
    for bn_run in runs:
        if not bn_run.get("batchnorm") or not bn_run.get("checkpoints"):
            continue
        partners = [
            r
            for r in runs
            if not r.get("batchnorm")
            and r.get("model") == bn_run.get("model")
            and r.get("checkpoints")
        ]
        if not partners:
            continue
        plain = partners[0]
        steps = {c["step"] for c in plain["checkpoints"]} & {
            c["step"] for c in bn_run["checkpoints"]
        }
        if not steps:
            continue
        step = max(steps)
        cp = next(c for c in plain["checkpoints"] if c["step"] == step)
        cb = next(c for c in bn_run["checkpoints"] if c["step"] == step)
        k = int(bn_run.get("num_classes") or 1)
        r_plain, r_bn = cp.get("outlier_ratio"), cb.get("outlier_ratio")
        e_plain = _at(cp.get("gradient_energy_full"), k - 1)
        e_bn = _at(cb.get("gradient_energy_full"), k - 1)
        out.append(
            {
                "model": bn_run.get("model"),
                "bn_run": bn_run["name"],
                "plain_run": plain["name"],
                "bn_mode": bn_run.get("bn_mode"),
                "step": step,
                "num_classes": k,
                "outlier_ratio_plain": r_plain,
                "outlier_ratio_bn": r_bn,
                "outlier_ratio_quotient": (r_plain / r_bn) if r_plain and r_bn else None,
                "energy_topK_plain": e_plain,
                "energy_topK_bn": e_bn,
                "energy_topK_difference": (
                    e_plain - e_bn if e_plain is not None and e_bn is not None else None
                ),
                "minibatch_energy_topK_plain": _at(cp.get("gradient_energy_minibatch_mean"), k - 1),
                "minibatch_energy_topK_bn": _at(cb.get("gradient_energy_minibatch_mean"), k - 1),
            }
        )
    return out


def _run_label(run: Mapping[str, Any]) -> str:
    if run.get("bn_mode"):
        return f"{run['name']} (BN, {run['bn_mode']} mode)"
    return f"{run['name']} (no BN)"


def _last_checkpoint_table(results: Mapping[str, Any]) -> list[str]:
    head = (
        "| run | step | params | λ1 | bulk edge | outliers (K) | λ1/bulk edge | λ1/λK | "
        "trace | energy top-K (full) | energy top-K (mini-batch) | max rel. residual | "
        "train loss | test acc. |"
    )
    lines = [head, "|" + "---|" * 14]
    for run in results.get("runs", []):
        if not run.get("checkpoints"):
            continue
        c = run["checkpoints"][-1]
        k = int(run.get("num_classes") or 1)
        lam = c.get("top_eigenvalues") or [None]
        rel = [v for v in (c.get("relative_residuals") or []) if v is not None]
        mb_mean = _at(c.get("gradient_energy_minibatch_mean"), k - 1)
        mb_std = _at(c.get("gradient_energy_minibatch_std"), k - 1)
        lines.append(
            f"| {_run_label(run)} | {c['step']} | {run.get('num_params')} | {_fmt(lam[0])} | "
            f"{_fmt(c.get('bulk_edge'))} | {c.get('num_outliers')} ({k}) | "
            f"{_fmt(c.get('outlier_ratio'))} | {_fmt(c.get('lambda1_over_lambdaK'))} | "
            f"{_fmt(c.get('trace'))} ± {_fmt(c.get('trace_stderr'), 2)} | "
            f"{_fmt(_at(c.get('gradient_energy_full'), k - 1))} | "
            f"{_fmt(mb_mean)} ± {_fmt(mb_std, 2)} | {_fmt(max(rel) if rel else None, 2)} | "
            f"{_fmt(c.get('train_loss'))} | {_fmt(c.get('test_accuracy'))} |"
        )
    return lines


def _over_training_table(run: Mapping[str, Any]) -> list[str]:
    k = int(run.get("num_classes") or 1)
    lines = [
        "| step | train loss | test acc. | λ1 | outliers | λ1/bulk edge | λ1/λK | energy top-K "
        "(full) | energy top-K (mini-batch) | density σ |",
        "|" + "---|" * 10,
    ]
    for c in run.get("checkpoints", []):
        lam = c.get("top_eigenvalues") or [None]
        lines.append(
            f"| {c['step']} | {_fmt(c.get('train_loss'))} | {_fmt(c.get('test_accuracy'))} | "
            f"{_fmt(lam[0])} | {c.get('num_outliers')} | {_fmt(c.get('outlier_ratio'))} | "
            f"{_fmt(c.get('lambda1_over_lambdaK'))} | "
            f"{_fmt(_at(c.get('gradient_energy_full'), k - 1))} | "
            f"{_fmt(_at(c.get('gradient_energy_minibatch_mean'), k - 1))} | "
            f"{_fmt(c.get('density_sigma'), 2)} |"
        )
    return lines


def render_report(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """report.md: the setting, the findings with the measured numbers, per-run tables over
    training, and the figures (``figures`` maps a caption to a path relative to the
    output folder)."""
    cfg = results.get("config", {})
    data = results.get("data", {})
    settings = results.get("settings", {})
    timing = results.get("timing", {})
    tcfg = cfg.get("train", {})
    lines = [f"# {cfg.get('title', 'hessspec study')}", ""]
    status = results.get("status")
    if status != "complete":
        lines += [f"**Status: {status}** — the numbers below cover what was measured.", ""]
    lines += [
        f"hessspec {results.get('hessspec_version')}; command: `{results.get('command', '')}`",
        "",
        "## Setting",
        "",
        f"- Data: {data.get('name')} — {data.get('train_size')} training and "
        f"{data.get('test_size')} test examples of shape {data.get('input_shape')}, "
        f"{data.get('num_classes')} classes (K); preprocessing "
        f"{data.get('preprocessing')}.",
        f"- Analysis set: {data.get('analysis_size')} fixed training examples; Hessian and "
        "full-batch gradient of the mean loss over them, cut into batches of "
        f"{settings.get('hvp_batch_size')} (in BatchNorm train mode each batch is "
        "normalised with its own statistics; without BN and in eval/population mode the "
        "cut does not matter).",
        f"- Training: {tcfg.get('optimizer')} (learning rate {tcfg.get('learning_rate')}, "
        f"momentum {tcfg.get('momentum')}, batch {tcfg.get('batch_size')}, weight decay "
        f"{tcfg.get('weight_decay')}) for {tcfg.get('steps')} steps, seed {cfg.get('seed')}; "
        f"analysed at steps {results.get('checkpoint_steps')}.",
        f"- Per checkpoint: top {settings.get('top_k')} eigenpairs (Lanczos, residuals "
        f"computed), SLQ density with {settings.get('slq_probes')} probes × "
        f"{settings.get('slq_steps')} steps, {settings.get('trace_method')} trace with "
        f"{settings.get('trace_matvecs')} matvecs, gradient energy of the full-batch gradient "
        f"and of {settings.get('num_minibatches')} mini-batch gradients "
        f"({settings.get('minibatch_size')} examples each).",
        "- Outliers: eigenvalues above the largest relative gap among the top eigenvalues; "
        "bulk edge = the largest eigenvalue that is not an outlier; outlier ratio = "
        "λ1 / bulk edge; K = number of classes is the reference count (Papyan).",
        "- Density smoothing: Gaussian kernel of standard deviation σ = "
        "sqrt(1e-5 · max(1, λmax − λmin)) (Ghorbani et al. 2019), per checkpoint; the σ used "
        "is listed in the tables below.",
    ]
    if timing:
        lines.append(
            f"- Wall time: {_fmt(timing.get('seconds_total'))} s in all "
            f"({_fmt(timing.get('seconds_training'))} s training, "
            f"{_fmt(timing.get('seconds_analysis'))} s analysis)."
        )
    lines += ["", "## Findings", ""]
    found = findings(results)
    if not found:
        lines.append(
            "No pair of networks with and without BatchNorm was analysed at a common step, "
            "so there is no comparison to state."
        )
    for f in found:
        k = f["num_classes"]
        q = f["outlier_ratio_quotient"]
        d = f["energy_topK_difference"]
        lines += [
            f"- **{f['model']} without BN vs with BN ({f['bn_mode']} mode), step {f['step']}.** "
            f"Outlier ratio λ1/bulk edge: {_fmt(f['outlier_ratio_plain'])} without BN, "
            f"{_fmt(f['outlier_ratio_bn'])} with BN"
            + (f" — {_fmt(q)} times larger without BN." if q is not None else ".")
            + f" Fraction of the full-batch gradient in the top-{k} eigenspace: "
            f"{_fmt(f['energy_topK_plain'])} without BN, {_fmt(f['energy_topK_bn'])} with BN"
            + (f" (difference {_fmt(d)})." if d is not None else ".")
            + f" Mini-batch gradients: {_fmt(f['minibatch_energy_topK_plain'])} vs "
            f"{_fmt(f['minibatch_energy_topK_bn'])}.",
        ]
        if q is not None and d is not None:
            shows = q >= 3 and d >= 0.3
            verdict = "shows" if shows else "does not show"
            lines.append(
                f"  This run {verdict} Ghorbani et al.'s effect at the thresholds of this "
                f"project (outlier ratio at least 3 times larger and at least 0.3 more "
                f"gradient energy in the top-{k} eigenspace without BN): measured "
                f"{_fmt(q)} times and {_fmt(d)}."
            )
    lines += ["", "## At the last checkpoint", ""]
    lines += _last_checkpoint_table(results)
    for run in results.get("runs", []):
        lines += ["", f"## {_run_label(run)} over training", ""]
        lines += _over_training_table(run)
        warn = [w for c in run.get("checkpoints", []) for w in c.get("warnings", [])]
        if warn:
            lines += ["", "Lanczos convergence notes:", ""] + [f"- {w}" for w in warn]
    if figures:
        lines += ["", "## Figures", ""]
        for caption, rel in figures.items():
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any] | None = None,
    spectra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, str]:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md``.

    Args:
        out_dir: the output folder.
        results, spectra: the study's results and arrays; read from the folder if None.

    Returns:
        Figure captions mapped to their paths relative to ``out_dir``.
    """
    from hessspec import plots

    out_dir = Path(out_dir)
    if results is None or spectra is None:
        loaded, arrays = load_results(out_dir)
        results = loaded if results is None else results
        spectra = arrays if spectra is None else spectra
    import matplotlib.pyplot as plt

    rel = {}
    for caption, (name, fig) in plots.draw_all(results, spectra).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / FIGURES_DIR / f"{name}.png", buf.getvalue())
        rel[caption] = f"{FIGURES_DIR}/{name}.png"
    atomic_write_text(out_dir / "report.md", render_report(results, rel))
    return rel
