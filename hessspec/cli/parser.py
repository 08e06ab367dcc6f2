"""The arguments of ``python -m hessspec.run`` and of its ``analyze`` command: every flag,
the help text (every config field of the BatchNorm spectrum study, with its default) and the
exit statuses."""

from __future__ import annotations

import argparse
import textwrap

from hessspec.cli.registry import DEFAULT_STUDY, STUDIES
from hessspec.studies.batchnorm_spectrum.config import QUICK_OVERRIDES, describe_fields

__all__ = [
    "DEFAULT_OUT",
    "DISTRIBUTED_FLAGS",
    "build_analyze_parser",
    "build_parser",
    "distributed_arguments",
]

DEFAULT_OUT = "hessspec-out"

_DESCRIPTION = """\
Train networks with and without BatchNorm and measure their Hessian spectra over training
(Ghorbani, Krishnan & Xiao 2019). At each checkpoint, on a fixed analysis set: the top-2K
Hessian eigenpairs with residuals (K classes), the SLQ spectral density, the Hutch++ trace,
outliers vs bulk (count, bulk edge, outlier ratio = lambda_1 / bulk edge, lambda_1 /
lambda_K), the fraction of the full-batch and of mini-batch gradients in the top-k
eigenspace (k = 1..2K), and train/test loss and accuracy. BatchNorm networks are analysed
in the mode(s) of analysis.bn_modes (train mode by default): one run per mode.

With no arguments: the embedded default study (digits, MLP without and with BN) into
./hessspec-out. Output: results.json (written last; lists every file the run wrote),
spectra.npz, figures/*.png, report.md, config.toml, and checkpoints/<step>/<network>/ (the
training state at every analysis step, orbax; hessspec.load_checkpoint reads it).
results.json and spectra.npz are rewritten after every checkpoint, with the loss curve.

Interrupted (Ctrl-C, SIGTERM) or failed runs record what they measured and where they
stopped; an interrupted training saves the state it reached. --resume continues such a run
in its folder without repeating a training step. `python -m hessspec.run analyze RUN_DIR
--out NEW` analyses a run's saved checkpoints again with other analysis settings (see
`python -m hessspec.run analyze --help`).

A config file whose top-level key `experiment` names another study runs that study
instead, with the same --set/--quick/--seed/--out/--overwrite (see experiments/README.md):
{studies}.
The fields listed below are those of the BatchNorm spectrum study."""


def _description() -> str:
    """The description of ``--help``, naming every other study of the registry."""
    others = [
        f'"{name}" ({study.summary}, {study.package})'
        for name, study in STUDIES.items()
        if name != DEFAULT_STUDY
    ]
    return _DESCRIPTION.format(studies="\n".join(textwrap.wrap("; ".join(others), width=88)))


_EXIT_STATUS = (
    "exit status: 0 done, 1 failed during the run (the last line says why; --debug shows the "
    "traceback), 2 bad input, busy or unusable output folder, or not enough memory (nothing "
    "trained), 130 interrupted."
)


