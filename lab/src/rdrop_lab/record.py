"""The record of one finished run (``runs/<run_id>.json``) and its schema versions.

:class:`RunRecord` holds the keys the runner writes, in the order it writes them;
:meth:`RunRecord.to_dict` is the JSON object of a run file. :meth:`RunRecord.from_dict`
reads any schema this lab has written:

* schema 2 (:data:`SCHEMA`): the current keys.
* schema 1 (or no ``schema`` key): records without the keys ``max_steps``,
  ``steps_per_epoch``, ``clock``, ``train_wall_seconds``, ``converged``, ``stop_reason``,
  ``diverged``, ``diverged_at_step`` and ``resumes``; some also lack
  ``time_budget_sources`` and ``method_info``. :func:`migrate` fills them in.

Example:
    >>> old = {"schema": 1, "steps": 10, "epochs_run": 2.0, "train_seconds": 3.0,
    ...        "time_budget_reached": None}
    >>> record = RunRecord.from_dict({**{k: None for k in _SCHEMA_1_KEYS}, **old})
    >>> record.schema, record.clock, record.steps_per_epoch, record.stop_reason
    (2, 'wall', 5, 'epochs')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEMA", "RecordError", "RunRecord", "migrate"]

#: The schema version of records this lab writes.
SCHEMA = 2


class RecordError(ValueError):
    """A run record of an unknown schema, or with keys missing or unknown."""


@dataclass
class RunRecord:
    """One finished run: its configuration, evaluations, budgets and selections.

    The fields are the keys of the run file, in the order the runner writes them.
    """

    schema: int
    run_id: str
    command: str
    config: dict[str, Any]
    task: dict[str, Any]
    evals: list[dict[str, Any]]
    train_curve: list[dict[str, Any]]
    steps: int
    planned_steps: int
    max_steps: int | None
    epochs_run: float
    steps_per_epoch: int | None
    clock: str
    train_seconds: float
    train_wall_seconds: float | None
    seconds_per_step: float
    wall_seconds: float
    time_budget_seconds: float | None
    time_budget_sources: list[str] | None
    time_budget_reached: bool | None
    converged: bool | None
    stop_reason: str | None
    diverged: bool
    diverged_at_step: int | None
    resumes: list[dict[str, Any]]
    selections: dict[str, Any]
    method_info: dict[str, Any] | None
    environment: dict[str, Any]
    started_at: str
    finished_at: str

    def to_dict(self) -> dict[str, Any]:
        """The run file's JSON object: every key, in field order (values not copied).

        Returns:
            ``{key: value}`` for every field.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Read a record of any known schema (older ones are migrated, see :func:`migrate`).

        Args:
            data: a parsed run file.

        Returns:
            The record at schema :data:`SCHEMA`.

        Raises:
            RecordError: an unknown schema, or keys missing or unknown for its schema.
        """
        current = migrate(data)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in current]
        unknown = sorted(set(current) - set(names))
        if missing or unknown:
            raise RecordError(
                f"record {data.get('run_id')!r}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"unknown keys {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
            )
        return cls(**{name: current[name] for name in names})


#: The keys every schema-1 record has (some lack ``method_info`` and
#: ``time_budget_sources`` too, which :func:`migrate` adds).
_SCHEMA_1_KEYS = (
    "run_id",
    "command",
    "config",
    "task",
    "evals",
    "train_curve",
    "steps",
    "planned_steps",
    "epochs_run",
    "train_seconds",
    "seconds_per_step",
    "wall_seconds",
    "time_budget_seconds",
    "time_budget_reached",
    "selections",
    "environment",
    "started_at",
    "finished_at",
)


def _steps_per_epoch_of(data: dict[str, Any]) -> int | None:
    """Steps per epoch from steps / epochs run (``None`` when no epoch was run)."""
    epochs = data.get("epochs_run")
    return round(data["steps"] / epochs) if epochs else None


def _migrate_schema_1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record with the schema-2 keys it lacks.

    Schema-1 runs trained a fixed number of epochs (or to the equal-time budget) on the
    wall clock, were never resumed and never diverged (the lab did not record it).
    """
    added = {
        "max_steps": None,  # not recorded: the cap depended on the budget then found
        "steps_per_epoch": _steps_per_epoch_of(data),
        "clock": "wall",
        "train_wall_seconds": data.get("train_seconds"),
        "time_budget_sources": None,
        "converged": None,
        "stop_reason": "time_budget" if data.get("time_budget_reached") else "epochs",
        "diverged": False,
        "diverged_at_step": None,
        "resumes": [],
        "method_info": None,
    }
    return {**{k: v for k, v in added.items() if k not in data}, **data, "schema": 2}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as a record of schema :data:`SCHEMA` (a new dict; ``data`` is unchanged).

    Args:
        data: a parsed run file of schema 1 (or without a ``schema`` key) or 2.

    Returns:
        The record's keys at the current schema.

    Raises:
        RecordError: for a schema this lab never wrote.
    """
    schema = data.get("schema", 1)
    if schema == SCHEMA:
        return dict(data)
    if schema == 1:
        return _migrate_schema_1(data)
    raise RecordError(f"record {data.get('run_id')!r}: unknown schema {schema!r}")
