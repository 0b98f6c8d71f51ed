"""The convergence protocol (early stopping, convergence marking) and exact resume, on a
toy task that trains in milliseconds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from rdrop_lab import runner
from rdrop_lab import tasks as task_registry
from rdrop_lab.config import ConfigError, RunConfig
from rdrop_lab.resume import ResumeError, load_resume_state, resume_path, save_resume_state
from rdrop_lab.runner import train_run
from rdrop_lab.store import ResultStore
from tests.experiments._records import comparable
from tests.experiments._toy import ToyTask, examples


class ScriptedTask(ToyTask):
    """The toy task whose validation score follows a script (one value per evaluation),
    so early stopping can be checked against hand-counted evaluations."""

    name = "scripted"

    def __init__(self, scores: list[float]) -> None:
        super().__init__(examples(16))
        self.scores = scores
        self.calls = 0

    def evaluate(self, model, data, collate, batch_size, *, final=False):  # type: ignore[no-untyped-def]
        if final:
            return {"accuracy": 0.5}
        value = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"accuracy": value}


TOY = {"epochs": 1.0, "train_size": 16, "batch_size": 4, "evals_per_epoch": 2, "probe_size": 4}


def _register(monkeypatch: pytest.MonkeyPatch, task: ToyTask) -> None:
    monkeypatch.setitem(task_registry.TASKS, task.name, task)


def test_convergence_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="patience must be an integer >= 1"):
        RunConfig("sst2", patience=0)
    with pytest.raises(ConfigError, match="max_epochs needs patience"):
        RunConfig("sst2", max_epochs=4.0)
    with pytest.raises(ConfigError, match="max_epochs must be a finite number >= epochs"):
        RunConfig("sst2", epochs=3.0, max_epochs=2.0, patience=2)
    with pytest.raises(ConfigError, match="min_steps needs patience"):
        RunConfig("sst2", min_steps=10)
    for bad in (-0.01, math.nan, math.inf, True, "0.01"):
        with pytest.raises(ConfigError, match="min_delta must be a finite number >= 0"):
            RunConfig("sst2", patience=2, min_delta=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_delta needs patience"):
        RunConfig("sst2", min_delta=0.01)
    assert "min_delta" not in RunConfig("sst2", patience=2).identity()
    assert (
        RunConfig("sst2", patience=2, min_delta=0.01).run_id()
        != RunConfig("sst2", patience=2).run_id()
    )
    # The new fields at their defaults leave every existing run id unchanged.
    assert "patience" not in RunConfig("sst2").identity()
    assert RunConfig("sst2", patience=3).run_id() != RunConfig("sst2").run_id()


def test_early_stop_after_patience_evaluations_without_improvement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 evaluations per epoch of 4 steps: evaluations at steps 2, 4, 6, ...
    task = ScriptedTask([0.5, 0.7, 0.6, 0.7, 0.65, 0.9])
    _register(monkeypatch, task)
    config = RunConfig("scripted", max_epochs=10.0, patience=3, equal_time=False, **TOY)
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    # Best 0.7 at the 2nd evaluation; a tie (0.7) does not improve; the 3rd evaluation after
    # the best stops the run, before the 0.9 it would have reached.
    assert [e["step"] for e in record["evals"]] == [2, 4, 6, 8, 10]
    assert record["converged"] is True and record["stop_reason"] == "early_stop"
    assert record["selections"]["converged"]["step"] == 4
    assert record["selections"]["equal_epochs"]["step"] == 4  # within epochs = 1 (step 4)
    # Test scores exist exactly for the best-so-far checkpoints.
    assert [("test" in e) for e in record["evals"]] == [True, True, False, False, False]


def test_min_delta_counts_only_gains_larger_than_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Gains of 0.003 at a time, within 0.01 of the 0.70 that last restarted the count, then
    # a larger one: with min_delta = 0.01 the creep does not restart it, so the run stops
    # at the 3rd evaluation after 0.70.
    scores = [0.5, 0.7, 0.703, 0.706, 0.709, 0.75, 0.8, 0.9]
    _register(monkeypatch, ScriptedTask(scores))
    config = RunConfig(
        "scripted", max_epochs=10.0, patience=3, min_delta=0.01, equal_time=False, **TOY
    )
    record = train_run(config, ResultStore(tmp_path / "delta"), data_dir=tmp_path)
    assert [e["step"] for e in record["evals"]] == [2, 4, 6, 8, 10]
    assert record["converged"] is True and record["stop_reason"] == "early_stop"
    # Selection still takes the best score seen, the creep's last step (0.709).
    assert record["selections"]["converged"]["step"] == 10
    # Without min_delta every gain counts: the run goes on to the 0.9 and past it.
    _register(monkeypatch, ScriptedTask(scores))
    plain = RunConfig("scripted", max_epochs=10.0, patience=3, equal_time=False, **TOY)
    record = train_run(plain, ResultStore(tmp_path / "plain"), data_dir=tmp_path)
    assert record["selections"]["converged"]["step"] == 16
    assert [e["step"] for e in record["evals"]][-1] == 22


def test_min_steps_delays_the_early_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = ScriptedTask([0.9, 0.5, 0.5, 0.5, 0.5, 0.5])
    _register(monkeypatch, task)
    config = RunConfig(
        "scripted", max_epochs=10.0, patience=1, min_steps=8, equal_time=False, **TOY
    )
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    assert record["steps"] == 8 and record["converged"] is True


def test_a_run_that_hits_max_epochs_is_not_converged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = ScriptedTask([0.1 * i for i in range(1, 30)])  # improves at every evaluation
    _register(monkeypatch, task)
    config = RunConfig("scripted", max_epochs=2.0, patience=2, equal_time=False, **TOY)
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    assert record["steps"] == 8 and record["max_steps"] == 8
    assert record["converged"] is False and record["stop_reason"] == "max_epochs"


def test_training_seconds_use_the_process_cpu_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(monkeypatch, ToyTask(examples(16)))
    config = RunConfig("toy", equal_time=False, **TOY)
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    assert record["clock"] == "process_cpu"
    assert record["train_seconds"] > 0 and record["train_wall_seconds"] > 0
    times = [e["train_seconds"] for e in record["evals"]]
    assert times == sorted(times)


class Killed(Exception):
    pass


def _train_until_killed(
    monkeypatch: pytest.MonkeyPatch,
    config: RunConfig,
    store: ResultStore,
    resume: Path,
    data_dir: Path,
    kill_at: int,
) -> None:
    """Train ``config`` with a checkpoint at every step and kill it after ``kill_at``
    optimizer steps; the optimizer is restored afterwards."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > kill_at:
            raise Killed
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(Killed):
        train_run(config, store, data_dir=data_dir, resume_file=resume, checkpoint_every=0)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


