"""Configuration of a BatchNorm spectrum study: frozen dataclasses, TOML in, overrides on top.

A :class:`Config` has four sections, :class:`DataConfig` (``[data]``),
:class:`ModelConfig` (``[model]``), :class:`TrainConfig` (``[train]``) and
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
import json
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EXPERIMENT",
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "QUICK_OVERRIDES",
    "TrainConfig",
    "apply_overrides",
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
#: values name other studies, which :mod:`hessspec.run` dispatches to).
EXPERIMENT = "batchnorm_spectrum"
DATASETS = ("digits", "mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet", "linear")
BN_MODES = ("train", "eval", "population")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")
PREPROCESSING = ("unit", "center", "standardize", "raw")
TRACE_METHODS = ("hutch++", "hutchinson")
DTYPES = ("float32", "float64")
BASIS_DTYPES = ("", "float32", "float64")
BASIS_MEMORIES = ("device", "host")
#: Seeds are non-negative and fit in 32 bits (numpy, scikit-learn and JAX all take them).
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or invalid value."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help})


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
        "folder holding the MNIST/CIFAR-10 files (see hessspec.data); empty: "
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
class TrainConfig:
    """``[train]``: the optimizer, the training length and the analysis checkpoints."""

    optimizer: str = _f("sgd", "'sgd' (with momentum) or 'adam'")
    learning_rate: float = _f(0.003, "learning rate (constant)")
    momentum: float = _f(0.9, "sgd: heavy-ball momentum (0 for plain SGD)")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    adam_b1: float = _f(0.9, "adam: beta1")
    adam_b2: float = _f(0.999, "adam: beta2")
    weight_decay: float = _f(
        0.0, "weight decay (L2 on the gradient for sgd, decoupled AdamW for adam)"
    )
    batch_size: int = _f(64, "training mini-batch size")
    steps: int = _f(500, "number of optimizer steps")
    checkpoints: tuple[int, ...] = _f(
        (),
        "steps at which to analyse the Hessian (0 = at initialization); empty: "
        "train.num_checkpoints steps, 0 then doubling up to train.steps",
    )
    num_checkpoints: int = _f(5, "number of automatic checkpoints when train.checkpoints is empty")


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


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_classes() -> dict[str, type]:
    return {
        name: hint
        for name, hint in _hints(Config).items()
        if isinstance(hint, type) and dataclasses.is_dataclass(hint)
    }


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_name(tp: Any) -> str:
    """``"an integer"``, ``"a list of numbers"``, ``"a list of 2 integers"``, ``"a table"``."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _type_name(args[0]).split(" ", 1)[1]
        if Ellipsis in typing.get_args(tp):
            return f"a list of {item}s"
        return f"a list of {len(args)} {item}s"
    if dataclasses.is_dataclass(tp):
        return "a table"
    name = _TYPE_NAMES.get(tp, str(tp))
    return ("an " if name[0] in "aeiou" else "a ") + name


def _describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the field type ``tp``: lists become tuples, ints floats,
    tables nested config dataclasses."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"config key {key!r} must be {_type_name(tp)}, got {_describe_value(value)}."
            )
        if Ellipsis in args:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"config key {key!r} must be a list of {len(args)} values, got {list(value)!r}."
            )
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config key {key!r} must be a table ([{key}] in TOML), got "
                f"{_describe_value(value)}."
            )
        return config_from_mapping(tp, value, prefix=f"{key}.")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {tp!r} for {key!r}")
    if not ok:
        raise ConfigError(
            f"config key {key!r} must be {_type_name(tp)}, got {_describe_value(value)}."
        )
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be finite, got {value!r}.")
    return value


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint} Valid keys here: {', '.join(known)}.")


