"""Schedules for alpha: callables ``step -> alpha`` that :class:`rdrop.RDrop` accepts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rdrop._checks import check_alpha, check_int, check_scheduled_alpha

__all__ = ["ConsistencySchedule", "LinearWarmup", "linear_warmup"]


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
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, 1))

    def __call__(self, step: int) -> float:
        return self.alpha * min(1.0, (step + 1) / self.warmup_steps)


def linear_warmup(alpha: float, warmup_steps: int) -> LinearWarmup:
    """Shorthand for :class:`LinearWarmup` (``RDrop(model, alpha=linear_warmup(5.0, 1000))``)."""
    return LinearWarmup(alpha, warmup_steps)


@dataclass(frozen=True)
class ConsistencySchedule:
    """When R-Drop's consistency term is used, and with which alpha, at a training step.

    The one rule of :class:`rdrop.RDrop` (steps are its training calls) and of
    :class:`rdrop.integrations.hf.RDropTrainerMixin` (steps are optimizer steps):
    step ``s`` uses the consistency term when ``s % every_k_steps == 0`` (steps
    ``0, k, 2k, ...``; the other steps are a plain single pass), with weight
    ``alpha(s)`` for a schedule or ``alpha`` for a number.

    Example:
        >>> schedule = ConsistencySchedule(linear_warmup(2.0, 2), every_k_steps=2)
        >>> [(schedule.applies_at(s), schedule.alpha_at(s)) for s in range(3)]
        [(True, 1.0), (False, 2.0), (True, 2.0)]

    Args:
        alpha: a weight ``>= 0`` or a callable ``step -> alpha`` (checked at each step).
        every_k_steps: ``k >= 1``.
    """

    alpha: float | Callable[[int], float]
    every_k_steps: int = 1

    def __post_init__(self) -> None:
        if not callable(self.alpha):
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        every_k_steps = check_int("every_k_steps", self.every_k_steps, 1)
        object.__setattr__(self, "every_k_steps", every_k_steps)

    def alpha_at(self, step: int) -> float:
        """Alpha at ``step`` (a schedule's value is checked: finite and ``>= 0``)."""
        if callable(self.alpha):
            return check_scheduled_alpha(self.alpha(step), step)
        return float(self.alpha)

    def applies_at(self, step: int) -> bool:
        """Whether the consistency term is used at ``step``."""
        return step % self.every_k_steps == 0
