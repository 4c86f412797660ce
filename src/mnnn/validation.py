"""Argument checks shared by the public constructors: one clear ``ValueError`` naming the
argument, what it must be and what came (bools are not ints, NaN and infinity are not numbers)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (NumPy integers accepted, bools and fractions refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
               open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite float in the interval (``open_*``: that end excluded)."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if open_low else value >= low) and (value < high if open_high else value <= high))
    if not ok:
        interval = (f"{'(' if open_low or math.isinf(low) else '['}{low:g}, "
                    f"{high:g}{')' if open_high or math.isinf(high) else ']'}")
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
