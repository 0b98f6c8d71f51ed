"""Few-shot training sets and unlabeled pools, drawn reproducibly with ``data_seed``.

* **Few-shot** (``RunConfig.shots_per_class = k``): exactly ``k`` examples of every class,
  drawn from the task's whole training split with ``data_seed`` (several data seeds =
  several draws of the few-shot set). The validation split stays the task's usual one: it
  is used for checkpoint selection only (a real few-shot user would not have a
  development set this large; reports say so). Regression and token-level tasks have no
  classes: few-shot is refused for them.
* **Unlabeled pool** (``RunConfig.unlabeled_size = n``): ``n`` examples drawn with
  ``data_seed`` from the training examples that are **not** in the labelled set, with
  their labels replaced by zeros (:func:`strip_labels`).

Runs that use neither get exactly the data of :meth:`Task.load` (nothing changes for them).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from rdrop_lab.config import ConfigError, RunConfig
from rdrop_lab.tasks.base import Example, Task, TaskData

__all__ = ["few_shot_indices", "pool_indices", "select_training_data", "strip_labels"]

# Offsets of data_seed for the two draws (the GLUE loader uses +1..+3 for its own).
_FEW_SHOT_OFFSET = 4
_POOL_OFFSET = 5


def few_shot_indices(classes: Sequence[Hashable], shots: int, data_seed: int) -> list[int]:
    """Indices of ``shots`` examples of every class, drawn with ``data_seed``.

    Args:
        classes: the class of every example of the split (in split order).
        shots: examples per class (``k``).
        data_seed: the draw; the same seed gives the same indices.

    Returns:
        The chosen indices in split order (``shots * number of classes`` of them).

    Raises:
        ConfigError: a class has fewer than ``shots`` examples.

    Example:
        >>> len(few_shot_indices(["a", "b", "a", "b", "a"], 2, 0))
        4
    """
    if shots < 1:
        raise ConfigError(f"shots_per_class must be >= 1, got {shots}")
    by_class: dict[Hashable, list[int]] = {}
    for index, label in enumerate(classes):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(data_seed + _FEW_SHOT_OFFSET)
    chosen: list[int] = []
    for label in sorted(by_class, key=repr):
        members = by_class[label]
        if len(members) < shots:
            raise ConfigError(
                f"shots_per_class={shots}: class {label!r} has only {len(members)} "
                "training examples"
            )
        chosen += rng.sample(members, shots)
    return sorted(chosen)


def pool_indices(total: int, exclude: Sequence[int], size: int, data_seed: int) -> list[int]:
    """``size`` indices of ``range(total)`` outside ``exclude``, drawn with ``data_seed``.

    Raises:
        ConfigError: fewer than ``size`` indices are left.
    """
    excluded = set(exclude)
    rest = [i for i in range(total) if i not in excluded]
    if size > len(rest):
        raise ConfigError(
            f"unlabeled_size={size}: only {len(rest)} training examples are left outside "
            "the labelled set"
        )
    return sorted(random.Random(data_seed + _POOL_OFFSET).sample(rest, size))


def strip_labels(examples: Sequence[Any]) -> list[Any]:
    """Copies of dataclass examples with the label replaced by a zero of its type, so an
    unlabeled pool really carries no labels (the collator still needs a value)."""
    stripped = []
    for example in examples:
        if dataclasses.is_dataclass(example) and hasattr(example, "label"):
            zero: Any = 0.0 if isinstance(example.label, float) else 0
            stripped.append(dataclasses.replace(example, label=zero))  # type: ignore[type-var]
        else:
            stripped.append(example)
    return stripped


def _load(task: Task, data_dir: Path, config: RunConfig, train_size: int | None) -> TaskData:
    return task.load(
        data_dir,
        train_size,
        config.validation_size,
        config.data_seed,
        config.test_size,
        max_length=config.max_length,
    )


def _same_examples(a: Sequence[Any], b: Sequence[Any]) -> bool:
    try:
        return len(a) == len(b) and all(bool(x == y) for x, y in zip(a, b, strict=True))
    except (RuntimeError, TypeError, ValueError):  # e.g. examples holding tensors
        return False


def select_training_data(
    task: Task, data_dir: Path, config: RunConfig
) -> tuple[TaskData, list[Example]]:
    """The run's splits (training set: few-shot draw or the task's subsample) and its
    unlabeled pool (empty unless ``unlabeled_size`` is set).

    ``data.info`` records the regime: ``shots_per_class``, ``class_counts``,
    ``few_shot_draw`` and ``unlabeled_examples``.
    """
    shots, pool_size = config.shots_per_class, config.unlabeled_size
    if shots is None and pool_size is None:
        return _load(task, data_dir, config, config.train_size), []
    if shots is not None and task.kind != "classification":
        raise ConfigError(
            f"shots_per_class: few-shot sampling needs classes, and task {task.name!r} is a "
            f"{task.kind} task"
        )
    data = _load(task, data_dir, config, None)
    full = data.train
    info: dict[str, Any] = dict(data.info)
    if shots is not None:
        labelled_idx = few_shot_indices([task.class_of(e) for e in full], shots, config.data_seed)
        info["shots_per_class"] = shots
        info["few_shot_draw"] = (
            f"{shots} per class drawn with data_seed={config.data_seed} from the "
            f"{len(full):,} training examples"
        )
    else:
        n = len(full) if config.train_size is None else min(config.train_size, len(full))
        labelled_idx = list(range(n))
        subsample = _load(task, data_dir, config, config.train_size).train
        if not _same_examples([full[i] for i in labelled_idx], subsample):
            raise ConfigError(
                f"unlabeled_size without shots_per_class: task {task.name!r} does not "
                "subsample its training split as a prefix of the whole split, so the "
                "labelled set cannot be told apart from the pool; set shots_per_class"
            )
    labelled = [full[i] for i in labelled_idx]
    counts: dict[str, int] = {}
    if task.kind == "classification":
        for example in labelled:
            key = str(task.class_of(example))
            counts[key] = counts.get(key, 0) + 1
        info["class_counts"] = dict(sorted(counts.items()))
    info["train_examples"] = len(labelled)
    info.setdefault("train_available", len(full))
    unlabeled: list[Example] = []
    if pool_size is not None:
        chosen = pool_indices(len(full), labelled_idx, pool_size, config.data_seed)
        unlabeled = strip_labels([full[i] for i in chosen])
        info["unlabeled_examples"] = len(unlabeled)
        info["unlabeled_pool"] = (
            f"{len(unlabeled):,} training examples outside the labelled set, drawn with "
            f"data_seed={config.data_seed}, labels discarded"
        )
    return TaskData(labelled, data.validation, data.test, info, data.resources), unlabeled
