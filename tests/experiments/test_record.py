"""Run records: the committed run files read back through :class:`RunRecord` (schema 1
migrated, schema 2 unchanged), the runner's deferred divergence check, and the one run
expansion shared by suite files and ``rdrop run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rdrop_lab import tasks as task_registry
from rdrop_lab.config import RunConfig, expand_runs, parse_suite
from rdrop_lab.methods import method_specs
from rdrop_lab.record import SCHEMA, RecordError, RunRecord, migrate
from rdrop_lab.runner import train_run
from rdrop_lab.store import ResultStore, finite_json
from tests.experiments._toy import ToyTask, examples

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted(ROOT.glob("results/**/runs/*.json"))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _store_text(record: dict[str, Any]) -> str:
    """The run file's JSON as :meth:`ResultStore.write` writes it."""
    return json.dumps(finite_json(record), indent=1, sort_keys=True, allow_nan=False)


@pytest.mark.skipif(not RECORDS, reason="no committed run records")
def test_committed_records_read_back_and_schema_2_writes_the_same_json() -> None:
    schemas = set()
    for path in RECORDS:
        data = _load(path)
        record = RunRecord.from_dict(data)
        schemas.add(data.get("schema", 1))
        assert record.schema == SCHEMA
        if data.get("schema") == SCHEMA:
            assert record.to_dict() == data, path
            assert _store_text(record.to_dict()) == _store_text(data), path
        else:  # migrated: every key the old record had keeps its value
            written = record.to_dict()
            assert {k: written[k] for k in data if k != "schema"} == {
                k: v for k, v in data.items() if k != "schema"
            }, path
    assert schemas <= {1, 2}


def test_schema_1_migration_fills_what_old_records_lack() -> None:
    old = {
        "schema": 1,
        "run_id": "x",
        "steps": 30,
        "epochs_run": 3.0,
        "train_seconds": 12.0,
        "time_budget_reached": True,
    }
    migrated = migrate(old)
    assert migrated["schema"] == 2 and old["schema"] == 1
    assert migrated["clock"] == "wall" and migrated["train_wall_seconds"] == 12.0
    assert migrated["steps_per_epoch"] == 10 and migrated["stop_reason"] == "time_budget"
    assert migrated["diverged"] is False and migrated["resumes"] == []
    assert migrate({k: v for k, v in old.items() if k != "schema"}) == migrated


def test_unknown_schema_and_missing_keys_are_refused() -> None:
    with pytest.raises(RecordError, match="unknown schema 3"):
        RunRecord.from_dict({"schema": 3, "run_id": "x"})
    with pytest.raises(RecordError, match="missing"):
        RunRecord.from_dict({"schema": 2, "run_id": "x"})


TOY = {"epochs": 1.0, "train_size": 16, "batch_size": 2, "evals_per_epoch": 1, "probe_size": 4}


def test_the_runner_writes_a_run_record_in_field_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(task_registry.TASKS, "toy", ToyTask(examples(16)))
    record = train_run(RunConfig("toy", equal_time=False, **TOY), ResultStore(tmp_path),
                       data_dir=tmp_path)  # fmt: skip
    assert list(record) == list(RunRecord.from_dict(record).to_dict())
    assert record["schema"] == SCHEMA and record["diverged"] is False


def test_a_divergence_found_at_a_curve_point_is_dated_to_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(task_registry.TASKS, "toy", ToyTask(examples(16)))
    # 16 steps per epoch, curve points every 4 steps: the losses are read back at step 4,
    # and the record names the first step whose loss was not finite (step 2 here).
    config = RunConfig("toy", lr=1e30, equal_time=False, **{**TOY, "batch_size": 1})
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    assert record["diverged"] is True and record["stop_reason"] == "diverged"
    assert record["steps"] == record["diverged_at_step"] == 2
    assert all(point["step"] < record["diverged_at_step"] for point in record["train_curve"])
    assert record["evals"] == []


SPECS = method_specs()


def test_rdrop_run_order_is_method_first_and_suites_seed_first() -> None:
    common = {"specs": SPECS, "seeds": [0, 1], "alphas": [1.0, 0.5], "paper_alpha": 1.0,
              "options": {"epochs": 1.0}, "data_seeds": [3, 4]}  # fmt: skip
    cli = expand_runs("sst2", ["rdrop", "baseline"], method_first=True, **common)
    suite = expand_runs("sst2", ["rdrop", "baseline"], **common)
    assert sorted(r.run_id() for r in cli) == sorted(r.run_id() for r in suite)
    assert [(r.method, r.data_seed, r.seed, r.alpha) for r in cli[:4]] == [
        ("rdrop", 3, 0, 1.0), ("rdrop", 3, 0, 0.5), ("rdrop", 3, 1, 1.0), ("rdrop", 3, 1, 0.5)
    ]  # fmt: skip
    assert [(r.data_seed, r.seed, r.method) for r in suite[:3]] == [
        (3, 0, "rdrop"), (3, 0, "rdrop"), (3, 0, "baseline")
    ]  # fmt: skip


def test_a_suite_expands_through_expand_runs() -> None:
    data = {
        "suite": {"name": "s", "tasks": ["sst2"], "methods": ["rdrop", "baseline"],
                  "seeds": [0, 1], "alphas": [1.0], "data_seeds": [2]},
        "train": {"epochs": 1.0, "every_k_steps": 2},
    }  # fmt: skip
    suite = parse_suite(data, known_tasks={"sst2": 1.0}, known_methods=SPECS)
    direct = expand_runs("sst2", ["rdrop", "baseline"], specs=SPECS, seeds=[0, 1],
                         alphas=[1.0], paper_alpha=1.0,
                         options={"epochs": 1.0, "every_k_steps": 2}, data_seeds=[2])  # fmt: skip
    assert [r.run_id() for r in suite.runs] == [r.run_id() for r in direct]
    assert [r.every_k_steps for r in direct] == [2, 1, 2, 1]