def _epilog() -> str:
    lines = [
        "config fields (TOML sections [data], [model], [train], [analysis]; change any with",
        "--set section.field=value, values as TOML literals, e.g. --set train.steps=200",
        "--set model.hidden=[128,128] --set analysis.bn_modes=train,population):",
        "",
    ]
    for key, tp, default, help_text in describe_fields():
        lines.append(f"  {key} ({tp}, default {default})")
        lines.extend(
            textwrap.wrap(help_text, width=88, initial_indent="      ", subsequent_indent="      ")
        )
    lines += [
        "",
        "--quick applies, before any --set: " + " ".join(QUICK_OVERRIDES),
        "",
        "examples:",
        "  python -m hessspec.run",
        "  python -m hessspec.run --config experiments/digits_cnn.toml --out runs/cnn",
        "  python -m hessspec.run --quick --set train.steps=300 --seed 1 --out runs/s1",
        "  python -m hessspec.run --resume --out runs/s1          # after Ctrl-C or a crash",
        "  python -m hessspec.run analyze runs/s1 --out runs/s1-top30 --set analysis.top_k=30",
        "  python -m hessspec.run --config experiments/cifar10_resnet.toml "
        "--set data.path=~/data/cifar-10-batches-py --set analysis.basis_dtype=float32",
        "  # two processes on one machine (CPU: JAX_PLATFORMS=cpu), process 0 writes runs/mp:",
        "  python -m hessspec.run --quick --out runs/mp --coordinator localhost:23456 "
        "--num-processes 2 --process-id 0 &",
        "  python -m hessspec.run --quick --out runs/mp --coordinator localhost:23456 "
        "--num-processes 2 --process-id 1",
        "",
        "memory: before training the run prints what its largest analysis call needs and what is",
        "available, and refuses (exit status 2) when it does not fit; lower the need with",
        "analysis.basis_dtype=float32, analysis.chunk_size, fewer analysis.lanczos_steps /",
        "analysis.slq_steps above 128, or set a budget with --memory-limit.",
        "",
        "compilation cache: compiled XLA programs are kept in ~/.cache/hessspec/jax (or "
        "$XDG_CACHE_HOME/hessspec/jax)",
        "and reused by later runs; HESSSPEC_COMPILATION_CACHE=DIR moves it, "
        "HESSSPEC_COMPILATION_CACHE=off or",
        "--no-compilation-cache switches it off.",
        "",
        _EXIT_STATUS,
    ]
    return "\n".join(lines)


def _set_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--set SECTION.FIELD=VALUE`` (repeatable) into ``overrides``."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=help_text,
    )


def _common_flags(p: argparse.ArgumentParser) -> None:
    """Flags of both ``python -m hessspec.run`` and its ``analyze`` command."""
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: one log line per tenth of each training (and at least every "
        "minute) and one per analysis stage (the other studies: one per part as it starts), "
        "with the elapsed time (also what a run whose output is not a terminal prints)",
    )
    p.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (by default compiled programs are "
        "kept in ~/.cache/hessspec/jax for later runs; the environment variable "
        "HESSSPEC_COMPILATION_CACHE=DIR or =off does the same for every run)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the Python traceback after the one-line message",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="memory budget in GiB for the analysis (same as --set "
        "analysis.memory_limit_gib=GIB). Before training the run prints the memory its "
        "largest solver call needs and what is available, and stops (exit status 2) if it "
        "does not fit. Default: the memory available (free device memory; host RAM on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hessspec.run``."""
    p = argparse.ArgumentParser(
        prog="python -m hessspec.run",
        description=_description(),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="study config (TOML); fields it leaves out keep their defaults. Default: the "
        "embedded digits MLP study.",
    )
    _set_flag(
        p,
        "override one config field (repeatable; applied in order, after --config and "
        "--quick). Every field is listed below.",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"output folder (default: ./{DEFAULT_OUT}); must be empty or absent unless "
        "--overwrite or --resume",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in a folder that holds one: the new run is written "
        "beside it (in DIR/.hessspec-pending/) and swapped in only when it completes; then "
        "exactly the files the previous run wrote (its results.json lists them) are "
        "replaced. Other files are never touched; a failed or interrupted new run leaves "
        "the previous one as it was",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted or failed run in --out with its own config "
        "(config.toml there): keep its analyses, restore each network's latest saved "
        "training state and train on, no step twice. Takes no --config, --set, --quick, "
        "--seed, --memory-limit or --overwrite",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="cheaper analysis: fewer SLQ probes and steps, fewer trace matvecs and "
        "mini-batches (the values are listed below); training is unchanged",
    )
    p.add_argument("--seed", type=int, help="global seed (same as --set seed=N)")
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config as TOML and exit without running",
    )
    _common_flags(p)
    multi = p.add_argument_group(
        "multi-process run (all three together; one command per process, each with the "
        "same options and its own --process-id; process 0 writes the output)"
    )
    multi.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0 and a free port on it, e.g. localhost:23456",
    )
    multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    multi.add_argument(
        "--process-id", type=int, metavar="I", help="this process's rank, 0 <= I < N"
    )
    return p


