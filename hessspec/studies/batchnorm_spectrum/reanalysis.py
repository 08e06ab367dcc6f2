"""Analyse saved networks again without training (``python -m hessspec.run analyze``): the
checkpoints of a finished or interrupted run with other analysis settings, or parameters
trained elsewhere.

:func:`reanalysis_config` gives the config of a re-analysis of a run (the run's own, changed
only in ``analysis.*``, ``title`` and ``x64``); :func:`reanalyze` checks everything before
it writes, then analyses into a new run folder (:func:`analyze_run`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.nn.progress import Progress
from hessspec.studies.batchnorm_spectrum.config import (
    Config,
    ConfigError,
    build_config,
)
from hessspec.studies.batchnorm_spectrum.errors import (
    SetupError,
    failure_line,
    translated_failures,
)
from hessspec.studies.batchnorm_spectrum.preflight import memory_preflight
from hessspec.studies.batchnorm_spectrum.session import (
    Session,
    new_results,
    print_note,
    results_header,
)
from hessspec.studies.batchnorm_spectrum.setup import (
    Network,
    StudySetup,
    enable_x64,
    prepare_study,
)
from hessspec.studies.common.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    saved_checkpoints,
)
from hessspec.studies.common.interrupts import InterruptGuard
from hessspec.studies.common.params_file import load_params
from hessspec.studies.common.runfolder import FolderLock, OutputFolderError, RunFolder

__all__ = [
    "ANALYZE_KEYS_PREFIX",
    "ANALYZE_TOP_KEYS",
    "analysis_plan",
    "analyze_run",
    "reanalysis_config",
    "reanalyze",
]

#: Config keys a re-analysis of a run may change (the rest describes what was trained).
ANALYZE_KEYS_PREFIX = "analysis."
ANALYZE_TOP_KEYS = ("title", "x64")


def reanalysis_config(
    run_dir: Path,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    memory_limit_gib: float | None = None,
) -> Config:
    """The config of a re-analysis of the run in ``run_dir``: its own config.toml, then
    ``quick``, ``overrides`` and ``memory_limit_gib`` as in
    :func:`~hessspec.studies.batchnorm_spectrum.config.build_config`; validated.

    Raises:
        ConfigError: ``run_dir`` is not a run folder, an override that would change what
            was trained (anything but ``analysis.*``, ``title`` and ``x64``), or an invalid
            config.
    """
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(
            f"{run_dir} is not a run folder: it has no config.toml (a run of "
            "python -m hessspec.run writes one, with checkpoints/)."
        )
    keys = [(o, o.split("=", 1)[0].strip()) for o in overrides]
    bad = [
        o for o, k in keys if not k.startswith(ANALYZE_KEYS_PREFIX) and k not in ANALYZE_TOP_KEYS
    ]
    if bad:
        raise ConfigError(
            f"analyze RUN_DIR changes analysis settings only (analysis.*, title); "
            f"{', '.join(bad)} would change what was trained: start a new run for that."
        )
    return build_config(
        run_dir / "config.toml",
        quick=quick,
        overrides=overrides,
        memory_limit_gib=memory_limit_gib,
    )


def analysis_plan(
    setup: StudySetup, run_dir: Path, steps: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """``{network: steps}`` that a re-analysis of ``run_dir`` analyses: the run's analysis
    steps with a saved checkpoint (or ``steps``).

    Raises:
        CheckpointError: a network without them, or a step not saved.
    """
    found = saved_checkpoints(run_dir)
    plan = {}
    for net in setup.networks:
        have = sorted(found.get(net.name, {}))
        wanted = sorted(steps) if steps else [s for s in have if s in setup.checkpoints]
        lacking = [s for s in wanted if s not in have]
        if lacking or not wanted:
            raise CheckpointError(
                f"{run_dir} holds no saved checkpoint of {net.name} at step(s) "
                f"{lacking or setup.checkpoints}; saved steps: {have or 'none'}."
            )
        plan[net.name] = wanted
    return plan


def _saved_model(net: Network, step: int, *, run_dir: Path | None, params_file: Path | None):
    """The network to analyse: ``net`` at ``step`` from ``run_dir``, or ``net`` holding the
    parameters of ``params_file``."""
    if run_dir is not None:
        return load_checkpoint(checkpoint_path(run_dir, step, net.name)).model()
    need_statistics = net.batchnorm and "eval" in net.modes
    load_params(params_file, net.model, need_statistics=need_statistics)
    return net.model


def analyze_run(
    setup: StudySetup,
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    params_file: str | Path | None = None,
    steps: Sequence[int] | None = None,
    command: str = "",
    progress: bool | str | Progress = True,
    check_memory: bool | float = True,
    guard: InterruptGuard | None = None,
) -> dict[str, Any]:
    """Analyse saved networks without training: the checkpoints of a finished (or
    interrupted) run, or parameters trained elsewhere.

    Args:
        setup: from :func:`~hessspec.studies.batchnorm_spectrum.setup.prepare_study` of the
            config to analyse with (the run's own config with other ``analysis.*`` settings,
            or the config that builds the network of ``params_file``).
        out_dir: the folder to write (results.json, spectra.npz, figures, report.md,
            config.toml; no checkpoints).
        run_dir: a run folder: every network's checkpoints at the run's analysis steps
            (``steps`` to choose some) are analysed; the loss curves and the sharpness are
            the run's.
        params_file: instead of ``run_dir``: an ``.npz`` or orbax folder of the parameters
            of the config's single network
            (:func:`hessspec.studies.common.params_file.load_params`), recorded as step 0.
        steps: analyse only these saved steps (default: every analysis step of the run).
        command, progress, check_memory, guard: as in
            :func:`hessspec.studies.batchnorm_spectrum.runner.run_study`.

    Returns:
        The results (as written to results.json); ``"source"`` names what was analysed.

    Raises:
        CheckpointError: missing checkpoints, a parameter file that does not fit the network.
        KeyboardInterrupt: after recording the interruption.
    """
    out_dir = Path(out_dir)
    guard = guard if guard is not None else InterruptGuard()
    run_dir = Path(run_dir) if run_dir is not None else None
    header = results_header(setup, command)
    if run_dir is not None:
        plan = analysis_plan(setup, run_dir, steps)
        header["source"] = {"run_dir": str(run_dir.absolute())}
    else:
        (net,) = setup.networks
        plan = {net.name: [0]}
        header["source"] = {"params_file": str(Path(params_file).absolute())}
    header["checkpoint_steps"] = sorted({s for v in plan.values() for s in v})
    writer = new_results(setup, out_dir, header, write=True, lock=guard.lock)
    session = Session(
        setup, writer, command=command, resumed=False, progress=progress, guard=guard,
        check_memory=check_memory,
    )  # fmt: skip
    analyses, t_start = session.analyses, time.perf_counter()

    def record() -> None:
        seconds = {"seconds_total": time.perf_counter() - t_start, "seconds_training": 0.0}
        writer.update(write=False, timing={**seconds, "seconds_analysis": analyses.seconds})

    with session.recording(record=record, record_from_host=record):
        for net in setup.networks:
            analyses.add_runs(net)
            for step in plan[net.name]:
                session.tracker.phase = "start-up"
                model = _saved_model(net, step, run_dir=run_dir, params_file=params_file)
                analyses.analyse(net, step, model, net.modes)
            if run_dir is not None:
                losses = load_checkpoint(run_dir, network=net.name).loss_curve  # the latest
                sharpness = _recorded_sharpness(run_dir).get(net.name, [])
                for run_id in analyses.run_ids[net.name].values():
                    writer.set_loss_curve(run_id, np.arange(1, losses.size + 1), losses)
                    writer.set_sharpness(run_id, sharpness)
    return writer.results


def _recorded_sharpness(run_dir: Path) -> dict[str, list]:
    """``{network: sharpness entries}`` the run in ``run_dir`` recorded during its training
    (its results.json; empty when it has none or cannot be read)."""
    from hessspec.studies.batchnorm_spectrum.results import load_results

    try:
        runs = load_results(run_dir)[0]["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for run in runs:
        mode = run.get("bn_mode")
        network = run["name"][: -len(mode) - 1] if mode else run["name"]
        out.setdefault(network, run.get("sharpness") or [])
    return out


def reanalyze(
    config: Config,
    out_dir: str | Path,
    *,
    run_dir: Path | None = None,
    params_file: Path | None = None,
    steps: Sequence[int] | None = None,
    overwrite: bool = False,
    command: str = "",
    progress: bool | str | Progress = True,
    guard: InterruptGuard | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A whole re-analysis into a new run folder, everything checked before it writes.

    In order: enable x64 (``config.x64``); refuse an output folder that cannot take the run;
    load the data and build the networks; refuse missing checkpoints; the memory preflight
    (its line to ``log``; a refusal when the analysis cannot fit); hold ``run_dir`` under a
    shared lock (no run writes it meanwhile) and the output folder under an exclusive one;
    :func:`analyze_run`; swap the new output in (``overwrite``).

    Args:
        config: validated config (:func:`reanalysis_config` for a run).
        out_dir: the new folder.
        run_dir, params_file, steps: what to analyse, as in :func:`analyze_run`.
        overwrite: replace a previous output in ``out_dir`` once this one completes.
        command, progress, guard: as in :func:`analyze_run`.
        log: where the one-line notes go (default: stderr).

    Returns:
        The results (as written to results.json).

    Raises:
        OutputFolderError, SetupError, CheckpointError: refused before anything was written.
        RunInterrupted: interrupted after recording what was measured.
        RunFailed: failed after recording why.
    """
    log = log or print_note
    guard = guard if guard is not None else InterruptGuard()
    out_dir = Path(out_dir)
    enable_x64(config)
    message = RunFolder.refusal(out_dir, overwrite=overwrite)
    if message:
        raise OutputFolderError(message)
    setup = prepare_study(config)
    if run_dir is not None:
        analysis_plan(setup, run_dir, steps)  # refuses missing checkpoints before writing
    preflight = memory_preflight(setup)
    log(preflight.line())
    if not preflight.fits:
        raise SetupError(preflight.refusal())
    budget = float(preflight.available) if config.analysis.memory_limit_gib else True
    with contextlib.ExitStack() as held:
        if run_dir is not None:
            held.enter_context(FolderLock(run_dir, shared=True))
        folder = held.enter_context(RunFolder.open(out_dir, overwrite=overwrite, command=command))
        log(f"hessspec: analysing {run_dir or params_file} with the new settings; output in "
            f"{folder.work_dir}/")  # fmt: skip
        with translated_failures(
            interrupted=f"what was measured is in {folder.work_dir}/",
            failed=lambda e: failure_line(e, folder.work_dir, None),
            passing=(CheckpointError,),
        ):
            results = analyze_run(
                setup,
                folder.work_dir,
                run_dir=run_dir,
                params_file=params_file,
                steps=steps,
                command=command,
                progress=progress,
                check_memory=budget,
                guard=guard,
            )
        if folder.replaces:
            with guard.critical():
                folder.commit()
    return results
