"""The cheaper R-Drop variants of a converged task: how much of full R-Drop's gain each
keeps, at what cost per step, and when it overtakes the baseline.

A variant is an R-Drop row with options (``branch_at``, ``every_k_steps``,
``stop_gradient``, ...); its reference is plain R-Drop at the same alpha, over the seeds
that the variant, plain R-Drop and the baseline all have.
"""

from __future__ import annotations

import math

from rdrop_lab.report._convergence import (
    _table,
    _usable,
    crossing_text,
    step_cost_text,
)
from rdrop_lab.report._grouping import BOOTSTRAP_SEED, CONFIDENCE, N_BOOTSTRAP, MethodRuns, TaskRuns
from rdrop_lab.report._records import pair_of
from rdrop_lab.stats import (
    GAIN_KEPT_MIN_SEEDS,
    PairedDifference,
    format_interval,
    format_signed,
    gain_kept,
    paired_difference,
)


def _full_rdrop_for(task: TaskRuns, variant: MethodRuns) -> MethodRuns | None:
    return next((g for g in task.groups if g.is_plain_rdrop and g.alpha == variant.alpha), None)


def _kept_cell(
    variant: list[float],
    reference: list[float],
    baseline: list[float],
    full_gain: PairedDifference,
    task: TaskRuns,
) -> str:
    """The gain-kept cell: the ratio with its bootstrap interval where there are enough
    seeds, marked when full R-Drop's own gain is not significant; none without a gain."""
    if not (full_gain.mean > 0 if task.higher_is_better else full_gain.mean < 0):
        return "— (full R-Drop did not gain)"
    kept, low, high = gain_kept(
        variant, reference, baseline, CONFIDENCE, N_BOOTSTRAP, BOOTSTRAP_SEED
    )
    n = len(baseline)
    interval = f" (n={n}: no interval)" if math.isnan(low) else f" [{low:.0%}, {high:.0%}]"
    if n >= 2 and not full_gain.t_excludes_zero():
        interval += "; full gain not significant"
    return f"{kept:.0%}{interval}"


def cheaper_variant_lines(task: TaskRuns, digits: int) -> list[str]:
    """The gain-kept table of a converged task's R-Drop variants (empty without any).

    Gain kept = ``mean(variant - baseline) / mean(full - baseline)`` of the converged test
    score (:func:`rdrop_lab.stats.gain_kept`), left out where full R-Drop did not gain;
    step cost = the counted seeds' mean seconds per step over the baseline's, crossing time as
    in the time-to-quality tables. Every cell of a row counts the same seeds: those where
    all three runs are usable (not diverged, a finite validation score).
    """
    base = task.baseline
    variants = [g for g in task.groups if g.method == "rdrop" and g.variant]
    if base is None or not variants:
        return []
    metric = task.primary
    rows, compared = [], 0
    for group in [g for g in task.groups if g.is_plain_rdrop] + variants:
        full = _full_rdrop_for(task, group)
        if full is None:
            continue
        trio = (group, full, base)
        scores = [g.values("converged", "test", metric) for g in trio]
        usable = [{pair_of(r) for r in _usable(g, task)} for g in trio]
        pairs = sorted(set.intersection(*(set(s) for s in scores), *usable))
        if not pairs:
            continue
        variant, reference, baseline = ([s[p] for p in pairs] for s in scores)
        delta = sum(v - b for v, b in zip(variant, baseline, strict=True)) / len(pairs)
        full_gain = paired_difference(reference, baseline, CONFIDENCE, N_BOOTSTRAP, BOOTSTRAP_SEED)
        full_cell = format_signed(full_gain.mean, digits)
        if full_gain.n >= 2:
            full_cell += " " + format_interval(full_gain.t_low, full_gain.t_high, digits)
        if group is full:
            kept_cell = "100% (reference)"
        else:
            compared += 1
            kept_cell = _kept_cell(variant, reference, baseline, full_gain, task)
        runs = [[r for r in g.records if pair_of(r) in pairs] for g in (group, base)]
        rows.append(
            [
                group.label,
                str(len(pairs)),
                format_signed(delta, digits),
                full_cell,
                kept_cell,
                step_cost_text(*runs),
                crossing_text(task, *runs) or "never",
            ]
        )
    if not compared:
        return []
    header = [
        "R-Drop row",
        "n",
        f"converged Δ test {metric} vs baseline",
        f"full R-Drop's Δ on these seeds [{CONFIDENCE:.0%} t-interval]",
        f"gain kept [{CONFIDENCE:.0%} bootstrap]",
        "s/step × baseline",
        "crossing time",
    ]
    return [
        "",
        "Cheaper variants against full R-Drop at the same α, over the seeds all three "
        "(variant, full R-Drop, baseline) have. Gain kept = mean(variant − baseline) / "
        "mean(full − baseline) of the converged test score, with a percentile bootstrap over "
        f"seeds ({N_BOOTSTRAP} resamples, seed {BOOTSTRAP_SEED}; from "
        f"{GAIN_KEPT_MIN_SEEDS} seeds on), next to the denominator, full R-Drop's own gain "
        "on the same seeds: the ratio is wide, and marked, when that gain is not "
        "significant. Step cost from the runs' own training seconds (the "
        "side-by-side benchmark is `python -m benchmarks.cheap_variants`).",
        "",
        _table(header, rows),
    ]
