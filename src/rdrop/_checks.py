"""Argument checks shared by the public functions (one rule, one error message each)."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a non-int (``bool`` included),
    ``ValueError`` below ``minimum``; ``meaning`` is appended to the range error.

    Example:
        >>> check_int("num_passes", 3, 2)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{meaning}, got {value}")
    return value


def check_label_smoothing(value: Any) -> float:
    """``value`` as a float in ``[0, 1)``.

    Example:
        >>> check_label_smoothing(0.1)
        0.1
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return float(value)
