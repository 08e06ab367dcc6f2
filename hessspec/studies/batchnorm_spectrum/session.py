"""One session of a BatchNorm spectrum run: a new run, a resumed one, or a re-analysis of
saved networks. Shared by :func:`hessspec.studies.batchnorm_spectrum.runner.run_study` and
:func:`hessspec.studies.batchnorm_spectrum.reanalysis.analyze_run`:

- :func:`new_results`: results.json's header and config.toml of a new run folder;
- :class:`Analyses`: the networks analysed at checkpoints, one run per network and BN mode,
  each result recorded as it comes (with the overlap of its top-K eigenspace with the run's
  previous checkpoint's);
- :class:`Session`: the session's entry in results.json, what it is doing (for the record of
  an interruption), and :meth:`Session.recording`, which writes how the session ended,
  results.json always last (:func:`finish`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hessspec.nn.progress import Progress
from hessspec.studies.batchnorm_spectrum.config import config_to_dict, to_toml
from hessspec.studies.batchnorm_spectrum.results import ResultsWriter
from hessspec.studies.batchnorm_spectrum.setup import (
    Network,
    StudySetup,
    analysis_settings,
    run_name,
)
from hessspec.studies.batchnorm_spectrum.tracking import (
    SubspaceOverlaps,
    stability_threshold_or_none,
)
from hessspec.studies.common.interrupts import InterruptGuard
from hessspec.studies.common.runfolder import OutputWriteError, atomic_write_text

__all__ = [
    "Analyses",
    "Session",
    "Tracker",
    "finish",
    "new_results",
    "now",
    "print_note",
    "results_header",
]


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def print_note(line: str) -> None:
    """A one-line note of a run (memory, where it writes) on stderr: the default ``log``."""
    print(line, file=sys.stderr)


def _platform() -> dict[str, Any]:
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def results_header(setup: StudySetup, command: str) -> dict[str, Any]:
    """The top-level entries of a new run's results.json."""
    import hessspec

    config = setup.config
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    first = analysis_settings(setup)[setup.networks[0].name]
    return {
        "hessspec_version": hessspec.__version__,
        "status": "running",
        "created": now(),
        "command": command,
        "config": config_to_dict(config),
        "data": {
            "name": config.data.name,
            "preprocessing": (
                config.data.preprocessing
                if config.data.name == "digits"
                else ("standardize" if config.data.standardize else "unit")
            ),
            "train_size": tr.num_examples,
            "test_size": te.num_examples,
            "analysis_size": an.num_examples,
            "input_shape": list(tr.input_shape),
            "num_classes": tr.num_classes,
        },
        "settings": dataclasses.asdict(first),
        "checkpoint_steps": setup.checkpoints,
        "platform": _platform(),
    }


def new_results(
    setup: StudySetup, out_dir: Path, header: dict[str, Any], *, write: bool, lock: Any
) -> ResultsWriter:
    """The results writer of a new run folder, with config.toml written (when ``write``)."""
    writer = ResultsWriter(out_dir, header, write=write, lock=lock)
    if write:
        atomic_write_text(out_dir / "config.toml", to_toml(setup.config))
        writer.add_files("config.toml")
    return writer


class Tracker:
    """What a run is doing (for the record of an interruption), its loss curves and its
    sharpness measurements."""

    def __init__(self):
        self.phase = "start-up"
        self.curves: dict[str, Any] = {}  # network name -> LossCurve
        self.started: dict[str, int] = {}  # network name -> step this session began at
        self.sharpness: dict[str, list] = {}  # network name -> [{"step", "lambda_max"}]


