"""The studies ``python -m hessspec.run`` runs, by the top-level ``experiment`` key of their
TOML config: one entry each in :data:`STUDIES`, so that adding a study is one line.

A study is a package that exports a config class (a frozen dataclass of the one config
mechanism, :mod:`hessspec.studies.common.config`), a runner
``run(config, out_dir, progress, *, overwrite)`` that writes a run folder and returns the
results, and the overrides of ``--quick``. A file without the key (or with
``experiment = "batchnorm_spectrum"``) configures :data:`DEFAULT_STUDY`, which has its own
command (``--resume``, multi-process runs, ``--memory-limit``, ``analyze``:
:mod:`hessspec.cli.batchnorm`); every other study runs through :func:`run_registered_study`.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple

from hessspec.cli.errors import CLIError
from hessspec.nn.progress import Progress
from hessspec.studies.common.config import (
    ConfigError,
    apply_overrides,
    config_from_mapping,
    config_to_toml,
    read_toml,
)
from hessspec.studies.common.interrupts import EXIT_INTERRUPTED
from hessspec.studies.common.runfolder import FolderLock, RunFolder

__all__ = [
    "DEFAULT_STUDY",
    "STUDIES",
    "RegisteredStudy",
    "progress_of",
    "run_registered_study",
    "study_name",
]


class RegisteredStudy(NamedTuple):
    """One study: where it lives and what it exports.

    Attributes:
        package: the importable package exporting the names below.
        config_class: name of its config class.
        runner: name of ``run(config, out_dir, progress, *, overwrite) -> results``.
        quick_overrides: name of its ``--quick`` overrides (``"key=value"`` strings).
        summary: what it measures, for ``--help``.
    """

    package: str
    config_class: str
    runner: str
    quick_overrides: str
    summary: str

    def attribute(self, name: str) -> Any:
        """The exported ``name``; the package is imported on first use."""
        return getattr(importlib.import_module(self.package), name)


#: Every study, by the value of the ``experiment`` key of its config files.
STUDIES: dict[str, RegisteredStudy] = {
    "batchnorm_spectrum": RegisteredStudy(
        "hessspec.studies.batchnorm_spectrum",
        "Config",
        "run_batchnorm_spectrum_study",
        "QUICK_OVERRIDES",
        "Hessian spectra of networks with and without BatchNorm over training (Ghorbani, "
        "Krishnan & Xiao)",
    ),
    "input_bias": RegisteredStudy(
        "hessspec.studies.input_bias",
        "InputBiasConfig",
        "run_input_bias_study",
        "QUICK_OVERRIDES",
        "LeCun, Kanter & Solla: input statistics and the Hessian outlier",
    ),
    "santurkar": RegisteredStudy(
        "hessspec.studies.santurkar",
        "SanturkarConfig",
        "run_santurkar_study",
        "QUICK_OVERRIDES",
        "Santurkar et al.: BatchNorm and the smoothness of the loss landscape",
    ),
    "edge_of_stability": RegisteredStudy(
        "hessspec.studies.edge_of_stability",
        "EdgeOfStabilityConfig",
        "run_edge_of_stability_study",
        "QUICK_OVERRIDES",
        "Cohen et al.: full-batch gradient descent at the edge of stability (sharpness "
        "against 2 / lr)",
    ),
}

#: The study of a config file without an ``experiment`` key, and of no config file.
DEFAULT_STUDY = "batchnorm_spectrum"


def study_name(config_path: str | None) -> str:
    """The study a config file configures: its top-level ``experiment`` key if that names
    a study of :data:`STUDIES`, else :data:`DEFAULT_STUDY` (whose config reader then
    refuses an unknown ``experiment``).

    Raises:
        ConfigError: the file cannot be read or is not valid TOML.
    """
    value = read_toml(config_path).get("experiment") if config_path else None
    return value if isinstance(value, str) and value in STUDIES else DEFAULT_STUDY


def _config(name: str, study: RegisteredStudy, args: argparse.Namespace):
    """The study's config from ``args.config``, then ``--quick``, ``--set``, ``--seed``.

    Raises:
        ConfigError: naming the file.
    """
    try:
        values = read_toml(args.config)
        config = config_from_mapping(study.attribute(study.config_class), values, experiment=name)
        if args.quick:
            config = apply_overrides(config, study.attribute(study.quick_overrides))
        config = apply_overrides(config, args.overrides)
        if args.seed is not None:
            if args.seed < 0:
                raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}.")
            config = apply_overrides(config, [f"seed={args.seed}"])
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    return config


def progress_of(args: argparse.Namespace) -> Progress:
    """Every study's progress: bars on a terminal, log lines otherwise; log lines only
    with --no-progress."""
    return Progress("lines" if args.no_progress else "auto")


def run_registered_study(name: str, args: argparse.Namespace) -> int:
    """Run the study ``name`` of :data:`STUDIES` from its config file, with ``--quick``,
    ``--set``, ``--seed``, ``--out``, ``--overwrite`` and ``--show-config``; returns the exit
    status.

    Raises:
        CLIError, ConfigError: a flag the study does not take, a bad config, an output
            folder that holds files (without ``--overwrite``).
    """
    if args.resume:
        raise CLIError(
            f"--resume applies to the BatchNorm spectrum study only; the {name!r} study of "
            f"{args.config} starts over: run it again without --resume."
        )
    study = STUDIES[name]
    config = _config(name, study, args)
    if args.show_config:
        print(config_to_toml(config, name), end="")
        return 0
    out_dir = Path(args.out).expanduser()
    message = None if args.overwrite else RunFolder.refusal(out_dir)
    if message:
        raise CLIError(message)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir, command=shlex.join(sys.argv)):
        try:
            study.attribute(study.runner)(
                config,
                out_dir,
                progress=progress_of(args),
                overwrite=args.overwrite,
            )
        except FileExistsError as e:
            raise CLIError(str(e)) from None
        except KeyboardInterrupt:
            print(f"hessspec.run: interrupted; what was written is in {out_dir}/", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"hessspec: {name} study complete; output in {out_dir}/ (report: report.md)")
    return 0
