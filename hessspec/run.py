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
data folder, a dataset the model cannot take, an output folder that holds files, an analysis
whose memory estimate exceeds what is available: :func:`memory_preflight`) stops the run
with a one-line message and exit status 2 before any training starts.

Several processes (hosts) run one study together with ``--coordinator HOST:PORT
--num-processes N --process-id I`` (:func:`hessspec.distributed.initialize`, called before
any other JAX work): the Hessian operators shard their batches over every process's
devices, so every process trains the same networks and runs the same analyses in the same
order; only process 0 writes the output folder and prints the report, the others print one
line. Decisions that could differ between processes (the output folder check, the memory
preflight, a setup error) are taken together (:func:`hessspec.distributed.gather`), so all
processes stop or go on alike.
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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from hessspec.memory import MemoryEstimate
    from hessspec.study import StudySettings

__all__ = [
    "DEFAULT_OUT",
    "MemoryPreflight",
    "Network",
    "StudySetup",
    "SetupError",
    "analysis_settings",
    "build_parser",
    "distributed_arguments",
    "main",
    "memory_preflight",
    "prepare_study",
    "run_cli_study",
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


def analysis_settings(setup: StudySetup) -> dict[str, StudySettings]:
    """The resolved analysis settings (:class:`hessspec.study.StudySettings`) of every
    network of ``setup``, by network name."""
    from hessspec.study import resolve_settings

    config, tr, an = setup.config, setup.train_set, setup.analysis_set
    return {
        net.name: resolve_settings(
            config.analysis,
            config.train,
            tr.num_classes,
            net.num_params,
            an.num_examples,
            tr.num_examples,
        )
        for net in setup.networks
    }


@dataclasses.dataclass(frozen=True)
class MemoryPreflight:
    """What the analysis of a study will need, against what there is, before training.

    Attributes:
        estimates: ``(label, estimate)`` of every solver call kind of every analysed graph
            (label e.g. ``"mlp-bn, BN train mode"``), from
            :meth:`hessspec.study.CheckpointAnalyzer.memory_estimates`.
        label: the network/mode of the largest estimate.
        peak: the largest estimate (the solver calls run one after another, so the run
            needs the largest of them).
        needed: bytes needed: ``peak.total`` (in a multi-process run the largest over the
            processes).
        available: bytes available: ``analysis.memory_limit_gib`` when set, else the free
            memory of this process's first device (host RAM on CPU; in a multi-process run
            the smallest over the processes).
        source: where ``available`` comes from (``"host RAM"``, ``"free on cuda:0"``,
            ``"analysis.memory_limit_gib = 0.5"``).
        options: config changes that lower ``needed``, largest saving first.
    """

    estimates: list[tuple[str, MemoryEstimate]]
    label: str
    peak: MemoryEstimate
    needed: int
    available: int
    source: str
    options: tuple[str, ...]

    @property
    def fits(self) -> bool:
        """Whether the largest solver call fits in the available memory."""
        return self.needed <= self.available

    def line(self) -> str:
        """One line for the terminal: need (by component), largest call, availability."""
        from hessspec.memory import summarize

        text = summarize([self.peak], available=self.available)
        return f"hessspec: memory ({self.label}): {text} ({self.source})"

    def refusal(self) -> str:
        """The error message of a run that does not fit: what it needs, what is available,
        and the config options that lower the need."""
        from hessspec.memory import format_bytes

        options = "; ".join(self.options) if self.options else "a smaller model or data"
        if self.source.startswith("analysis.memory_limit_gib"):
            more = "or raise the budget with --memory-limit GIB (0: all available memory)"
        else:
            more = "or run where more memory is free"
        return (
            f"not enough memory for the analysis: {self.peak.solver} on {self.label} needs "
            f"about {format_bytes(self.needed)} ({self.peak.summary().split(' (', 1)[1]}, "
            f"but only {format_bytes(self.available)} is available ({self.source}). Nothing "
            f"was trained. Lower the need with: {options}; {more}."
        )


def _memory_options(
    peak: MemoryEstimate,
    settings: StudySettings,
    config: Config,
    analysis_size: int,
    num_params: int,
) -> list[str]:
    """Config changes (as ``--set`` options) that lower ``peak``, largest saving first.

    Savings are rough: the basis halves with float32; the basis shrinks with the number of
    steps and with fewer SLQ probes at once; the HVP working set shrinks with the chunk
    size; the operator's data with the analysis set.
    """
    import jax

    from hessspec.linop import basis_dtype as resolve_basis_dtype

    s = settings
    options: list[tuple[int, str]] = []
    basis_bytes = int(peak.basis)
    if basis_bytes and resolve_basis_dtype(config.model.dtype, s.basis_dtype).itemsize > 4:
        options.append(
            (basis_bytes // 2, "--set analysis.basis_dtype=float32 (halves the Krylov bases)")
        )
    if basis_bytes and s.basis_memory == "device" and jax.default_backend() != "cpu":
        options.append(
            (
                basis_bytes * 7 // 8,
                "--set analysis.basis_memory=host (the Krylov bases in host memory)",
            )
        )
    if peak.solver == "top_eigenpairs":
        m = s.lanczos_steps or min(num_params, max(2 * s.top_k + 20, 3 * s.top_k))
        if m > s.top_k + 1:
            options.append(
                (
                    basis_bytes // 3,
                    f"fewer Lanczos steps, --set analysis.lanczos_steps=N with {s.top_k} < N < "
                    f"{m} (the basis has N vectors)",
                )
            )
    elif peak.solver == "spectral_density":
        pb = min(s.slq_probe_batch_size or s.slq_probes, s.slq_probes)
        if pb > 1:
            options.append(
                (
                    basis_bytes * (pb - 1) // pb,
                    f"--set analysis.slq_probe_batch_size=1 (now {pb} probes, each with its "
                    "own basis, at once)",
                )
            )
        options.append(
            (
                basis_bytes // 3,
                f"fewer SLQ steps, --set analysis.slq_steps=N with N < {s.slq_steps}",
            )
        )
    elif peak.solver == "trace":
        options.append(
            (
                int(peak.probes) // 2,
                f"fewer trace matvecs, --set analysis.trace_matvecs=N with N < {s.trace_matvecs}",
            )
        )
    if peak.solver in ("top_eigenpairs", "trace") and s.matvec_batch_size != 1:
        options.append((int(peak.hvp) // 2, "--set analysis.matvec_batch_size=1"))
    chunk = s.chunk_size or analysis_size
    if peak.hvp and chunk > s.hvp_batch_size:
        options.append(
            (
                int(peak.hvp) // 2,
                f"--set analysis.chunk_size=N with N < {chunk} (examples per Hessian-vector "
                "product; the HVP working set grows with it)",
            )
        )
    if peak.operator:
        options.append(
            (
                int(peak.operator) // 2,
                f"--set analysis.size=N with N < {analysis_size} (fewer analysis examples)",
            )
        )
    return [text for saving, text in sorted(options, key=lambda o: -o[0]) if saving > 0]


#: Label suffix of each analysed graph in memory messages, by the BN mode that builds it.
_GRAPH_LABELS = {None: "", "train": ", BN train mode", "eval": ", BN eval/population mode"}


def memory_preflight(setup: StudySetup, *, multi_process: bool = False) -> MemoryPreflight:
    """Estimate the memory of the analysis before training and compare it with what is
    available.

    For every network and every distinct analysed graph (no BN; BN train mode; BN eval and
    population mode, which share one), the Hessian operator over the analysis set (chunks
    of ``analysis.chunk_size``) is built from the untrained network, which has the shapes
    of every checkpoint, and :meth:`~hessspec.study.CheckpointAnalyzer.memory_estimates`
    gives the estimates of ``top_eigenpairs``, ``spectral_density`` and ``trace`` with the
    config's sizes and ``analysis.basis_dtype``. Nothing is compiled or run.

    Args:
        setup: from :func:`prepare_study` (call after enabling x64, as the run will: the
            solver dtype depends on it).
        multi_process: take the largest need and the smallest availability over all
            processes (a collective: every process must call this), so that they all
            decide alike.

    Returns:
        :class:`MemoryPreflight`; ``fits`` says whether the run may start.
    """
    import jax

    from hessspec import distributed
    from hessspec.memory import available_memory
    from hessspec.objective import make_objective
    from hessspec.study import CheckpointAnalyzer

    config = setup.config
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    settings = analysis_settings(setup)
    estimates: list[tuple[str, MemoryEstimate]] = []
    network_of: dict[str, Network] = {}
    for net in setup.networks:
        graphs = {"train" if m == "train" else ("eval" if m else None) for m in net.modes}
        for mode in sorted(graphs, key=str):
            obj = make_objective(net.model, config.model.loss, bn_mode=mode)
            analyzer = CheckpointAnalyzer(obj, an, tr, te, tr.num_classes, settings[net.name])
            label = net.name + _GRAPH_LABELS[mode]
            network_of[label] = net
            estimates.extend((label, e) for e in analyzer.memory_estimates(obj))
    label, peak = max(estimates, key=lambda item: item[1].total)
    limit = config.analysis.memory_limit_gib
    if limit:
        available = int(limit * 2**30)
        source = f"analysis.memory_limit_gib = {limit:g}"
    else:
        device = jax.local_devices()[0]
        available = available_memory(device)
        source = "host RAM" if device.platform == "cpu" else f"free on {device}"
    needed = int(peak.total)
    if multi_process:
        rows = distributed.gather([needed, available])
        needed = int(rows[:, 0].max())
        if not limit:
            available = int(rows[:, 1].min())
            source += f", the least of {rows.shape[0]} processes"
    net = network_of[label]
    options = _memory_options(peak, settings[net.name], config, an.num_examples, net.num_params)
    return MemoryPreflight(
        estimates=estimates,
        label=label,
        peak=peak,
        needed=needed,
        available=int(available),
        source=source,
        options=tuple(options),
    )


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


def run_study(
    setup: StudySetup,
    out_dir: str | Path,
    *,
    command: str = "",
    progress: bool = True,
    write: bool = True,
    check_memory: bool | float = True,
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
        write: False computes everything but writes no file (processes other than 0 of a
            multi-process run: they take part in every sharded computation).
        check_memory: the solvers' memory check (:class:`hessspec.study.CheckpointAnalyzer`):
            True against the memory available at each call, a number of bytes as the budget,
            False none.

    Returns:
        The results (as written to results.json).
    """
    import jax

    import hessspec
    from hessspec.objective import make_objective
    from hessspec.report import ResultsWriter, atomic_write_text, write_report
    from hessspec.study import CheckpointAnalyzer
    from hessspec.train import train

    t_start = time.perf_counter()
    config = setup.config
    out_dir = Path(out_dir)
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    num_classes = tr.num_classes
    if write:
        atomic_write_text(out_dir / "config.toml", to_toml(config))
    settings = analysis_settings(setup)
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
        write=write,
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
                step, model, show, net=net, st=st, run_ids=run_ids, analyzers=analyzers
            ):
                nonlocal seconds_analysis
                t0 = time.perf_counter()
                for mode in net.modes:
                    label = f"step {step}" + (f", {mode} mode" if mode else "")
                    show(f"analysing {label}")
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
                        analyzers[shared] = CheckpointAnalyzer(
                            obj, an, tr, te, num_classes, st, check_memory=check_memory
                        )
                    result = analyzers[shared].analyse(
                        obj,
                        jax.random.fold_in(base_key, step),
                        seed=config.seed * 1_000_003 + step,
                        on_stage=lambda s, label=label: show(f"analysing {label}: {s}"),
                    )
                    arrays = dict(result.arrays)
                    if not config.analysis.save_eigenvectors:
                        arrays.pop("eigenvectors", None)
                    writer.add_checkpoint(run_ids[mode], step, result.record, arrays)
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
        if write and any(r["checkpoints"] for r in writer.results["runs"]):
            if status == "complete":
                write_report(out_dir, writer.results, writer.arrays)
            else:  # never let the report hide why the run stopped
                try:
                    write_report(out_dir, writer.results, writer.arrays)
                except Exception as e:
                    print(f"hessspec.run: could not write the report: {e}", file=sys.stderr)
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
        "--set data.path=~/data/cifar-10-batches-py --set analysis.basis_dtype=float32",
        "  # two processes on one machine (CPU: JAX_PLATFORMS=cpu), process 0 writes runs/mp:",
        "  python -m hessspec.run --quick --out runs/mp --coordinator localhost:23456 "
        "--num-processes 2 --process-id 0 &",
        "  python -m hessspec.run --quick --out runs/mp --coordinator localhost:23456 "
        "--num-processes 2 --process-id 1",
        "",
        "memory: before training the run prints what its largest analysis call needs and what is",
        "available, and refuses (exit status 2) when it does not fit; lower the need with",
        "analysis.basis_dtype=float32, analysis.slq_probe_batch_size, analysis.chunk_size, fewer",
        "analysis.lanczos_steps / analysis.slq_steps, or set a budget with --memory-limit.",
        "",
        "exit status: 0 done, 1 failed during the run, 2 bad input or not enough memory "
        "(nothing trained), 130 interrupted.",
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
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="memory budget in GiB for the analysis (same as --set "
        "analysis.memory_limit_gib=GIB). Before training the run prints the memory its "
        "largest solver call needs and what is available, and stops (exit status 2) if it "
        "does not fit. Default: the memory available (free device memory; host RAM on CPU)",
    )
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
    from hessspec.distributed import check_arguments

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


def resolve_config(args: argparse.Namespace) -> Config:
    """The config an argument list describes: --config (or the defaults), then --quick,
    then --set in order, then --seed and --memory-limit; validated.

    Raises:
        ConfigError: unknown key, wrong type, invalid value.
    """
    config = load_config(args.config) if args.config else Config()
    if args.quick:
        config = apply_overrides(config, QUICK_OVERRIDES)
    config = apply_overrides(config, args.overrides)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    if getattr(args, "memory_limit", None) is not None:
        analysis = dataclasses.replace(config.analysis, memory_limit_gib=args.memory_limit)
        config = dataclasses.replace(config, analysis=analysis)
    return validate(config)


def _error(message: str, who: str = "") -> int:
    """Print ``message`` as the CLI's error line (``who`` names the process in a
    multi-process run) and return exit status 2."""
    print(f"hessspec.run{who}: error: {message}", file=sys.stderr)
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
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 bad input or not enough
    memory, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    dist = distributed_arguments(parser, args)
    try:
        experiment = _experiment_of(args.config) if args.config else None
        if experiment in EXPERIMENTS:
            if dist is not None or args.memory_limit is not None:
                return _error(
                    f"--coordinator/--num-processes/--process-id and --memory-limit apply to "
                    f"the BatchNorm spectrum study only; the {experiment!r} study of "
                    f"{args.config} runs in one process: leave them out."
                )
            return _run_experiment(experiment, args)
        config = resolve_config(args)
    except ConfigError as e:
        return _error(str(e))
    if args.show_config:
        print(to_toml(config), end="")
        return 0
    return run_cli_study(config, args, argv, dist)


def run_cli_study(
    config: Config,
    args: argparse.Namespace,
    argv: Sequence[str],
    dist: tuple[str, int, int] | None = None,
) -> int:
    """The BatchNorm spectrum study of a resolved config, as the CLI runs it.

    In order: join the multi-process job (``dist``, before any other JAX work); enable x64;
    refuse a non-empty output folder; load the data and build the networks
    (:func:`prepare_study`); the memory preflight (:func:`memory_preflight`: one line, and
    a refusal when the analysis cannot fit); prepare the output folder; train and analyse
    (:func:`run_study`). Everything up to the preflight stops with exit status 2 before any
    training.

    In a multi-process run every process runs this with the same config; the output folder
    is checked and written by process 0 only, and each refusal is decided together
    (:func:`_agree`), so every process stops at the same point or none does.

    Args:
        config: validated config.
        args: the parsed command line (``out``, ``overwrite``, ``no_progress``).
        argv: the command line, recorded in results.json.
        dist: ``(coordinator, num_processes, process_id)`` from
            :func:`distributed_arguments`, or None for one process.

    Returns:
        The exit status.
    """
    from hessspec.report import OutputFolderError, prepare_output_dir

    rank, count = (dist[2], dist[1]) if dist else (0, 1)
    multi = count > 1
    main_process = rank == 0
    who = f" (process {rank} of {count})" if multi else ""
    if dist is not None:
        from hessspec import distributed

        try:
            distributed.initialize(*dist)
        except Exception as e:  # noqa: BLE001 - connection failures come in many types
            return _error(
                f"could not join the multi-process job at {dist[0]} as process {rank} of "
                f"{count}: {type(e).__name__}: {e}. Start all {count} processes with the same "
                "--coordinator (process 0's host and a free port) within a few minutes.",
                who,
            )
    if config.x64:
        import jax

        jax.config.update("jax_enable_x64", True)

    out_dir = Path(args.out).expanduser()
    # only process 0 looks at the folder (it is the one that creates it): the others could
    # otherwise find its first files there and refuse
    message = _refuse_nonempty(out_dir, args.overwrite) if main_process else None
    message = _agree(message, multi)
    if message:
        return _error(message, who)

    setup, message = None, None
    try:
        setup = prepare_study(config)
    except SetupError as e:
        message = str(e)
    message = _agree(message, multi)
    if message:
        return _error(message, who)

    preflight = memory_preflight(setup, multi_process=multi)
    if main_process:
        print(preflight.line(), file=sys.stderr)
    if not preflight.fits:  # the same decision on every process (shared numbers)
        return _error(preflight.refusal(), who)

    message = None
    if main_process:
        try:
            prepare_output_dir(out_dir, overwrite=args.overwrite)
        except (OutputFolderError, OSError) as e:
            message = str(e)
    message = _agree(message, multi)
    if message:
        return _error(message, who)

    if main_process:
        sizes = ", ".join(f"{n.name} ({n.num_params} params)" for n in setup.networks)
        print(
            f"hessspec: {config.data.name}, {sizes}; {config.train.steps} steps, checkpoints "
            f"{setup.checkpoints}; output in {out_dir}/"
            + (f"; {count} processes" if multi else ""),
            file=sys.stderr,
        )
    # A budget (given, or agreed by all processes) makes the solvers' own checks decide
    # alike everywhere; otherwise each call compares with the memory free when it starts.
    budget = config.analysis.memory_limit_gib or multi
    command = shlex.join(["python", "-m", "hessspec.run", *argv])
    previous = _terminate_as_interrupt()
    try:
        results = run_study(
            setup,
            out_dir,
            command=command,
            progress=main_process and not args.no_progress,
            write=main_process,
            check_memory=float(preflight.available) if budget else True,
        )
    except KeyboardInterrupt:
        where = f"what was measured is in {out_dir}/" if main_process else "process 0 wrote"
        print(f"hessspec.run{who}: interrupted; {where}", file=sys.stderr)
        return 130
    finally:
        _restore_terminate(previous)
    if main_process:
        print(_summary(results, out_dir))
    else:
        print(
            f"hessspec: process {rank} of {count}: study {results.get('status')} in "
            f"{results['timing']['seconds_total']:.1f} s; process 0 wrote the output to "
            f"{out_dir}/"
        )
    return 0


def _agree(message: str | None, multi_process: bool) -> str | None:
    """A refusal decided by all processes together: each passes its own message (None: no
    objection); in a multi-process run every process learns whether any objected (a
    collective: all must call it at the same point) and all return a message if one did.
    With one process, ``message`` is returned as is (no JAX work)."""
    if not multi_process:
        return message
    from hessspec import distributed

    flags = distributed.gather([1.0 if message else 0.0])[:, 0]
    if message:
        return message
    refused = [str(i) for i, flag in enumerate(flags) if flag]
    if refused:
        return (
            f"process {', '.join(refused)} refused to start (its message says why); nothing "
            "was run."
        )
    return None


def _terminate_as_interrupt():
    """Make SIGTERM (``kill``, a scheduler's time limit) interrupt the run like Ctrl-C, so
    the output is finalized (status "interrupted", report from what was measured).

    Returns:
        ``(installed, previous handler)``; nothing is installed outside the main thread.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False, None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return True, signal.signal(signal.SIGTERM, handler)


def _restore_terminate(state) -> None:
    """Put back the SIGTERM handler :func:`_terminate_as_interrupt` replaced."""
    import signal

    installed, previous = state
    if installed:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    raise SystemExit(main())
