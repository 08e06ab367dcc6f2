"""The one config mechanism of every study: frozen dataclasses, TOML in, overrides on top.

A study's config is a frozen dataclass whose fields are bool, int, float, str, tuples of
those, or nested dataclasses of the same kind (TOML tables). :func:`read_toml` reads a file,
:func:`config_from_mapping` checks every key and every value's type against the
dataclasses, :func:`apply_overrides` changes single fields from ``"a.b=value"`` strings (the
CLI's ``--set``), :func:`config_to_toml` writes a config back as TOML that loads to the same
config, :func:`describe_fields` lists the fields for ``--help``. Every problem raises
:class:`ConfigError` with one line naming the key, what was expected and what was given.

TOML is read by :mod:`tomllib` and written by tomli-w. The type checks are hand-written:
pydantic's ``TypeAdapter`` on these stdlib dataclasses is strict only for dataclass instances
(not tables), and lax mode takes ``"5"`` for an integer and ignores unknown keys; strict
adapters per field type work, but turning their errors into these messages takes as many
lines as the checks themselves. Unknown keys (with the closest valid one), tables, the
``experiment`` key and ``--set`` parsing have no library equivalent with these messages.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

__all__ = [
    "MAX_SEED",
    "ConfigError",
    "apply_overrides",
    "config_from_mapping",
    "config_to_mapping",
    "config_to_toml",
    "describe_fields",
    "field",
    "read_toml",
]

#: Seeds are non-negative and fit in 32 bits (numpy, scikit-learn and JAX all take them).
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or invalid value."""


def field(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help})


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


def _toml_literal(value: Any) -> str:
    """``value`` as a TOML literal on one line (``"text"``, ``0.5``, ``[64, 64]``), for
    ``--help``: tomli-w writes each scalar, lists stay inline."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")


def config_to_toml(config: Any, experiment: str) -> str:
    """A config dataclass as TOML text (written by tomli-w); reading it back gives the same
    config.

    Args:
        config: a frozen config dataclass.
        experiment: the value of the leading ``experiment = ...`` line.

    Returns:
        TOML text: ``experiment``, the top-level keys, then one table per nested section.
    """
    return tomli_w.dumps({"experiment": experiment, **config_to_mapping(config)})


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


def _flat_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _flat_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _replace_path(config: Any, parts: list[str], raw: str, key: str) -> Any:
    """``config`` with the field at the dotted ``parts`` set from the ``--set`` text ``raw``."""
    hints = _hints(type(config))
    name = parts[0]
    tp = hints.get(name)
    nested = isinstance(tp, type) and dataclasses.is_dataclass(tp)
    if tp is None or nested != (len(parts) > 1):
        raise _unknown_key(key, _flat_keys(type(config)))
    if nested:
        value = _replace_path(getattr(config, name), parts[1:], raw, key)
    else:
        value = _coerce(_parse_value(raw, tp), tp, key)
    return dataclasses.replace(config, **{name: value})


def apply_overrides(config: Any, overrides: Iterable[str], *, example: str = "seed=1") -> Any:
    """``config`` with single fields changed by ``"key=value"`` strings, in order.

    Keys are dotted paths through the nested dataclasses (``"train.steps"``, ``"seed"``);
    values are TOML literals (``200``, ``0.1``, ``true``, ``"text"``, ``[64, 64]``); strings
    may be left unquoted, lists may be written ``a,b``. Each replaced dataclass runs its
    ``__post_init__`` checks, if it has any.

    Args:
        config: a frozen config dataclass.
        overrides: the ``key=value`` strings.
        example: an override shown when one lacks its ``=``.

    Raises:
        ConfigError: no ``=``, an unknown key (with the closest valid one), or a value of
            the wrong type; the message names the key.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. {example}).")
        key, raw = (s.strip() for s in item.split("=", 1))
        config = _replace_path(config, key.split("."), raw, key)
    return config


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` of every field of the config class ``cls`` (nested
    tables flattened to dotted keys), in declaration order."""
    rows = []
    default = cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows += [(f"{f.name}.{k}", *rest) for k, *rest in describe_fields(type(value))]
            continue
        kind = _type_name(hints[f.name]).removeprefix("a ").removeprefix("an ")
        rows.append((f.name, kind, _toml_literal(value), f.metadata.get("help", "")))
    return rows
