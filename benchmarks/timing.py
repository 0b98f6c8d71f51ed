"""Side-by-side timing: variants interleaved in one process, median of per-rep ratios."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Timing:
    seconds: list[float]  # one per repetition
    ratios: list[float]  # seconds / baseline seconds of the same repetition

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_range(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)


def side_by_side(
    variants: dict[str, Callable[[], Any]],
    baseline: str,
    reps: int,
    warmup: int = 1,
    min_seconds: float = 0.05,
) -> dict[str, Timing]:
    """Time every variant ``reps`` times, interleaved (rotating order), after warm-up.

    Fast variants are looped within a repetition until it lasts ``min_seconds``.
    """
    names = list(variants)
    inner: dict[str, int] = {}
    for name in names:
        for _ in range(warmup):
            variants[name]()
        start = time.perf_counter()
        variants[name]()
        once = time.perf_counter() - start
        inner[name] = max(1, int(min_seconds / max(once, 1e-9)))
    # the same loop count for every variant keeps the comparison symmetric
    loops = max(inner.values()) if max(inner.values()) <= 3 * min(inner.values()) else None
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            n = loops or inner[name]
            gc.collect()
            start = time.perf_counter()
            for _ in range(n):
                variants[name]()
            seconds[name].append((time.perf_counter() - start) / n)
    base = seconds[baseline]
    return {
        name: Timing(values, [v / b for v, b in zip(values, base)])
        for name, values in seconds.items()
    }
