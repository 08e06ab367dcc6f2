"""Train every network of a BatchNorm spectrum study and analyse it at every checkpoint
(:func:`run_study`), its training states saved on the way (:class:`CheckpointStore`), so
that an interrupted or failed run continues (``resume=True``) without repeating a step.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.nn.progress import Progress
from hessspec.studies.batchnorm_spectrum.config import config_to_dict
from hessspec.studies.batchnorm_spectrum.results import ResultsWriter
from hessspec.studies.batchnorm_spectrum.session import (
    Session,
    new_results,
    results_header,
)
from hessspec.studies.batchnorm_spectrum.setup import Network, StudySetup
from hessspec.studies.batchnorm_spectrum.tracking import sharpness_tracking
from hessspec.studies.common.checkpoint import (
    CHECKPOINTS_DIR,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    saved_checkpoints,
)
from hessspec.studies.common.interrupts import InterruptGuard
from hessspec.studies.common.runfolder import OutputFolderError

__all__ = ["CheckpointStore", "run_study"]


class CheckpointStore:
    """The orbax checkpoints of a run folder (``checkpoints/<step>/<network>/``).

    Args:
        folder: the run folder.
        setup: the study (its config and data shapes are stored with each state).
        writer: the run's results (``"files"`` lists every saved state).
        guard: the process's interrupt guard (a save is a critical section).
        write: False saves nothing (a process that does not write, or a multi-process run).
    """

    def __init__(self, folder: Path, setup: StudySetup, writer, guard, *, write: bool):
        self.folder = folder
        self.setup = setup
        self.writer = writer
        self.guard = guard
        self.write = write

    def saved(self, network: str) -> dict[int, dict[str, Any]]:
        """``{step: meta}`` of the saved states of ``network``."""
        return saved_checkpoints(self.folder).get(network, {})

    @staticmethod
    def _relative(step: int, network: str) -> str:
        return f"{CHECKPOINTS_DIR}/{int(step)}/{network}/"

    def save(self, net: Network, state, kind: str) -> None:
        """Save ``net``'s training state (unless this process does not write, or the same
        step is saved already) and drop the network's older interruption states."""
        if not self.write:
            return
        saved = self.saved(net.name)
        existing = saved.get(state.step)
        with self.guard.critical():
            if existing is None or (existing.get("kind") != kind and kind != "interrupt"):
                save_checkpoint(
                    checkpoint_path(self.folder, state.step, net.name),
                    state,
                    network=net.name,
                    batchnorm=net.batchnorm,
                    kind=kind,
                    config=self.setup.config,
                    input_shape=self.setup.train_set.input_shape,
                    num_classes=self.setup.train_set.num_classes,
                )
            self.writer.add_files(self._relative(state.step, net.name))
            analysis_steps = set(self.setup.checkpoints)
            for step, meta in saved.items():
                superseded = meta.get("kind") == "interrupt" and step not in analysis_steps
                if step < state.step and superseded:
                    path = checkpoint_path(self.folder, step, net.name)
                    shutil.rmtree(path, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()
                    self.writer.remove_files(self._relative(step, net.name))
            self.writer.write_json()

    def load(self, net: Network, step: int):
        """The saved state of ``net`` at ``step`` (a
        :class:`~hessspec.studies.common.checkpoint.Checkpoint`)."""
        return load_checkpoint(checkpoint_path(self.folder, step, net.name))


def _open_results(
    setup: StudySetup, out_dir: Path, *, command: str, write: bool, resume: bool, lock: Any
) -> tuple[ResultsWriter, dict[str, float]]:
    """The run's results writer (a new one, or the folder's own to continue it) and the
    timing of its earlier sessions.

    Raises:
        OutputFolderError: ``resume`` of a folder whose run was made with another config.
    """
    if not resume:
        header = results_header(setup, command)
        return new_results(setup, out_dir, header, write=write, lock=lock), {}
    writer = ResultsWriter.reopen(out_dir, write=write, lock=lock)
    if writer.results.get("config") != config_to_dict(setup.config):
        raise OutputFolderError(
            f"cannot continue the run in {out_dir}: its results.json was made with another "
            "config than its config.toml."
        )
    writer.update(status="running", stopped_during=None, error=None, write=False)
    return writer, dict(writer.results.get("timing") or {})


class _ProgressRecord:
    """Copies the loss curves, the sharpness, the sessions' trained steps and the timing
    into the results (in memory); a curve restored from a checkpoint carries the training
    time of earlier sessions."""

    def __init__(self, setup: StudySetup, session: Session, previous_timing: dict, t_start):
        self.setup = setup
        self.session = session
        self.previous = previous_timing
        self.t_start = t_start

    def __call__(self, *, from_device: bool) -> None:
        tracker, writer = self.session.tracker, self.session.writer
        run_ids = self.session.analyses.run_ids
        for net in self.setup.networks:
            curve = tracker.curves.get(net.name)
            if curve is None:
                continue
            losses = curve.losses() if from_device else curve.host_losses()
            for run_id in run_ids.get(net.name, {}).values():
                writer.set_loss_curve(run_id, np.arange(1, losses.size + 1), losses, write=False)
                if net.name in tracker.sharpness:
                    writer.set_sharpness(run_id, tracker.sharpness[net.name], write=False)
            self.session.entry["trained"][net.name] = [tracker.started[net.name], losses.size]
        by_network = dict(self.previous.get("seconds_training_by_network", {}))
        by_network.update({n: c.seconds for n, c in tracker.curves.items()})
        elapsed = time.perf_counter() - self.t_start
        analysis = self.session.analyses.seconds
        writer.update(
            write=False,
            timing={
                "seconds_total": float(self.previous.get("seconds_total", 0.0)) + elapsed,
                "seconds_training": sum(by_network.values()),
                "seconds_training_by_network": by_network,
                "seconds_analysis": float(self.previous.get("seconds_analysis", 0.0)) + analysis,
            },
        )


def _start_step(needed: dict[int, Any], saved: dict[int, Any]) -> int | None:
    """The saved step training resumes from: the latest, or an earlier one when analyses
    before the latest have no saved state to analyse (they are trained again)."""
    start = max(saved) if saved else None
    without_state = [s for s in needed if start is not None and s < start and s not in saved]
    if without_state:
        start = max((s for s in saved if s <= min(without_state)), default=None)
    return start


def _sharpness_tracking(session: Session, net: Network, *, start: int):
    """The sharpness tracking of ``net``'s training from ``start`` (None when off); its
    entries, those of earlier sessions first, go to the session's tracker."""
    analyses = session.analyses
    first_run = next(iter(analyses.run_ids[net.name].values()))
    earlier = session.writer.results["runs"][first_run].get("sharpness") or []
    weight_decay = analyses.settings[net.name].weight_decay
    tracking = sharpness_tracking(
        analyses.setup, net, weight_decay=weight_decay, start=start, earlier=earlier
    )
    if tracking is not None:
        session.tracker.sharpness[net.name] = tracking.entries
    return tracking


def _train_and_analyse(
    session: Session, store: CheckpointStore, net: Network, index: int, *, record, resume: bool
) -> None:
    """Bring ``net`` to the end of its training with every analysis recorded: analyse the
    saved states a resumed run has not analysed yet, then train from the latest usable
    state, analysing at every checkpoint step on the way."""
    from hessspec.nn.train import LossCurve, train

    setup, tracker, analyses, show = store.setup, session.tracker, session.analyses, session.show
    config = setup.config
    tracker.phase = "start-up"
    analyses.add_runs(net)
    needed = analyses.missing(net, setup.checkpoints)
    saved = store.saved(net.name) if resume else {}
    if not needed and saved and max(saved) == config.train.steps:
        show.line(f"{net.name}: trained and analysed already (step {max(saved)}); skipped")
        return
    start = _start_step(needed, saved)
    state = store.load(net, start).training_state() if start is not None else None
    if state is not None:
        show.line(
            f"{net.name}: resuming at step {start} (saved training state); "
            f"analyses still to do at steps {sorted(needed) or 'none'}"
        )
    for step in sorted(s for s in needed if start is not None and s < start):
        analyses.analyse(net, step, store.load(net, step).model(), needed[step])
    tracker.curves[net.name] = curve = LossCurve()
    tracker.started[net.name] = int(start or 0)
    sharpness = _sharpness_tracking(session, net, start=int(start or 0))
    tracker.phase = "training"

    def on_checkpoint(step, model, status):
        analyses.analyse(net, step, model, needed[step])
        record(from_device=True)
        session.writer.write_json()
        tracker.phase = "training"

    def on_save(state, kind):
        previous, tracker.phase = tracker.phase, "saving a checkpoint"
        store.save(net, state, kind)
        tracker.phase = previous

    train(
        net.model,
        setup.train_set.x,
        setup.train_set.y,
        config.train,
        checkpoints=[s for s in needed if start is None or s >= start],
        on_checkpoint=on_checkpoint,
        loss=config.model.loss,
        seed=config.seed,
        progress=show,
        desc=f"{net.name} ({index + 1}/{len(setup.networks)})",
        resume_from=state,
        on_save=on_save,
        curve=curve,
        observe=sharpness.observe if sharpness else None,
        observe_at=sharpness.steps if sharpness else (),
    )
    record(from_device=True)
    session.writer.write_json()


def run_study(
    setup: StudySetup,
    out_dir: str | Path,
    *,
    command: str = "",
    progress: bool | str | Progress = True,
    write: bool = True,
    check_memory: bool | float = True,
    resume: bool = False,
    guard: InterruptGuard | None = None,
) -> dict[str, Any]:
    """Train every network, analyse it at every checkpoint in every mode, write the output.

    Per network, in order: at every checkpoint step the training state is saved
    (``checkpoints/<step>/<network>/``, orbax) and then analysed; ``results.json`` and
    ``spectra.npz`` are rewritten after each analysis, with the loss curve so far. At the end
    the figures and ``report.md`` are written, and results.json last (status "complete").
    An interruption or a failure is recorded in results.json (status, ``stopped_during``,
    ``error``) with the loss curves and everything measured; an interrupted training saves
    the state it reached, so ``resume=True`` continues without repeating a step.

    Args:
        setup: from :func:`hessspec.studies.batchnorm_spectrum.setup.prepare_study`.
        out_dir: the folder to write: empty or absent
            (:func:`hessspec.studies.batchnorm_spectrum.results.prepare_output_dir`), or
            prepared by :class:`hessspec.studies.common.runfolder.RunFolder`.
        command: the command line, recorded in the results.
        progress: a :class:`hessspec.nn.progress.Progress`, True (bars on a terminal, log
            lines otherwise), False (nothing) or a style name.
        write: False computes everything but writes no file (processes other than 0 of a
            multi-process run: they take part in every sharded computation).
        check_memory: the solvers' memory check
            (:class:`hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer`): True
            against the memory available at each call, a number of bytes as the budget,
            False none.
        resume: continue the run in ``out_dir`` (same config): keep its analyses, restore
            each network's latest saved training state, train on and analyse the rest.
        guard: the :class:`hessspec.studies.common.interrupts.InterruptGuard` of the process
            (its lock and critical sections keep the files consistent under interrupts); a
            passive one by default.

    Returns:
        The results (as written to results.json).

    Raises:
        hessspec.nn.train.TrainingDiverged: a non-finite training loss (recorded as failed).
        hessspec.studies.common.runfolder.OutputWriteError: a file could not be written.
        hessspec.studies.common.runfolder.OutputFolderError: ``resume`` of a folder whose run
            does not match ``setup``.
        KeyboardInterrupt: after recording the interruption.
    """
    import jax

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    guard = guard if guard is not None else InterruptGuard()
    writer, previous_timing = _open_results(
        setup, out_dir, command=command, write=write, resume=resume, lock=guard.lock
    )
    session = Session(
        setup, writer, command=command, resumed=resume, progress=progress, guard=guard,
        check_memory=check_memory,
    )  # fmt: skip
    # A multi-process run saves no checkpoints yet: orbax's saving synchronises every
    # process, while here process 0 alone writes (and SIGTERM belongs to JAX's preemption
    # notifier there).
    store = CheckpointStore(out_dir, setup, writer, guard, write=write and jax.process_count() == 1)
    if store.write:  # imported now, so that saving the state of an interrupted run is quick
        import orbax.checkpoint  # noqa: F401
    record = _ProgressRecord(setup, session, previous_timing, t_start)
    with session.recording(
        record=lambda: record(from_device=True),
        record_from_host=lambda: record(from_device=False),
    ):
        for index, net in enumerate(setup.networks):
            _train_and_analyse(session, store, net, index, record=record, resume=resume)
    return writer.results