@pytest.mark.parametrize("method", ["baseline", "rdrop", "mixup", "rdrop_rates"])
@pytest.mark.parametrize("kill_at", [1, 5, 9])
def test_a_run_killed_at_any_step_resumes_to_the_same_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, kill_at: int
) -> None:
    _register(monkeypatch, ToyTask(examples(16)))
    options: dict[str, Any] = {}
    if method == "rdrop_rates":  # a tuple-valued option must survive the checkpoint
        method, options = "rdrop", {"dropout_rates": (0.1, 0.3), "every_k_steps": 2}
    alpha = 1.0 if method == "rdrop" else None
    config = RunConfig(
        "toy", method, alpha=alpha, max_epochs=4.0, patience=20, equal_time=False, **TOY,
        **options,
    )  # fmt: skip
    whole = train_run(config, ResultStore(tmp_path / "a"), data_dir=tmp_path)

    store = ResultStore(tmp_path / "b")
    resume = resume_path(tmp_path / "resume", store.results_dir, config.run_id())
    _train_until_killed(monkeypatch, config, store, resume, tmp_path, kill_at)
    assert resume.is_file() and not store.has(config.run_id())
    assert load_resume_state(resume)["loop"]["step"] == kill_at
    resumed = train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    assert not resume.exists()  # deleted once the record is written
    assert resumed["resumes"][0]["step"] == kill_at
    assert comparable(resumed, None) == comparable(whole, None)
    # Training time excludes the time the run was down and the repeated work.
    first = whole["evals"][0]["train_seconds"]
    assert math.isfinite(first)


