"""The command line: ``python -m hessspec.run`` trains networks with and without BatchNorm
and measures their Hessian spectra over training.

With no arguments it runs the embedded default study (the 8x8 digits bundled with
scikit-learn; an MLP without and with BatchNorm; SGD with momentum; analysis at five
checkpoints) and writes ``hessspec-out/``. See ``python -m hessspec.run --help`` for every
option and every config field.

This module is thin: configuration in (:mod:`hessspec.studies.batchnorm_spectrum.config`), data and
models
(:mod:`hessspec.nn.data`, :mod:`hessspec.nn.models`), training (:mod:`hessspec.nn.train`), the
per-checkpoint analysis (:mod:`hessspec.studies.batchnorm_spectrum.analyzer`), files out
(:mod:`hessspec.studies.batchnorm_spectrum.report`).
Every problem that can be seen before training (unknown config key, wrong type, missing
data folder, a dataset the model cannot take, an output folder that holds files, an analysis
whose memory estimate exceeds what is available: :func:`memory_preflight`) stops the run
with a one-line message and exit status 2 before any training starts.

Several processes (hosts) run one study together with ``--coordinator HOST:PORT
--num-processes N --process-id I`` (:func:`hessspec.curvature.distributed.initialize`, called before
any other JAX work): the Hessian operators shard their batches over every process's
devices, so every process trains the same networks and runs the same analyses in the same
order; only process 0 writes the output folder and prints the report, the others print one
line. Decisions that could differ between processes (the output folder check, the memory
preflight, a setup error) are taken together (:func:`hessspec.curvature.distributed.gather`), so all
processes stop or go on alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hessspec.nn.progress import Progress
from hessspec.studies.batchnorm_spectrum.config import (
    QUICK_OVERRIDES,
    Config,
    ConfigError,
    apply_overrides,
    checkpoint_steps,
    config_to_dict,
    describe_fields,
    load_config,
    read_toml,
    to_toml,
    validate,
)
from hessspec.studies.common.interrupts import EXIT_INTERRUPTED, InterruptGuard
from hessspec.studies.common.runfolder import OutputFolderError, RunFolder, atomic_write_text

if TYPE_CHECKING:
    from hessspec.linalg.memory import MemoryEstimate
    from hessspec.studies.batchnorm_spectrum.analyzer import StudySettings

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
    "input_bias": ("hessspec.studies.input_bias", "InputBiasConfig", "run_input_bias_study"),
    "santurkar": ("hessspec.studies.santurkar", "SanturkarConfig", "run_santurkar_study"),
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


def _load_data(config: Config):
    import numpy as np

    from hessspec.nn import data as hdata

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
        train_set = _subset(train_set, d.train_size, "data.train_size", "training", config)
    if d.test_size:
        test_set = _subset(test_set, d.test_size, "data.test_size", "test", config)
    return train_set, test_set


def _subset(dataset, size: int, key: str, what: str, config: Config):
    """A stratified subset of ``size`` examples, or a SetupError naming ``key``."""
    from hessspec.nn import data as hdata

    if size > dataset.num_examples:
        raise SetupError(
            f"{key}={size} exceeds the {dataset.num_examples} {what} examples of "
            f"{config.data.name}."
        )
    classes = dataset.num_classes if dataset.is_classification else 0
    if classes and size < classes:
        raise SetupError(
            f"{key}={size} is smaller than the {classes} classes of {config.data.name}: a "
            f"stratified subset needs one example of each class; set {key} to at least "
            f"{classes} (or 0 for all {dataset.num_examples})."
        )
    try:
        return hdata.subsample(dataset, size, seed=config.seed, stratify=dataset.is_classification)
    except ValueError as e:
        raise SetupError(f"{key}={size}: {e}") from None


def prepare_study(config: Config) -> StudySetup:
    """Load the data, draw the analysis set, build the networks and check that they fit.

    Raises:
        SetupError: missing data folder or files, sizes the data cannot provide, a loss
            the targets do not allow, a model that cannot take the inputs or whose output
            width is not the number of classes.
    """
    import jax
    import numpy as np

    from hessspec.nn.models import count_params
    from hessspec.nn.objective import make_objective
    from hessspec.studies.common.checkpoint import build_model

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
        analysis_set = _subset(train_set, a.size, "analysis.size", "training", config)
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
            model = build_model(
                config, input_shape=input_shape, num_classes=num_classes, batchnorm=bn
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
    """The resolved analysis settings
    (:class:`hessspec.studies.batchnorm_spectrum.analyzer.StudySettings`) of every
    network of ``setup``, by network name."""
    from hessspec.studies.batchnorm_spectrum.analyzer import resolve_settings

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
            :meth:`hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer.memory_estimates`.
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
        from hessspec.linalg.memory import summarize

        text = summarize([self.peak], available=self.available)
        return f"hessspec: memory ({self.label}): {text} ({self.source})"

    def refusal(self) -> str:
        """The error message of a run that does not fit: what it needs, what is available,
        and the config options that lower the need."""
        from hessspec.linalg.memory import format_bytes

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

    Savings are rough: the basis halves with float32, and shrinks with the number of steps
    above the smallest basis (128 rows); the HVP working set shrinks with the chunk size;
    the operator's data with the analysis set.
    """
    import jax

    from hessspec.linalg.krylov import MIN_BASIS_ROWS, basis_rows
    from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype

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
    # the basis has basis_rows(m) >= 128 rows: fewer steps help only above that
    if peak.solver == "top_eigenpairs":
        m = s.lanczos_steps or min(num_params, basis_rows(max(2 * s.top_k + 20, 3 * s.top_k)))
        if m > MIN_BASIS_ROWS:
            options.append(
                (
                    basis_bytes // 2,
                    f"fewer Lanczos steps, --set analysis.lanczos_steps=N with {s.top_k} < N <= "
                    f"{MIN_BASIS_ROWS} (the basis has at least {MIN_BASIS_ROWS} rows)",
                )
            )
    elif peak.solver == "spectral_density" and s.slq_steps > MIN_BASIS_ROWS:
        options.append(
            (
                basis_bytes // 2,
                f"fewer SLQ steps, --set analysis.slq_steps=N with N <= {MIN_BASIS_ROWS}",
            )
        )
    elif peak.solver == "trace" and s.trace_matvecs // 3 > MIN_BASIS_ROWS:
        options.append(
            (
                basis_bytes // 2,
                "fewer trace matvecs, --set analysis.trace_matvecs=N with N <= "
                f"{3 * MIN_BASIS_ROWS} (Hutch++ keeps N/3 vectors)",
            )
        )
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
    of every checkpoint, and
    :meth:`~hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer.memory_estimates`
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

    from hessspec.curvature import distributed
    from hessspec.linalg.memory import available_memory
    from hessspec.nn.objective import make_objective
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

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


