"""The record of a BatchNorm spectrum run: results.json and spectra.npz.

Both files are written atomically (:func:`hessspec.studies.common.runfolder.atomic_write_bytes`),
so a reader or an interrupted run never sees a half-written file. They are rewritten after
every checkpoint (spectra.npz first: results.json only ever lists checkpoints whose arrays are
on disk), so an interrupted run keeps everything it measured; results.json is the last file
a run writes, and its ``"files"`` lists every file the run wrote (checkpoint folders end
with ``/``).

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

Non-finite numbers are written as ``null`` (:func:`hessspec.studies.common.jsonio.jsonable`).
``spectra.npz`` holds, per run and checkpoint, the arrays named
``"<run>/step<step>/<array>"`` (``nodes``, ``weights``, ``eigenvalues``, ``residuals``,
``eigenvectors``, ``density_grid``, ``density``, ``gradient_energy_minibatch``);
:func:`spectra_key` builds the names.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.studies.common.jsonio import jsonable
from hessspec.studies.common.runfolder import (
    OutputFolderError,
    atomic_write_bytes,
    atomic_write_text,
)

__all__ = [
    "RESULTS_SCHEMA",
    "ResultsWriter",
    "compare_results",
    "load_results",
    "prepare_output_dir",
    "spectra_key",
    "validate_results",
]


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
        self.results: dict[str, Any] = {**jsonable(dict(header))}
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
            entry = jsonable(dict(run))
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
            checkpoints.append({"step": int(step), **jsonable(dict(record))})
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
                "loss": jsonable(losses),
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
            self.results.update(jsonable(entries))
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