_ANALYZE_DESCRIPTION = """\
Analyse saved networks again without training, with other analysis settings.

  python -m hessspec.run analyze RUN_DIR --out NEW [--set analysis.FIELD=VALUE ...]

analyses the checkpoints RUN_DIR/checkpoints/<step>/<network>/ of a run (every analysis
step, or those of --steps) with the run's config, changed only in analysis.* (and title, x64),
e.g. --set analysis.top_k=30 or --set analysis.bn_modes=train,eval,population. NEW gets
results.json, spectra.npz, figures/, report.md and config.toml; the loss curves are the
run's. RUN_DIR is only read.

  python -m hessspec.run analyze --params FILE --config CFG.toml --out NEW

analyses parameters trained elsewhere: FILE is an .npz (array names are the model's
parameter paths, e.g. head/kernel, linears/0/kernel, norms/0/scale; BatchNorm running
averages norms/0/mean, norms/0/var are needed for eval mode;
hessspec.studies.common.params_file.save_params
writes this format) or an orbax folder holding such a nested dict. CFG builds the network
(model.batchnorm must name one network) and the data; any field may be changed with --set.
The parameters are recorded as step 0."""


def build_analyze_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hessspec.run analyze``."""
    p = argparse.ArgumentParser(
        prog="python -m hessspec.run analyze",
        description=_ANALYZE_DESCRIPTION,
        epilog=_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the run folder to analyse")
    p.add_argument("--params", metavar="FILE", help="parameters to analyse instead of a run")
    p.add_argument("--config", metavar="FILE.toml", help="with --params: the study config")
    _set_flag(p, "override one config field (with RUN_DIR: analysis.*, title and x64 only)")
    p.add_argument(
        "--quick", action="store_true", help="the cheaper analysis settings of the main command"
    )
    p.add_argument(
        "--steps",
        metavar="S1,S2,...",
        help="with RUN_DIR: analyse only these saved steps (default: every analysis step)",
    )
    p.add_argument("--out", metavar="NEW", required=True, help="the output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous output in NEW (swapped in only when this one completes)",
    )
    _common_flags(p)
    return p


#: The command-line flags of a multi-process run, by their argparse destination.
DISTRIBUTED_FLAGS = {
    "coordinator": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
}


def distributed_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, int, int] | None:
    """The multi-process flags: ``(coordinator, num_processes, process_id)``, or None when
    none is given.

    Calls ``parser.error`` (usage and exit status 2) when only some of the three are given
    (naming the missing ones), when ``--num-processes`` is below 1, when ``--process-id``
    lies outside ``[0, N)``, or when the coordinator is not ``HOST:PORT``.
    """
    from hessspec.curvature.distributed import check_arguments

    values = {dest: getattr(args, dest, None) for dest in DISTRIBUTED_FLAGS}
    given = [DISTRIBUTED_FLAGS[d] for d, v in values.items() if v is not None]
    if not given:
        return None
    missing = [DISTRIBUTED_FLAGS[d] for d, v in values.items() if v is None]
    if missing:
        parser.error(
            f"{' and '.join(given)} given without {' and '.join(missing)}: a multi-process "
            "run needs all three, --coordinator HOST:PORT --num-processes N --process-id I "
            "(the same HOST:PORT and N in every process, I = 0..N-1)."
        )
    coordinator, n, rank = values["coordinator"], values["num_processes"], values["process_id"]
    if n < 1:
        parser.error(f"--num-processes must be at least 1, got {n}.")
    if not 0 <= rank < n:
        parser.error(
            f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {rank} "
            "(ranks start at 0; process 0 writes the output)."
        )
    try:
        check_arguments(coordinator, n, rank)
    except ValueError as e:
        parser.error(f"--coordinator: {e}")
    return coordinator, n, rank
