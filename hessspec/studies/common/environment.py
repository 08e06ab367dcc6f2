"""What a study's results.json records about where it ran."""

from __future__ import annotations

import datetime
import platform
from typing import Any

__all__ = ["environment"]


def environment() -> dict[str, Any]:
    """Versions (jax, flax, optax, numpy, python), the devices, whether x64 is on, and the
    UTC time, as plain JSON types."""
    import flax
    import jax
    import numpy as np
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