class Analyses:
    """Analyses networks at checkpoints into a
    :class:`~hessspec.studies.batchnorm_spectrum.results.ResultsWriter`:
    one run per network and BatchNorm mode, the compiled programs of each analysed graph
    shared between its checkpoints
    (:class:`~hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer`).

    Attributes:
        run_ids: ``{network: {mode: index of its run in results.json}}``.
        seconds: time spent analysing in this session.
        overlaps: the top-K eigenspaces of the previous checkpoints
            (:class:`~hessspec.studies.batchnorm_spectrum.tracking.SubspaceOverlaps`).
    """

    def __init__(self, setup, writer, progress, guard, *, check_memory, tracker):
        self.setup = setup
        self.config = setup.config
        self.writer = writer
        self.progress = progress
        self.guard = guard
        self.check_memory = check_memory
        self.tracker = tracker
        self.settings = analysis_settings(setup)
        self.base_key = None
        self.analyzers: dict[tuple[str, str], Any] = {}
        self.run_ids: dict[str, dict[str | None, int]] = {}
        self.seconds = 0.0
        self.overlaps = SubspaceOverlaps(writer)

    def add_runs(self, net: Network) -> dict[str | None, int]:
        """The results.json runs of ``net`` (one per mode; kept when continuing, with their
        checkpoints, loss curve and sharpness)."""
        st = self.settings[net.name]
        threshold = stability_threshold_or_none(self.config.train)
        ids = {}
        for mode in net.modes:
            ids[mode] = self.writer.add_run(
                {
                    "name": run_name(net, mode),
                    "model": self.config.model.name,
                    "batchnorm": net.batchnorm,
                    "bn_mode": mode,
                    "num_params": net.num_params,
                    "num_classes": self.setup.train_set.num_classes,
                    "settings": dataclasses.asdict(st),
                    "stability_threshold": threshold,
                    "sharpness": [],
                }
            )
        self.run_ids[net.name] = ids
        return ids

    def missing(self, net: Network, steps: Sequence[int]) -> dict[int, list[str | None]]:
        """``{step: modes}`` of the analyses of ``net`` not recorded yet."""
        ids = self.run_ids[net.name]
        done = {mode: self.writer.analysed_steps(i) for mode, i in ids.items()}
        out = {}
        for step in steps:
            modes = [m for m in net.modes if step not in done[m]]
            if modes:
                out[step] = modes
        return out

    def _analyzer(self, net: Network, mode: str | None, objective):
        """The analyzer of ``net``'s graph in ``mode``: eval and population mode share a
        graph, hence compiled programs."""
        from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

        shared = (net.name, "train" if mode == "train" else "statistics")
        if shared not in self.analyzers:
            s = self.setup
            self.analyzers[shared] = CheckpointAnalyzer(
                objective,
                s.analysis_set,
                s.train_set,
                s.test_set,
                s.train_set.num_classes,
                self.settings[net.name],
                check_memory=self.check_memory,
            )
        return self.analyzers[shared]

    def analyse(self, net: Network, step: int, model, modes: Sequence[str | None]) -> None:
        """Analyse ``model`` (``net`` at ``step``) in ``modes`` and record each result."""
        import jax

        from hessspec.nn.objective import make_objective
        from hessspec.studies.batchnorm_spectrum.analyzer import analysis_stages

        if self.base_key is None:
            self.base_key = jax.random.key(self.config.seed)
        config, st = self.config, self.settings[net.name]
        population = self.setup.train_set.x
        previous = self.tracker.phase
        self.tracker.phase = "analysis"
        t0 = time.perf_counter()
        for mode in modes:
            label = f"{net.name}: step {step}" + (f", {mode} mode" if mode else "")
            obj = make_objective(
                model,
                config.model.loss,
                bn_mode=mode,
                population_data=population if mode == "population" else None,
                population_batch_size=st.eval_batch_size * 8 if mode == "population" else None,
            )
            analyzer = self._analyzer(net, mode, obj)
            stages = len(analysis_stages(st.per_layer))
            with self.progress.analysis(f"analysing {label}", stages) as shown:
                result = analyzer.analyse(
                    obj,
                    jax.random.fold_in(self.base_key, step),
                    seed=config.seed * 1_000_003 + step,
                    on_stage=shown.stage,
                )
            self._record(net, mode, step, result)
        self.seconds += time.perf_counter() - t0
        self.tracker.phase = previous

    def _record(self, net: Network, mode: str | None, step: int, result) -> None:
        """Record one analysis, with the overlap of its top-K eigenspace (K = number of
        classes) with the run's previous checkpoint's."""
        name, k = run_name(net, mode), max(int(self.setup.train_set.num_classes), 1)
        record = dict(result.record)
        record["top_k_overlap_with_previous"] = self.overlaps.overlap(
            name, step, result.arrays.get("eigenvectors"), k
        )
        arrays = dict(result.arrays)
        if not self.config.analysis.save_eigenvectors:
            arrays.pop("eigenvectors", None)
        with self.guard.critical():
            self.writer.add_checkpoint(self.run_ids[net.name][mode], step, record, arrays)


