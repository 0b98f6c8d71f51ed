"""Runs grouped into tables: one :class:`TaskRuns` per task (and few-shot size), one
:class:`MethodRuns` per row, the paired differences between rows and the verdict."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rdrop_lab.config import METHOD_FIELDS
from rdrop_lab.report._records import (
    Record,
    Variant,
    alpha_of,
    clock_description,
    config_of,
    data_seed_of,
    finite_or_none,
    format_alpha,
    method_label,
    method_of,
    order_key,
    pair_of,
    seconds_per_step_of,
    section_of,
    seed_of,
    selected_value,
    variant_of,
)
from rdrop_lab.stats import PairedDifference, mean_std, paired_difference

VERDICT_RDROP_BETTER = "R-Drop better (interval excludes 0)"
VERDICT_BASELINE_BETTER = "baseline better (interval excludes 0)"
VERDICT_NO_DIFFERENCE = "no significant difference at this scale"

CONFIDENCE = 0.95
N_BOOTSTRAP = 10000
BOOTSTRAP_SEED = 0

# Config fields that are expected to vary between the runs of one task.
_GROUPING_FIELDS = {
    "task",
    "method",
    "alpha",
    "seed",
    "paper_alpha",
    "data_seed",
    "shots_per_class",
    *METHOD_FIELDS,
}


# --------------------------------------------------------------------------- aggregation


@dataclass
class MethodRuns:
    """All seeds (and data draws) of one method (one row of a task's table)."""

    method: str
    alpha: float | None
    records: list[Record]
    variant: Variant = ()

    @property
    def label(self) -> str:
        return method_label(self.method, self.alpha, self.variant)

    @property
    def is_plain_rdrop(self) -> bool:
        return self.method == "rdrop" and not self.variant

    @property
    def seeds(self) -> list[int]:
        return sorted({seed_of(r) for r in self.records})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [pair_of(r) for r in self.records]

    def values(self, budget: str, split: str, metric: str) -> dict[tuple[int, int], float]:
        """Selected scores by (seed, data seed)."""
        out = {}
        for record in self.records:
            value = selected_value(record, budget, split, metric)
            if value is not None:
                out[pair_of(record)] = value
        return out

    def stat(self, budget: str, split: str, metric: str) -> tuple[float, float, int]:
        values = list(self.values(budget, split, metric).values())
        if not values:
            return math.nan, math.nan, 0
        mean, std = mean_std(values)
        return mean, std, len(values)

    def seconds_per_step(self) -> float:
        values = [v for r in self.records if (v := seconds_per_step_of(r)) is not None]
        return mean_std(values)[0] if values else math.nan


@dataclass
class TaskRuns:
    """One task (one few-shot size): its metadata, its method rows and the comparisons."""

    name: str
    info: dict[str, Any]
    groups: list[MethodRuns]
    notes: list[str] = field(default_factory=list)
    shots: int | None = None
    #: Where the runs come from (a results folder), for tables that list several.
    source: str | None = None

    @property
    def title(self) -> str:
        title = str(self.info.get("display_name") or self.name)
        if self.shots is not None:
            title += f", {self.shots} examples per class"
        return title

    @property
    def stem(self) -> str:
        """File-name stem of the task's plots."""
        return self.name if self.shots is None else f"{self.name}_{self.shots}shot"

    @property
    def data_seeds(self) -> list[int]:
        return sorted({data_seed_of(r) for r in self.records})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted({p for g in self.groups for p in g.pairs})

    @property
    def shows_draws(self) -> bool:
        """Whether runs differ by data draw (then tables name the draw)."""
        return self.data_seeds != [0] and bool(self.data_seeds)

    def group(self, method: str, alpha: float | None = None) -> MethodRuns | None:
        """The option-free row of ``method`` at ``alpha``."""
        for group in self.groups:
            if group.method != method or group.variant:
                continue
            if group.alpha == alpha or (
                group.alpha is not None and alpha is not None and math.isclose(group.alpha, alpha)
            ):
                return group
        return None

    @property
    def primary(self) -> str:
        return str(self.info["primary_metric"])

    @property
    def metrics(self) -> list[str]:
        metrics = self.info.get("metrics") or [self.primary]
        return [str(m) for m in metrics]

    @property
    def higher_is_better(self) -> bool:
        return bool(self.info.get("higher_is_better", True))

    @property
    def records(self) -> list[Record]:
        return [r for g in self.groups for r in g.records]

    @property
    def baseline(self) -> MethodRuns | None:
        return next((g for g in self.groups if g.method == "baseline"), None)

    @property
    def seeds(self) -> list[int]:
        return sorted({s for g in self.groups for s in g.seeds})

    def has_budget(self, budget: str) -> bool:
        base = self.baseline
        if base is None:
            return False
        return bool(base.values(budget, "test", self.primary))

    def paired(
        self,
        group: MethodRuns,
        budget: str,
        metric: str | None = None,
        reference: MethodRuns | None = None,
    ) -> PairedDifference | None:
        """Paired test difference ``group - reference`` (default: the baseline) over the
        (seed, data seed) pairs both have."""
        base = self.baseline if reference is None else reference
        if base is None or group is base:
            return None
        metric = metric or self.primary
        treated = group.values(budget, "test", metric)
        control = base.values(budget, "test", metric)
        common = sorted(set(treated) & set(control))
        if not common:
            return None
        return paired_difference(
            [treated[s] for s in common],
            [control[s] for s in common],
            confidence=CONFIDENCE,
            n_bootstrap=N_BOOTSTRAP,
            seed=BOOTSTRAP_SEED,
        )

    def paper_alpha(self) -> float | None:
        for record in self.records:
            for source in (record["config"], record["task"]):
                value = finite_or_none(source.get("paper_alpha"))
                if value is not None:
                    return value
        return None

    def chosen_rdrop(self) -> tuple[MethodRuns, str] | None:
        """The R-Drop row the verdict uses: the paper's alpha, else best mean validation."""
        candidates = [g for g in self.groups if g.is_plain_rdrop]
        if not candidates:
            return None
        paper = self.paper_alpha()
        if paper is not None:
            for group in candidates:
                if group.alpha is not None and math.isclose(group.alpha, paper, rel_tol=1e-9):
                    return group, "the paper's α"
        scored = []
        converged = any(r.get("config", {}).get("patience") is not None for r in self.records)
        budget = "converged" if converged else "equal_epochs"
        for group in candidates:
            mean, _, n = group.stat(budget, "validation", self.primary)
            if n:
                scored.append((mean if self.higher_is_better else -mean, group))
        if not scored:
            return candidates[0], "the only α with runs"
        best = max(scored, key=lambda item: (item[0], -(item[1].alpha or 0.0)))[1]
        reason = "best mean validation " + self.primary
        if paper is not None:
            reason += f"; no runs at the paper's α={format_alpha(paper)}"
        return best, reason


def group_tasks(records: Sequence[Record]) -> list[TaskRuns]:
    by_task: dict[tuple[str, int | None], list[Record]] = {}
    for record in records:
        by_task.setdefault(section_of(record), []).append(record)
    tasks = []
    for name, shots in sorted(by_task, key=lambda key: (key[0], key[1] or 0)):
        task_records = by_task[(name, shots)]
        by_method: dict[tuple[str, float | None, Variant], list[Record]] = {}
        for record in task_records:
            key = (method_of(record), alpha_of(record), variant_of(record))
            by_method.setdefault(key, []).append(record)
        groups = [
            MethodRuns(method, alpha, sorted(rs, key=pair_of), variant)
            for (method, alpha, variant), rs in sorted(
                by_method.items(), key=lambda kv: order_key(*kv[0])
            )
        ]
        info = dict(task_records[0]["task"])
        task = TaskRuns(name=name, info=info, groups=groups, shots=shots)
        task.notes = _diverged_notes(task) + _consistency_notes(task)
        tasks.append(task)
    return tasks


def _diverged_notes(task: TaskRuns) -> list[str]:
    """One line per diverged run: it has no score, and no table counts it."""
    return [
        f"**Diverged:** {group.label} seed {seed_of(record)} (non-finite loss at step "
        f"{record.get('diverged_at_step')}); shown as diverged, never as a score."
        for group in task.groups
        for record in group.records
        if record.get("diverged")
    ]


def _consistency_notes(task: TaskRuns) -> list[str]:
    """Differences between runs of one task that a reader should know about."""
    notes = []
    for key in ("primary_metric", "test_split", "train_examples", "higher_is_better"):
        values = {json.dumps(r["task"].get(key), default=str) for r in task.records}
        if len(values) > 1:
            notes.append(f"runs disagree on task.{key}: {', '.join(sorted(values))}")
    keys = sorted({k for r in task.records for k in r["config"]} - _GROUPING_FIELDS)
    for key in keys:
        values = {json.dumps(config_of(r, key), sort_keys=True, default=str) for r in task.records}
        if len(values) > 1:
            notes.append(f"config.{key} differs between runs: {', '.join(sorted(values))}")
    budgets = [
        v for r in task.records if (v := finite_or_none(r.get("time_budget_seconds"))) is not None
    ]
    if budgets and max(budgets) > 1.02 * min(budgets):
        notes.append(
            f"the equal-time budgets differ between runs ({min(budgets):.1f}–"
            f"{max(budgets):.1f} s): each is the median training time of the plain R-Drop "
            "runs already in the folder when the run started (`time_budget_sources` in its "
            "record), so runs made in chunks, or before every R-Drop seed had finished, "
            "see different sets of R-Drop runs"
        )
    days = sorted({str(r["started_at"])[:10] for r in task.records if r.get("started_at")})
    timed = any(r.get("time_budget_seconds") is not None for r in task.records)
    if timed and len(days) > 1:
        notes.append(
            f"runs were made on {len(days)} different days ({', '.join(days)}); the equal-time "
            f"budget is measured training time ({clock_description(task.records)}), so "
            "equal-time comparisons assume the machine ran at the same speed on each (compare "
            "the s/step column with earlier reports)"
        )
    base = task.baseline
    for group in task.groups:
        if base is None or group is base or set(group.pairs) == set(base.pairs):
            continue
        if task.shows_draws:
            notes.append(
                f"{group.label} has (seed, data draw) pairs {sorted(group.pairs)}, the "
                f"baseline {sorted(base.pairs)}; paired differences use the common pairs only"
            )
        else:
            notes.append(
                f"{group.label} has seeds {group.seeds}, the baseline {base.seeds}; paired "
                "differences use the common seeds only"
            )
    return notes


# --------------------------------------------------------------------------- verdict


def verdict(diff: PairedDifference | None, higher_is_better: bool = True) -> str:
    """One-line verdict from the paired difference R-Drop − baseline (t-interval).

    Args:
        diff: paired test difference ``rdrop - baseline`` (``None``: no paired seeds).
        higher_is_better: direction of the metric; for lower-is-better metrics a negative
            difference favours R-Drop.

    Returns:
        :data:`VERDICT_RDROP_BETTER`, :data:`VERDICT_BASELINE_BETTER` or
        :data:`VERDICT_NO_DIFFERENCE` (with a note when fewer than 2 seeds are paired).

    Example:
        >>> from rdrop_lab.stats import paired_difference
        >>> verdict(paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]))
        'R-Drop better (interval excludes 0)'
        >>> verdict(paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]), higher_is_better=False)
        'baseline better (interval excludes 0)'
    """
    if diff is None or diff.n < 2:
        n = 0 if diff is None else diff.n
        return f"{VERDICT_NO_DIFFERENCE} (only {n} paired seed{'s' * (n != 1)}: no interval)"
    first_better = significantly_first_better(diff, higher_is_better)
    if first_better is None:
        return VERDICT_NO_DIFFERENCE
    return VERDICT_RDROP_BETTER if first_better else VERDICT_BASELINE_BETTER


def significantly_first_better(diff: PairedDifference, higher_is_better: bool) -> bool | None:
    """For ``diff = first - second``: ``True`` / ``False`` when the t-interval excludes 0
    (first / second better in the metric's direction), ``None`` when it does not."""
    if diff.n < 2 or not diff.t_excludes_zero():
        return None
    return (diff.t_low > 0.0) == higher_is_better
