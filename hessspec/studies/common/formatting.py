"""Numbers in reports: one formatter for every study, so a value reads the same in every
report.md and a test can find a results.json number in the report by formatting it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["fmt", "md_table", "pct"]


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a report: ``digits`` significant digits, scientific notation outside
    [1e-3, 1e4); integers whole; booleans ``yes``/``no``; None and NaN ``n/a``; infinities
    ``inf``/``-inf``."""
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage: ``pct(0.1234) == "12.34 %"``."""
    return f"{100.0 * float(x):.{digits}f} %"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A Markdown table; numbers through :func:`fmt`, ``|`` inside cells escaped."""

    def cell(c: Any) -> str:
        return (c if isinstance(c, str) else fmt(c, digits)).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
