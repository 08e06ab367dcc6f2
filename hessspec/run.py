"""The command line: ``python -m hessspec.run`` trains networks with and without BatchNorm
and measures their Hessian spectra over training.

With no arguments it runs the embedded default study (the 8x8 digits bundled with
scikit-learn; an MLP without and with BatchNorm; SGD with momentum; analysis at five
checkpoints) and writes ``hessspec-out/``. See ``python -m hessspec.run --help`` for every
option and every config field.

This module is thin: configuration in (:mod:`hessspec.config`), data and models
(:mod:`hessspec.data`, :mod:`hessspec.models`), training (:mod:`hessspec.train`), the
per-checkpoint analysis (:mod:`hessspec.study`), files out (:mod:`hessspec.report`).
Every problem that can be seen before training (unknown config key, wrong type, missing
data folder, a dataset the model cannot take, an output folder that holds files) stops the
run with a one-line message and exit status 2 before any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hessspec.config import (
    QUICK_OVERRIDES,
    Config,
    ConfigError,
    apply_overrides,
    checkpoint_steps,
    config_to_dict,
    describe_fields,
    load_config,
    to_toml,
    validate,
)

__all__ = [
    "DEFAULT_OUT",
    "Network",
    "StudySetup",
    "SetupError",
    "main",
    "prepare_study",
    "run_study",
]

DEFAULT_OUT = "hessspec-out"

#: The other studies this command runs, by the top-level ``experiment`` key of their TOML
#: file: module, config class (``from_dict``, ``to_toml``), run function
#: ``(config, out_dir, progress, *, overwrite)``. The module provides ``override_config``
#: and ``QUICK_OVERRIDES``. Without that key (or with ``experiment = "batchnorm_spectrum"``)
#: a file configures the BatchNorm spectrum study of this module.
EXPERIMENTS = {
    "input_bias": ("hessspec.input_bias", "InputBiasConfig", "run_input_bias_study"),
    "santurkar": ("hessspec.santurkar", "SanturkarConfig", "run_santurkar_study"),
}


class SetupError(RuntimeError):
    """The study cannot start: data missing or malformed, or a model that does not fit it."""


@dataclasses.dataclass
class Network:
    """One network to train, and the runs (BatchNorm modes) it is analysed in.

    Attributes:
        name: base name (``"mlp"`` or ``"mlp-bn"``).
        model: the flax.nnx model (trained in place).
        batchnorm: whether it has BatchNorm layers.
        modes: the BN modes analysed (``[None]`` without BN).
        num_params: number of trainable scalars.
    """

    name: str
    model: Any
    batchnorm: bool
    modes: list[str | None]
    num_params: int


@dataclasses.dataclass
class StudySetup:
    """Everything a study needs, checked before training: the data splits, the fixed
    analysis set, and the networks."""

    config: Config
    train_set: Any
    test_set: Any
    analysis_set: Any
    networks: list[Network]
    checkpoints: list[int]


def _run_name(network: Network, mode: str | None) -> str:
    return network.name if mode is None else f"{network.name}-{mode}"


def _model_kwargs(config: Config) -> dict[str, Any]:
    m = config.model
    if m.name == "mlp":
        return {"hidden": m.hidden, "activation": m.activation, "bn_momentum": m.bn_momentum}
    if m.name == "cnn":
        return {"channels": m.channels, "bn_momentum": m.bn_momentum}
    if m.name == "resnet":
        return {
            "widths": m.widths,
            "blocks_per_stage": m.blocks_per_stage,
            "bn_momentum": m.bn_momentum,
        }
    return {}


def _load_data(config: Config):
    import numpy as np

    from hessspec import data as hdata

    d = config.data
    dtype = np.dtype(config.model.dtype)
    if d.name == "digits":
        kwargs = {
            "test_fraction": d.test_fraction,
            "seed": d.split_seed,
            "preprocessing": d.preprocessing,
        }
        path = None
    else:
        kwargs = {"standardize": d.standardize}
        path = d.path or None
    try:
        train_set, test_set = hdata.load_train_test(d.name, path, dtype=dtype, **kwargs)
    except FileNotFoundError as e:
        raise SetupError(
            f"data: {e} Set the folder with --set data.path=FOLDER (config key data.path)."
        ) from None
    except (ValueError, OSError) as e:
        raise SetupError(f"data: {e}") from None
    if d.train_size:
        if d.train_size > train_set.num_examples:
            raise SetupError(
                f"data.train_size={d.train_size} exceeds the {train_set.num_examples} "
                f"training examples of {d.name}."
            )
        train_set = hdata.subsample(train_set, d.train_size, seed=config.seed, stratify=True)
    if d.test_size:
        if d.test_size > test_set.num_examples:
            raise SetupError(
                f"data.test_size={d.test_size} exceeds the {test_set.num_examples} test "
                f"examples of {d.name}."
            )
        test_set = hdata.subsample(test_set, d.test_size, seed=config.seed, stratify=True)
    return train_set, test_set


def prepare_study(config: Config) -> StudySetup:
    """Load the data, draw the analysis set, build the networks and check that they fit.

    Raises:
        SetupError: missing data folder or files, sizes the data cannot provide, a loss
            the targets do not allow, a model that cannot take the inputs or whose output
            width is not the number of classes.
    """
    import jax
    import numpy as np

    from hessspec import data as hdata
    from hessspec.models import count_params, make_model
    from hessspec.objective import make_objective

    train_set, test_set = _load_data(config)
    n = train_set.num_examples
    t, a = config.train, config.analysis
    if config.model.loss == "cross_entropy" and not train_set.is_classification:
        raise SetupError(
            f"model.loss='cross_entropy' needs class labels; {train_set.name} has none."
        )
    if t.batch_size > n:
        raise SetupError(f"train.batch_size={t.batch_size} exceeds the {n} training examples.")
    if a.size > n:
        raise SetupError(f"analysis.size={a.size} exceeds the {n} training examples.")
    if a.size and a.size < n:
        analysis_set = hdata.subsample(train_set, a.size, seed=config.seed, stratify=True)
    else:
        analysis_set = train_set
    mb = a.minibatch_size or t.batch_size
    if mb > n:
        raise SetupError(f"analysis.minibatch_size={mb} exceeds the {n} training examples.")

    num_classes = train_set.num_classes
    outputs = max(num_classes, 1)
    probe = np.asarray(train_set.x[:2])
    input_shape = config.model.input_shape or train_set.input_shape
    networks = []
    for bn in config.model.batchnorm:
        name = config.model.name + ("-bn" if bn else "")
        try:
            model = make_model(
                config.model.name,
                input_shape,
                num_classes,
                bn,
                seed=config.seed,
                dtype=np.dtype(config.model.dtype),
                **_model_kwargs(config),
            )
            obj = make_objective(model, config.model.loss, bn_mode="eval" if bn else None)
            out = jax.eval_shape(obj.logits_fn, obj.params, probe)
        except (ValueError, TypeError) as e:
            built = (
                f" (built for inputs of shape {tuple(input_shape)})"
                if config.model.input_shape
                else ""
            )
            raise SetupError(
                f"the {config.model.name!r} model{built} does not fit the {config.data.name} "
                f"inputs of shape {train_set.input_shape}: {e}"
            ) from None
        if tuple(out.shape) != (probe.shape[0], outputs):
            raise SetupError(
                f"the {config.model.name!r} model maps {config.data.name} inputs of shape "
                f"{train_set.input_shape} to outputs of shape {tuple(out.shape[1:])}, but the "
                f"data has {num_classes} classes."
            )
        modes: list[str | None] = list(config.analysis.bn_modes) if bn else [None]
        networks.append(Network(name, model, bn, modes, count_params(model)))
    return StudySetup(
        config=config,
        train_set=train_set,
        test_set=test_set,
        analysis_set=analysis_set,
        networks=networks,
        checkpoints=checkpoint_steps(config.train),
    )


def _platform() -> dict[str, Any]:
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def run_study(
    setup: StudySetup,
    out_dir: str | Path,
    *,
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Train every network, analyse it at every checkpoint in every mode, write the output.

    ``results.json`` and ``spectra.npz`` are rewritten after each checkpoint, the figures
    and ``report.md`` at the end (also after an interruption or a failure, from what was
    measured).

    Args:
        setup: from :func:`prepare_study`.
        out_dir: the output folder (prepared: exists, holds no study output).
        command: the command line, recorded in the results.
        progress: tqdm progress bars on stderr.

    Returns:
        The results (as written to results.json).
    """
    import jax

    import hessspec
    from hessspec.objective import make_objective
    from hessspec.report import ResultsWriter, atomic_write_text, write_report
    from hessspec.study import CheckpointAnalyzer, resolve_settings
    from hessspec.train import train

    t_start = time.perf_counter()
    config = setup.config
    out_dir = Path(out_dir)
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    num_classes = tr.num_classes
    atomic_write_text(out_dir / "config.toml", to_toml(config))
    settings = {
        net.name: resolve_settings(
            config.analysis,
            config.train,
            num_classes,
            net.num_params,
            an.num_examples,
            tr.num_examples,
        )
        for net in setup.networks
    }
    first = settings[setup.networks[0].name]
    writer = ResultsWriter(
        out_dir,
        {
            "hessspec_version": hessspec.__version__,
            "status": "running",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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
                "num_classes": num_classes,
            },
            "settings": dataclasses.asdict(first),
            "checkpoint_steps": setup.checkpoints,
            "platform": _platform(),
        },
    )
    base_key = jax.random.key(config.seed)
    seconds_training = 0.0
    seconds_analysis = 0.0
    status, error = "failed", None
    try:
        for net_index, net in enumerate(setup.networks):
            st = settings[net.name]
            run_ids = {}
            for mode in net.modes:
                run_ids[mode] = writer.add_run(
                    {
                        "name": _run_name(net, mode),
                        "model": config.model.name,
                        "batchnorm": net.batchnorm,
                        "bn_mode": mode,
                        "num_params": net.num_params,
                        "num_classes": num_classes,
                        "settings": dataclasses.asdict(st),
                    }
                )
            analyzers: dict[str, CheckpointAnalyzer] = {}

            def on_checkpoint(
                step, model, status, net=net, st=st, run_ids=run_ids, analyzers=analyzers
            ):
                nonlocal seconds_analysis
                t0 = time.perf_counter()
                for mode in net.modes:
                    label = f"step {step}" + (f", {mode} mode" if mode else "")
                    status(f"analysing {label}")
                    obj = make_objective(
                        model,
                        config.model.loss,
                        bn_mode=mode,
                        population_data=tr.x if mode == "population" else None,
                        population_batch_size=st.eval_batch_size * 8
                        if mode == "population"
                        else None,
                    )
                    # eval and population mode share a graph, hence compiled programs
                    shared = "train" if mode == "train" else "statistics"
                    if shared not in analyzers:
                        analyzers[shared] = CheckpointAnalyzer(obj, an, tr, te, num_classes, st)
                    result = analyzers[shared].analyse(
                        obj,
                        jax.random.fold_in(base_key, step),
                        seed=config.seed * 1_000_003 + step,
                        on_stage=lambda s, label=label: status(f"analysing {label}: {s}"),
                    )
                    writer.add_checkpoint(run_ids[mode], step, result.record, result.arrays)
                seconds_analysis += time.perf_counter() - t0

            history = train(
                net.model,
                tr.x,
                tr.y,
                config.train,
                checkpoints=setup.checkpoints,
                on_checkpoint=on_checkpoint,
                loss=config.model.loss,
                seed=config.seed,
                progress=progress,
                desc=f"{net.name} ({net_index + 1}/{len(setup.networks)})",
            )
            seconds_training += history.seconds
            for run_id in run_ids.values():
                writer.set_loss_curve(run_id, history.steps, history.losses)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        writer.update(
            status=status,
            error=error,
            timing={
                "seconds_total": time.perf_counter() - t_start,
                "seconds_training": seconds_training,
                "seconds_analysis": seconds_analysis,
            },
        )
        if any(r["checkpoints"] for r in writer.results["runs"]):
            write_report(out_dir, writer.results, writer.arrays)
    return writer.results


