"""What the configs of the single-file studies (input bias, Santurkar) share: reading,
writing and checking a config through :mod:`hessspec.studies.common.config`, under the
study's ``experiment`` name (the key the CLI dispatches on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hessspec.studies.common.config import (
    config_from_mapping,
    config_to_mapping,
    config_to_toml,
)

__all__ = ["ExperimentConfig", "as_config"]


class ExperimentConfig:
    """Mixin of a frozen config dataclass: :meth:`from_dict`, :meth:`to_dict`,
    :meth:`to_toml`. The class sets ``EXPERIMENT`` (a plain class attribute, not a
    field): the value of the ``experiment`` key of its TOML files."""

    EXPERIMENT = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a nested mapping (parsed TOML); see :func:`config_from_mapping`.

        Args:
            values: nested mapping; absent keys keep their defaults, a top-level
                ``experiment`` key must name this study.

        Returns:
            The validated config.

        Raises:
            ConfigError (a ValueError): unknown key, wrong type or invalid value, naming
                the key.
        """
        return config_from_mapping(cls, values, experiment=cls.EXPERIMENT)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts and lists, with ``experiment`` first."""
        return {"experiment": self.EXPERIMENT, **config_to_mapping(self)}

    def to_toml(self) -> str:
        """The config as TOML text that :meth:`from_dict` of ``tomllib.loads`` reads back."""
        return config_to_toml(self, self.EXPERIMENT)


def as_config(config: Any, cls: type):
    """``config`` as an instance of the config class ``cls``: a mapping (parsed TOML) is
    read with ``cls.from_dict``.

    Raises:
        ConfigError: the mapping is not a valid config (the message names the key).
        TypeError: ``config`` is neither a ``cls`` nor a mapping.
    """
    if isinstance(config, Mapping):
        config = cls.from_dict(config)
    if not isinstance(config, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"config must be {article} {cls.__name__}, got {type(config).__name__}.")
    return config