#: The stages :meth:`hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer.analyse`
#: reports, in order.
ANALYSIS_STAGES = ("hessian", "top eigenpairs", "density", "trace", "gradients", "metrics")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _header(setup: StudySetup, command: str) -> dict[str, Any]:
    """The top-level entries of a new run's results.json."""
    import hessspec

    config = setup.config
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    first = analysis_settings(setup)[setup.networks[0].name]
    return {
        "hessspec_version": hessspec.__version__,
        "status": "running",
        "created": _now(),
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


class _Analyses:
    """Analyses networks at checkpoints into a
    :class:`~hessspec.studies.batchnorm_spectrum.report.ResultsWriter`:
    one run per network and BatchNorm mode, the compiled programs of each analysed graph
    shared between its checkpoints
    (:class:`~hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer`)."""

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

    def add_runs(self, net: Network) -> dict[str | None, int]:
        """The results.json runs of ``net`` (one per mode; kept when continuing)."""
        st = self.settings[net.name]
        ids = {}
        for mode in net.modes:
            ids[mode] = self.writer.add_run(
                {
                    "name": _run_name(net, mode),
                    "model": self.config.model.name,
                    "batchnorm": net.batchnorm,
                    "bn_mode": mode,
                    "num_params": net.num_params,
                    "num_classes": self.setup.train_set.num_classes,
                    "settings": dataclasses.asdict(st),
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

    def analyse(self, net: Network, step: int, model, modes: Sequence[str | None]) -> None:
        """Analyse ``model`` (``net`` at ``step``) in ``modes`` and record each result."""
        import jax

        from hessspec.nn.objective import make_objective
        from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

        if self.base_key is None:
            self.base_key = jax.random.key(self.config.seed)
        config, st = self.config, self.settings[net.name]
        tr, te, an = self.setup.train_set, self.setup.test_set, self.setup.analysis_set
        previous = self.tracker.phase
        self.tracker.phase = "analysis"
        t0 = time.perf_counter()
        for mode in modes:
            label = f"{net.name}: step {step}" + (f", {mode} mode" if mode else "")
            obj = make_objective(
                model,
                config.model.loss,
                bn_mode=mode,
                population_data=tr.x if mode == "population" else None,
                population_batch_size=st.eval_batch_size * 8 if mode == "population" else None,
            )
            # eval and population mode share a graph, hence compiled programs
            shared = (net.name, "train" if mode == "train" else "statistics")
            if shared not in self.analyzers:
                self.analyzers[shared] = CheckpointAnalyzer(
                    obj, an, tr, te, tr.num_classes, st, check_memory=self.check_memory
                )
            with self.progress.analysis(f"analysing {label}", len(ANALYSIS_STAGES)) as shown:
                result = self.analyzers[shared].analyse(
                    obj,
                    jax.random.fold_in(self.base_key, step),
                    seed=config.seed * 1_000_003 + step,
                    on_stage=shown.stage,
                )
            arrays = dict(result.arrays)
            if not config.analysis.save_eigenvectors:
                arrays.pop("eigenvectors", None)
            with self.guard.critical():
                self.writer.add_checkpoint(
                    self.run_ids[net.name][mode], step, result.record, arrays
                )
        self.seconds += time.perf_counter() - t0
        self.tracker.phase = previous


class _Tracker:
    """What a run is doing (for the record of an interruption) and its loss curves."""

    def __init__(self):
        self.phase = "start-up"
        self.curves: dict[str, Any] = {}  # network name -> LossCurve
        self.started: dict[str, int] = {}  # network name -> step this session began at


class _CheckpointStore:
    """The orbax checkpoints of a run folder (``checkpoints/<step>/<network>/``)."""

    def __init__(self, folder: Path, setup: StudySetup, writer, guard, *, write: bool):
        self.folder = folder
        self.setup = setup
        self.writer = writer
        self.guard = guard
        self.write = write

    def saved(self, network: str) -> dict[int, dict[str, Any]]:
        from hessspec.studies.common.checkpoint import saved_checkpoints

        return saved_checkpoints(self.folder).get(network, {})

    def _relative(self, step: int, network: str) -> str:
        from hessspec.studies.common.checkpoint import CHECKPOINTS_DIR

        return f"{CHECKPOINTS_DIR}/{int(step)}/{network}/"

    def save(self, net: Network, state, kind: str) -> None:
        """Save ``net``'s training state (unless this process does not write, or the same
        step is saved already) and drop the network's older interruption states."""
        import shutil

        from hessspec.studies.common.checkpoint import checkpoint_path, save_checkpoint

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
        from hessspec.studies.common.checkpoint import checkpoint_path, load_checkpoint

        return load_checkpoint(checkpoint_path(self.folder, step, net.name))


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
        setup: from :func:`prepare_study`.
        out_dir: the folder to write (prepared: see
        :class:`hessspec.studies.common.runfolder.RunFolder`).
        command: the command line, recorded in the results.
        progress: a :class:`hessspec.nn.progress.Progress`, True (bars on a terminal, log
            lines otherwise), False (nothing) or a style name.
        write: False computes everything but writes no file (processes other than 0 of a
            multi-process run: they take part in every sharded computation).
        check_memory: the solvers' memory check
        (:class:`hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer`):
            True against the memory available at each call, a number of bytes as the budget,
            False none.
        resume: continue the run in ``out_dir`` (same config): keep its analyses, restore
            each network's latest saved training state, train on and analyse the rest.
        guard: the :class:`hessspec.studies.common.interrupts.InterruptGuard` of the process (its
        lock and
            critical sections keep the files consistent under interrupts); a passive one by
            default.

    Returns:
        The results (as written to results.json).

    Raises:
        hessspec.nn.train.TrainingDiverged: a non-finite training loss (recorded as failed).
        hessspec.studies.common.runfolder.OutputWriteError: a file could not be written (full disk).
        hessspec.studies.common.runfolder.OutputFolderError: ``resume`` of a folder whose run does
        not
            match ``setup``.
        KeyboardInterrupt: after recording the interruption.
    """
    from hessspec.nn.train import LossCurve, train
    from hessspec.studies.batchnorm_spectrum.report import ResultsWriter

    t_start = time.perf_counter()
    config = setup.config
    out_dir = Path(out_dir)
    show = Progress.of(progress)
    guard = guard if guard is not None else InterruptGuard()
    tracker = _Tracker()
    previous_timing: dict[str, float] = {}
    if resume:
        writer = ResultsWriter.reopen(out_dir, write=write, lock=guard.lock)
        if writer.results.get("config") != config_to_dict(config):
            raise OutputFolderError(
                f"cannot continue the run in {out_dir}: its results.json was made with another "
                "config than its config.toml."
            )
        previous_timing = dict(writer.results.get("timing") or {})
        writer.update(status="running", stopped_during=None, error=None, write=False)
    else:
        writer = ResultsWriter(out_dir, _header(setup, command), write=write, lock=guard.lock)
        if write:
            atomic_write_text(out_dir / "config.toml", to_toml(config))
            writer.add_files("config.toml")
    session = {"started": _now(), "command": command, "resumed": bool(resume), "trained": {}}
    writer.results.setdefault("sessions", []).append(session)
    writer.write_json()
    analyses = _Analyses(setup, writer, show, guard, check_memory=check_memory, tracker=tracker)
    # A multi-process run saves no checkpoints yet: orbax's saving synchronises every
    # process, while here process 0 alone writes (and SIGTERM belongs to JAX's preemption
    # notifier there).
    import jax

    checkpoints = write and jax.process_count() == 1
    store = _CheckpointStore(out_dir, setup, writer, guard, write=checkpoints)
    if checkpoints:  # imported now, so that saving the state of an interrupted run is quick
        import orbax.checkpoint  # noqa: F401
    previous_analysis = float(previous_timing.get("seconds_analysis", 0.0))

    def record_progress(*, from_device: bool) -> None:
        """Loss curves, sessions and timing into the results (in memory)."""
        for net in setup.networks:
            curve = tracker.curves.get(net.name)
            if curve is None:
                continue
            losses = curve.losses() if from_device else curve.host_losses()
            for run_id in analyses.run_ids.get(net.name, {}).values():
                writer.set_loss_curve(run_id, np.arange(1, losses.size + 1), losses, write=False)
            session["trained"][net.name] = [tracker.started[net.name], int(losses.size)]
        # a curve restored from a checkpoint carries the training time of earlier sessions
        by_network = dict(previous_timing.get("seconds_training_by_network", {}))
        by_network.update({n: c.seconds for n, c in tracker.curves.items()})
        writer.update(
            write=False,
            timing={
                "seconds_total": float(previous_timing.get("seconds_total", 0.0))
                + time.perf_counter()
                - t_start,
                "seconds_training": sum(by_network.values()),
                "seconds_training_by_network": by_network,
                "seconds_analysis": previous_analysis + analyses.seconds,
            },
        )

    def on_stuck() -> str:
        """From the watchdog, the main thread stuck in native code: record what is held."""
        record_progress(from_device=False)
        session["status"] = "interrupted"
        writer.update(status="interrupted", stopped_during=tracker.phase)
        return f"what was measured is in {out_dir}/"

    guard.on_stuck = on_stuck if write else None
    status, error = "failed", None
    try:
        for net_index, net in enumerate(setup.networks):
            tracker.phase = "start-up"
            analyses.add_runs(net)
            needed = analyses.missing(net, setup.checkpoints)
            saved = store.saved(net.name) if resume else {}
            last = max(saved) if saved else None
            if not needed and last == config.train.steps:
                show.line(f"{net.name}: trained and analysed already (step {last}); skipped")
                continue
            start = last
            without_state = [
                s for s in needed if start is not None and s < start and s not in saved
            ]
            if without_state:  # analyses whose state was never saved: train again from there
                start = max((s for s in saved if s <= min(without_state)), default=None)
            state = store.load(net, start).training_state() if start is not None else None
            if state is not None:
                show.line(
                    f"{net.name}: resuming at step {start} (saved training state); "
                    f"analyses still to do at steps {sorted(needed) or 'none'}"
                )
            for step in sorted(s for s in needed if start is not None and s < start):
                analyses.analyse(net, step, store.load(net, step).model(), needed[step])
            curve = LossCurve()
            tracker.curves[net.name] = curve
            tracker.started[net.name] = int(start or 0)
            tracker.phase = "training"

            def on_checkpoint(step, model, status, net=net, needed=needed):
                analyses.analyse(net, step, model, needed[step])
                record_progress(from_device=True)
                writer.write_json()
                tracker.phase = "training"

            def on_save(state, kind, net=net):
                previous = tracker.phase
                tracker.phase = "saving a checkpoint"
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
                desc=f"{net.name} ({net_index + 1}/{len(setup.networks)})",
                resume_from=state,
                on_save=on_save,
                curve=curve,
            )
            record_progress(from_device=True)
            writer.write_json()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        _finish(
            writer,
            out_dir,
            status=status,
            error=error,
            tracker=tracker,
            session=session,
            guard=guard,
            record=lambda: record_progress(from_device=True),
            write=write,
        )
    return writer.results


def _finish(
    writer, out_dir, *, status, error, tracker, session, guard, record, write, report=True
) -> None:
    """The final writes of a run, results.json always last.

    - complete: the figures and report.md, then results.json ("complete"); an interrupt or
      an error on the way is recorded instead (``stopped_during`` = "writing the output",
      ``files`` lists what was written);
    - interrupted: results.json only (status, where it stopped, the loss curves), so the
      process ends within a second; the report is drawn when the run completes (--resume);
    - failed: results.json first (why), then the report of what was measured, unless the
      failure was a write (a full disk).
    """
    from hessspec.studies.batchnorm_spectrum.report import write_report
    from hessspec.studies.common.runfolder import OutputWriteError

    if status != "complete":
        guard.finishing = True  # a second interrupt now ends the process at once
    try:
        record()
    except Exception as e:  # noqa: BLE001 - keep the host-side curves then
        print(f"hessspec.run: could not copy the loss curves: {e}", file=sys.stderr)
    session["status"] = status
    if status != "complete":
        # the original error propagates; a failed write here leaves the last consistent file
        with contextlib.suppress(OutputWriteError):
            writer.update(status=status, stopped_during=tracker.phase, error=error)
        if status == "interrupted" or not write or (error or "").startswith("OutputWriteError"):
            return
    has_results = any(r["checkpoints"] for r in writer.results["runs"])
    if not write or not has_results or not report:
        if status == "complete":
            writer.update(status=status, stopped_during=None, error=None)
        return
    if status != "complete":
        try:
            write_report(out_dir, writer.results, writer.arrays, on_written=writer.add_files)
            writer.write_json()
        except Exception as e:  # noqa: BLE001 - never let the report hide why the run stopped
            print(f"hessspec.run: could not write the report: {e}", file=sys.stderr)
            with contextlib.suppress(OutputWriteError):
                writer.write_json()
        return
    tracker.phase = "writing the output"
    try:
        writer.update(status="complete", stopped_during=None, error=None, write=False)
        write_report(out_dir, writer.results, writer.arrays, on_written=writer.add_files)
        writer.write_json()
    except BaseException as e:
        guard.finishing = True
        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        session["status"] = stopped
        message = None if stopped == "interrupted" else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OutputWriteError):
            writer.update(status=stopped, stopped_during="writing the output", error=message)
        raise


# --------------------------------------------------------------------------------------
# Re-analysis of saved checkpoints (``python -m hessspec.run analyze``)
# --------------------------------------------------------------------------------------

#: Config keys ``analyze RUN_DIR --set`` may change (the rest describes what was trained).
ANALYZE_KEYS_PREFIX = "analysis."
ANALYZE_TOP_KEYS = ("title", "x64")


def analysis_plan(
    setup: StudySetup, run_dir: Path, steps: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """``{network: steps}`` that ``analyze RUN_DIR`` analyses: the run's analysis steps
    with a saved checkpoint (or ``steps``).

    Raises:
        hessspec.studies.common.checkpoint.CheckpointError: a network without them, or a step not
        saved.
    """
    from hessspec.studies.common.checkpoint import CheckpointError, saved_checkpoints

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
        setup: from :func:`prepare_study` of the config to analyse with (the run's own
            config with other ``analysis.*`` settings, or the config that builds the network
            of ``params_file``).
        out_dir: the folder to write (results.json, spectra.npz, figures, report.md,
            config.toml; no checkpoints).
        run_dir: a run folder: every network's checkpoints at the run's analysis steps
            (``steps`` to choose some) are analysed; the loss curves are the run's.
        params_file: instead of ``run_dir``: an ``.npz`` or orbax folder of the parameters
            of the config's single network (:func:`hessspec.studies.common.checkpoint.load_params`),
            recorded as step 0.
        steps: analyse only these saved steps (default: every analysis step of the run).
        command, progress, check_memory, guard: as in :func:`run_study`.

    Returns:
        The results (as written to results.json); ``"source"`` names what was analysed.

    Raises:
        hessspec.studies.common.checkpoint.CheckpointError: missing checkpoints, a parameter file
        that does
            not fit the network.
        KeyboardInterrupt: after recording the interruption.
    """
    from hessspec.studies.batchnorm_spectrum.report import ResultsWriter
    from hessspec.studies.common.checkpoint import (
        checkpoint_path,
        load_checkpoint,
        load_params,
    )

    out_dir = Path(out_dir)
    config = setup.config
    show = Progress.of(progress)
    guard = guard if guard is not None else InterruptGuard()
    tracker = _Tracker()
    header = _header(setup, command)
    if run_dir is not None:
        run_dir = Path(run_dir)
        plan = analysis_plan(setup, run_dir, steps)
        header["source"] = {"run_dir": str(run_dir.absolute())}
        header["checkpoint_steps"] = sorted({s for v in plan.values() for s in v})
    else:
        (net,) = setup.networks
        plan = {net.name: [0]}
        header["source"] = {"params_file": str(Path(params_file).absolute())}
        header["checkpoint_steps"] = [0]
    writer = ResultsWriter(out_dir, header, lock=guard.lock)
    atomic_write_text(out_dir / "config.toml", to_toml(config))
    writer.add_files("config.toml")
    writer.write_json()
    analyses = _Analyses(setup, writer, show, guard, check_memory=check_memory, tracker=tracker)
    t_start = time.perf_counter()

    def record() -> None:
        writer.update(
            write=False,
            timing={
                "seconds_total": time.perf_counter() - t_start,
                "seconds_training": 0.0,
                "seconds_analysis": analyses.seconds,
            },
        )

    def on_stuck() -> str:
        record()
        writer.update(status="interrupted", stopped_during=tracker.phase)
        return f"what was measured is in {out_dir}/"

    guard.on_stuck = on_stuck
    session = {"started": _now(), "command": command, "resumed": False, "trained": {}}
    writer.results["sessions"] = [session]
    status, error = "failed", None
    try:
        for net in setup.networks:
            analyses.add_runs(net)
            for step in plan[net.name]:
                tracker.phase = "start-up"
                if run_dir is not None:
                    checkpoint = load_checkpoint(checkpoint_path(run_dir, step, net.name))
                    model = checkpoint.model()
                else:
                    model = net.model
                    eval_mode = "eval" in net.modes
                    load_params(params_file, model, need_statistics=net.batchnorm and eval_mode)
                analyses.analyse(net, step, model, net.modes)
            if run_dir is not None:
                last = load_checkpoint(run_dir, network=net.name)  # the latest state
                losses = last.loss_curve
                for run_id in analyses.run_ids[net.name].values():
                    writer.set_loss_curve(run_id, np.arange(1, losses.size + 1), losses)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        _finish(
            writer,
            out_dir,
            status=status,
            error=error,
            tracker=tracker,
            session=session,
            guard=guard,
            record=record,
            write=True,
        )
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
instead, with the same --set/--quick/--seed/--out/--overwrite: "input_bias" (LeCun, Kanter
& Solla: input statistics and the Hessian outlier, hessspec.studies.input_bias.study) and
"santurkar"
(landscape smoothness, hessspec.studies.santurkar.study); see experiments/README.md. The fields
listed
below are those of the BatchNorm spectrum study."""

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


def _common_flags(p: argparse.ArgumentParser) -> None:
    """Flags of both ``python -m hessspec.run`` and its ``analyze`` command."""
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: one log line per tenth of each training (and at least every "
        "minute) and one per analysis stage, with the elapsed time (also what a run whose "
        "output is not a terminal prints)",
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
hessspec.studies.common.checkpoint.save_params
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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (with RUN_DIR: analysis.*, title and x64 only)",
    )
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


def resolve_config(args: argparse.Namespace) -> Config:
    """The config an argument list describes: --config (or the defaults), then --quick,
    then --set in order, then --seed and --memory-limit; validated.

    Raises:
        ConfigError: unknown key, wrong type, invalid value, unreadable file.
    """
    config = load_config(args.config) if args.config else Config()
    if args.quick:
        config = apply_overrides(config, QUICK_OVERRIDES)
    config = apply_overrides(config, args.overrides)
    if getattr(args, "seed", None) is not None:
        config = dataclasses.replace(config, seed=args.seed)
    if getattr(args, "memory_limit", None) is not None:
        analysis = dataclasses.replace(config.analysis, memory_limit_gib=args.memory_limit)
        config = dataclasses.replace(config, analysis=analysis)
    return validate(config)


def resume_config(out_dir: Path, args: argparse.Namespace) -> Config:
    """The config of the run ``--resume`` continues (its folder's config.toml; the pending
    run of an interrupted ``--overwrite`` first).

    Raises:
        ConfigError: a config option was given with --resume, or the folder's config.toml
            is missing or invalid.
    """
    from hessspec.studies.common.runfolder import PENDING_NAME

    given = [
        flag
        for flag, on in (
            ("--config", args.config),
            ("--set", args.overrides),
            ("--quick", args.quick),
            ("--seed", args.seed is not None),
            ("--memory-limit", args.memory_limit is not None),
            ("--overwrite", args.overwrite),
        )
        if on
    ]
    if given:
        raise ConfigError(
            f"--resume continues a run with its own config ({out_dir}/config.toml); leave out "
            f"{', '.join(given)}, or start a new run without --resume."
        )
    folder = (
        out_dir / PENDING_NAME if (out_dir / PENDING_NAME / "results.json").is_file() else out_dir
    )
    path = folder / "config.toml"
    if not path.is_file():
        raise ConfigError(
            f"--resume: {out_dir} holds no run to continue ({path} is missing); start a new run "
            "without --resume."
        )
    return validate(load_config(path))


class CLIError(Exception):
    """A problem the CLI reports in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _error(message: str, who: str = "") -> int:
    """Print ``message`` as the CLI's error line (``who`` names the process in a
    multi-process run) and return exit status 2."""
    print(f"hessspec.run{who}: error: {message}", file=sys.stderr)
    return 2


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    from hessspec.studies.batchnorm_spectrum.report import findings

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
        ConfigError: the file cannot be read or is not valid TOML.
    """
    value = read_toml(path).get("experiment")
    return value if isinstance(value, str) else None


def _run_experiment(name: str, args: argparse.Namespace) -> int:
    """Run one of :data:`EXPERIMENTS` from its config file, with --quick, --set, --seed."""
    import importlib

    from hessspec.studies.common.runfolder import FolderLock

    module_name, class_name, run_name = EXPERIMENTS[name]
    module = importlib.import_module(module_name)
    if args.resume:
        return _error(
            f"--resume applies to the BatchNorm spectrum study only; the {name!r} study of "
            f"{args.config} starts over: run it again without --resume."
        )
    try:
        config = getattr(module, class_name).from_dict(read_toml(args.config))
        if args.quick:
            config = module.override_config(config, module.QUICK_OVERRIDES)
        config = module.override_config(config, args.overrides)
        if args.seed is not None:
            if args.seed < 0:
                raise ConfigError(f"--seed must be a non-negative integer, got {args.seed}.")
            config = module.override_config(config, [f"seed={args.seed}"])
    except ConfigError as e:
        return _error(f"{args.config}: {e}")
    if args.show_config:
        print(config.to_toml(), end="")
        return 0
    out_dir = Path(args.out).expanduser()
    if not args.overwrite:
        message = RunFolder.refusal(out_dir)
        if message:
            return _error(message)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir, command=shlex.join(sys.argv)):
        try:
            getattr(module, run_name)(
                config, out_dir, progress=not args.no_progress, overwrite=args.overwrite
            )
        except (FileExistsError, ConfigError) as e:
            return _error(str(e))
        except KeyboardInterrupt:
            print(f"hessspec.run: interrupted; what was written is in {out_dir}/", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"hessspec: {name} study complete; output in {out_dir}/ (report: report.md)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 bad input, a busy or
    unusable output folder, or not enough memory, 130 interrupted).

    SIGINT and SIGTERM interrupt every phase within a second
    (:class:`hessspec.studies.common.interrupts.InterruptGuard`); every error ends in one line on
    stderr
    (``--debug`` adds the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    analyze = bool(argv) and argv[0] == "analyze"
    parser = build_analyze_parser() if analyze else build_parser()
    args = parser.parse_args(argv[1:] if analyze else argv)
    with InterruptGuard() as guard:
        try:
            if not args.no_compilation_cache:
                from hessspec.compilation_cache import enable_compilation_cache

                try:
                    enable_compilation_cache()
                except ValueError as e:
                    raise CLIError(f"{e}") from None
            if analyze:
                return analyze_cli(args, argv, guard)
            dist = distributed_arguments(parser, args)
            experiment = _experiment_of(args.config) if args.config else None
            if experiment in EXPERIMENTS:
                if dist is not None or args.memory_limit is not None:
                    return _error(
                        f"--coordinator/--num-processes/--process-id and --memory-limit apply "
                        f"to the BatchNorm spectrum study only; the {experiment!r} study of "
                        f"{args.config} runs in one process: leave them out."
                    )
                return _run_experiment(experiment, args)
            out_dir = Path(args.out).expanduser()
            if args.resume:
                if dist is not None:
                    return _error(
                        "--resume runs in one process; continue a multi-process run without "
                        "--coordinator/--num-processes/--process-id."
                    )
                config = resume_config(out_dir, args)
            else:
                config = resolve_config(args)
            if args.show_config:
                print(to_toml(config), end="")
                return 0
            return run_cli_study(config, args, argv, dist, guard=guard)
        except KeyboardInterrupt:
            print(
                "hessspec.run: interrupted before the run started; nothing was written",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except (ConfigError, SetupError, OutputFolderError, CLIError) as e:
            if args.debug:
                traceback.print_exc()
            return _error(str(e)) if getattr(e, "status", 2) == 2 else _fail(str(e))
        except Exception as e:
            if args.debug:
                traceback.print_exc()
            from hessspec.studies.common.checkpoint import CheckpointError

            if isinstance(e, CheckpointError):
                return _error(str(e))
            return _fail(
                f"{type(e).__name__}: {e} (an unexpected error: run again with --debug for "
                "the traceback, and please report it)"
            )


def _fail(message: str, who: str = "") -> int:
    """Print a failure line and return exit status 1."""
    print(f"hessspec.run{who}: error: {message}", file=sys.stderr)
    return 1


def _failure_line(error: BaseException, out_dir: Path, network: str | None) -> str:
    """The one line that says why a run failed and what to do."""
    from hessspec.nn.train import TrainingDiverged
    from hessspec.studies.common.runfolder import OutputWriteError

    if isinstance(error, TrainingDiverged):
        who = f"training {network}" if network else "training"
        return (
            f"{who} diverged: the mini-batch loss became {error.value} at step {error.step}; "
            f"lower train.learning_rate (e.g. --set train.learning_rate=...) or the batch size "
            f"noise, and start again. What was measured before is in {out_dir}/ (status failed)."
        )
    if isinstance(error, OutputWriteError):
        return f"{error.strerror}. The folder keeps the last consistent state ({out_dir}/)."
    return (
        f"{type(error).__name__}: {error}. What was measured is in {out_dir}/ (status "
        "failed); run again with --debug for the traceback."
    )


def run_cli_study(
    config: Config,
    args: argparse.Namespace,
    argv: Sequence[str],
    dist: tuple[str, int, int] | None = None,
    *,
    guard: InterruptGuard | None = None,
) -> int:
    """The BatchNorm spectrum study of a resolved config, as the CLI runs it.

    In order: join the multi-process job (``dist``, before any other JAX work); enable x64;
    refuse an output folder that cannot take the run (:meth:`RunFolder.refusal`); load the
    data and build the networks (:func:`prepare_study`); the memory preflight
    (:func:`memory_preflight`: one line, and a refusal when the analysis cannot fit); lock
    and prepare the output folder (:meth:`RunFolder.open`); train and analyse
    (:func:`run_study`); swap the new run in (:meth:`RunFolder.commit`). Everything up to
    the folder's preparation stops with exit status 2 before any training.

    In a multi-process run every process runs this with the same config; the output folder
    is checked and written by process 0 only, and each refusal is decided together
    (:func:`_agree`), so every process stops at the same point or none does.

    Args:
        config: validated config.
        args: the parsed command line (``out``, ``overwrite``, ``resume``, ``no_progress``).
        argv: the command line, recorded in results.json.
        dist: ``(coordinator, num_processes, process_id)`` from
            :func:`distributed_arguments`, or None for one process.
        guard: the process's interrupt guard (a passive one by default).

    Returns:
        The exit status.
    """
    rank, count = (dist[2], dist[1]) if dist else (0, 1)
    multi = count > 1
    main_process = rank == 0
    who = f" (process {rank} of {count})" if multi else ""
    guard = guard if guard is not None else InterruptGuard()
    resume = bool(getattr(args, "resume", False))
    if dist is not None:
        from hessspec.curvature import distributed

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
    message = (
        RunFolder.refusal(out_dir, overwrite=args.overwrite, resume=resume)
        if main_process
        else None
    )
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

    command = shlex.join(["python", "-m", "hessspec.run", *argv])
    folder, message = None, None
    if main_process:
        try:
            folder = RunFolder.open(
                out_dir, overwrite=args.overwrite, resume=resume, command=command
            )
        except OutputFolderError as e:
            message = str(e)
    message = _agree(message, multi)
    if message:
        if folder is not None:
            folder.close()
        return _error(message, who)

    progress = Progress("lines" if args.no_progress else "auto") if main_process else False
    try:
        if main_process:
            sizes = ", ".join(f"{n.name} ({n.num_params} params)" for n in setup.networks)
            where = folder.work_dir if folder.replaces else out_dir
            print(
                f"hessspec: {config.data.name}, {sizes}; {config.train.steps} steps, "
                f"checkpoints {setup.checkpoints}; output in {where}/"
                + (" (continuing the run there)" if folder.resumed else "")
                + (f", swapped into {out_dir}/ when complete" if folder.replaces else "")
                + (f"; {count} processes" if multi else ""),
                file=sys.stderr,
            )
            for path in folder.removed_temporaries:
                print(f"hessspec: removed {path} (left by a killed run)", file=sys.stderr)
            if multi:
                print(
                    "hessspec: a multi-process run saves no checkpoints (no --resume, no "
                    "analyze of this run); results.json, spectra.npz and the report as usual",
                    file=sys.stderr,
                )
        # A budget (given, or agreed by all processes) makes the solvers' own checks decide
        # alike everywhere; otherwise each call compares with the memory free when it starts.
        budget = config.analysis.memory_limit_gib or multi
        work_dir = folder.work_dir if folder is not None else out_dir
        network = None
        try:
            results = run_study(
                setup,
                work_dir,
                command=command,
                progress=progress,
                write=main_process,
                check_memory=float(preflight.available) if budget else True,
                resume=resume,
                guard=guard,
            )
        except KeyboardInterrupt:
            if main_process:
                where = (
                    f"what was measured is in {work_dir}/; continue with --resume --out {out_dir}"
                )
                if folder.replaces:
                    where += f" (the previous run in {out_dir}/ is unchanged)"
            else:
                where = "process 0 wrote the output"
            print(f"hessspec.run{who}: interrupted; {where}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:
            from hessspec.nn.train import TrainingDiverged

            if getattr(args, "debug", False):
                traceback.print_exc()
            if isinstance(e, TrainingDiverged):
                network = _diverged_network(work_dir, setup)
            line = _failure_line(e, work_dir, network)
            if folder is not None and folder.replaces:
                line += f" The previous run in {out_dir}/ is unchanged."
            return _fail(line, who)
        if folder is not None and folder.replaces:
            with guard.critical():
                folder.commit()
    finally:
        if folder is not None:
            folder.close()
    if main_process:
        print(_summary(results, out_dir))
    else:
        print(
            f"hessspec: process {rank} of {count}: study {results.get('status')} in "
            f"{results['timing']['seconds_total']:.1f} s; process 0 wrote the output to "
            f"{out_dir}/"
        )
    return 0


def _diverged_network(work_dir: Path, setup: StudySetup) -> str | None:
    """The network whose training was running when the run failed (from its record)."""
    import json

    try:
        sessions = json.loads((work_dir / "results.json").read_text())["sessions"]
        trained = sessions[-1]["trained"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    names = [n.name for n in setup.networks if n.name in trained]
    return names[-1] if names else None


def analyze_cli(args: argparse.Namespace, argv: Sequence[str], guard: InterruptGuard) -> int:
    """``python -m hessspec.run analyze``: resolve what to analyse and with which config,
    check it, lock both folders, then :func:`analyze_run`."""
    from hessspec.studies.common.runfolder import FolderLock

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
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else None
    if run_dir is not None:
        if args.config:
            raise CLIError(
                "analyze RUN_DIR uses the run's own config (RUN_DIR/config.toml); leave out "
                "--config and change analysis settings with --set analysis.FIELD=VALUE."
            )
        if not (run_dir / "config.toml").is_file():
            raise CLIError(
                f"{run_dir} is not a run folder: it has no config.toml (a run of "
                "python -m hessspec.run writes one, with checkpoints/)."
            )
        bad = [
            o
            for o in args.overrides
            if not o.split("=", 1)[0].strip().startswith(ANALYZE_KEYS_PREFIX)
            and o.split("=", 1)[0].strip() not in ANALYZE_TOP_KEYS
        ]
        if bad:
            raise CLIError(
                f"analyze RUN_DIR changes analysis settings only (analysis.*, title); "
                f"{', '.join(bad)} would change what was trained: start a new run for that."
            )
        config = load_config(run_dir / "config.toml")
    else:
        if steps is not None:
            raise CLIError("--steps applies to analyze RUN_DIR only.")
        config = load_config(args.config) if args.config else Config()
    if args.quick:
        config = apply_overrides(config, QUICK_OVERRIDES)
    config = apply_overrides(config, args.overrides)
    if args.memory_limit is not None:
        analysis = dataclasses.replace(config.analysis, memory_limit_gib=args.memory_limit)
        config = dataclasses.replace(config, analysis=analysis)
    config = validate(config)
    if args.params and len(config.model.batchnorm) != 1:
        raise CLIError(
            f"--params holds one network; the config trains {len(config.model.batchnorm)} "
            "(model.batchnorm = [false, true]): set --set model.batchnorm=[false] or "
            "--set model.batchnorm=[true] to say which."
        )
    if args.params and not Path(args.params).expanduser().exists():
        raise CLIError(f"--params: {args.params} does not exist.")
    if config.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    out_dir = Path(args.out).expanduser()
    if run_dir is not None and out_dir.absolute() == run_dir.absolute():
        raise CLIError("analyze writes a new folder: --out must not be RUN_DIR.")
    message = RunFolder.refusal(out_dir, overwrite=args.overwrite)
    if message:
        raise CLIError(message)
    setup = prepare_study(config)
    if run_dir is not None:
        analysis_plan(setup, run_dir, steps)  # refuses missing checkpoints before writing
    preflight = memory_preflight(setup)
    print(preflight.line(), file=sys.stderr)
    if not preflight.fits:
        raise CLIError(preflight.refusal())
    command = shlex.join(["python", "-m", "hessspec.run", *argv])
    source_lock = FolderLock(run_dir, shared=True) if run_dir is not None else None
    if source_lock is not None:
        source_lock.acquire()
    try:
        with RunFolder.open(out_dir, overwrite=args.overwrite, command=command) as folder:
            print(
                f"hessspec: analysing {run_dir or args.params} with the new settings; output in "
                f"{folder.work_dir}/",
                file=sys.stderr,
            )
            try:
                results = analyze_run(
                    setup,
                    folder.work_dir,
                    run_dir=run_dir,
                    params_file=Path(args.params).expanduser() if args.params else None,
                    steps=steps,
                    command=command,
                    progress=Progress("lines" if args.no_progress else "auto"),
                    check_memory=float(preflight.available)
                    if config.analysis.memory_limit_gib
                    else True,
                    guard=guard,
                )
            except KeyboardInterrupt:
                print(
                    f"hessspec.run: interrupted; what was measured is in {folder.work_dir}/",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            except Exception as e:
                from hessspec.studies.common.checkpoint import CheckpointError

                if args.debug:
                    traceback.print_exc()
                if isinstance(e, CheckpointError):
                    return _error(str(e))
                return _fail(_failure_line(e, folder.work_dir, None))
            if folder.replaces:
                with guard.critical():
                    folder.commit()
    finally:
        if source_lock is not None:
            source_lock.release()
    print(_summary(results, out_dir))
    return 0


def _agree(message: str | None, multi_process: bool) -> str | None:
    """A refusal decided by all processes together: each passes its own message (None: no
    objection); in a multi-process run every process learns whether any objected (a
    collective: all must call it at the same point) and all return a message if one did.
    With one process, ``message`` is returned as is (no JAX work)."""
    if not multi_process:
        return message
    from hessspec.curvature import distributed

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
