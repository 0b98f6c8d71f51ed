"""What a resumed or interrupted run must reproduce of a record: everything but clocks,
dates, the command line and the resume history."""

from __future__ import annotations

from typing import Any

CLOCKS = frozenset(
    {
        "train_seconds",
        "train_wall_seconds",
        "wall_seconds",
        "seconds_per_step",
        "started_at",
        "finished_at",
        "resumes",
        "command",
        "environment",
        "time_budget_seconds",
        "time_budget_sources",
        "time_budget_reached",
    }
)


def comparable(value: Any, digits: int | None = 5) -> Any:
    """``value`` without the :data:`CLOCKS` keys, floats rounded to ``digits``."""
    if isinstance(value, dict):
        return {k: comparable(v, digits) for k, v in value.items() if k not in CLOCKS}
    if isinstance(value, list):
        return [comparable(v, digits) for v in value]
    if isinstance(value, float) and digits is not None:
        return round(value, digits)
    return value
