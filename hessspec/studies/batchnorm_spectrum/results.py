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
               "stability_threshold": float | null,
               "sharpness": [{"step": int, "lambda_max": float}, ...],
               "checkpoints": [{"step": int, "train_loss": float, "test_accuracy": float,
                                "top_eigenvalues": [...largest first], "residuals": [...],
                                "trace": float, "headline_ratio": float | null,
                                "num_outliers": int, "bulk_edge": float,
                                "outlier_ratio": float, "lambda1_over_lambdaK": float,
                                "gradient_energy_full": [k = 1..2K],
                                "gradient_energy_minibatch_mean": [...],
                                "gradient_energy_minibatch_std": [...],
                                "top_k_overlap_with_previous": float | null,
                                "per_layer": {...} (with analysis.per_layer),
                                "density_sigma": float, ...}]}],
     "sessions": [{"started": str, "command": str, "resumed": bool,
                   "trained": {network: [first step, last step]}, "status": str}],
     "files": [...], "timing": {...}}

The entries issue 13 added:

- ``headline_ratio``: ``lambda_1 / lambda_{K+1}`` of the checkpoint's top eigenvalues, K the
  number of classes (null when ``lambda_{K+1} <= 0``): the one outlier measure that the
  report's headline, the findings and the outlier-ratio figure use for every run and
  checkpoint. The gap-based ``num_outliers``, ``bulk_edge`` and ``outlier_ratio`` (lambda_1 /
  bulk edge) stay beside it.
- ``top_k_overlap_with_previous``: ``||Q_prev^T Q||_F^2 / K`` between the top-K eigenvectors
  (K = number of classes, float32 as stored in spectra.npz) of this checkpoint and of the
  run's previous one (Gur-Ari et al. 2018); null at the first checkpoint
  (:class:`~hessspec.studies.batchnorm_spectrum.tracking.SubspaceOverlaps`).
- ``per_layer`` (when ``analysis.per_layer``): ``names``, ``sizes``, ``parameters`` (the
  paths of each block), ``top_eigenvalues`` and ``residuals`` (per block, largest first),
  ``traces``, ``trace_stderrs``, ``js_distances`` (``B x B`` Jensen-Shannon distances between
  the block densities), ``density_sigma``
  (:func:`~hessspec.studies.batchnorm_spectrum.layers.measure_layers`).
- per run, ``sharpness``: ``lambda_max`` of the training objective every
  ``train.track_sharpness_every`` steps (empty when off), and ``stability_threshold``:
  ``2 / lr`` (``(2 + 2 momentum) / lr`` with momentum) for SGD, null for Adam and Nesterov.
- ``settings.weight_decay``: the ``wd`` of the L2 term ``(wd / 2) ||w||^2`` in the analysed
  objective (0 when not included).

Non-finite numbers are written as ``null`` (:func:`hessspec.studies.common.jsonio.jsonable`).
``spectra.npz`` holds, per run and checkpoint, the arrays named
``"<run>/step<step>/<array>"`` (``nodes``, ``weights``, ``eigenvalues``, ``residuals``,
``eigenvectors``, ``density_grid``, ``density``, ``gradient_energy_minibatch``, and with
per-layer spectra ``layer_density_grid``, ``layer_densities`` ``(B, G)``, ``layer<i>_nodes``,
``layer<i>_weights``); :func:`spectra_key` builds the names.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.studies.batchnorm_spectrum.schema import (
    RESULTS_SCHEMA,
    compare_results,
    validate_results,
)
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
        existing run of the same name is kept, its entries updated but for its checkpoints,
        loss curve and sharpness)."""
        with self.lock:
            entry = jsonable(dict(run))
            index = self.run_index(entry["name"])
            if index is not None:
                kept = ("checkpoints", "loss_curve", "sharpness")
                self.results["runs"][index].update(
                    {k: v for k, v in entry.items() if k not in kept}
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

    def set_sharpness(self, run_index: int, entries: Any, *, write: bool = True) -> None:
        """Store a run's sharpness, ``[{"step", "lambda_max"}, ...]`` by step; write unless
        ``write`` is False."""
        with self.lock:
            self.results["runs"][run_index]["sharpness"] = jsonable(
                sorted((dict(e) for e in entries), key=lambda e: e["step"])
            )
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
