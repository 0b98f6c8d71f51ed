"""Turn finished run records into ``REPORT.md`` and plots.

Reads ``<results_dir>/runs/*.json`` (one record per finished run, written by the runner),
aggregates them per task and method (mean ± std over seeds, paired differences against the
baseline at two budgets) and writes ``REPORT.md`` plus PNG plots in ``plots/``.

A table is one task (and, for few-shot runs, one number of shots per class); a row is one
method with its alpha and its non-default options (an ablation such as ``k=5`` is its own
row, never merged with plain R-Drop); runs are paired by (seed, data seed). Records
written before a config field existed are read with that field's default.

matplotlib is imported only inside the plotting functions (``import rdrop`` and
``import rdrop.experiments.report`` never import it); the Agg canvas is used directly, so no
global backend is switched and no display is needed.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "runs").mkdir()
    ...     load_records(tmp)
    []
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdrop.experiments.config import METHOD_FIELDS, config_value
from rdrop.experiments.stats import (
    PairedDifference,
    format_interval,
    format_mean_std,
    format_signed,
    mean_std,
    paired_difference,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "BUDGETS",
    "ReportWarning",
    "VERDICT_BASELINE_BETTER",
    "VERDICT_NO_DIFFERENCE",
    "VERDICT_RDROP_BETTER",
    "load_records",
    "method_label",
    "summary_table",
    "verdict",
    "write_report",
]

Record = dict[str, Any]

BUDGETS: tuple[str, ...] = ("equal_epochs", "equal_time")
_BUDGET_TITLES = {"equal_epochs": "equal epochs", "equal_time": "equal wall-clock time"}
_BUDGET_SHORT = {"equal_epochs": "eq. epochs", "equal_time": "eq. time"}

VERDICT_RDROP_BETTER = "R-Drop better (interval excludes 0)"
VERDICT_BASELINE_BETTER = "baseline better (interval excludes 0)"
VERDICT_NO_DIFFERENCE = "no significant difference at this scale"

CONFIDENCE = 0.95
N_BOOTSTRAP = 10000
BOOTSTRAP_SEED = 0

# Methods whose equal-time model is their equal-epochs model, for records that do not say
# (written before ``method_info``; all of them plain R-Drop or the doubled batch).
_COSTS_LIKE_RDROP = {"rdrop", "doubled_batch"}
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

# Display names and row order of the methods (unknown methods: their name, last).
_METHOD_NAMES = {
    "baseline": "baseline",
    "doubled_batch": "doubled batch (no KL)",
    "rdrop": "R-Drop",
    "label_smoothing": "label smoothing",
    "mixup": "MixUp",
    "manifold_mixup": "Manifold MixUp",
    "fgm": "FGM",
    "rdrop_label_smoothing": "R-Drop + label smoothing",
    "rdrop_mixup": "R-Drop + MixUp",
    "rdrop_manifold_mixup": "R-Drop + Manifold MixUp",
    "rdrop_fgm": "R-Drop + FGM",
    "rdrop_semi": "R-Drop semi-supervised",
}
_METHOD_RANK = {name: rank for rank, name in enumerate(_METHOD_NAMES)}
# The regularizers R-Drop is compared with and combined with: (alone, combined).
_REGULARIZER_PAIRS = (
    ("label_smoothing", "rdrop_label_smoothing"),
    ("mixup", "rdrop_mixup"),
    ("manifold_mixup", "rdrop_manifold_mixup"),
    ("fgm", "rdrop_fgm"),
)
# Short labels of the options in a row label (field -> prefix).
_OPTION_LABELS = {
    "every_k_steps": "k=",
    "num_passes": "m=",
    "dropout_rates": "p=",
    "stop_gradient": "stop-grad",
    "label_smoothing": "ε_ls=",
    "mixup_alpha": "α_mix=",
    "manifold_mixup_alpha": "α_mm=",
    "fgm_epsilon": "ε_fgm=",
    "unlabeled_size": "unlabeled=",
}

Variant = tuple[tuple[str, Any], ...]


class ReportWarning(UserWarning):
    """A run record was skipped or is inconsistent with the others."""


# --------------------------------------------------------------------------- loading


def _missing_keys(record: Any) -> list[str]:
    """Names of the keys the report cannot do without (empty list: usable)."""
    if not isinstance(record, dict):
        return ["<top level is not an object>"]
    missing = []
    config, task, selections = record.get("config"), record.get("task"), record.get("selections")
    if not isinstance(config, dict):
        missing.append("config")
    else:
        missing += [f"config.{k}" for k in ("method", "seed") if k not in config]
    if not isinstance(task, dict):
        missing.append("task")
    else:
        missing += [f"task.{k}" for k in ("name", "primary_metric") if k not in task]
    if not isinstance(selections, dict) or not isinstance(selections.get("equal_epochs"), dict):
        missing.append("selections.equal_epochs")
    return missing


def load_records(results_dir: str | os.PathLike[str]) -> list[Record]:
    """Read every finished run record in ``results_dir/runs/*.json``.

    Files that are not ``*.json`` (e.g. ``*.tmp`` written by a run in progress), that do not
    parse, or that lack the keys the report needs are skipped with a :class:`ReportWarning`.
    Several records for the same (task, method, alpha, seed) keep the last one finished.

    Args:
        results_dir: the results folder (the one holding ``runs/``).

    Returns:
        The records, sorted by (task, method, alpha, seed).

    Raises:
        FileNotFoundError: if ``results_dir/runs`` does not exist.
    """
    runs_dir = Path(results_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no run records folder: {runs_dir}")
    by_key: dict[tuple[Any, ...], tuple[Path, Record]] = {}
    for path in sorted(runs_dir.iterdir()):
        partial = path.name.endswith(".tmp")
        if not partial and (path.name.startswith(".") or path.is_dir()):
            continue
        if path.suffix != ".json":
            warnings.warn(
                f"skipping {path.name}: not a finished run record (run in progress or "
                "interrupted?)",
                ReportWarning,
                stacklevel=2,
            )
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warnings.warn(
                f"skipping {path.name}: unreadable ({error})", ReportWarning, stacklevel=2
            )
            continue
        missing = _missing_keys(record)
        if missing:
            warnings.warn(
                f"skipping {path.name}: partial record, missing {', '.join(missing)}",
                ReportWarning,
                stacklevel=2,
            )
            continue
        if record.get("schema", 1) != 1:
            warnings.warn(
                f"{path.name}: unknown record schema {record.get('schema')!r}, reading it as 1",
                ReportWarning,
                stacklevel=2,
            )
        key = (
            _section(record),
            _method(record),
            _alpha(record),
            _variant(record),
            record["config"]["seed"],
            _data_seed(record),
        )
        if key in by_key:
            previous_path, previous = by_key[key]
            newer = str(record.get("finished_at", "")) >= str(previous.get("finished_at", ""))
            kept, dropped = (path, previous_path) if newer else (previous_path, path)
            where = f"task={key[0][0]} method={key[1]} alpha={key[2]} seed={key[4]}"
            if key[3]:
                where += " " + _variant_text(key[3])
            if key[5]:
                where += f" data_seed={key[5]}"
            warnings.warn(
                f"two records for {where}: keeping {kept.name}, ignoring {dropped.name}",
                ReportWarning,
                stacklevel=2,
            )
            if not newer:
                continue
        by_key[key] = (path, record)
    records = [record for _, record in by_key.values()]
    records.sort(key=lambda r: (_task_name(r), _method_order(r), _pair(r)))
    return records


# --------------------------------------------------------------------------- record access


def _task_name(record: Record) -> str:
    return str(record["task"].get("name") or record["config"].get("task"))


def _method(record: Record) -> str:
    return str(record["config"]["method"])


def _alpha(record: Record) -> float | None:
    alpha = record["config"].get("alpha")
    return None if alpha is None else float(alpha)


def _seed(record: Record) -> int:
    return int(record["config"]["seed"])


def _config(record: Record, key: str) -> Any:
    """A config value, with the field's default for records older than the field."""
    return config_value(record["config"], key)


def _data_seed(record: Record) -> int:
    return int(_config(record, "data_seed") or 0)


def _pair(record: Record) -> tuple[int, int]:
    """What pairs runs of different methods: the seed and the data draw."""
    return _seed(record), _data_seed(record)


def _shots(record: Record) -> int | None:
    value = _config(record, "shots_per_class")
    return None if value is None else int(value)


def _section(record: Record) -> tuple[str, int | None]:
    """The table a record belongs to: its task and its few-shot size."""
    return _task_name(record), _shots(record)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _variant(record: Record) -> Variant:
    """The method options of a record that differ from their defaults (sorted)."""
    items = []
    for key in sorted(METHOD_FIELDS):
        value = _hashable(_config(record, key))
        default = _hashable(config_value({}, key))
        if value != default:
            items.append((key, value))
    return tuple(items)


def _option_text(key: str, value: Any) -> str:
    prefix = _OPTION_LABELS.get(key, f"{key}=")
    if key == "stop_gradient":
        return prefix if value else "no stop-grad"
    if isinstance(value, tuple):
        return prefix + "(" + ",".join(f"{v:g}" for v in value) + ")"
    if isinstance(value, float):
        return prefix + f"{value:g}"
    return prefix + str(value)


def _variant_text(variant: Variant) -> str:
    return " ".join(_option_text(k, v) for k, v in variant)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _format_alpha(alpha: float) -> str:
    return f"{alpha:.1f}" if alpha == round(alpha, 1) else f"{alpha:g}"


def method_label(method: str, alpha: float | None, variant: Variant = ()) -> str:
    """Row label of a method in the report: its name, alpha and non-default options.

    Example:
        >>> method_label("rdrop", 1.0), method_label("doubled_batch", None)
        ('R-Drop α=1.0', 'doubled batch (no KL)')
        >>> method_label("rdrop", 1.0, (("every_k_steps", 5),))
        'R-Drop α=1.0 k=5'
        >>> method_label("rdrop", 1.0, (("dropout_rates", (0.1, 0.3)),))
        'R-Drop α=1.0 p=(0.1,0.3)'
        >>> method_label("mixup", None, (("mixup_alpha", 0.4),))
        'MixUp α_mix=0.4'
    """
    if method in ("baseline", "doubled_batch") and not variant:
        return _METHOD_NAMES[method]
    name = _METHOD_NAMES.get(method, method.replace("_", " "))
    label = name if alpha is None else f"{name} α={_format_alpha(alpha)}"
    return f"{label} {_variant_text(variant)}" if variant else label


def _method_order(record: Record) -> tuple[Any, ...]:
    return _order_key(_method(record), _alpha(record), _variant(record))


def _order_key(method: str, alpha: float | None, variant: Variant = ()) -> tuple[Any, ...]:
    rank = _METHOD_RANK.get(method, len(_METHOD_RANK))
    return (
        rank,
        method,
        bool(variant),  # a method's plain rows (every alpha) before its ablations
        -1.0 if alpha is None else alpha,
        json.dumps([list(item) for item in variant], default=str),
    )


def _costs_like_rdrop(record: Record) -> bool:
    info = record.get("method_info")
    if isinstance(info, dict) and isinstance(info.get("costs_like_rdrop"), bool):
        return bool(info["costs_like_rdrop"])
    return _method(record) in _COSTS_LIKE_RDROP and not _variant(record)


def _selection(record: Record, budget: str) -> dict[str, Any] | None:
    selections = record.get("selections") or {}
    selected = selections.get(budget)
    if budget == "equal_time" and _costs_like_rdrop(record):
        # R-Drop sets the time budget, and the doubled batch costs the same per step: their
        # equal-time model is their equal-epochs model.
        selected = selections.get("equal_epochs")
    return selected if isinstance(selected, dict) else None


def _selected_value(record: Record, budget: str, split: str, metric: str) -> float | None:
    selected = _selection(record, budget)
    if selected is None or not isinstance(selected.get(split), dict):
        return None
    return _finite(selected[split].get(metric))


def _seconds_per_step(record: Record) -> float | None:
    value = _finite(record.get("seconds_per_step"))
    if value is None:
        seconds, steps = _finite(record.get("train_seconds")), _finite(record.get("steps"))
        if seconds is not None and steps:
            value = seconds / steps
    return value


# --------------------------------------------------------------------------- aggregation


@dataclass
class _Group:
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
        return sorted({_seed(r) for r in self.records})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [_pair(r) for r in self.records]

    def values(self, budget: str, split: str, metric: str) -> dict[tuple[int, int], float]:
        """Selected scores by (seed, data seed)."""
        out = {}
        for record in self.records:
            value = _selected_value(record, budget, split, metric)
            if value is not None:
                out[_pair(record)] = value
        return out

    def stat(self, budget: str, split: str, metric: str) -> tuple[float, float, int]:
        values = list(self.values(budget, split, metric).values())
        if not values:
            return math.nan, math.nan, 0
        mean, std = mean_std(values)
        return mean, std, len(values)

    def seconds_per_step(self) -> float:
        values = [v for r in self.records if (v := _seconds_per_step(r)) is not None]
        return mean_std(values)[0] if values else math.nan


@dataclass
class _Task:
    """One task (one few-shot size): its metadata, its method rows and the comparisons."""

    name: str
    info: dict[str, Any]
    groups: list[_Group]
    notes: list[str] = field(default_factory=list)
    shots: int | None = None

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
        return sorted({_data_seed(r) for r in self.records})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted({p for g in self.groups for p in g.pairs})

    @property
    def shows_draws(self) -> bool:
        """Whether runs differ by data draw (then tables name the draw)."""
        return self.data_seeds != [0] and bool(self.data_seeds)

    def group(self, method: str, alpha: float | None = None) -> _Group | None:
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
    def baseline(self) -> _Group | None:
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
        group: _Group,
        budget: str,
        metric: str | None = None,
        reference: _Group | None = None,
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
                value = _finite(source.get("paper_alpha"))
                if value is not None:
                    return value
        return None

    def chosen_rdrop(self) -> tuple[_Group, str] | None:
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
        for group in candidates:
            mean, _, n = group.stat("equal_epochs", "validation", self.primary)
            if n:
                scored.append((mean if self.higher_is_better else -mean, group))
        if not scored:
            return candidates[0], "the only α with runs"
        best = max(scored, key=lambda item: (item[0], -(item[1].alpha or 0.0)))[1]
        reason = "best mean validation " + self.primary
        if paper is not None:
            reason += f"; no runs at the paper's α={_format_alpha(paper)}"
        return best, reason


def _group_tasks(records: Sequence[Record]) -> list[_Task]:
    by_task: dict[tuple[str, int | None], list[Record]] = {}
    for record in records:
        by_task.setdefault(_section(record), []).append(record)
    tasks = []
    for name, shots in sorted(by_task, key=lambda key: (key[0], key[1] or 0)):
        task_records = by_task[(name, shots)]
        by_method: dict[tuple[str, float | None, Variant], list[Record]] = {}
        for record in task_records:
            key = (_method(record), _alpha(record), _variant(record))
            by_method.setdefault(key, []).append(record)
        groups = [
            _Group(method, alpha, sorted(rs, key=_pair), variant)
            for (method, alpha, variant), rs in sorted(
                by_method.items(), key=lambda kv: _order_key(*kv[0])
            )
        ]
        info = dict(task_records[0]["task"])
        task = _Task(name=name, info=info, groups=groups, shots=shots)
        task.notes = _consistency_notes(task)
        tasks.append(task)
    return tasks


def _consistency_notes(task: _Task) -> list[str]:
    """Differences between runs of one task that a reader should know about."""
    notes = []
    for key in ("primary_metric", "test_split", "train_examples", "higher_is_better"):
        values = {json.dumps(r["task"].get(key), default=str) for r in task.records}
        if len(values) > 1:
            notes.append(f"runs disagree on task.{key}: {', '.join(sorted(values))}")
    keys = sorted({k for r in task.records for k in r["config"]} - _GROUPING_FIELDS)
    for key in keys:
        values = {json.dumps(_config(r, key), sort_keys=True, default=str) for r in task.records}
        if len(values) > 1:
            notes.append(f"config.{key} differs between runs: {', '.join(sorted(values))}")
    days = sorted({str(r["started_at"])[:10] for r in task.records if r.get("started_at")})
    timed = any(r.get("time_budget_seconds") is not None for r in task.records)
    if timed and len(days) > 1:
        notes.append(
            f"runs were made on {len(days)} different days ({', '.join(days)}); the equal-time "
            "budget is wall-clock, so equal-time comparisons assume the machine ran at the "
            "same speed on each (compare the s/step column with earlier reports)"
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
        >>> from rdrop.experiments.stats import paired_difference
        >>> verdict(paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]))
        'R-Drop better (interval excludes 0)'
        >>> verdict(paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]), higher_is_better=False)
        'baseline better (interval excludes 0)'
    """
    if diff is None or diff.n < 2:
        n = 0 if diff is None else diff.n
        return f"{VERDICT_NO_DIFFERENCE} (only {n} paired seed{'s' * (n != 1)}: no interval)"
    if not diff.t_excludes_zero():
        return VERDICT_NO_DIFFERENCE
    rdrop_larger = diff.t_low > 0.0
    return VERDICT_RDROP_BETTER if rdrop_larger == higher_is_better else VERDICT_BASELINE_BETTER


def _verdict_line(task: _Task) -> str:
    chosen = task.chosen_rdrop()
    head = f"**Verdict ({task.title})**"
    if chosen is None:
        return f"{head}: no R-Drop runs."
    if task.baseline is None:
        return f"{head}: no baseline runs to compare with."
    group, reason = chosen
    parts = []
    for budget in BUDGETS:
        if budget == "equal_time" and not task.has_budget(budget):
            parts.append(f"{_BUDGET_TITLES[budget]}: not measured")
            continue
        diff = task.paired(group, budget)
        text = f"{_BUDGET_TITLES[budget]}: {verdict(diff, task.higher_is_better)}"
        if diff is not None:
            digits = _digits(task, task.primary)
            text += (
                f" (Δ {task.primary} {format_signed(diff.mean, digits)}, "
                f"95% t-interval {format_interval(diff.t_low, diff.t_high, digits)}, n={diff.n})"
            )
        parts.append(text)
    return f"{head}, {group.label} ({reason}) vs baseline — " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- tables


def _digits(task: _Task, metric: str) -> int:
    values = [
        abs(v)
        for g in task.groups
        for budget in BUDGETS
        for v in g.values(budget, "test", metric).values()
    ]
    return 2 if values and max(values) >= 10 else 4


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _wtl(diff: PairedDifference, higher_is_better: bool) -> str:
    better, worse = (diff.wins, diff.losses) if higher_is_better else (diff.losses, diff.wins)
    return f"{better}/{diff.ties}/{worse}"


def _mean_std_cell(group: _Group, budget: str, split: str, metric: str, digits: int) -> str:
    mean, std, _ = group.stat(budget, split, metric)
    return format_mean_std(mean, std, digits)


def _main_table(task: _Task) -> str:
    metric, digits = task.primary, _digits(task, task.primary)
    budgets = [b for b in BUDGETS if b == "equal_epochs" or task.has_budget(b)]
    header = ["method", "seeds"]
    for budget in budgets:
        short = _BUDGET_SHORT[budget]
        header += [
            f"test {metric} ({short})",
            f"Δ vs baseline ({short})",
            "95% t-interval",
            "95% bootstrap",
            "W/T/L",
        ]
    header += [f"val {metric} at selection", "s/step", "× baseline s/step"]
    base = task.baseline
    base_sps = base.seconds_per_step() if base is not None else math.nan
    rows = []
    for group in task.groups:
        row = [group.label, str(len(group.records))]
        for budget in budgets:
            row.append(_mean_std_cell(group, budget, "test", metric, digits))
            diff = task.paired(group, budget)
            if diff is None:
                reference = group is base
                row += ["(reference)" if reference else "—", "", "", ""]
            else:
                row += [
                    format_signed(diff.mean, digits),
                    format_interval(diff.t_low, diff.t_high, digits),
                    format_interval(diff.boot_low, diff.boot_high, digits),
                    _wtl(diff, task.higher_is_better),
                ]
        row.append(_mean_std_cell(group, "equal_epochs", "validation", metric, digits))
        sps = group.seconds_per_step()
        row.append("—" if math.isnan(sps) else f"{sps:.3f}" if sps < 10 else f"{sps:.1f}")
        ratio = sps / base_sps if base_sps > 0 else math.nan
        row.append("—" if math.isnan(ratio) else f"{ratio:.2f}×")
        rows.append(row)
    return _table(header, rows)


def _model_lines(info: dict[str, Any]) -> list[str]:
    """Model size, tokenizer and metric signature, for tasks that record them."""
    facts = []
    if "parameters" in info:
        facts.append(f"model: {_count(info['parameters'])} trainable parameters")
    if "tokenizer" in info:
        facts.append(f"tokenizer: {info['tokenizer']}")
    if "bleu_signature" in info:
        facts.append(f"sacreBLEU signature: `{info['bleu_signature']}`")
    if not facts:
        return []
    text = "; ".join(facts)
    return ["", text[0].upper() + text[1:] + "."]


def _regime_lines(task: _Task) -> list[str]:
    """Few-shot and semi-supervised facts of a task section (none for other tasks)."""
    lines = []
    if task.shots is not None:
        lines += [
            "",
            f"Few-shot: {task.shots} training examples per class, "
            f"{len(task.data_seeds)} draw(s) of them (data seeds "
            f"{', '.join(map(str, task.data_seeds))}). The validation split "
            f"({_count(task.info.get('validation_examples', '?'))} examples) is used for "
            "checkpoint selection only; a real few-shot user would not have it, so these "
            "numbers are optimistic for every method alike.",
        ]
    semi = [r for r in task.records if _method(r) == "rdrop_semi"]
    if semi:
        pool = sorted({str(r["task"].get("unlabeled_examples", "?")) for r in semi})
        seen = [
            v
            for r in semi
            if (v := _finite((r.get("method_info") or {}).get("unlabeled_seen"))) is not None
        ]
        text = (
            f"Semi-supervised: unlabeled pool of {', '.join(pool)} training examples outside "
            "the labelled set (labels discarded)"
        )
        if seen:
            text += f"; R-Drop semi-supervised used {mean_std(seen)[0]:,.0f} unlabeled "
            text += "examples per run on average (with repeats once the pool is exhausted)"
        lines += ["", text + "."]
    return lines


def _comparisons(task: _Task) -> list[tuple[_Group, _Group]]:
    """(first, second) pairs worth a paired difference besides "vs baseline": R-Drop vs
    each regularizer, each combination vs its parts, each ablation and the
    semi-supervised run vs plain R-Drop at the same alpha."""
    chosen = task.chosen_rdrop()
    rdrop = chosen[0] if chosen is not None else None
    pairs: list[tuple[_Group, _Group]] = []
    for alone, combined in _REGULARIZER_PAIRS:
        singles = [g for g in task.groups if g.method == alone]
        if rdrop is not None:
            pairs += [(rdrop, single) for single in singles]
        for group in (g for g in task.groups if g.method == combined):
            pairs += [(group, single) for single in singles]
            same = task.group("rdrop", group.alpha)
            if same is not None:
                pairs.append((group, same))
    for group in task.groups:
        if (group.method == "rdrop" and group.variant) or group.method == "rdrop_semi":
            same = task.group("rdrop", group.alpha)
            if same is not None:
                pairs.append((group, same))
    return pairs


def _pair_verdict(diff: PairedDifference | None, higher_is_better: bool) -> str:
    if diff is None or diff.n < 2:
        return f"n={0 if diff is None else diff.n}: no interval"
    if not diff.t_excludes_zero():
        return "no significant difference"
    first_larger = diff.t_low > 0.0
    return "first better" if first_larger == higher_is_better else "second better"


def _comparison_table(task: _Task) -> str | None:
    pairs = _comparisons(task)
    if not pairs:
        return None
    metric, digits = task.primary, _digits(task, task.primary)
    budgets = [b for b in BUDGETS if b == "equal_epochs" or task.has_budget(b)]
    header = ["first", "second"]
    for budget in budgets:
        short = _BUDGET_SHORT[budget]
        header += [f"Δ {metric} ({short})", "95% t-interval", "W/T/L", "verdict"]
    rows = []
    for first, second in pairs:
        row = [first.label, second.label]
        for budget in budgets:
            diff = task.paired(first, budget, reference=second)
            if diff is None:
                row += ["—", "", "", "no common seeds"]
                continue
            row += [
                format_signed(diff.mean, digits),
                format_interval(diff.t_low, diff.t_high, digits),
                _wtl(diff, task.higher_is_better),
                _pair_verdict(diff, task.higher_is_better),
            ]
        rows.append(row)
    return _table(header, rows)


def _secondary_table(task: _Task) -> str | None:
    if len(task.metrics) < 2:
        return None
    budgets = [b for b in BUDGETS if b == "equal_epochs" or task.has_budget(b)]
    header = ["method"] + [f"test {m} ({_BUDGET_SHORT[b]})" for b in budgets for m in task.metrics]
    rows = [
        [group.label]
        + [
            _mean_std_cell(group, b, "test", m, _digits(task, m))
            for b in budgets
            for m in task.metrics
        ]
        for group in task.groups
    ]
    return _table(header, rows)


def _pair_label(task: _Task, pair: tuple[int, int]) -> str:
    return f"{pair[0]} / {pair[1]}" if task.shows_draws else str(pair[0])


def _per_seed_table(task: _Task, budget: str) -> str:
    metric, digits = task.primary, _digits(task, task.primary)
    header = ["seed / data draw" if task.shows_draws else "seed"] + [g.label for g in task.groups]
    columns = [g.values(budget, "test", metric) for g in task.groups]
    rows = [
        [_pair_label(task, pair)] + [f"{c[pair]:.{digits}f}" if pair in c else "—" for c in columns]
        for pair in task.pairs
    ]
    return _table(header, rows)


def _task_summary_lines(task: _Task) -> list[str]:
    direction = "higher is better" if task.higher_is_better else "lower is better"
    return [
        f"### {task.title}",
        "",
        f"Primary metric: {task.primary} ({direction}); test split: "
        f"{task.info.get('test_split', 'not recorded')}; seeds: "
        f"{', '.join(map(str, task.seeds))}.",
        "",
        _main_table(task),
        "",
        _verdict_line(task),
    ]


def summary_table(records: Sequence[Record]) -> str:
    """The main comparison table of every task, as Markdown (for printing in a terminal).

    Args:
        records: run records, e.g. from :func:`load_records`.

    Returns:
        Per task: a heading, the table (test primary metric mean ± std at equal epochs and at
        equal wall-clock time, paired difference vs the baseline with its 95% t- and bootstrap
        intervals and wins/ties/losses, validation metric at selection, seconds per step) and
        the verdict line.
    """
    tasks = _group_tasks(records)
    if not tasks:
        return "No finished runs."
    return "\n\n".join("\n".join(_task_summary_lines(task)) for task in tasks)


# --------------------------------------------------------------------------- report text


def _format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _protocol_section(tasks: Sequence[_Task]) -> list[str]:
    rows = []
    for task in tasks:
        info = task.info
        used, available = info.get("train_examples"), info.get("train_available")
        if isinstance(used, int) and isinstance(available, int) and available > 0:
            train = f"{used:,} of {available:,} ({100.0 * used / available:.1f}%)"
        else:
            train = f"{_count(used)} of {_count(available)}"
        budgets = [
            v for r in task.records if (v := _finite(r.get("time_budget_seconds"))) is not None
        ]
        budget = f"{mean_std(budgets)[0]:.1f} s" if budgets else "—"
        capped = [r for r in task.records if r.get("time_budget_reached") is False]
        if capped:
            budget += f" (not reached by {len(capped)} run(s): max_time_factor cap)"
        n_seeds = len(task.seeds)
        n_pairs = len(task.pairs)
        fewer = [f"{g.label}: {len(g.records)}" for g in task.groups if len(g.records) < n_pairs]
        seeds = f"{n_seeds}"
        if task.shows_draws:
            seeds += f" × {len(task.data_seeds)} data draws"
        seeds += f" (fewer for {'; '.join(fewer)})" if fewer else ""
        rows.append(
            [
                task.title,
                train,
                _count(info.get("validation_examples", "—")),
                _count(info.get("test_examples", "—")),
                str(info.get("test_split", "not recorded")),
                seeds,
                budget,
            ]
        )
    return [
        "## Protocol",
        "",
        "- **Model selection** on the validation split only: each run is evaluated on the "
        "validation split during training and the best checkpoint (best validation primary "
        "metric within the budget) is kept.",
        "- **Final numbers** are that checkpoint's scores on a held-out **test split that was "
        "never used for selection** (which split, per task: table below).",
        "- **Seeds**: every method is run with the same seeds (same training subsample and "
        "initialisation per seed); tables give **mean ± std** over seeds (sample std, ddof=1).",
        "- **Paired comparison against the baseline**: per seed, d = method - baseline on the "
        f"test split; reported: mean of d, its {CONFIDENCE:.0%} Student-t interval (df = n - 1), "
        f"its {CONFIDENCE:.0%} percentile-bootstrap interval ({N_BOOTSTRAP} resamples, seed "
        f"{BOOTSTRAP_SEED}) and W/T/L = seeds where the method is better / equal / worse. "
        "With few seeds the bootstrap interval is too narrow; the verdict uses the t-interval.",
        "- **Two budgets**: *equal epochs* (every method trains for the same number of epochs) "
        "and *equal wall-clock time* (the baseline continues training until it has used the "
        "median training time of the R-Drop runs, `time_budget_seconds`, is evaluated when it "
        "reaches it and is selected on validation among the evaluations up to that point; "
        "R-Drop and the doubled batch cost the same per step, so their equal-time model is "
        "their equal-epochs model).",
        "- **Verdict**: R-Drop at the paper's α for the task if it was run, else the α with the "
        "best mean *validation* metric (never chosen by test); R-Drop or the baseline is "
        "called better only when the 95% t-interval of the paired difference excludes 0.",
        "- **Training sets are subsampled** (column *train used*), so absolute numbers are "
        "below the paper's; the comparison, not the level, is the point.",
        *_extra_protocol(tasks),
        "",
        _table(
            [
                "task",
                "train used",
                "validation",
                "test",
                "test split",
                "seeds",
                "equal-time budget (mean)",
            ],
            rows,
        ),
    ]


def _extra_protocol(tasks: Sequence[_Task]) -> list[str]:
    """Protocol bullets for the methods, ablations and data regimes present (none for
    reports of baseline, R-Drop and the doubled batch only)."""
    groups = [g for t in tasks for g in t.groups]
    lines = []
    if any(g.method not in _COSTS_LIKE_RDROP | {"baseline"} or g.variant for g in groups):
        lines.append(
            "- **Other methods and ablations** at equal wall-clock time: only plain R-Drop "
            "(k = 1, m = 2, one dropout rate, no stop-gradient) sets the time budget. Methods "
            "that cost what it costs per step (the doubled batch, R-Drop + label smoothing, "
            "R-Drop + MixUp, R-Drop + Manifold MixUp) use their equal-epochs model; every "
            "other method and ablation is measured against the budget: a cheaper one trains "
            "on until it, a dearer one (FGM, R-Drop + FGM, m = 3, semi-supervised R-Drop) is "
            "selected among the evaluations made before it ran out. *× baseline s/step* is "
            "the measured cost per step."
        )
    if any(t.shows_draws for t in tasks):
        lines.append(
            "- **Data draws**: tasks with several data seeds draw their training set (and "
            "unlabeled pool) once per data seed; runs are paired by (seed, data draw), and "
            "mean ± std and the intervals are over those pairs."
        )
    if any(t.shots is not None for t in tasks):
        lines.append(
            "- **Few-shot**: k training examples per class drawn from the whole training "
            "split with the data seed. The validation split is the task's usual one and is "
            "used for checkpoint selection only; a real few-shot user would not have a "
            "development set this large, so every method's few-shot numbers are optimistic "
            "alike."
        )
    if any(g.method == "rdrop_semi" for g in groups):
        lines.append(
            "- **Semi-supervised**: R-Drop semi-supervised adds, at every step, the "
            "consistency term alone (weighted by α like the labelled one) on an unlabeled "
            "batch of the labelled batch's size, drawn from a pool of training examples "
            "outside the labelled set with their labels discarded; the baseline and R-Drop "
            "rows train on the labelled examples only."
        )
    return lines


def _environment_section(records: Sequence[Record]) -> list[str]:
    values: dict[str, list[str]] = {}
    for record in records:
        environment = record.get("environment")
        if not isinstance(environment, dict):
            continue
        for key, value in environment.items():
            text = "—" if value is None else str(value)
            if text not in values.setdefault(key, []):
                values[key].append(text)
    lines = ["## Hardware and environment", ""]
    if values:
        lines.append(_table(["", "value(s)"], [[k, "; ".join(v)] for k, v in values.items()]))
    else:
        lines.append("Not recorded.")
    commands = list(dict.fromkeys(str(r["command"]) for r in records if r.get("command")))
    wall = sum(v for r in records if (v := _finite(r.get("wall_seconds"))) is not None)
    train = sum(v for r in records if (v := _finite(r.get("train_seconds"))) is not None)
    started = [str(r["started_at"]) for r in records if r.get("started_at")]
    finished = [str(r["finished_at"]) for r in records if r.get("finished_at")]
    lines += ["", "## Commands", ""]
    lines += ["```", *commands, "```"] if commands else ["Not recorded."]
    lines += [
        "",
        "## Compute",
        "",
        f"{len(records)} runs; total wall-clock time {_format_duration(wall)} "
        f"(of which training {_format_duration(train)}).",
    ]
    if started and finished:
        lines[-1] += f" First run started {min(started)}, last finished {max(finished)}."
    return lines


def _task_section(task: _Task, plots: Sequence[tuple[str, str]]) -> list[str]:
    info = task.info
    direction = "higher is better" if task.higher_is_better else "lower is better"
    lines = [
        f"## {task.title}",
        "",
        f"Primary metric: **{task.primary}** ({direction}); metrics: {', '.join(task.metrics)}. "
        f"Train {_count(info.get('train_examples', '?'))} of "
        f"{_count(info.get('train_available', '?'))} examples; validation "
        f"{_count(info.get('validation_examples', '?'))}; test "
        f"{_count(info.get('test_examples', '?'))}; test split: "
        f"{info.get('test_split', 'not recorded')}.",
        *_model_lines(info),
        *_regime_lines(task),
        "",
        _verdict_line(task),
        "",
        _main_table(task),
    ]
    comparisons = _comparison_table(task)
    if comparisons is not None:
        lines += [
            "",
            f"Method against method (paired test {task.primary} differences, first minus "
            "second; *better* only when the 95% t-interval excludes 0):",
            "",
            comparisons,
        ]
    secondary = _secondary_table(task)
    if secondary is not None:
        lines += ["", "All metrics (test, mean ± std over seeds):", "", secondary]
    for budget in BUDGETS:
        if budget == "equal_epochs" or task.has_budget(budget):
            lines += [
                "",
                f"Per-seed test {task.primary} ({_BUDGET_TITLES[budget]}):",
                "",
                _per_seed_table(task, budget),
            ]
    if task.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in task.notes]
    if plots:
        lines += ["", "Plots:", ""]
        for caption, relative in plots:
            lines += [f"![{caption}]({relative})", ""]
        lines.pop()
    return lines


# --------------------------------------------------------------------------- plots


def _color_map(records: Sequence[Record]) -> dict[str, str]:
    """Method label -> colour, the same in every plot of the report."""
    keys = sorted(
        {(_method(r), _alpha(r), _variant(r)) for r in records}, key=lambda k: _order_key(*k)
    )
    palette = [
        "tab:blue",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:cyan",
    ]
    fixed = {"baseline": "black", "doubled_batch": "tab:orange"}
    colors, index = {}, 0
    for method, alpha, variant in keys:
        label = method_label(method, alpha, variant)
        if method in fixed and not variant:
            colors[label] = fixed[method]
        else:
            colors[label] = palette[index % len(palette)]
            index += 1
    return colors


def _new_figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=100)
    figure.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.91)  # no layout engine
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


Curve = tuple[list[float], list[float]]


def _plot_curves(
    axes: Axes, curves: Sequence[Curve], color: str, label: str, log_y: bool = False
) -> bool:
    """Each seed faint, the mean over seeds (by evaluation index) bold. False if no data."""
    curves = [c for c in curves if c[0]]
    if not curves:
        return False
    for xs, ys in curves:
        axes.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
    length = min(len(xs) for xs, _ in curves)
    mean_x = [sum(c[0][i] for c in curves) / len(curves) for i in range(length)]
    mean_y = [sum(c[1][i] for c in curves) / len(curves) for i in range(length)]
    axes.plot(mean_x, mean_y, color=color, linewidth=2.0, label=f"{label} (n={len(curves)})")
    if log_y and all(y > 0 for _, ys in curves for y in ys):
        axes.set_yscale("log")
    return True


def _eval_curve(record: Record, x_key: str, y: Callable[[dict[str, Any]], Any]) -> Curve:
    xs, ys = [], []
    for point in record.get("evals") or []:
        if not isinstance(point, dict):
            continue
        x_value = _finite(point.get(x_key))
        y_value = _finite(y(point))
        if x_value is not None and y_value is not None:
            xs.append(x_value)
            ys.append(y_value)
    return xs, ys


def _loss_curve(record: Record) -> Curve:
    xs, ys = [], []
    for point in record.get("train_curve") or []:
        if isinstance(point, dict):
            x_value, y_value = _finite(point.get("step")), _finite(point.get("loss"))
            if x_value is not None and y_value is not None:
                xs.append(x_value)
                ys.append(y_value)
    if xs:
        return xs, ys
    return _eval_curve(record, "step", lambda p: p.get("train_loss"))


def _curve_plot(
    task: _Task,
    colors: dict[str, str],
    path: Path,
    curve: Callable[[Record], Curve],
    xlabel: str,
    ylabel: str,
    title: str,
    log_y: bool = False,
    vline: tuple[float, str] | None = None,
) -> bool:
    figure = _new_figure()
    axes = figure.add_subplot()
    drawn = False
    for group in task.groups:
        curves = [curve(r) for r in group.records]
        drawn |= _plot_curves(axes, curves, colors[group.label], group.label, log_y)
    if not drawn:
        return False
    if vline is not None:
        axes.axvline(vline[0], color="gray", linestyle=":", linewidth=1.2, label=vline[1])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def _alpha_plot(task: _Task, colors: dict[str, str], path: Path) -> bool:
    groups = [g for g in task.groups if g.is_plain_rdrop and g.alpha is not None and g.alpha > 0]
    if len(groups) < 2:
        return False
    figure = _new_figure()
    axes = figure.add_subplot()
    alphas = [float(g.alpha or 0.0) for g in groups]
    series = (("validation", "o-", "tab:blue"), ("test", "s--", "tab:red"))
    for split, style, color in series:
        stats = [g.stat("equal_epochs", split, task.primary) for g in groups]
        axes.errorbar(
            alphas,
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            fmt=style,
            color=color,
            capsize=3,
            label=f"R-Drop, {split}",
        )
        base = task.baseline
        if base is not None:
            mean, _, n = base.stat("equal_epochs", split, task.primary)
            if n:
                axes.axhline(
                    mean, color=color, linestyle=":", linewidth=1.2, label=f"baseline, {split}"
                )
    paper = task.paper_alpha()
    if paper is not None and paper > 0:
        axes.axvline(paper, color="gray", linestyle="-.", linewidth=1.0, label="paper α")
    axes.set_xscale("log")
    axes.set_xticks(alphas, [_format_alpha(a) for a in alphas])
    axes.minorticks_off()
    axes.set_xlabel("α (log scale)")
    axes.set_ylabel(f"{task.primary} (mean ± std over seeds)")
    axes.set_title(f"{task.title}: α-sensitivity (equal epochs)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def _task_plots(task: _Task, colors: dict[str, str], plots_dir: Path) -> list[tuple[str, str]]:
    """Write the task's PNGs; return (caption, path relative to the report) pairs."""
    primary = task.primary
    budgets = [v for r in task.records if (v := _finite(r.get("time_budget_seconds"))) is not None]
    vline = (sum(budgets) / len(budgets), "equal-time budget") if budgets else None
    stem = _safe_name(task.stem)
    specs: list[tuple[str, str, Callable[[Path], bool]]] = [
        (
            f"{task.title}: validation {primary} vs step",
            f"{stem}_validation_vs_step.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(
                    r, "step", lambda e: (e.get("validation") or {}).get(primary)
                ),
                "training step",
                f"validation {primary}",
                f"{task.title}: validation {primary} vs step",
            ),
        ),
        (
            f"{task.title}: validation {primary} vs training time",
            f"{stem}_validation_vs_time.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(
                    r, "train_seconds", lambda e: (e.get("validation") or {}).get(primary)
                ),
                "training time (s)",
                f"validation {primary}",
                f"{task.title}: validation {primary} vs training time",
                vline=vline,
            ),
        ),
        (
            f"{task.title}: training loss vs step",
            f"{stem}_train_loss.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                _loss_curve,
                "training step",
                "training loss (R-Drop: incl. consistency)",
                f"{task.title}: training loss",
            ),
        ),
        (
            f"{task.title}: dropout consistency (probe KL) vs step",
            f"{stem}_probe_kl.png",
            lambda p: _curve_plot(
                task,
                colors,
                p,
                lambda r: _eval_curve(r, "step", lambda e: e.get("probe_kl")),
                "training step",
                "probe KL (two dropout passes)",
                f"{task.title}: consistency of two dropout passes",
                log_y=True,
            ),
        ),
        (
            f"{task.title}: α-sensitivity",
            f"{stem}_alpha_sensitivity.png",
            lambda p: _alpha_plot(task, colors, p),
        ),
    ]
    written = []
    for caption, filename, draw in specs:
        if draw(plots_dir / filename):
            written.append((caption, f"{plots_dir.name}/{filename}"))
    return written


# --------------------------------------------------------------------------- entry point


def write_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``REPORT.md`` and ``plots/*.png`` for the finished runs in ``results_dir``.

    Args:
        results_dir: folder holding ``runs/*.json`` (see :func:`load_records`).
        out_dir: where to write; defaults to ``results_dir``. Plots go to ``out_dir/plots``
            and are linked from the report with relative paths.

    Returns:
        The path of the written ``REPORT.md``.

    Raises:
        FileNotFoundError: if ``results_dir/runs`` does not exist.
    """
    results_dir = Path(results_dir)
    out_dir = results_dir if out_dir is None else Path(out_dir)
    records = load_records(results_dir)
    tasks = _group_tasks(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = out_dir / "plots"
    colors = _color_map(records)

    lines = ["# R-Drop experiment report", ""]
    if not tasks:
        lines += [f"No finished runs in `{results_dir / 'runs'}`."]
    else:
        lines += ["## Summary", ""]
        lines += [f"- {_verdict_line(task)}" for task in tasks]
        lines += [""]
        lines += _protocol_section(tasks)
        lines += [""]
        lines += _environment_section(records)
        for task in tasks:
            lines += [""]
            lines += _task_section(task, _task_plots(task, colors, plots_dir))
    report = out_dir / "REPORT.md"
    temporary = report.with_name(report.name + ".tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(report)
    return report