_DESCRIPTION = """\
Train networks with and without BatchNorm and measure their Hessian spectra over training
(Ghorbani, Krishnan & Xiao 2019). At each checkpoint, on a fixed analysis set: the top-2K
Hessian eigenpairs with residuals (K classes), the SLQ spectral density, the Hutch++ trace,
outliers vs bulk (count, bulk edge, outlier ratio = lambda_1 / bulk edge, lambda_1 /
lambda_K), the fraction of the full-batch and of mini-batch gradients in the top-k
eigenspace (k = 1..2K), and train/test loss and accuracy. BatchNorm networks are analysed
in the mode(s) of analysis.bn_modes (train mode by default): one run per mode.

With no arguments: the embedded default study (digits, MLP without and with BN) into
./hessspec-out. Output: results.json, spectra.npz, figures/*.png, report.md, config.toml
(results.json and spectra.npz are rewritten after every checkpoint).

A config file whose top-level key `experiment` names another study runs that study
instead, with the same --set/--quick/--seed/--out/--overwrite: "input_bias" (LeCun, Kanter
& Solla: input statistics and the Hessian outlier, hessspec.input_bias) and "santurkar"
(landscape smoothness, hessspec.santurkar); see experiments/README.md. The fields listed
below are those of the BatchNorm spectrum study."""


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
        "  python -m hessspec.run --config experiments/cifar10_resnet.toml "
        "--set data.path=~/data/cifar-10-batches-py",
        "",
        "exit status: 0 done, 1 failed during the run, 2 bad input (nothing trained), "
        "130 interrupted.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hessspec.run``."""
    p = argparse.ArgumentParser(
        prog="python -m hessspec.run",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="study config (TOML); fields it leaves out keep their defaults. Default: the "
        "embedded digits MLP study.",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable; applied in order, after --config and "
        "--quick). Every field is listed below.",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"output folder (default: ./{DEFAULT_OUT}); must be empty or absent unless "
        "--overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study output (results.json, spectra.npz, report.md, config.toml, "
        "figures/*.png) in a folder that already holds files; other files are kept",
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """The config an argument list describes: --config (or the defaults), then --quick,
    then --set in order, then --seed; validated.

    Raises:
        ConfigError: unknown key, wrong type, invalid value.
    """
    config = load_config(args.config) if args.config else Config()
    if args.quick:
        config = apply_overrides(config, QUICK_OVERRIDES)
    config = apply_overrides(config, args.overrides)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    return validate(config)


def _error(message: str) -> int:
    print(f"hessspec.run: error: {message}", file=sys.stderr)
    return 2


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    from hessspec.report import findings

    lines = [
        f"hessspec: study {results.get('status')} in "
        f"{results['timing']['seconds_total']:.1f} s; output in {out_dir}/"
    ]
    for f in findings(results):
        q, d = f["outlier_ratio_quotient"], f["energy_topK_difference"]
        lines.append(
            f"  step {f['step']}: outlier ratio {f['outlier_ratio_plain']:.3g} without BN vs "
            f"{f['outlier_ratio_bn']:.3g} with BN ({f['bn_mode']} mode)"
            + (f", {q:.3g}x" if q is not None else "")
            + f"; top-{f['num_classes']} gradient energy {f['energy_topK_plain']:.3g} vs "
            f"{f['energy_topK_bn']:.3g}" + (f" (difference {d:.3g})" if d is not None else "")
        )
    lines.append(f"  report: {out_dir / 'report.md'}")
    return "\n".join(lines)


def _experiment_of(path: str) -> str | None:
    """The top-level ``experiment`` key of a TOML config file (None if absent).

    Raises:
        ConfigError: the file is missing or not valid TOML.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}.") from None
    value = values.get("experiment")
    return value if isinstance(value, str) else None


def _refuse_nonempty(out_dir: Path, overwrite: bool) -> str | None:
    """The error message if ``out_dir`` holds files and ``overwrite`` is off, else None."""
    from hessspec.report import OutputFolderError, prepare_output_dir

    if out_dir.exists() and not overwrite:
        try:
            prepare_output_dir(out_dir, overwrite=False)
        except OutputFolderError as e:
            return str(e)
    return None


def _run_experiment(name: str, args: argparse.Namespace) -> int:
    """Run one of :data:`EXPERIMENTS` from its config file, with --quick, --set, --seed."""
    import importlib
    import tomllib

    module_name, class_name, run_name = EXPERIMENTS[name]
    module = importlib.import_module(module_name)
    try:
        with open(args.config, "rb") as f:
            config = getattr(module, class_name).from_dict(tomllib.load(f))
        if args.quick:
            config = module.override_config(config, module.QUICK_OVERRIDES)
        config = module.override_config(config, args.overrides)
        if args.seed is not None:
            config = module.override_config(config, [f"seed={args.seed}"])
    except ConfigError as e:
        return _error(f"{args.config}: {e}")
    if args.show_config:
        print(config.to_toml(), end="")
        return 0
    out_dir = Path(args.out).expanduser()
    message = _refuse_nonempty(out_dir, args.overwrite)
    if message:
        return _error(message)
    try:
        getattr(module, run_name)(
            config, out_dir, progress=not args.no_progress, overwrite=args.overwrite
        )
    except (FileExistsError, ConfigError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print(f"hessspec.run: interrupted; what was written is in {out_dir}/", file=sys.stderr)
        return 130
    print(f"hessspec: {name} study complete; output in {out_dir}/ (report: report.md)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 bad input, 130
    interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        experiment = _experiment_of(args.config) if args.config else None
        if experiment in EXPERIMENTS:
            return _run_experiment(experiment, args)
        config = resolve_config(args)
    except ConfigError as e:
        return _error(str(e))
    if args.show_config:
        print(to_toml(config), end="")
        return 0

    from hessspec.report import OutputFolderError, prepare_output_dir

    out_dir = Path(args.out).expanduser()
    message = _refuse_nonempty(out_dir, args.overwrite)  # before loading anything
    if message:
        return _error(message)

    if config.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    try:
        setup = prepare_study(config)
    except SetupError as e:
        return _error(str(e))
    try:
        prepare_output_dir(out_dir, overwrite=args.overwrite)
    except (OutputFolderError, OSError) as e:
        return _error(str(e))

    sizes = ", ".join(f"{n.name} ({n.num_params} params)" for n in setup.networks)
    print(
        f"hessspec: {config.data.name}, {sizes}; {config.train.steps} steps, checkpoints "
        f"{setup.checkpoints}; output in {out_dir}/",
        file=sys.stderr,
    )
    command = shlex.join(["python", "-m", "hessspec.run", *argv])
    previous = _terminate_as_interrupt()
    try:
        results = run_study(setup, out_dir, command=command, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"hessspec.run: interrupted; what was measured is in {out_dir}/", file=sys.stderr)
        return 130
    finally:
        _restore_terminate(previous)
    print(_summary(results, out_dir))
    return 0


def _terminate_as_interrupt():
    """Make SIGTERM (``kill``, a scheduler's time limit) interrupt the run like Ctrl-C, so
    the output is finalized (status "interrupted", report from what was measured). Returns
    the previous handler (None where signals cannot be set: not the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_terminate(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