def config_from_mapping(
    cls: type, values: Mapping[str, Any], prefix: str = "", experiment: str | None = None
):
    """Build the frozen config dataclass ``cls`` from a (partial) nested mapping.

    The one mechanism behind every study's config (:class:`Config` here, the input-bias
    and Santurkar studies' own classes): every key is checked against the fields of
    ``cls`` (nested dataclasses are tables) and every value against the field's type;
    absent keys keep their defaults. A top-level ``experiment`` key is accepted when it
    equals ``experiment`` (the CLI's dispatch key).

    Args:
        cls: a frozen dataclass whose fields are bool, int, float, str, tuples of those, or
            nested dataclasses of the same kind.
        values: the mapping, e.g. parsed TOML.
        prefix: prefix of the keys in error messages (``"linear."``).
        experiment: the accepted value of a top-level ``experiment`` key.

    Returns:
        An instance of ``cls`` (its ``__post_init__``, if any, checks the values).

    Raises:
        ConfigError (a ValueError): an unknown key, a value of the wrong type, or an invalid
            value; the message names the key.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping (TOML table), got {type(values).__name__}.")
    hints = _hints(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k == "experiment" and not prefix and experiment is not None:
            if v != experiment:
                raise ConfigError(
                    f"config key 'experiment' is {v!r}, but this is the {experiment!r} study."
                )
            continue
        if k not in hints:
            raise _unknown_key(key, hints)
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def config_to_mapping(config: Any) -> dict[str, Any]:
    """A config dataclass as plain nested dicts and lists (JSON/TOML ready)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_mapping(v)
        elif isinstance(v, tuple | list):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for these characters
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def config_to_toml(config: Any, experiment: str) -> str:
    """A config dataclass as TOML text; reading it back gives the same config.

    Args:
        config: a frozen config dataclass.
        experiment: the value of the leading ``experiment = ...`` line.

    Returns:
        TOML text: ``experiment``, the top-level keys, then one table per nested section.
    """
    values = config_to_mapping(config)
    lines = [f"experiment = {_toml_value(experiment)}"]
    tables = []
    for k, v in values.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a (partial) nested mapping, checking keys and types.

    Args:
        values: ``{"seed": 1, "train": {"steps": 100}, ...}``; absent keys keep defaults.
            An ``experiment`` key is accepted when it is :data:`EXPERIMENT`.

    Raises:
        ConfigError: unknown key, wrong type, or a section that is not a table.
    """
    sections = _section_classes()
    hints = _hints(Config)
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k == "experiment":
            if v != EXPERIMENT:
                raise ConfigError(
                    f"config key 'experiment' is {v!r}: that is not this study "
                    f"({EXPERIMENT!r}); python -m hessspec.run --config FILE runs each study "
                    "its file names."
                )
        elif k in sections:
            if not isinstance(v, Mapping):
                raise ConfigError(
                    f"config key {k!r} must be a table ([{k}] in TOML), got {_describe_value(v)}."
                )
            kwargs[k] = config_from_mapping(sections[k], v, prefix=f"{k}.")
        elif k in hints:
            kwargs[k] = _coerce(v, hints[k], k)
        else:
            raise _unknown_key(k, hints)
    return Config(**kwargs)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON/TOML ready)."""
    return config_to_mapping(config)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed contents of a TOML config file: the one reader of every study's config.

    Raises:
        ConfigError: the file is missing, is a folder, cannot be read, is not UTF-8 text or
            is not valid TOML (the message names the file and the problem).
    """
    path = Path(path).expanduser()
    name = repr(str(path))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {name} is a folder; pass a TOML file, e.g. experiments/digits_mlp.toml."
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {name} cannot be read: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); "
            "save it as UTF-8."
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {name} is not valid TOML: {e}.") from None


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


def _parse_value(raw: str, tp: Any) -> Any:
    """A ``--set`` value: a TOML literal if it parses as one, else the raw string; for list
    fields a bare comma-separated list is accepted too (``train,population``)."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if tp is str and not isinstance(value, str):
        return raw
    if typing.get_origin(tp) is tuple and not isinstance(value, list):
        item = typing.get_args(tp)[0]
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return [_parse_value(p, item) for p in parts]
    return value


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Change single fields from ``"section.field=value"`` (or ``"field=value"`` for the
    top-level fields) strings, in order.

    Values are TOML literals (``200``, ``0.1``, ``true``, ``"text"``, ``[64, 64]``);
    strings may be left unquoted, lists may be written ``a,b``.

    Raises:
        ConfigError: no ``=``, an unknown key, or a value of the wrong type.
    """
    sections = _section_classes()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like section.field=value (e.g. train.steps=200)."
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in sections:
            section, name = parts
            cls = sections[section]
            hints = _hints(cls)
            if name not in hints:
                raise _unknown_key(key, hints)
            value = _coerce(_parse_value(raw, hints[name]), hints[name], key)
            current = getattr(config, section)
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(current, **{name: value})}
            )
        elif len(parts) == 1 and parts[0] in _hints(Config) and parts[0] not in sections:
            tp = _hints(Config)[key]
            config = dataclasses.replace(config, **{key: _coerce(_parse_value(raw, tp), tp, key)})
        else:
            known = [f"{s}.{n}" for s, c in sections.items() for n in _hints(c)] + [
                n for n in _hints(Config) if n not in sections
            ]
            raise _unknown_key(key, known)
    return config


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


def validate(config: Config) -> Config:
    """Check the values of a config (choices, ranges, checkpoints); return it unchanged.

    Raises:
        ConfigError: the first problem found, naming the key.
    """
    d, m, t, a = config.data, config.model, config.train, config.analysis
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
    bad = [s for s in t.checkpoints if not 0 <= s <= t.steps]
    if bad:
        raise ConfigError(
            f"config key 'train.checkpoints' must hold steps in [0, train.steps = {t.steps}], "
            f"got {bad}."
        )

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
    for key in ("slq_probes", "slq_steps", "trace_matvecs", "num_minibatches"):
        _check_positive(getattr(a, key), f"analysis.{key}")
    return config


def describe_fields() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every config field, in declaration order."""
    rows = []
    default = Config()
    for f in dataclasses.fields(Config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            hints = _hints(type(value))
            for g in dataclasses.fields(value):
                rows.append(
                    (
                        f"{f.name}.{g.name}",
                        _type_name(hints[g.name]).removeprefix("a ").removeprefix("an "),
                        _toml_value(getattr(value, g.name)),
                        g.metadata.get("help", ""),
                    )
                )
        else:
            rows.append(
                (
                    f.name,
                    _type_name(_hints(Config)[f.name]).removeprefix("a ").removeprefix("an "),
                    _toml_value(value),
                    f.metadata.get("help", ""),
                )
            )
    return rows


def to_toml(config: Config) -> str:
    """The whole config as TOML text; ``load_config`` of it gives back ``config``."""
    return config_to_toml(config, EXPERIMENT)
