"""Configuration of a BatchNorm spectrum study: frozen dataclasses, TOML in, overrides on top.

A :class:`Config` has four sections, :class:`DataConfig` (``[data]``),
:class:`ModelConfig` (``[model]``), :class:`TrainConfig` (``[train]``: the training loop's
options, :class:`hessspec.nn.train.TrainConfig`, and sharpness tracking) and
:class:`AnalysisConfig` (``[analysis]``), plus a few top-level fields (``seed``, ``x64``,
``title``). Every field has a default; a TOML file names only what it changes::

    seed = 0
    [train]
    steps = 2000
    learning_rate = 0.01
    [analysis]
    bn_modes = ["train", "population"]

:func:`load_config` reads such a file, :func:`apply_overrides` changes single fields from
``"section.field=value"`` strings (the CLI's ``--set``), and both check every key and every
type against the dataclasses: an unknown key or a wrong type raises :class:`ConfigError`
naming the key, what was expected and what was given, before anything runs.
:func:`validate` checks the values themselves (choices, ranges, checkpoints within the
training) and :func:`to_toml` writes a config back as TOML that loads to the same config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hessspec.nn.objective import BN_MODES
from hessspec.nn.train import TrainConfig as LoopConfig
from hessspec.studies.common.config import (
    MAX_SEED,
    ConfigError,
    config_from_mapping,
    config_to_mapping,
    config_to_toml,
    read_toml,
)
from hessspec.studies.common.config import apply_overrides as common_apply_overrides
from hessspec.studies.common.config import describe_fields as common_describe_fields
from hessspec.studies.common.config import field as _f

__all__ = [
    "EXPERIMENT",
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoopConfig",
    "ModelConfig",
    "QUICK_OVERRIDES",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "checkpoint_steps",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "load_config",
    "read_toml",
    "to_toml",
    "validate",
]

#: Value of the optional top-level ``experiment`` key of this study's TOML files (other
#: values name other studies, which :mod:`hessspec.cli.registry` lists).
EXPERIMENT = "batchnorm_spectrum"
DATASETS = ("digits", "mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet", "linear")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")
PREPROCESSING = ("unit", "center", "standardize", "raw")
TRACE_METHODS = ("hutch++", "hutchinson")
DTYPES = ("float32", "float64")
BASIS_DTYPES = ("", "float32", "float64")
BASIS_MEMORIES = ("device", "host")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``[data]``: which dataset, where it lives and how it is split and scaled."""

    name: str = _f(
        "digits",
        "dataset: 'digits' (8x8 digits bundled with scikit-learn), 'mnist' (IDX files) or "
        "'cifar10' (python pickle batches); mnist and cifar10 read data.path",
    )
    path: str = _f(
        "",
        "folder holding the MNIST/CIFAR-10 files (see hessspec.nn.data); empty: "
        "$HESSSPEC_DATA/<name> or ./data/<name>; must be empty for digits",
    )
    preprocessing: str = _f(
        "unit",
        "digits only: 'unit' (x/16 in [0,1]), 'center' (minus the per-pixel train mean), "
        "'standardize' (per-pixel z-score) or 'raw' (0..16)",
    )
    standardize: bool = _f(
        False, "mnist/cifar10 only: standardize with train statistics (else [0,1] pixels)"
    )
    test_fraction: float = _f(0.2, "digits only: fraction of each class held out for testing")
    split_seed: int = _f(0, "digits only: seed of the stratified train/test split")
    train_size: int = _f(0, "use a fixed stratified subset of this many training examples; 0: all")
    test_size: int = _f(0, "use a fixed stratified subset of this many test examples; 0: all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the architecture, trained once per entry of ``batchnorm``."""

    name: str = _f("mlp", "architecture: 'mlp', 'cnn', 'resnet' or 'linear'")
    batchnorm: tuple[bool, ...] = _f(
        (False, True),
        "one network is trained per entry: false = without BatchNorm, true = with "
        "(BN after every hidden linear/conv layer, before the nonlinearity)",
    )
    input_shape: tuple[int, ...] = _f(
        (),
        "shape of one input the model is built for, e.g. [32, 32, 3]; empty: taken from the "
        "data. When set, data of another shape is refused before training",
    )
    hidden: tuple[int, ...] = _f((64, 64), "mlp: widths of the hidden layers")
    activation: str = _f("relu", "mlp: relu, tanh, gelu, softplus, sigmoid or identity")
    channels: tuple[int, ...] = _f((16, 32), "cnn: channels of each conv stage")
    widths: tuple[int, ...] = _f((16, 32, 64), "resnet: channels of each stage")
    blocks_per_stage: int = _f(1, "resnet: residual blocks per stage")
    bn_momentum: float = _f(0.9, "momentum of the BatchNorm running averages")
    dtype: str = _f("float32", "parameter and HVP dtype: float32 or float64 (needs x64)")
    loss: str = _f("cross_entropy", "'cross_entropy' or 'mse' (squared error on one-hot)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """``[train]``: the training loop's options (:class:`hessspec.nn.train.TrainConfig`) and
    the sharpness tracked during training."""

    track_sharpness_every: int = _f(
        0,
        "every this many steps, lambda_max of the training objective (BatchNorm in train "
        "mode, the analysis set in batches of train.batch_size; warm-started Lanczos), "
        "recorded as runs[].sharpness; 0: off",
    )


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """``[analysis]``: what is measured at every checkpoint, and on which examples."""

    bn_modes: tuple[str, ...] = _f(
        ("train",),
        "BatchNorm mode(s) each BN network is analysed in, one run per mode: 'train' (batch "
        "statistics, the function SGD descends), 'eval' (running averages), 'population' "
        "(statistics recomputed over the training set, then frozen)",
    )
    size: int = _f(
        512, "examples in the fixed analysis set (a seeded subset of the training set); 0: all"
    )
    batch_size: int = _f(
        0,
        "BN train mode: the analysis set is cut into batches of this many examples, each "
        "normalised with its own statistics (this defines the analysed function); 0: "
        "train.batch_size. Also the batch size of the train/test metrics",
    )
    chunk_size: int = _f(
        0,
        "examples per Hessian-vector-product chunk, to bound memory on big models; 0: the "
        "whole analysis set at once (rounded to a multiple of analysis.batch_size)",
    )
    top_k: int = _f(0, "number of top eigenpairs; 0: 2K (K = number of classes)")
    lanczos_steps: int = _f(0, "Lanczos steps for the top eigenpairs; 0: the library default")
    tol: float = _f(
        0.0, "relative residual tolerance of the top eigenpairs; 0: the library default"
    )
    slq_probes: int = _f(10, "SLQ density: number of random probe vectors")
    slq_steps: int = _f(90, "SLQ density: Lanczos steps per probe")
    slq_probe_batch_size: int = _f(
        1, "kept so that older configs load; no effect (the probes run one after another)"
    )
    trace_matvecs: int = _f(300, "Hessian-vector products spent on the trace estimate")
    matvec_batch_size: int = _f(
        1, "kept so that older configs load; no effect (the solvers run one matvec at a time)"
    )
    trace_method: str = _f("hutch++", "trace estimator: 'hutch++' or 'hutchinson'")
    num_minibatches: int = _f(
        8, "mini-batch gradients whose top-eigenspace energy is averaged (mean and std)"
    )
    minibatch_size: int = _f(0, "examples per mini-batch gradient; 0: train.batch_size")
    include_weight_decay: bool = _f(
        True,
        "add the L2 term of train.weight_decay to the analysed objective (Hessian + wd I, "
        "gradient + wd w, for every parameter, as optax.add_decayed_weights does for sgd); "
        "adam's decay is decoupled (AdamW), no term of the loss, and never added",
    )
    per_layer: bool = _f(
        False,
        "per-layer spectra at every checkpoint: one block per layer (its kernel and bias with "
        "the scale and shift of the BatchNorm after it), each block's top eigenvalues, SLQ "
        "density and trace, and the Jensen-Shannon distances between the block densities. "
        "Off by default (the default run's 40 s budget: it costs about 10 s more there, "
        "mostly compiling each block's programs); on in experiments/digits_*.toml",
    )
    per_layer_top_k: int = _f(3, "per-layer spectra: top eigenpairs per block")
    per_layer_slq_probes: int = _f(4, "per-layer spectra: SLQ probe vectors per block")
    per_layer_slq_steps: int = _f(40, "per-layer spectra: Lanczos steps per SLQ probe")
    per_layer_trace_matvecs: int = _f(
        60, "per-layer spectra: Hessian-vector products of each block's Hutch++ trace"
    )
    save_eigenvectors: bool = _f(
        True, "store the top eigenvectors in spectra.npz (k x num_params per checkpoint)"
    )
    basis_dtype: str = _f(
        "",
        "dtype of the Lanczos/SLQ Krylov bases (num_steps x num_params numbers each, the "
        "largest arrays of the analysis): 'float32' halves them (eigenvalues then carry "
        "relative errors of ~1e-7), 'float64' needs x64 = true; empty: the solver dtype "
        "(float64 with x64)",
    )
    basis_memory: str = _f(
        "device",
        "where the Krylov bases live during the analysis: 'device', or 'host' (host "
        "memory, streamed block by block to the accelerator each step: device memory then "
        "holds one eighth of each basis; on CPU both are the same RAM)",
    )
    memory_limit_gib: float = _f(
        0.0,
        "memory budget in GiB (2**30 bytes) for the analysis: the run is refused before "
        "training when the estimate of its largest solver call exceeds it, and the solvers "
        "check against it; 0: the memory available (free device memory, or host RAM on "
        "CPU). Same as --memory-limit",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole study: data, model(s), training, analysis, and the global seed."""

    seed: int = _f(0, "seed of the initialization, the batch order and every random probe")
    x64: bool = _f(
        True,
        "enable jax_enable_x64 in this process so Lanczos runs in float64 (the model keeps "
        "model.dtype: mixed precision)",
    )
    title: str = _f("BatchNorm and the Hessian spectrum", "title of report.md")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    analysis: AnalysisConfig = dataclasses.field(default_factory=AnalysisConfig)


#: Overrides applied by ``--quick`` (before any ``--set``): a cheaper density and trace.
QUICK_OVERRIDES: tuple[str, ...] = (
    "analysis.slq_probes=4",
    "analysis.slq_steps=40",
    "analysis.trace_matvecs=60",
    "analysis.num_minibatches=4",
)


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a (partial) nested mapping, checking keys and types
    (:func:`hessspec.studies.common.config.config_from_mapping`).

    Args:
        values: ``{"seed": 1, "train": {"steps": 100}, ...}``; absent keys keep defaults.
            An ``experiment`` key is accepted when it is :data:`EXPERIMENT`.

    Raises:
        ConfigError: another ``experiment``, an unknown key, a wrong type, or a section that
            is not a table.
    """
    experiment = values.get("experiment", EXPERIMENT) if isinstance(values, Mapping) else None
    if experiment != EXPERIMENT:
        raise ConfigError(
            f"config key 'experiment' is {experiment!r}: that is not this study "
            f"({EXPERIMENT!r}); python -m hessspec.run --config FILE runs each study "
            "its file names."
        )
    return config_from_mapping(Config, values, experiment=EXPERIMENT)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON/TOML ready)."""
    return config_to_mapping(config)


def load_config(path: str | Path) -> Config:
    """Read a TOML file into a :class:`Config` (absent keys keep their defaults).

    Raises:
        ConfigError: the file cannot be read (:func:`read_toml`), or has an unknown key or
            a value of the wrong type (the message names the file and the key).
    """
    path = Path(path)
    values = read_toml(path)
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Change single fields from ``"section.field=value"`` (or ``"field=value"`` for the
    top-level fields) strings, in order: :func:`hessspec.studies.common.config.apply_overrides`.

    Raises:
        ConfigError: no ``=``, an unknown key, or a value of the wrong type.
    """
    return common_apply_overrides(config, overrides, example="train.steps=200")


def build_config(
    path: str | Path | None = None,
    *,
    quick: bool = False,
    overrides: Iterable[str] = (),
    seed: int | None = None,
    memory_limit_gib: float | None = None,
) -> Config:
    """The config of a run, built the way the command line builds it: the TOML file at
    ``path`` (or the defaults), then :data:`QUICK_OVERRIDES` when ``quick``, then
    ``overrides`` in order, then ``seed`` and ``memory_limit_gib`` when given; validated.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, invalid value.
    """
    config = load_config(path) if path else Config()
    if quick:
        config = apply_overrides(config, QUICK_OVERRIDES)
    config = apply_overrides(config, overrides)
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    if memory_limit_gib is not None:
        analysis = dataclasses.replace(config.analysis, memory_limit_gib=memory_limit_gib)
        config = dataclasses.replace(config, analysis=analysis)
    return validate(config)


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """The sorted, distinct steps at which the network is analysed.

    ``train.checkpoints`` when given; else ``train.num_checkpoints`` steps: 0, then
    ``steps / 2**j`` doubling up to ``steps`` (``[0, 125, 250, 500, 1000]`` for 5 of 1000).
    """
    if train.checkpoints:
        return sorted(set(int(s) for s in train.checkpoints))
    n = int(train.num_checkpoints)
    if n <= 1 or train.steps == 0:
        return [0]
    later = [int(round(train.steps / 2 ** (n - 2 - j))) for j in range(n - 1)]
    return sorted({0, *later})


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {list(choices)}, got {value!r}.")


def _check_positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key {key!r} must be {bound}, got {value!r}.")


def _validate_data(config: Config) -> None:
    """``seed`` and ``[data]``."""
    d = config.data
    for key, seed in (("seed", config.seed), ("data.split_seed", d.split_seed)):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"config key {key!r} must lie in [0, {MAX_SEED}], got {seed}.")
    _check_choice(d.name, DATASETS, "data.name")
    _check_choice(d.preprocessing, PREPROCESSING, "data.preprocessing")
    if d.name == "digits" and d.path:
        raise ConfigError("config key 'data.path' must be empty for digits (bundled data).")
    if not 0 < d.test_fraction < 1:
        raise ConfigError(
            f"config key 'data.test_fraction' must lie in (0, 1), got {d.test_fraction}."
        )
    _check_positive(d.train_size, "data.train_size", allow_zero=True)
    _check_positive(d.test_size, "data.test_size", allow_zero=True)


def _validate_model(config: Config) -> None:
    """``[model]``."""
    m = config.model
    _check_choice(m.name, MODELS, "model.name")
    _check_choice(m.dtype, DTYPES, "model.dtype")
    _check_choice(m.loss, LOSSES, "model.loss")
    if not m.batchnorm:
        raise ConfigError("config key 'model.batchnorm' needs at least one entry (false, true).")
    if len(set(m.batchnorm)) != len(m.batchnorm):
        raise ConfigError(f"config key 'model.batchnorm' repeats an entry: {list(m.batchnorm)}.")
    if m.name == "linear" and any(m.batchnorm):
        raise ConfigError("model 'linear' has no BatchNorm: set model.batchnorm = [false].")
    if m.dtype == "float64" and not config.x64:
        raise ConfigError("model.dtype = 'float64' needs x64 = true.")
    for key, seq in (
        ("model.input_shape", m.input_shape),
        ("model.hidden", m.hidden),
        ("model.channels", m.channels),
        ("model.widths", m.widths),
    ):
        if any(v < 1 for v in seq):
            raise ConfigError(f"config key {key!r} must hold positive widths, got {list(seq)}.")
    _check_positive(m.blocks_per_stage, "model.blocks_per_stage")
    if not 0 <= m.bn_momentum < 1:
        raise ConfigError(
            f"config key 'model.bn_momentum' must lie in [0, 1), got {m.bn_momentum}."
        )


def _validate_train(t: TrainConfig) -> None:
    """``[train]``."""
    _check_choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    _check_positive(t.learning_rate, "train.learning_rate")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"config key 'train.momentum' must lie in [0, 1), got {t.momentum}.")
    for key, v in (("train.adam_b1", t.adam_b1), ("train.adam_b2", t.adam_b2)):
        if not 0 <= v < 1:
            raise ConfigError(f"config key {key!r} must lie in [0, 1), got {v}.")
    _check_positive(t.weight_decay, "train.weight_decay", allow_zero=True)
    _check_positive(t.batch_size, "train.batch_size")
    _check_positive(t.steps, "train.steps", allow_zero=True)
    _check_positive(t.num_checkpoints, "train.num_checkpoints")
    _check_positive(t.track_sharpness_every, "train.track_sharpness_every", allow_zero=True)
    bad = [s for s in t.checkpoints if not 0 <= s <= t.steps]
    if bad:
        raise ConfigError(
            f"config key 'train.checkpoints' must hold steps in [0, train.steps = {t.steps}], "
            f"got {bad}."
        )


def _validate_analysis(config: Config) -> None:
    """``[analysis]`` (its top_k against the number of classes is checked with the data,
    :func:`hessspec.studies.batchnorm_spectrum.setup.prepare_study`)."""
    a = config.analysis
    if not a.bn_modes:
        raise ConfigError("config key 'analysis.bn_modes' needs at least one mode.")
    for i, mode in enumerate(a.bn_modes):
        _check_choice(mode, BN_MODES, f"analysis.bn_modes[{i}]")
    if len(set(a.bn_modes)) != len(a.bn_modes):
        raise ConfigError(f"config key 'analysis.bn_modes' repeats a mode: {list(a.bn_modes)}.")
    _check_choice(a.trace_method, TRACE_METHODS, "analysis.trace_method")
    for key in (
        "size",
        "batch_size",
        "chunk_size",
        "top_k",
        "lanczos_steps",
        "minibatch_size",
        "slq_probe_batch_size",
        "matvec_batch_size",
    ):
        _check_positive(getattr(a, key), f"analysis.{key}", allow_zero=True)
    _check_positive(a.tol, "analysis.tol", allow_zero=True)
    _check_choice(a.basis_dtype, BASIS_DTYPES, "analysis.basis_dtype")
    if a.basis_dtype == "float64" and not config.x64:
        raise ConfigError(
            "analysis.basis_dtype = 'float64' needs x64 = true (without x64 the bases are "
            "float32); set x64 = true or analysis.basis_dtype = 'float32'."
        )
    _check_choice(a.basis_memory, BASIS_MEMORIES, "analysis.basis_memory")
    _check_positive(a.memory_limit_gib, "analysis.memory_limit_gib", allow_zero=True)
    for key in (
        "slq_probes",
        "slq_steps",
        "trace_matvecs",
        "num_minibatches",
        "per_layer_top_k",
        "per_layer_slq_probes",
        "per_layer_slq_steps",
        "per_layer_trace_matvecs",
    ):
        _check_positive(getattr(a, key), f"analysis.{key}")


def validate(config: Config) -> Config:
    """Check the values of a config (choices, ranges, checkpoints); return it unchanged.

    Raises:
        ConfigError: the first problem found, naming the key.
    """
    _validate_data(config)
    _validate_model(config)
    _validate_train(config.train)
    _validate_analysis(config)
    return config


def describe_fields() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every config field, in declaration order."""
    return common_describe_fields(Config)


def to_toml(config: Config) -> str:
    """The whole config as TOML text; ``load_config`` of it gives back ``config``."""
    return config_to_toml(config, EXPERIMENT)
