"""Reading run records, and the facts the report takes from each one.

A record is the JSON a finished run writes to ``runs/*.json``. The accessors here read a
record's task, method, alpha, seed, data draw and options, with each config field's default
for records written before the field existed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rdrop_lab.config import METHOD_FIELDS, config_value
from rdrop_lab.hardware import machine

Record = dict[str, Any]

BUDGETS: tuple[str, ...] = ("converged", "equal_epochs", "equal_time")

# Methods whose equal-time model is their equal-epochs model, for records that do not say
# (written before ``method_info``; all of them plain R-Drop or the doubled batch).
COSTS_LIKE_RDROP = {"rdrop", "doubled_batch"}

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
# Short labels of the options in a row label (field -> prefix).
_OPTION_LABELS = {
    "every_k_steps": "k=",
    "num_passes": "m=",
    "dropout_rates": "p=",
    "stop_gradient": "stop-grad",
    "branch_at": "branch@",
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
    # A diverged run, or one without any finite validation score, selects nothing (None).
    diverged = record.get("diverged") is True
    if not isinstance(selections, dict) or not (
        diverged
        or isinstance(selections.get("equal_epochs"), dict)
        or ("equal_epochs" in selections and selections["equal_epochs"] is None)
    ):
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
        if record.get("schema", 1) not in (1, 2):
            warnings.warn(
                f"{path.name}: unknown record schema {record.get('schema')!r}, reading it as 1",
                ReportWarning,
                stacklevel=2,
            )
        key = (
            section_of(record),
            method_of(record),
            alpha_of(record),
            variant_of(record),
            record["config"]["seed"],
            data_seed_of(record),
        )
        if key in by_key:
            previous_path, previous = by_key[key]
            newer = str(record.get("finished_at", "")) >= str(previous.get("finished_at", ""))
            kept, dropped = (path, previous_path) if newer else (previous_path, path)
            configs = (record["config"], previous["config"])
            kept_config, dropped_config = configs if newer else configs[::-1]
            where = f"task={key[0][0]} method={key[1]} alpha={key[2]} seed={key[4]}"
            if key[3]:
                where += " " + variant_text(key[3])
            if key[5]:
                where += f" data_seed={key[5]}"
            warnings.warn(
                f"two records for {where}: keeping {kept.name}, ignoring {dropped.name}"
                + _settings_differ(kept_config, dropped_config),
                ReportWarning,
                stacklevel=2,
            )
            if not newer:
                continue
        by_key[key] = (path, record)
    records = [record for _, record in by_key.values()]
    records.sort(key=lambda r: (task_name_of(r), _method_order(r), pair_of(r)))
    return records


def _settings_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """What the warning about two records of one run adds when their training settings
    differ (e.g. pilots of two learning rates in one folder): which, and what to do."""
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not differ:
        return ""
    shown = ", ".join(f"{k} ({a.get(k)!r} kept, {b.get(k)!r} ignored)" for k in differ[:4])
    return (
        f"; they differ in {shown}: a report compares one training setting per folder, "
        "so give runs of another setting their own --results-dir"
    )


# --------------------------------------------------------------------------- record access


def task_name_of(record: Record) -> str:
    return str(record["task"].get("name") or record["config"].get("task"))


def method_of(record: Record) -> str:
    return str(record["config"]["method"])


def alpha_of(record: Record) -> float | None:
    alpha = record["config"].get("alpha")
    return None if alpha is None else float(alpha)


def seed_of(record: Record) -> int:
    return int(record["config"]["seed"])


def config_of(record: Record, key: str) -> Any:
    """A config value, with the field's default for records older than the field."""
    return config_value(record["config"], key)


def data_seed_of(record: Record) -> int:
    return int(config_of(record, "data_seed") or 0)


def pair_of(record: Record) -> tuple[int, int]:
    """What pairs runs of different methods: the seed and the data draw."""
    return seed_of(record), data_seed_of(record)


def shots_of(record: Record) -> int | None:
    value = config_of(record, "shots_per_class")
    return None if value is None else int(value)


def section_of(record: Record) -> tuple[str, int | None]:
    """The table a record belongs to: its task and its few-shot size."""
    return task_name_of(record), shots_of(record)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def variant_of(record: Record) -> Variant:
    """The method options of a record that differ from their defaults (sorted)."""
    items = []
    for key in sorted(METHOD_FIELDS):
        value = _hashable(config_of(record, key))
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


def variant_text(variant: Variant) -> str:
    return " ".join(_option_text(k, v) for k, v in variant)


def finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


_CLOCK_NAMES = {
    "process_cpu": "process CPU time of the training steps",
    "wall": "wall-clock time of the training steps",
}


def machines_of(records: Sequence[Record]) -> list[str]:
    """The machines these records were timed on (:func:`rdrop_lab.hardware.machine`),
    in order of first appearance."""
    return list(dict.fromkeys(machine(r.get("environment") or {}) for r in records))


#: Process-CPU seconds per step of one configuration (all but the seed) that spread over
#: more than this factor were measured on machines of different speed, even where the CPU's
#: name and instruction set agree: two 2-core "Intel(R) Xeon(R) Processor (AVX512, native
#: bf16)" machines ran the converged translation suite's R-Drop step at 1.03 s (seed 0's
#: record) and about 2.5 s (seed 1, stopped at step 474 after 22.8 minutes), while the
#: seeds of one configuration on one machine spread by at most 1.32x over this project's
#: process-CPU records.
SPEED_SPREAD_LIMIT = 1.5


