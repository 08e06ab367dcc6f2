"""The command line: ``python -m hessspec.run`` runs a study from a config into a run folder.

With no arguments it runs the embedded default study (the 8x8 digits bundled with
scikit-learn; an MLP without and with BatchNorm; SGD with momentum; analysis at five
checkpoints) and writes ``hessspec-out/``. See ``python -m hessspec.run --help`` for every
option and every config field.

This module is thin: the arguments (:mod:`hessspec.cli.parser`), the dispatch to the study
a config file names (:mod:`hessspec.cli.registry`; the BatchNorm spectrum study's commands
in :mod:`hessspec.cli.batchnorm`), signals
(:class:`hessspec.studies.common.interrupts.InterruptGuard`), and every error turned into
one line on stderr with an exit status (:mod:`hessspec.cli.errors`): 0 done, 1 failed, 2
bad input, a busy or unusable output folder, or not enough memory (before any training),
130 interrupted. The studies themselves live in :mod:`hessspec.studies`, importable without
the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from hessspec.cli.batchnorm import analyze_cli, study_command
from hessspec.cli.errors import CLIError, error, fail
from hessspec.cli.parser import build_analyze_parser, build_parser, distributed_arguments
from hessspec.cli.registry import DEFAULT_STUDY, run_registered_study, study_name
from hessspec.studies.batchnorm_spectrum.errors import SetupError
from hessspec.studies.common.checkpoint import CheckpointError
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.interrupts import EXIT_INTERRUPTED, InterruptGuard
from hessspec.studies.common.runfolder import OutputFolderError

__all__ = ["main", "run_as_command"]

#: Errors that mean bad input: one line, exit status 2 (a CLIError may say otherwise).
_BAD_INPUT = (ConfigError, SetupError, OutputFolderError, CLIError, CheckpointError)


def _enable_compilation_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache, unless ``--no-compilation-cache``."""
    if args.no_compilation_cache:
        return
    from hessspec.compilation_cache import enable_compilation_cache

    try:
        enable_compilation_cache()
    except ValueError as e:
        raise CLIError(f"{e}") from None


def _dispatch(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
    guard: InterruptGuard,
) -> int:
    """Run what the arguments ask for: the study their config names, with the flags it
    takes."""
    dist = distributed_arguments(parser, args)
    name = study_name(args.config)
    if name == DEFAULT_STUDY:
        return study_command(args, argv, dist, guard)
    if dist is not None or args.memory_limit is not None:
        raise CLIError(
            f"--coordinator/--num-processes/--process-id and --memory-limit apply "
            f"to the BatchNorm spectrum study only; the {name!r} study of "
            f"{args.config} runs in one process: leave them out."
        )
    return run_registered_study(name, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 bad input, a busy or
    unusable output folder, or not enough memory, 130 interrupted).

    SIGINT and SIGTERM interrupt every phase within a second
    (:class:`hessspec.studies.common.interrupts.InterruptGuard`); every error ends in one
    line on stderr (``--debug`` adds the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    analyze = bool(argv) and argv[0] == "analyze"
    parser = build_analyze_parser() if analyze else build_parser()
    args = parser.parse_args(argv[1:] if analyze else argv)
    with InterruptGuard() as guard:
        try:
            _enable_compilation_cache(args)
            if analyze:
                return analyze_cli(args, argv, guard)
            return _dispatch(parser, args, argv, guard)
        except KeyboardInterrupt:
            print(
                "hessspec.run: interrupted before the run started; nothing was written",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except _BAD_INPUT as e:
            if args.debug:
                traceback.print_exc()
            return error(str(e)) if getattr(e, "status", 2) == 2 else fail(str(e))
        except Exception as e:
            if args.debug:
                traceback.print_exc()
            return fail(
                f"{type(e).__name__}: {e} (an unexpected error: run again with --debug for "
                "the traceback, and please report it)"
            )


def run_as_command(argv: Sequence[str] | None = None) -> None:
    """``python -m hessspec.run``: :func:`main`, then exit with its status. An interrupted
    run of one process leaves without the interpreter's teardown of JAX and orbax (about a
    second), having flushed its output: everything it wrote is on disk by then, and an
    interrupt should end the process at once."""
    status = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if status == EXIT_INTERRUPTED and not _joined_multi_process():
        os._exit(status)
    raise SystemExit(status)


def _joined_multi_process() -> bool:
    """Whether this process joined a multi-process JAX job (its shutdown must then run)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    try:
        from jax._src import distributed as jax_distributed

        return jax_distributed.global_state.client is not None
    except (ImportError, AttributeError):
        return True  # cannot tell: take the careful way out
