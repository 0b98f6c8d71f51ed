"""Time to quality: what each method would have selected at any training-time budget.

A converging run (``patience`` set) records every validation evaluation with the training
seconds spent by then, and a test score for every checkpoint that was the best so far on
validation. So for any budget ``T`` the model a method would have selected by ``T`` is
known after the fact: the last best-so-far checkpoint evaluated at or before ``T`` (a run
that stopped earlier keeps its final choice). Selection reads validation only.

For two methods paired by seed:

* the **best-so-far curve** of a method is the mean over its runs of
  ``v_r(t) = max {validation of run r at evaluations with seconds <= t}`` (``min`` for a
  lower-is-better metric), defined once every run has evaluated;
* the **crossing time** is the earliest ``t`` from which the treatment's curve stays
  strictly better than the control's at every evaluation time up to the end
  (``None``: never);
* the **paired difference at a budget** compares the test scores of the models each
  method would have selected by then.

Example:
    >>> evals = [
    ...     {"train_seconds": 1.0, "validation": {"acc": 0.5}, "test": {"acc": 0.4}},
    ...     {"train_seconds": 2.0, "validation": {"acc": 0.7}, "test": {"acc": 0.6}},
    ...     {"train_seconds": 3.0, "validation": {"acc": 0.6}},
    ... ]
    >>> run = {"evals": evals}
    >>> [best_so_far(run, t, "acc") for t in (0.5, 1.0, 2.5, 9.0)]
    [None, 0.5, 0.7, 0.7]
    >>> selected_test(run, 2.9, "acc")
    0.6
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]

__all__ = [
    "Crossing",
    "best_so_far",
    "crossing_time",
    "curve_times",
    "mean_best_so_far",
    "selected_eval",
    "selected_test",
    "time_to_best",
]


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def selected_eval(
    record: Record, budget: float, metric: str, higher: bool = True
) -> dict[str, Any] | None:
    """The evaluation a run would have selected with ``budget`` training seconds: the
    best validation ``metric`` among the evaluations at or before ``budget`` (a tie keeps
    the earlier one). ``None`` when the run had not evaluated by then.

    Args:
        record: a run record (its ``evals``, each with ``train_seconds`` and
            ``validation``).
        budget: training seconds on the record's clock.
        metric: the validation metric selection uses.
        higher: whether a larger value is better.

    Returns:
        The selected evaluation (a dict of the record), or ``None``.
    """
    chosen: dict[str, Any] | None = None
    for entry in record.get("evals", []):
        if entry["train_seconds"] > budget:
            break
        value = entry["validation"].get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if chosen is None or _better(value, chosen["validation"][metric], higher):
            chosen = entry
    return chosen


def best_so_far(record: Record, budget: float, metric: str, higher: bool = True) -> float | None:
    """The best validation ``metric`` a run reached within ``budget`` seconds."""
    chosen = selected_eval(record, budget, metric, higher)
    return None if chosen is None else float(chosen["validation"][metric])


def selected_test(
    record: Record, budget: float, metric: str, higher: bool = True, *, test_metric: str = ""
) -> float | None:
    """The test score (``test_metric``, default ``metric``) of the model selected on
    validation within ``budget`` seconds; ``None`` when there is none yet.

    Raises:
        KeyError: if the selected evaluation has no test score (a record not made with the
            convergence protocol).
    """
    chosen = selected_eval(record, budget, metric, higher)
    if chosen is None:
        return None
    return float(chosen["test"][test_metric or metric])


def time_to_best(record: Record, metric: str, higher: bool = True) -> float:
    """Training seconds at the run's best validation evaluation (its converged choice)."""
    chosen = selected_eval(record, math.inf, metric, higher)
    if chosen is None:
        raise ValueError(f"run {record.get('run_id')} has no evaluation")
    return float(chosen["train_seconds"])


def curve_times(*groups: Sequence[Record]) -> list[float]:
    """Every evaluation time of the given runs, sorted (where the curves can change)."""
    return sorted({e["train_seconds"] for runs in groups for r in runs for e in r["evals"]})


def mean_best_so_far(
    runs: Sequence[Record], times: Sequence[float], metric: str, higher: bool = True
) -> list[tuple[float, float, float] | None]:
    """Mean, minimum and maximum over ``runs`` of the best-so-far validation ``metric`` at
    each of ``times``; ``None`` where some run has not evaluated yet."""
    out: list[tuple[float, float, float] | None] = []
    for t in times:
        values = [best_so_far(r, t, metric, higher) for r in runs]
        if not values or any(v is None for v in values):
            out.append(None)
            continue
        present = [float(v) for v in values if v is not None]
        out.append((statistics.fmean(present), min(present), max(present)))
    return out


@dataclass(frozen=True)
class Crossing:
    """When the treatment's best-so-far curve passes the control's for good.

    Attributes:
        seconds: the crossing time in training seconds (``None``: never).
        control_epochs: the same time in epochs of the control method (its median
            seconds per epoch), ``None`` when never.
    """

    seconds: float | None
    control_epochs: float | None


def crossing_time(
    treatment: Sequence[Record],
    control: Sequence[Record],
    metric: str,
    higher: bool = True,
    control_seconds_per_epoch: float | None = None,
) -> Crossing:
    """The earliest evaluation time from which the treatment's mean best-so-far curve is
    strictly better than the control's at every later evaluation time of either method.

    Args:
        treatment: the runs of the method under test (e.g. R-Drop).
        control: the runs of the reference method (e.g. the baseline).
        metric: the validation metric.
        higher: whether a larger value is better.
        control_seconds_per_epoch: to express the crossing in control epochs.

    Returns:
        A :class:`Crossing`; ``seconds`` is ``None`` when the treatment is not ahead at the
        end.
    """
    times = curve_times(treatment, control)
    ours = mean_best_so_far(treatment, times, metric, higher)
    theirs = mean_best_so_far(control, times, metric, higher)
    crossing: float | None = None
    for t, a, b in zip(times, ours, theirs):
        ahead = a is not None and b is not None and _better(a[0], b[0], higher)
        if ahead and crossing is None:
            crossing = t
        elif not ahead:
            crossing = None
    epochs = None
    if crossing is not None and control_seconds_per_epoch:
        epochs = crossing / control_seconds_per_epoch
    return Crossing(crossing, epochs)
