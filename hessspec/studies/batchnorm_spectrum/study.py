"""The BatchNorm spectrum study from a config into a run folder, in one call:
:func:`run_batchnorm_spectrum_study` (what ``python -m hessspec.run`` runs; a notebook or a
script calls it the same way).

Every problem that can be seen before training (data, model, output folder, memory) stops
the run before any training starts, with one line
(:class:`~hessspec.studies.batchnorm_spectrum.errors.SetupError`,
:class:`~hessspec.studies.common.runfolder.OutputFolderError`). Several processes (hosts) may
run one study together (``process``; :func:`hessspec.curvature.distributed.initialize`
first): the Hessian operators shard their batches over every process's devices, so every
process trains the same networks and runs the same analyses in the same order; only process
0 writes the output folder. Decisions that could differ between processes (the output folder
check, the memory preflight, a setup error) are taken together
(:func:`hessspec.studies.common.processes.agree`), so all processes stop or go on alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hessspec.nn.progress import Progress
from hessspec.studies.batchnorm_spectrum.config import Config, ConfigError, load_config, validate
from hessspec.studies.batchnorm_spectrum.errors import (
    SetupError,
    failure_line,
    translated_failures,
)
from hessspec.studies.batchnorm_spectrum.preflight import MemoryPreflight, memory_preflight
from hessspec.studies.batchnorm_spectrum.runner import run_study
from hessspec.studies.batchnorm_spectrum.session import print_note
from hessspec.studies.batchnorm_spectrum.setup import StudySetup, enable_x64, prepare_study
from hessspec.studies.common.interrupts import InterruptGuard
from hessspec.studies.common.processes import ONE_PROCESS, ProcessRole, agree
from hessspec.studies.common.runfolder import PENDING_NAME, OutputFolderError, RunFolder

__all__ = ["resume_config", "run_batchnorm_spectrum_study"]


def resume_config(out_dir: Path) -> Config:
    """The config of the run in ``out_dir`` (its config.toml; the pending run of an
    interrupted ``--overwrite`` first), to continue it.

    Raises:
        ConfigError: the folder holds no run (no config.toml), or an invalid one.
    """
    pending = out_dir / PENDING_NAME
    folder = pending if (pending / "results.json").is_file() else out_dir
    path = folder / "config.toml"
    if not path.is_file():
        raise ConfigError(
            f"--resume: {out_dir} holds no run to continue ({path} is missing); start a new run "
            "without --resume."
        )
    return validate(load_config(path))


def _prepared(config: Config, out_dir: Path, *, overwrite: bool, resume: bool, process):
    """The checked study: the output folder can take the run, the data and networks are
    ready, the analysis fits in memory; each decision taken by all processes together.

    Raises:
        OutputFolderError, SetupError: the refusal (the same on every process).
    """
    # only process 0 looks at the folder (it is the one that creates it): the others could
    # otherwise find its first files there and refuse
    message = None
    if process.main:
        message = RunFolder.refusal(out_dir, overwrite=overwrite, resume=resume)
    message = agree(message, multi_process=process.multi)
    if message:
        raise OutputFolderError(message)
    setup, message = None, None
    try:
        setup = prepare_study(config)
    except SetupError as e:
        message = str(e)
    message = agree(message, multi_process=process.multi)
    if message:
        raise SetupError(message)
    return setup


def _open_folder(
    out_dir: Path, *, overwrite: bool, resume: bool, command: str, process
) -> RunFolder | None:
    """The locked, prepared output folder (process 0; None on the others).

    Raises:
        OutputFolderError: it cannot be opened (on any process: decided together).
    """
    folder, message = None, None
    if process.main:
        try:
            folder = RunFolder.open(out_dir, overwrite=overwrite, resume=resume, command=command)
        except OutputFolderError as e:
            message = str(e)
    message = agree(message, multi_process=process.multi)
    if message:
        if folder is not None:
            folder.close()
        raise OutputFolderError(message)
    return folder


def _announce(log, setup: StudySetup, folder: RunFolder, out_dir: Path, process) -> None:
    """The lines that say what runs where, before training."""
    config = setup.config
    sizes = ", ".join(f"{n.name} ({n.num_params} params)" for n in setup.networks)
    where = folder.work_dir if folder.replaces else out_dir
    log(
        f"hessspec: {config.data.name}, {sizes}; {config.train.steps} steps, "
        f"checkpoints {setup.checkpoints}; output in {where}/"
        + (" (continuing the run there)" if folder.resumed else "")
        + (f", swapped into {out_dir}/ when complete" if folder.replaces else "")
        + (f"; {process.count} processes" if process.multi else "")
    )
    for path in folder.removed_temporaries:
        log(f"hessspec: removed {path} (left by a killed run)")
    if process.multi:
        log(
            "hessspec: a multi-process run saves no checkpoints (no --resume, no "
            "analyze of this run); results.json, spectra.npz and the report as usual"
        )


def diverged_network(work_dir: Path, setup: StudySetup) -> str | None:
    """The network whose training was running when the run failed (from its record)."""
    try:
        sessions = json.loads((work_dir / "results.json").read_text())["sessions"]
        trained = sessions[-1]["trained"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    names = [n.name for n in setup.networks if n.name in trained]
    return names[-1] if names else None


def _failure(error: Exception, work_dir: Path, out_dir: Path, setup: StudySetup, folder) -> str:
    """The line of a failed run: why, what to do, and that a replaced run is unchanged."""
    from hessspec.nn.train import TrainingDiverged

    network = diverged_network(work_dir, setup) if isinstance(error, TrainingDiverged) else None
    line = failure_line(error, work_dir, network)
    if folder is not None and folder.replaces:
        line += f" The previous run in {out_dir}/ is unchanged."
    return line


def _interruption(work_dir: Path, out_dir: Path, folder, process) -> str:
    """What an interrupted run kept, and how to continue it."""
    if not process.main:
        return "process 0 wrote the output"
    where = f"what was measured is in {work_dir}/; continue with --resume --out {out_dir}"
    if folder.replaces:
        where += f" (the previous run in {out_dir}/ is unchanged)"
    return where


def _memory_budget(config: Config, preflight: MemoryPreflight, process) -> bool | float:
    """The solvers' memory check: a budget (given, or agreed by all processes) makes their
    checks decide alike everywhere; otherwise each call compares with the memory free when
    it starts."""
    if config.analysis.memory_limit_gib or process.multi:
        return float(preflight.available)
    return True


def run_batchnorm_spectrum_study(
    config: Config,
    out_dir: str | Path,
    progress: bool | str | Progress = True,
    *,
    overwrite: bool = False,
    resume: bool = False,
    command: str = "",
    guard: InterruptGuard | None = None,
    process: ProcessRole = ONE_PROCESS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole study into ``out_dir``, as the command line runs it.

    In order: enable x64 (``config.x64``); refuse an output folder that cannot take the run
    (:meth:`RunFolder.refusal`); load the data and build the networks
    (:func:`~hessspec.studies.batchnorm_spectrum.setup.prepare_study`); the memory preflight
    (:func:`~hessspec.studies.batchnorm_spectrum.preflight.memory_preflight`: one line, and
    a refusal when the analysis cannot fit); lock and prepare the output folder
    (:meth:`RunFolder.open`); train and analyse
    (:func:`~hessspec.studies.batchnorm_spectrum.runner.run_study`); swap the new run in
    (:meth:`RunFolder.commit`). Everything up to the folder's preparation stops before any
    training.

    Args:
        config: validated config (e.g. from
            :func:`~hessspec.studies.batchnorm_spectrum.config.build_config`).
        out_dir: the run folder: absent or empty, or holding a previous run (``overwrite``:
            replaced when this one completes; ``resume``: continued).
        progress: a :class:`hessspec.nn.progress.Progress`, True (bars on a terminal, log
            lines otherwise), False (nothing) or a style name.
        overwrite: replace the previous run in ``out_dir``.
        resume: continue the interrupted or failed run in ``out_dir`` (same config:
            :func:`resume_config`).
        command: the command line, recorded in results.json.
        guard: the process's interrupt guard (a passive one by default).
        process: this process's place in a multi-process run (joined already); process 0
            writes, every process must call this with the same config.
        log: where process 0's one-line notes go (memory, where it writes; default stderr).

    Returns:
        The results (as written to results.json).

    Raises:
        OutputFolderError, SetupError: refused before training; nothing was written.
        RunInterrupted: interrupted, after recording what was measured (a KeyboardInterrupt).
        RunFailed: failed after it started, its failure recorded (the error is its cause).
    """
    say = (log or print_note) if process.main else (lambda line: None)
    guard = guard if guard is not None else InterruptGuard()
    out_dir = Path(out_dir).expanduser()
    enable_x64(config)
    setup = _prepared(config, out_dir, overwrite=overwrite, resume=resume, process=process)
    preflight = memory_preflight(setup, multi_process=process.multi)
    say(preflight.line())
    if not preflight.fits:  # the same decision on every process (shared numbers)
        raise SetupError(preflight.refusal())
    folder = _open_folder(
        out_dir, overwrite=overwrite, resume=resume, command=command, process=process
    )
    work_dir = folder.work_dir if folder is not None else out_dir
    try:
        if folder is not None:
            _announce(say, setup, folder, out_dir, process)
        with translated_failures(
            interrupted=_interruption(work_dir, out_dir, folder, process),
            failed=lambda e: _failure(e, work_dir, out_dir, setup, folder),
        ):
            results = run_study(
                setup,
                work_dir,
                command=command,
                progress=progress if process.main else False,
                write=process.main,
                check_memory=_memory_budget(config, preflight, process),
                resume=resume,
                guard=guard,
            )
        if folder is not None and folder.replaces:
            with guard.critical():
                folder.commit()
    finally:
        if folder is not None:
            folder.close()
    return results