class Session:
    """One session of a run: its entry in results.json's ``"sessions"`` (started, command,
    resumed, the steps each network trained, how it ended), its :class:`Tracker` and
    :class:`Analyses`.

    Args:
        setup: the study.
        writer: the run's results (new or reopened); its folder is the one written, and
            only when it writes does the session write.
        command: the command line, recorded.
        resumed: whether this session continues an earlier one.
        progress: a :class:`hessspec.nn.progress.Progress`, True, False or a style name.
        guard: the process's interrupt guard.
        check_memory: the solvers' memory check (see
            :class:`~hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer`).
    """

    def __init__(
        self,
        setup: StudySetup,
        writer: ResultsWriter,
        *,
        command: str,
        resumed: bool,
        progress: bool | str | Progress,
        guard: InterruptGuard,
        check_memory: bool | float,
    ):
        self.writer = writer
        self.out_dir = writer.out_dir
        self.guard = guard
        self.write = writer.write
        self.show = Progress.of(progress)
        self.tracker = Tracker()
        self.analyses = Analyses(
            setup, writer, self.show, guard, check_memory=check_memory, tracker=self.tracker
        )
        self.entry: dict[str, Any] = {
            "started": now(),
            "command": command,
            "resumed": bool(resumed),
            "trained": {},
        }
        writer.results.setdefault("sessions", []).append(self.entry)
        writer.write_json()

    def _on_stuck(self, record: Callable[[], None]) -> Callable[[], str]:
        """What the guard's watchdog calls when the main thread is stuck in native code:
        record what is held (from host memory), mark the run interrupted."""

        def on_stuck() -> str:
            record()
            self.entry["status"] = "interrupted"
            self.writer.update(status="interrupted", stopped_during=self.tracker.phase)
            return f"what was measured is in {self.out_dir}/"

        return on_stuck

    @contextlib.contextmanager
    def recording(
        self, *, record: Callable[[], None], record_from_host: Callable[[], None]
    ) -> Iterator[None]:
        """Run the session's work inside; then write how it ended (:func:`finish`):
        complete, interrupted (a KeyboardInterrupt, re-raised) or failed (an exception,
        re-raised).

        Args:
            record: puts the loss curves and timing into the results (in memory).
            record_from_host: the same without touching the devices, for the watchdog.
        """
        self.guard.on_stuck = self._on_stuck(record_from_host) if self.write else None
        status, error = "failed", None
        try:
            yield
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            finish(self, status=status, error=error, record=record)


def _write_report_or_say(session: Session) -> None:
    """The report of a run that did not complete; a failure here is printed, never raised
    (the run's own error is what propagates)."""
    from hessspec.studies.batchnorm_spectrum.report import write_report

    writer = session.writer
    try:
        write_report(session.out_dir, writer.results, writer.arrays, on_written=writer.add_files)
        writer.write_json()
    except Exception as e:  # noqa: BLE001 - never let the report hide why the run stopped
        print(f"hessspec.run: could not write the report: {e}", file=sys.stderr)
        with contextlib.suppress(OutputWriteError):
            writer.write_json()


def _write_output(session: Session) -> None:
    """The figures and report.md of a complete run, then results.json ("complete"); an
    interrupt or an error on the way is recorded instead and re-raised."""
    from hessspec.studies.batchnorm_spectrum.report import write_report

    writer = session.writer
    session.tracker.phase = "writing the output"
    try:
        writer.update(status="complete", stopped_during=None, error=None, write=False)
        write_report(session.out_dir, writer.results, writer.arrays, on_written=writer.add_files)
        writer.write_json()
    except BaseException as e:
        session.guard.finishing = True
        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        session.entry["status"] = stopped
        message = None if stopped == "interrupted" else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OutputWriteError):
            writer.update(status=stopped, stopped_during="writing the output", error=message)
        raise


def finish(session: Session, *, status: str, error: str | None, record: Callable[[], None]):
    """The final writes of a session, results.json always last.

    - complete: the figures and report.md, then results.json ("complete"); an interrupt or
      an error on the way is recorded instead (``stopped_during`` = "writing the output",
      ``files`` lists what was written);
    - interrupted: results.json only (status, where it stopped, the loss curves), so the
      process ends within a second; the report is drawn when the run completes (--resume);
    - failed: results.json first (why), then the report of what was measured, unless the
      failure was a write (a full disk).
    """
    writer, write = session.writer, session.write
    if status != "complete":
        session.guard.finishing = True  # a second interrupt now ends the process at once
    try:
        record()
    except Exception as e:  # noqa: BLE001 - keep the host-side curves then
        print(f"hessspec.run: could not copy the loss curves: {e}", file=sys.stderr)
    session.entry["status"] = status
    if status != "complete":
        # the original error propagates; a failed write here leaves the last consistent file
        with contextlib.suppress(OutputWriteError):
            writer.update(status=status, stopped_during=session.tracker.phase, error=error)
        if status == "interrupted" or not write or (error or "").startswith("OutputWriteError"):
            return
    has_results = any(r["checkpoints"] for r in writer.results["runs"])
    if not write or not has_results:
        if status == "complete":
            writer.update(status=status, stopped_during=None, error=None)
        return
    if status != "complete":
        _write_report_or_say(session)
    else:
        _write_output(session)
