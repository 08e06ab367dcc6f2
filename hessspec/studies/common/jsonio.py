"""JSON for run folders: one encoder for every study (strict JSON: NaN and infinities
become null, arrays become lists)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["dumps", "jsonable"]


def jsonable(x: Any) -> Any:
    """``x`` in plain JSON types: mappings with string keys, lists, bool, int, float (finite;
    NaN and infinities become None), str, None. NumPy and JAX arrays and scalars convert.

    Raises:
        TypeError: a value with no JSON form (the message names its type).
    """
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "__array__") and not isinstance(x, str | bytes):
        x = np.asarray(x)
        return jsonable(x.tolist()) if x.ndim else jsonable(x.item())
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def dumps(x: Any) -> str:
    """Strict, indented JSON of :func:`jsonable` ``(x)``, ending in a newline."""
    return json.dumps(jsonable(x), indent=2, allow_nan=False) + "\n"