def test_a_checkpoint_of_another_configuration_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _register(monkeypatch, ToyTask(examples(16)))
    config = RunConfig("toy", equal_time=False, **TOY)
    resume = tmp_path / "x.safetensors"
    save_resume_state(resume, {"run_id": "other", "config": {}})
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path, resume_file=resume)
    assert record["resumes"] == []
    assert "cannot resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content", [b"", b"not safetensors at all", b"\x80\x04\x95 a pickle renamed"]
)
def test_a_corrupt_checkpoint_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ResumeError, match="bad.safetensors"):
        load_resume_state(path)


def _toy_run_killed_at_step_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunConfig, ResultStore, Path]:
    """A toy run killed after 3 steps: ``(config, store, its resumable checkpoint)``."""
    _register(monkeypatch, ToyTask(examples(16)))
    config = RunConfig("toy", max_epochs=4.0, patience=20, equal_time=False, **TOY)
    store = ResultStore(tmp_path)
    resume = resume_path(tmp_path / "resume", store.results_dir, config.run_id())
    _train_until_killed(monkeypatch, config, store, resume, tmp_path, 3)
    return config, store, resume


def test_a_run_resumed_with_another_thread_count_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store, resume = _toy_run_killed_at_step_3(tmp_path, monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(ConfigError, match=f"resume with --threads {threads} "):
            train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    finally:
        torch.set_num_threads(threads)
    assert resume.is_file()  # kept: the same command with the right --threads resumes it
    resumed = train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    assert resumed["resumes"][0]["step"] == 3


def test_a_run_resumed_on_another_machine_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store, resume = _toy_run_killed_at_step_3(tmp_path, monkeypatch)
    here = runner.this_machine()
    assert load_resume_state(resume)["machine"] == here
    monkeypatch.setattr(runner, "this_machine", lambda: "Other CPU (AVX512)")
    with pytest.raises(ConfigError, match=rf"was trained on {re.escape(here)}, this process "):
        train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    assert resume.is_file()  # kept: the same command on the first machine resumes it
    monkeypatch.setattr(runner, "this_machine", lambda: here)
    resumed = train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    assert resumed["resumes"][0]["step"] == 3
    assert resumed["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_nan_validation_score_is_never_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = ScriptedTask([math.nan, 0.4, math.nan, 0.3, 0.35, 0.2])
    _register(monkeypatch, task)
    config = RunConfig("scripted", max_epochs=10.0, patience=3, equal_time=False, **TOY)
    store = ResultStore(tmp_path)
    resume = resume_path(tmp_path / "resume", store.results_dir, config.run_id())
    # checkpoint_every=0 writes a checkpoint holding the NaN score after every step.
    record = train_run(config, store, data_dir=tmp_path, resume_file=resume, checkpoint_every=0)
    assert record["selections"]["converged"]["step"] == 4  # 0.4, not the NaN before it
    assert [e["step"] for e in record["evals"]] == [2, 4, 6, 8, 10]  # 3 after the best


@pytest.mark.parametrize("converging", [True, False])
def test_a_run_without_any_finite_validation_score_selects_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, converging: bool
) -> None:
    _register(monkeypatch, ScriptedTask([math.nan]))
    budget = {"max_epochs": 2.0, "patience": 2} if converging else {}
    config = RunConfig("scripted", equal_time=False, **budget, **TOY)
    record = train_run(config, ResultStore(tmp_path), data_dir=tmp_path)
    assert all(selection is None for selection in record["selections"].values())
    if converging:  # patience never starts counting: it runs to max_epochs, not converged
        assert record["stop_reason"] == "max_epochs" and record["converged"] is False
    from rdrop_lab.report import write_report

    text = write_report(tmp_path).read_text()  # the report takes such a run as it is
    if converging:
        assert "**Not converged:** baseline seed 0 (hit max_epochs)" in text


def test_non_finite_floats_survive_a_resume_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_resume_state(
        path, {"scores": [math.nan, math.inf, -math.inf, 0.5], "weights": torch.ones(2)}
    )
    state = load_resume_state(path)
    assert math.isnan(state["scores"][0]) and state["scores"][1:] == [math.inf, -math.inf, 0.5]
