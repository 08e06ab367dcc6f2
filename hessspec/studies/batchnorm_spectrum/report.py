"""The output of a study: results.json, spectra.npz, figures/*.png and report.md.

Every file is written atomically (:func:`hessspec.studies.common.runfolder.atomic_write_bytes`), so
a
reader or an interrupted run never sees a half-written file. ``results.json`` and
``spectra.npz`` are rewritten after every checkpoint (spectra.npz first: results.json only
ever lists checkpoints whose arrays are on disk), so an interrupted run keeps everything it
measured; results.json is the last file a run writes, and its ``"files"`` lists every file
the run wrote (checkpoint folders end with ``/``).

``results.json`` (see :data:`RESULTS_SCHEMA` and :func:`validate_results`)::

    {"hessspec_version": str, "status": "running" | "complete" | "interrupted" | "failed",
     "stopped_during": "start-up" | "training" | "analysis" | "writing the output" (not
                       complete only), "error": str | null,
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
     "sessions": [{"started": str, "command": str, "resumed": bool,
                   "trained": {network: [first step, last step]}, "status": str}],
     "files": [...], "timing": {...}}

Non-finite numbers are written as ``null``. ``spectra.npz`` holds, per run and checkpoint,
the arrays named ``"<run>/step<step>/<array>"`` (``nodes``, ``weights``, ``eigenvalues``,
``residuals``, ``eigenvectors``, ``density_grid``, ``density``,
``gradient_energy_minibatch``); :func:`spectra_key` builds the names.
"""

from __future__ import annotations

import io
import json
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.studies.common.runfolder import (
    OutputFolderError,
    atomic_write_bytes,
    atomic_write_text,
)

__all__ = [
    "FIGURES_DIR",
    "OutputFolderError",
    "RESULTS_SCHEMA",
    "ResultsWriter",
    "atomic_write_bytes",
    "atomic_write_text",
    "compare_results",
    "findings",
    "load_results",
    "prepare_output_dir",
    "spectra_key",
    "validate_results",
    "write_report",
]

FIGURES_DIR = "figures"


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
    """Make sure ``path`` can receive a study's output, for library use
    (``run_study(setup, prepare_output_dir(path, overwrite=False))``; the CLI uses
    :class:`hessspec.studies.common.runfolder.RunFolder`, which also locks the folder and swaps a
    new run
    in only when it completes).

    A missing or empty folder is created. A folder holding anything refuses, unless
    ``overwrite``: then the files its previous run wrote (those its results.json lists) and
    the temporaries of killed runs are removed, and anything else is left alone.

    Raises:
        OutputFolderError: non-empty folder without ``overwrite``, or ``path`` is a file.
    """
    from hessspec.studies.common.runfolder import (
        LOCK_NAME,
        listed_files,
        remove_listed_files,
        remove_stale_temporaries,
    )

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"output path {str(path)!r} exists and is not a folder.")
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        if not overwrite:
            raise OutputFolderError(
                f"output folder {str(path)!r} already holds files; pass overwrite=True to "
                "replace a previous study's output there, or choose another folder."
            )
        remove_stale_temporaries(path)
        remove_listed_files(path, listed_files(path) or [])
    path.mkdir(parents=True, exist_ok=True)
    return path


