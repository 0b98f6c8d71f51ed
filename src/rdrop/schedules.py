"""Schedules for alpha: callables ``step -> alpha`` that :class:`rdrop.RDrop` accepts."""

from __future__ import annotations

from dataclasses import dataclass

from rdrop._checks import check_alpha, check_int

__all__ = ["LinearWarmup", "linear_warmup"]


@dataclass(frozen=True)
class LinearWarmup:
    """``alpha * min(1, (step + 1) / warmup_steps)``: a linear ramp, then constant.

    Example:
        >>> schedule = LinearWarmup(alpha=4.0, warmup_steps=4)
        >>> [schedule(step) for step in range(6)]
        [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    """

    alpha: float
    warmup_steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        check_int("warmup_steps", self.warmup_steps, 1)

    def __call__(self, step: int) -> float:
        return self.alpha * min(1.0, (step + 1) / self.warmup_steps)


def linear_warmup(alpha: float, warmup_steps: int) -> LinearWarmup:
    """Shorthand for :class:`LinearWarmup` (``RDrop(model, alpha=linear_warmup(5.0, 1000))``)."""
    return LinearWarmup(alpha, warmup_steps)