def speed_spread(records: Sequence[Record]) -> tuple[str, float, float] | None:
    """The widest spread of seconds per step among these records' runs of one
    configuration (the same config but the seed) on one kind of machine, when it passes
    :data:`SPEED_SPREAD_LIMIT`; ``None`` otherwise. Only process-CPU records count:
    wall-clock ones also stretch with the machine's load.

    Returns:
        ``(run label, fastest seconds per step, slowest)`` of the widest such spread.
    """
    groups: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    for r in records:
        seconds = seconds_per_step_of(r)
        if r.get("clock") != "process_cpu" or seconds is None or seconds <= 0:
            continue
        config = {k: v for k, v in r["config"].items() if k not in ("seed", "data_seed")}
        where = machine(r.get("environment") or {})
        key = json.dumps([where, config], sort_keys=True, default=str)
        groups.setdefault(key, []).append(seconds)
        labels[key] = f"{r['config'].get('task')} " + method_label(
            method_of(r), alpha_of(r), variant_of(r)
        )
    widest: tuple[str, float, float] | None = None
    for key, seconds in groups.items():
        fast, slow = min(seconds), max(seconds)
        if slow / fast > SPEED_SPREAD_LIMIT and (
            widest is None or slow / fast > widest[2] / widest[1]
        ):
            widest = (labels[key], fast, slow)
    return widest


def mixed_machines_mark(records: Sequence[Record]) -> str:
    """``" (mixed machines)"`` when these records' seconds come from more than one kind
    of machine, or from machines of one name but different speed (:func:`speed_spread`),
    so a ratio or a crossing time between them is not a property of the method; ``""``
    otherwise."""
    mixed = len(machines_of(records)) > 1 or speed_spread(records) is not None
    return " (mixed machines)" if mixed else ""


def clock_description(records: Sequence[Record]) -> str:
    """What ``train_seconds`` measures in these records, with their torch threads and
    machines, e.g. ``"process CPU time of the training steps, torch threads: 1, on AMD
    EPYC (AVX2)"`` (records written before the ``clock`` field timed wall-clock); records
    from several machines say that their seconds do not compare."""
    clocks = sorted({str(r.get("clock", "wall")) for r in records})
    threads = sorted({str(r.get("environment", {}).get("torch_threads", "?")) for r in records})
    names = " and ".join(_CLOCK_NAMES.get(c, c) for c in clocks)
    machines, spread = machines_of(records), speed_spread(records)
    where = (
        f"on {machines[0]}"
        if len(machines) == 1
        else f"on {len(machines)} kinds of machine ({'; '.join(machines)}), whose seconds "
        "do not compare"
    )
    if spread is not None:
        label, fast, slow = spread
        where += (
            f"; the seconds per step of one configuration differ {slow / fast:.1f}× between "
            f"runs ({label}: {fast:.2f} to {slow:.2f} s), so some ran on a slower machine of "
            "the same name, and those seconds do not compare"
        )
    return f"{names}, torch threads: {', '.join(threads)}, {where}"


def gain_that_counts(records: Sequence[Record]) -> str:
    """How the report words an early stop's "improved": ``""`` when every run counted any
    gain, ``" by more than `min_delta`"`` when one set ``min_delta``."""
    return " by more than `min_delta`" if any(config_of(r, "min_delta") for r in records) else ""


def format_alpha(alpha: float) -> str:
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
    label = name if alpha is None else f"{name} α={format_alpha(alpha)}"
    return f"{label} {variant_text(variant)}" if variant else label


def _method_order(record: Record) -> tuple[Any, ...]:
    return order_key(method_of(record), alpha_of(record), variant_of(record))


def order_key(method: str, alpha: float | None, variant: Variant = ()) -> tuple[Any, ...]:
    rank = _METHOD_RANK.get(method, len(_METHOD_RANK))
    return (
        rank,
        method,
        bool(variant),  # a method's plain rows (every alpha) before its ablations
        -1.0 if alpha is None else alpha,
        json.dumps([list(item) for item in variant], default=str),
    )


def costs_like_rdrop(record: Record) -> bool:
    info = record.get("method_info")
    if isinstance(info, dict) and isinstance(info.get("costs_like_rdrop"), bool):
        return bool(info["costs_like_rdrop"])
    return method_of(record) in COSTS_LIKE_RDROP and not variant_of(record)


def _selection(record: Record, budget: str) -> dict[str, Any] | None:
    selections = record.get("selections") or {}
    selected = selections.get(budget)
    if budget == "equal_time" and costs_like_rdrop(record):
        # R-Drop sets the time budget, and the doubled batch costs the same per step: their
        # equal-time model is their equal-epochs model.
        selected = selections.get("equal_epochs")
    return selected if isinstance(selected, dict) else None


def selected_value(record: Record, budget: str, split: str, metric: str) -> float | None:
    selected = _selection(record, budget)
    if selected is None or not isinstance(selected.get(split), dict):
        return None
    return finite_or_none(selected[split].get(metric))


def seconds_per_step_of(record: Record) -> float | None:
    value = finite_or_none(record.get("seconds_per_step"))
    if value is None:
        seconds, steps = (
            finite_or_none(record.get("train_seconds")),
            finite_or_none(record.get("steps")),
        )
        if seconds is not None and steps:
            value = seconds / steps
    return value