class ResultsWriter:
    """Accumulates runs and checkpoints and rewrites results.json and spectra.npz after
    each change (atomically; spectra.npz first).

    A checkpoint is recorded only once its arrays are on disk: when writing spectra.npz
    fails (a full disk), nothing changes, in memory or on disk, and the error propagates.
    Every change happens under :attr:`lock` (shared with
    :class:`hessspec.studies.common.interrupts.InterruptGuard`, whose watchdog may write
    results.json from
    another thread).

    Args:
        out_dir: the folder written to.
        header: top-level entries of results.json (version, config, data, settings, ...).
        write: False keeps everything in memory and writes no file (the processes other
            than process 0 of a multi-process run, which compute the same results).
        lock: the lock to change state under (default: a new one).
    """

    def __init__(
        self,
        out_dir: str | Path,
        header: Mapping[str, Any],
        *,
        write: bool = True,
        lock: Any = None,
    ):
        self.out_dir = Path(out_dir)
        self.write = bool(write)
        self.lock = lock if lock is not None else threading.RLock()
        self.results: dict[str, Any] = {**_json_ready(dict(header))}
        self.results.setdefault("runs", [])
        self.results.setdefault("status", "running")
        self.arrays: dict[str, np.ndarray] = {}
        self.files: set[str] = set(self.results.pop("files", []) or [])

    @classmethod
    def reopen(cls, out_dir: str | Path, *, write: bool = True, lock: Any = None):
        """The writer of an existing run folder (to continue it): its results.json and the
        arrays of its spectra.npz.

        Raises:
            OutputFolderError: results.json missing or unreadable.
        """
        out_dir = Path(out_dir)
        try:
            results, arrays = load_results(out_dir)
        except (OSError, ValueError) as e:
            raise OutputFolderError(
                f"cannot continue the run in {out_dir}: its results.json cannot be read ({e})."
            ) from None
        if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
            raise OutputFolderError(
                f"cannot continue the run in {out_dir}: its results.json is not a hessspec "
                "results file."
            )
        writer = cls(out_dir, results, write=write, lock=lock)
        # only the arrays of checkpoints results.json lists (a failed write may have left more)
        listed = {
            (run["name"], int(c["step"]))
            for run in writer.results["runs"]
            for c in run.get("checkpoints", [])
        }
        for key, value in arrays.items():
            name, step, _ = _split_key(key)
            if (name, step) in listed:
                writer.arrays[key] = value
        return writer

    def run_index(self, name: str) -> int | None:
        """Index of the run named ``name``, or None."""
        for i, run in enumerate(self.results["runs"]):
            if run["name"] == name:
                return i
        return None

    def add_run(self, run: Mapping[str, Any]) -> int:
        """Append a run (``name``, ``batchnorm``, ``bn_mode``, ...); returns its index (an
        existing run of the same name is kept, its entries updated)."""
        with self.lock:
            entry = _json_ready(dict(run))
            index = self.run_index(entry["name"])
            if index is not None:
                self.results["runs"][index].update(
                    {k: v for k, v in entry.items() if k not in ("checkpoints", "loss_curve")}
                )
                return index
            entry["checkpoints"] = []
            entry.setdefault("loss_curve", {"step": [], "loss": []})
            self.results["runs"].append(entry)
            return len(self.results["runs"]) - 1

    def analysed_steps(self, run_index: int) -> set[int]:
        """Steps of the checkpoints a run has recorded."""
        return {int(c["step"]) for c in self.results["runs"][run_index]["checkpoints"]}

    def add_checkpoint(
        self, run_index: int, step: int, record: Mapping[str, Any], arrays: Mapping[str, Any]
    ) -> None:
        """Record one checkpoint of a run: spectra.npz with its arrays first, then
        results.json. If spectra.npz cannot be written nothing is recorded.

        Raises:
            hessspec.studies.common.runfolder.OutputWriteError: a file could not be written.
        """
        with self.lock:
            run = self.results["runs"][run_index]
            new_arrays = dict(self.arrays)
            for name, value in arrays.items():
                new_arrays[spectra_key(run["name"], step, name)] = np.asarray(value)
            if self.write:
                self._write_npz(new_arrays)
                self.files.add("spectra.npz")
            self.arrays = new_arrays
            checkpoints = [c for c in run["checkpoints"] if int(c["step"]) != int(step)]
            checkpoints.append({"step": int(step), **_json_ready(dict(record))})
            run["checkpoints"] = sorted(checkpoints, key=lambda c: c["step"])
            self.write_json()

    def set_loss_curve(
        self, run_index: int, steps: Any, losses: Any, *, write: bool = True
    ) -> None:
        """Store a run's training loss curve (mini-batch loss per step); write unless
        ``write`` is False."""
        with self.lock:
            steps = np.asarray(steps).astype(int)
            losses = np.asarray(losses, dtype=np.float64)
            self.results["runs"][run_index]["loss_curve"] = {
                "step": steps.tolist(),
                "loss": [v if math.isfinite(v) else None for v in losses.tolist()],
            }
            if write:
                self.write_json()

    def add_files(self, *names: str) -> None:
        """Names (relative to the folder; folders end with ``/``) of files this run wrote;
        results.json lists them from its next write."""
        with self.lock:
            self.files.update(names)

    def remove_files(self, *names: str) -> None:
        """Names of files this run removed again."""
        with self.lock:
            self.files.difference_update(names)

    def update(self, *, write: bool = True, **entries: Any) -> None:
        """Set top-level entries of results.json and write it (unless ``write`` is False)."""
        with self.lock:
            self.results.update(_json_ready(entries))
            if write:
                self.write_json()

    def listed_files(self) -> list[str]:
        """The ``"files"`` of results.json: every file written, and results.json itself."""
        return sorted(self.files | {"results.json"})

    def write_json(self) -> None:
        """Write results.json (atomically; nothing when ``write`` is off)."""
        if not self.write:
            return
        with self.lock:
            self.results["files"] = self.listed_files()
            text = json.dumps(self.results, indent=1, allow_nan=False)
            atomic_write_text(self.out_dir / "results.json", text + "\n")

    def _write_npz(self, arrays: Mapping[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.out_dir / "spectra.npz", buf.getvalue())

    def write_npz(self) -> None:
        """Write spectra.npz (atomically; nothing when ``write`` is off)."""
        if self.write:
            with self.lock:
                self._write_npz(self.arrays)
                self.files.add("spectra.npz")

    def flush(self) -> None:
        """Write both files."""
        self.write_npz()
        self.write_json()


def _split_key(key: str) -> tuple[str, int, str]:
    """``(run, step, array)`` of a spectra.npz name (inverse of :func:`spectra_key`)."""
    run, step, name = key.rsplit("/", 2)
    return run, int(step.removeprefix("step")), name


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


#: Entries of a checkpoint record that measure time, not the network (left out by
#: :func:`compare_results`).
_TIMING_KEYS = frozenset({"seconds"})


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], *, rtol: float = 1e-6) -> list[str]:
    """Where two results differ in what they measured: every run's loss curve and every
    number of every checkpoint (timings left out), compared to ``rtol`` relative
    (``|x - y| <= rtol * max(|x|, |y|)``; nulls must match).

    Returns:
        One line per difference (empty: the same results), e.g.
        ``"mlp step 250 top_eigenvalues[3]: 1.2345 vs 1.2346"``.
    """
    problems: list[str] = []

    def close(x, y) -> bool:
        if x is None or y is None:
            return x is y
        return abs(x - y) <= rtol * max(abs(x), abs(y))

    def walk(x, y, where):
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                if k in _TIMING_KEYS:
                    continue
                if k not in x or k not in y:
                    problems.append(
                        f"{where} {k}: only in {'the first' if k in x else 'the second'}"
                    )
                else:
                    walk(x[k], y[k], f"{where} {k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                problems.append(f"{where}: {len(x)} vs {len(y)} entries")
                return
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, bool) or isinstance(y, bool) or isinstance(x, str):
            if x != y:
                problems.append(f"{where}: {x!r} vs {y!r}")
        elif isinstance(x, int | float | None) and isinstance(y, int | float | None):
            if not close(x, y):
                problems.append(f"{where}: {x!r} vs {y!r}")
        elif x != y:
            problems.append(f"{where}: {x!r} vs {y!r}")

    runs_a = {r["name"]: r for r in a.get("runs", [])}
    runs_b = {r["name"]: r for r in b.get("runs", [])}
    if set(runs_a) != set(runs_b):
        problems.append(f"runs: {sorted(runs_a)} vs {sorted(runs_b)}")
    for name in sorted(set(runs_a) & set(runs_b)):
        ra, rb = runs_a[name], runs_b[name]
        walk(ra.get("loss_curve"), rb.get("loss_curve"), f"{name} loss_curve")
        steps_a = {c["step"]: c for c in ra.get("checkpoints", [])}
        steps_b = {c["step"]: c for c in rb.get("checkpoints", [])}
        if set(steps_a) != set(steps_b):
            problems.append(f"{name} checkpoints: {sorted(steps_a)} vs {sorted(steps_b)}")
        for step in sorted(set(steps_a) & set(steps_b)):
            walk(steps_a[step], steps_b[step], f"{name} step {step}")
    return problems


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
        during = results.get("stopped_during")
        why = f" during {during}" if during else ""
        error = results.get("error")
        lines += [
            f"**Status: {status}{why}** — the numbers below cover what was measured."
            + (f" Error: {error}" if error else ""),
            "",
        ]
    if results.get("source"):
        src = results["source"]
        lines += [f"Re-analysis of {src.get('run_dir') or src.get('params_file')}.", ""]
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
    *,
    on_written: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md`` (last).

    Args:
        out_dir: the output folder.
        results, spectra: the study's results and arrays; read from the folder if None.
        on_written: called with each file's path relative to ``out_dir`` once it is
            written (so that a caller interrupted half-way knows what exists).

    Returns:
        Figure captions mapped to their paths relative to ``out_dir``.
    """
    from hessspec.studies.batchnorm_spectrum import plots

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
        if on_written is not None:
            on_written(rel[caption])
    atomic_write_text(out_dir / "report.md", render_report(results, rel))
    if on_written is not None:
        on_written("report.md")
    return rel
