"""The BatchNorm spectrum study's commands: a run (new, ``--resume``d, or one process of a
multi-process run) and ``analyze``. Each resolves its config from the arguments, calls the
study (:func:`hessspec.studies.batchnorm_spectrum.study.run_batchnorm_spectrum_study`,
:func:`hessspec.studies.batchnorm_spectrum.reanalysis.reanalyze`) and turns how it ended
into one line and an exit status.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from hessspec.cli.errors import CLIError, error, fail
from hessspec.cli.registry import progress_of
from hessspec.studies.batchnorm_spectrum.config import (
    Config,
    ConfigError,
    build_config,
    to_toml,
)
from hessspec.studies.batchnorm_spectrum.errors import RunFailed, RunInterrupted, SetupError
from hessspec.studies.batchnorm_spectrum.reanalysis import reanalysis_config, reanalyze
from hessspec.studies.batchnorm_spectrum.report import summary_text
from hessspec.studies.batchnorm_spectrum.study import resume_config, run_batchnorm_spectrum_study
from hessspec.studies.common.interrupts import EXIT_INTERRUPTED, InterruptGuard
from hessspec.studies.common.processes import ONE_PROCESS, ProcessRole
from hessspec.studies.common.runfolder import OutputFolderError

__all__ = ["analyze_cli", "resolve_config", "run_cli_study", "study_command"]


def _command(argv: Sequence[str]) -> str:
    """The command line as recorded in results.json."""
    return shlex.join(["python", "-m", "hessspec.run", *argv])


def resolve_config(args: argparse.Namespace) -> Config:
    """The config an argument list describes: --config (or the defaults), then --quick,
    then --set in order, then --seed and --memory-limit; validated
    (:func:`~hessspec.studies.batchnorm_spectrum.config.build_config`).

    Raises:
        ConfigError: unknown key, wrong type, invalid value, unreadable file.
    """
    return build_config(
        args.config,
        quick=args.quick,
        overrides=args.overrides,
        seed=getattr(args, "seed", None),
        memory_limit_gib=getattr(args, "memory_limit", None),
    )


def _resume_config(out_dir: Path, args: argparse.Namespace) -> Config:
    """The config of the run ``--resume`` continues (its folder's own).

    Raises:
        ConfigError: a config option was given with --resume, or the folder's config.toml
            is missing or invalid.
    """
    flags = (
        ("--config", args.config),
        ("--set", args.overrides),
        ("--quick", args.quick),
        ("--seed", args.seed is not None),
        ("--memory-limit", args.memory_limit is not None),
        ("--overwrite", args.overwrite),
    )
    given = [flag for flag, on in flags if on]
    if given:
        raise ConfigError(
            f"--resume continues a run with its own config ({out_dir}/config.toml); leave out "
            f"{', '.join(given)}, or start a new run without --resume."
        )
    return resume_config(out_dir)


def study_command(
    args: argparse.Namespace,
    argv: Sequence[str],
    dist: tuple[str, int, int] | None,
    guard: InterruptGuard,
) -> int:
    """``python -m hessspec.run`` for the BatchNorm spectrum study: its config (from the
    arguments, or the folder's own with ``--resume``), printed with ``--show-config``, else
    run (:func:`run_cli_study`)."""
    out_dir = Path(args.out).expanduser()
    if args.resume:
        if dist is not None:
            raise CLIError(
                "--resume runs in one process; continue a multi-process run without "
                "--coordinator/--num-processes/--process-id."
            )
        config = _resume_config(out_dir, args)
    else:
        config = resolve_config(args)
    if args.show_config:
        print(to_toml(config), end="")
        return 0
    return run_cli_study(config, args, argv, dist, guard=guard)


def _join(dist: tuple[str, int, int]) -> str | None:
    """Join the multi-process job (before any other JAX work); the reason when that fails."""
    from hessspec.curvature import distributed

    coordinator, count, rank = dist
    try:
        distributed.initialize(*dist)
    except Exception as e:  # noqa: BLE001 - connection failures come in many types
        return (
            f"could not join the multi-process job at {coordinator} as process {rank} of "
            f"{count}: {type(e).__name__}: {e}. Start all {count} processes with the same "
            "--coordinator (process 0's host and a free port) within a few minutes."
        )
    return None


def run_cli_study(
    config: Config,
    args: argparse.Namespace,
    argv: Sequence[str],
    dist: tuple[str, int, int] | None = None,
    *,
    guard: InterruptGuard | None = None,
) -> int:
    """The BatchNorm spectrum study of a resolved config, as the CLI runs it: join the
    multi-process job (``dist``), then
    :func:`~hessspec.studies.batchnorm_spectrum.study.run_batchnorm_spectrum_study`; every
    refusal before training ends with exit status 2, an interrupt with 130, a failure with 1.

    Args:
        config: validated config.
        args: the parsed command line (``out``, ``overwrite``, ``resume``, ``no_progress``,
            ``debug``).
        argv: the command line, recorded in results.json.
        dist: ``(coordinator, num_processes, process_id)`` from
            :func:`hessspec.cli.parser.distributed_arguments`, or None for one process.
        guard: the process's interrupt guard (a passive one by default).

    Returns:
        The exit status.
    """
    process = ProcessRole(index=dist[2], count=dist[1]) if dist else ONE_PROCESS
    who = process.label
    problem = _join(dist) if dist is not None else None
    if problem:
        return error(problem, who)
    out_dir = Path(args.out).expanduser()
    try:
        results = run_batchnorm_spectrum_study(
            config,
            out_dir,
            progress_of(args),
            overwrite=args.overwrite,
            resume=bool(getattr(args, "resume", False)),
            command=_command(argv),
            guard=guard,
            process=process,
        )
    except (SetupError, OutputFolderError) as e:
        return error(str(e), who)
    except RunInterrupted as e:
        print(f"hessspec.run{who}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        return fail(str(e), who)
    if process.main:
        print(summary_text(results, out_dir))
    else:
        print(
            f"hessspec: process {process.index} of {process.count}: study "
            f"{results.get('status')} in {results['timing']['seconds_total']:.1f} s; process "
            f"0 wrote the output to {out_dir}/"
        )
    return 0


def _analyze_steps(args: argparse.Namespace) -> list[int] | None:
    """The steps of ``--steps`` (None: every analysis step), after checking that the
    arguments name one source: RUN_DIR (with its own config), or --params with --config."""
    if (args.run_dir is None) == (args.params is None):
        raise CLIError(
            "analyze needs either RUN_DIR (a run folder with checkpoints/) or --params FILE "
            "(with --config), not "
            + ("both." if args.run_dir else "neither; e.g. analyze hessspec-out --out NEW.")
        )
    steps = None
    if args.steps:
        try:
            steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
        except ValueError:
            raise CLIError(
                f"--steps must be comma-separated step numbers, got {args.steps!r}."
            ) from None
    if args.run_dir and args.config:
        raise CLIError(
            "analyze RUN_DIR uses the run's own config (RUN_DIR/config.toml); leave out "
            "--config and change analysis settings with --set analysis.FIELD=VALUE."
        )
    if steps is not None and not args.run_dir:
        raise CLIError("--steps applies to analyze RUN_DIR only.")
    return steps


def _analyze_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    """The config of ``analyze``: the run's own (changed in analysis settings only), or the
    one of --config that builds the network of --params; checked against --params."""
    options = {
        "quick": args.quick,
        "overrides": args.overrides,
        "memory_limit_gib": args.memory_limit,
    }
    if run_dir is not None:
        return reanalysis_config(run_dir, **options)
    config = build_config(args.config, **options)
    if len(config.model.batchnorm) != 1:
        raise CLIError(
            f"--params holds one network; the config trains {len(config.model.batchnorm)} "
            "(model.batchnorm = [false, true]): set --set model.batchnorm=[false] or "
            "--set model.batchnorm=[true] to say which."
        )
    if not Path(args.params).expanduser().exists():
        raise CLIError(f"--params: {args.params} does not exist.")
    return config


def analyze_cli(args: argparse.Namespace, argv: Sequence[str], guard: InterruptGuard) -> int:
    """``python -m hessspec.run analyze``: what to analyse and with which config, checked;
    then :func:`~hessspec.studies.batchnorm_spectrum.reanalysis.reanalyze`."""
    steps = _analyze_steps(args)
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else None
    config = _analyze_config(args, run_dir)
    out_dir = Path(args.out).expanduser()
    if run_dir is not None and out_dir.absolute() == run_dir.absolute():
        raise CLIError("analyze writes a new folder: --out must not be RUN_DIR.")
    try:
        results = reanalyze(
            config,
            out_dir,
            run_dir=run_dir,
            params_file=Path(args.params).expanduser() if args.params else None,
            steps=steps,
            overwrite=args.overwrite,
            command=_command(argv),
            progress=progress_of(args),
            guard=guard,
        )
    except RunInterrupted as e:
        print(f"hessspec.run: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        if args.debug:
            traceback.print_exc()
        return fail(str(e))
    print(summary_text(results, out_dir))
    return 0
