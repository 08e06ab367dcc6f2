"""Validators for the ``__post_init__`` of a study's config dataclasses, and the model dtype
names a config may give. Each check raises :class:`~hessspec.studies.common.config.ConfigError`
with one line naming the key, what it must be and what it was."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from hessspec.studies.common.config import ConfigError

__all__ = ["DTYPES", "check", "check_dtype", "check_names", "dtype_of"]

#: The dtype names a config accepts, and the JAX dtypes they name.
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def check(ok: bool, key: str, must: str, value: Any) -> None:
    """Raise ``ConfigError("config key '<key>' must <must>, got <value>.")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key {key!r} must {must}, got {value!r}.")


def check_dtype(key: str, value: str) -> None:
    """``value`` names one of :data:`DTYPES`."""
    check(value in DTYPES, key, "be 'float32' or 'float64'", value)


def check_names(key: str, values: Sequence[str], allowed: Sequence[str], what: str) -> None:
    """``values`` is a non-empty list of distinct names out of ``allowed``.

    Args:
        key: the config key (items are named ``key[i]``).
        values: the names given.
        allowed: the names accepted.
        what: what one name is, for the messages (``"mode"``, ``"variant"``).
    """
    check(len(values) >= 1, key, f"name at least one {what}", values)
    for i, value in enumerate(values):
        check(value in allowed, f"{key}[{i}]", f"be one of {list(allowed)}", value)
    check(len(set(values)) == len(values), key, f"not repeat a {what}", list(values))


def dtype_of(name: str):
    """The JAX dtype a config's dtype name stands for (``"float32"`` -> ``jnp.float32``)."""
    return DTYPES[name]
