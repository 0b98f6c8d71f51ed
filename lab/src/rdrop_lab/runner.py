"""Train one run, select checkpoints on validation, score the held-out test split once.

Protocol (the same for every method):

1. Seed everything with the run's seed; the training subsample and the splits depend only
   on ``data_seed``, so every method and seed sees the same data (few-shot sets and
   unlabeled pools too: :mod:`rdrop_lab.data_regimes`).
2. AdamW, linear warm-up over ``warmup_ratio`` of the planned steps, then a constant
   learning rate (so a run that trains longer is the same run continued, which the
   equal-time comparison needs).
3. Evaluate on validation ``evals_per_epoch`` times per epoch (and at the end of the epoch
   budget); at each evaluation also record the training loss and the probe: the symmetric
   KL between two dropout passes on a fixed batch of training examples (for every method,
   since the authors' check is that it grows without R-Drop).
4. Two budgets. *Equal epochs*: the best validation checkpoint among the scheduled
   evaluations within ``epochs`` epochs (every method chooses from the same steps).
   *Equal wall-clock time*: methods cheaper per step than R-Drop (the baseline) keep
   training until they have used as many training seconds as R-Drop needed for ``epochs``
   epochs on the same task (the median over finished R-Drop runs with the same thread
   count; at most ``max_time_factor`` times the planned steps), are evaluated when they
   reach it, and the best validation checkpoint within that time is selected. Methods that
   cost what R-Drop costs (``doubled_batch``, R-Drop + MixUp, ...) use their equal-epochs
   checkpoint. Methods that cost more per step (FGM, R-Drop + FGM, m = 3, semi-supervised
   R-Drop) are measured the same way as the cheaper ones: they train their epochs, and the
   equal-time selection only looks at the evaluations made before the budget ran out. The
   budget comes from plain R-Drop runs only (k = 1, m = 2, no stop-gradient, one rate).
5. The test split is scored once per selected checkpoint. It is never used for selection.
6. Trained to convergence (``patience`` set): the run trains up to ``max_epochs`` and stops
   once ``patience`` scheduled evaluations in a row brought no new best validation score
   (never before ``min_steps``); it is *converged* only if it stopped that way. Every
   checkpoint that is the best so far is scored on test when it is reached, so that the
   report can tell, for any training-time budget, the test score of the model each method
   would have selected on validation by then (:mod:`rdrop_lab.time_to_quality`).
   Selections: ``converged`` (best of the whole run) and ``equal_epochs`` (best within
   ``epochs``); the equal-time budget of step 4 does not apply.

Training seconds are the process CPU time of the training steps (:data:`TRAINING_CLOCK`);
a run in progress writes a resumable checkpoint (:mod:`rdrop_lab.resume`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rdrop
from rdrop_lab.config import ConfigError, RunConfig, config_value, is_plain_rdrop
from rdrop_lab.data_regimes import select_training_data
from rdrop_lab.methods import RunContext, get_method
from rdrop_lab.progress import Progress
from rdrop_lab.resume import (
    ResumeError,
    load_resume_state,
    resume_path,
    save_resume_state,
)
from rdrop_lab.store import ResultStore, environment
from rdrop_lab.tasks import Example, Task, get_task

__all__ = [
    "check_run",
    "estimate_units",
    "evaluate",
    "run_suite",
    "time_budget_for",
    "time_budget_sources",
    "train_run",
]

State = dict[str, torch.Tensor]

#: The clock of ``train_seconds``: the process CPU time of the training steps, which other
#: processes on the machine do not stretch (wall-clock seconds are recorded beside it).
TRAINING_CLOCK = "process_cpu"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _batches(examples: Sequence[Example], size: int) -> list[Sequence[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    collate: Callable[..., Any],
    task: Task,
    batch_size: int,
    *,
    final: bool = False,
) -> dict[str, float]:
    """Task metrics of ``model`` (in eval mode) on ``examples``: see :meth:`Task.evaluate`."""
    return task.evaluate(model, examples, collate, batch_size, final=final)


def _same_budget(a: dict[str, Any], b: RunConfig) -> bool:
    """Same data and epoch budget (records older than a field get its default)."""
    keys = (
        "task",
        "epochs",
        "train_size",
        "batch_size",
        "max_length",
        "dropout",
        "data_seed",
        "lr",
        "shots_per_class",
    )
    return all(config_value(a, k) == getattr(b, k) for k in keys)


def time_budget_sources(config: RunConfig, store: ResultStore) -> dict[str, float]:
    """The finished plain R-Drop runs (k = 1, m = 2, no stop-gradient, the model's dropout
    rate) with the same data and epoch budget, measured on the same clock
    (:data:`TRAINING_CLOCK`) with the same number of torch threads as this process uses:
    ``{run_id: train_seconds}``."""
    threads = torch.get_num_threads()
    return {
        str(record.get("run_id")): float(record["train_seconds"])
        for record in store.records()
        if is_plain_rdrop(record.get("config", {}))
        and _same_budget(record.get("config", {}), config)
        and record.get("environment", {}).get("torch_threads") == threads
        and record.get("clock", "wall") == TRAINING_CLOCK
    }


def _median_budget(sources: dict[str, float]) -> float | None:
    return statistics.median(sources.values()) if sources else None


def time_budget_for(config: RunConfig, store: ResultStore) -> float | None:
    """The equal-time budget: the median of :func:`time_budget_sources` (``None``: none)."""
    return _median_budget(time_budget_sources(config, store))


def _planned_steps(config: RunConfig, train_examples: int) -> tuple[int, int]:
    steps_per_epoch = math.ceil(train_examples / config.batch_size)
    return steps_per_epoch, max(1, math.ceil(config.epochs * steps_per_epoch))


def estimate_units(config: RunConfig, train_examples: int | None = None) -> float:
    """Rough cost of a run in baseline-step units (for the suite's ETA)."""
    if train_examples is None:
        if config.shots_per_class is not None:
            classes = max(2, get_task(config.task).num_labels)
            train_examples = classes * config.shots_per_class
        else:
            train_examples = config.train_size or 1000
    _, steps = _planned_steps(config, train_examples)
    method = get_method(config.method)
    cost = method.cost_for(config)
    if method.costs_like_rdrop_for(config) or not config.equal_time:
        return cost * steps
    return max(cost, 2.0) * steps  # cheaper methods train on to the R-Drop time budget


def check_run(config: RunConfig) -> None:
    """Refuse a run that cannot work (before any data is loaded): the method must support
    the task and the run's options; few-shot needs a classification task.

    Raises:
        ConfigError: naming the run, the task and the option.
    """
    task = get_task(config.task)
    method = get_method(config.method)
    try:
        method.check(task, config)
        if config.shots_per_class is not None and task.kind != "classification":
            raise ConfigError(
                f"shots_per_class: few-shot sampling needs classes, and task {task.name!r} "
                f"is a {task.kind} task"
            )
    except ConfigError as error:
        raise ConfigError(f"run {config.run_id()}: {error}") from None


def _strictly_better(value: float, best: float, higher: bool) -> bool:
    """Whether a validation score beats the best so far (a tie keeps the earlier one)."""
    return value > best if higher else value < best


def _clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _LoopState:
    """Everything the training loop changes, so a run can stop and resume exactly."""

    step: int = 0
    #: Training seconds on the budget clock (process CPU time of the training steps).
    train_seconds: float = 0.0
    #: The same steps on the wall clock (recorded, never used for budgets).
    train_wall_seconds: float = 0.0
    epoch_order: list[int] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: (loss, task loss, consistency loss) of the steps since the last evaluation.
    window: list[list[float | None]] = field(default_factory=list)
    best_all: int | None = None
    best_epochs: int | None = None
    best_time: int | None = None
    time_cut: int | None = None  # the evaluation at which the time budget was reached
    stopped_early: bool = False
    diverged_at: int | None = None
    #: Where the run was resumed: ``{"step", "train_seconds"}`` per resume.
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _LoopState:
        return cls(**data)


def _rng_state(order_rng: torch.Generator, method_rng: torch.Generator) -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "order": order_rng.get_state(),
        "method": method_rng.get_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
    }


def _set_rng_state(
    state: dict[str, Any], order_rng: torch.Generator, method_rng: torch.Generator
) -> None:
    torch.set_rng_state(state["torch"])
    order_rng.set_state(state["order"])
    method_rng.set_state(state["method"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def _check_checkpoint_every(seconds: float) -> None:
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ConfigError(f"--checkpoint-every must be >= 0 seconds, got {seconds!r}")


def _is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def train_run(
    config: RunConfig,
    store: ResultStore,
    *,
    data_dir: Path,
    command: str = "",
    progress: Progress | None = None,
    units: float = 0.0,
    checkpoint_dir: Path | None = None,
    resume_file: Path | None = None,
    checkpoint_every: float = 600.0,
) -> dict[str, Any]:
    """Train one run to completion and write its record; returns the record.

    Args:
        config: the run.
        store: where its record goes (and where the equal-time budget's R-Drop runs are).
        data_dir: the data folder.
        command: the command line, recorded.
        progress: the suite's progress display.
        units: this run's share of the suite's progress units.
        checkpoint_dir: where the selected model is saved (``--save-checkpoints``).
        resume_file: the resumable checkpoint of this run (``None``: none is written).
            When the file exists the run continues from it; it is deleted once the record
            is written.
        checkpoint_every: seconds (wall clock) between resumable checkpoints; 0 writes
            one after every step.
    """
    check_run(config)
    _check_checkpoint_every(checkpoint_every)
    task = get_task(config.task)
    method = get_method(config.method)
    costs_like_rdrop = method.costs_like_rdrop_for(config)
    started = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    data, unlabeled = select_training_data(task, data_dir, config)
    steps_per_epoch, planned = _planned_steps(config, len(data.train))
    time_budget, budget_sources = None, None
    # Converging runs train to their own early stop; the report answers any time budget
    # from their validation curves.
    if config.equal_time and not costs_like_rdrop and not config.converges:
        sources = time_budget_sources(config, store)
        budget_sources = sorted(sources)
        time_budget = _median_budget(sources)
        if time_budget is None and progress is not None:
            progress.message(
                f"{config.run_id()}: no finished plain R-Drop run with the same data, epochs "
                f"and torch threads in {store.runs_dir}, so this run gets no equal-time "
                "selection (its record will not be redone later): run R-Drop first"
            )
    if config.converges:
        max_epochs = config.max_epochs if config.max_epochs is not None else config.epochs
        max_steps = max(planned, math.ceil(max_epochs * steps_per_epoch))
    elif time_budget is None:
        max_steps = planned
    else:
        max_steps = math.ceil(planned * config.max_time_factor)
    eval_interval = max(1, steps_per_epoch // config.evals_per_epoch)

    _seed_everything(config.seed)
    model, collate = task.build(dropout=config.dropout, max_length=config.max_length, data=data)
    context = RunContext(
        collate=collate,
        # The method's own draws (MixUp, unlabeled order): a stream apart from dropout's.
        generator=torch.Generator().manual_seed(config.seed + 1_000_003),
        unlabeled=unlabeled,
    )
    model.train()
    train_step = method.prepare(model, task, config, context)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, int(config.warmup_ratio * planned))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order_rng = torch.Generator().manual_seed(config.seed)
    probe_inputs, probe_target = collate(data.train[: config.probe_size])
    probe_mask = task.probe_mask(probe_target)

    state = _LoopState()
    snapshots: dict[int, State] = {}
    if resume_file is not None and resume_file.is_file():
        resumed = _resume(resume_file, config, model, optimizer, scheduler, context, progress)
        if resumed is not None:
            state, snapshots, rng = resumed
            _set_rng_state(rng, order_rng, context.generator)
            state.resumes.append({"step": state.step, "train_seconds": state.train_seconds})
    curve_every = max(1, eval_interval // 4)
    expected = max_steps if (time_budget is not None or config.converges) else planned
    consumed = units * min(1.0, state.step / max(expected, 1))
    if progress is not None and consumed:
        progress.advance(consumed)
    model.train()
    status = f"{task.name} {method.label}" + (f" α={config.alpha:g}" if method.uses_alpha else "")
    status += f" seed {config.seed}"
    primary, higher = task.primary_metric, task.higher_is_better

    def do_eval(scheduled: bool) -> None:
        validation = evaluate(model, data.validation, collate, task, config.eval_batch_size)
        probe = rdrop.dropout_consistency(
            model, **probe_inputs, consistency_mask=probe_mask, kind=task.consistency_kind
        )
        model.train()
        window = state.window

        def mean_of(column: int) -> float | None:
            values = [w[column] for w in window]
            if not values or values[0] is None:
                return None
            return float(np.mean(values))

        entry: dict[str, Any] = {
            "step": state.step,
            "epoch": state.step / steps_per_epoch,
            "train_seconds": state.train_seconds,
            "train_wall_seconds": state.train_wall_seconds,
            "train_loss": mean_of(0),
            "task_loss": mean_of(1),
            "consistency_loss": mean_of(2),
            "probe_kl": probe.consistency,
            "validation": validation,
            "scheduled": scheduled,
        }
        state.evals.append(entry)
        state.window = []
        index = len(state.evals) - 1

        def improves(current: int | None) -> bool:
            return current is None or _strictly_better(
                validation[primary], state.evals[current]["validation"][primary], higher
            )

        if improves(state.best_all):
            state.best_all = index
            if config.converges:
                # Every best-so-far checkpoint is the one some time budget selects: score it
                # now (selection never reads the test split) so the report can answer any
                # budget after the fact.
                entry["test"] = evaluate(
                    model, data.test, collate, task, config.eval_batch_size, final=True
                )
                if checkpoint_dir is not None:
                    _save_checkpoint(model, checkpoint_dir / f"{config.run_id()}.safetensors")
        # Equal epochs chooses among the scheduled evaluations only, so a method that
        # reaches the time budget early does not get one more candidate than the others.
        if scheduled and state.step <= planned and improves(state.best_epochs):
            state.best_epochs = index
        if config.converges:
            since_best = index - (state.best_all if state.best_all is not None else index)
            if (
                config.patience is not None
                and since_best >= config.patience
                and state.step >= config.min_steps
            ):
                state.stopped_early = True
            return
        if index in (state.best_all, state.best_epochs):
            snapshots[index] = _clone_state(model)
        if state.time_cut is None:
            state.best_time = state.best_all
            if time_budget is not None and state.train_seconds >= time_budget:
                state.time_cut = index
        for key in list(snapshots):
            if key not in (state.best_all, state.best_epochs, state.best_time):
                del snapshots[key]

    last_save = time.monotonic()
    while True:
        if not state.epoch_order:
            state.epoch_order = torch.randperm(len(data.train), generator=order_rng).tolist()
        batch_indices = state.epoch_order[: config.batch_size]
        state.epoch_order = state.epoch_order[config.batch_size :]
        inputs, target = collate([data.train[i] for i in batch_indices])
        tick_cpu, tick_wall = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        try:
            out = train_step(inputs, target)  # forward and backward (FGM: two of each)
        except rdrop.NonFiniteLossError:
            state.diverged_at = state.step + 1
            break
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state.train_seconds += time.process_time() - tick_cpu
        state.train_wall_seconds += time.perf_counter() - tick_wall
        state.step += 1
        step = state.step
        consistency = None if out.consistency_loss is None else float(out.consistency_loss.detach())
        loss_value, task_value = float(out.loss.detach()), float(out.task_loss.detach())
        if not all(map(_is_finite, (loss_value, task_value, consistency))):
            state.diverged_at = step
            break
        state.window.append([loss_value, task_value, consistency])
        if step % curve_every == 0:
            state.curve.append(
                {
                    "step": step,
                    "train_seconds": state.train_seconds,
                    "loss": loss_value,
                    "task_loss": task_value,
                    "consistency_loss": consistency,
                }
            )
        if config.converges:
            finished = step >= max_steps
            budget_crossed = False
            scheduled = step % eval_interval == 0 or step in (planned, max_steps)
        else:
            finished = step >= planned and (
                time_budget is None or state.train_seconds >= time_budget or step >= max_steps
            )
            budget_crossed = (
                time_budget is not None
                and state.time_cut is None
                and state.train_seconds >= time_budget
            )
            scheduled = step % eval_interval == 0 or step == planned
        if scheduled or finished or budget_crossed:
            do_eval(scheduled)
        if progress is not None:
            share = min(units / max(expected, 1), units - consumed)
            consumed += share
            progress.advance(share, f"{status} | step {step}/{expected}")
        if finished or state.stopped_early:
            break
        if resume_file is not None and time.monotonic() - last_save >= checkpoint_every:
            _save_resume(resume_file, config, state, snapshots, model, optimizer, scheduler,
                         context, order_rng)  # fmt: skip
            last_save = time.monotonic()

    if progress is not None and units > consumed:
        progress.advance(units - consumed)

    if state.diverged_at is not None:
        selections: dict[str, Any] = {"equal_epochs": None, "equal_time": None}
        if config.converges:
            selections["converged"] = None
    elif config.converges:
        selections = _converged_selections(state)
    else:
        selections = _budget_selections(
            config, state, snapshots, model, data, collate, task, costs_like_rdrop,
            time_budget, planned, checkpoint_dir,
        )  # fmt: skip

    step = state.step
    record = {
        "schema": 2,
        "run_id": config.run_id(),
        "command": command,
        "config": config.to_dict(),
        "task": {**task.describe(), **data.info},
        "evals": state.evals,
        "train_curve": state.curve,
        "steps": step,
        "planned_steps": planned,
        "max_steps": max_steps,
        "epochs_run": step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "clock": TRAINING_CLOCK,
        "train_seconds": state.train_seconds,
        "train_wall_seconds": state.train_wall_seconds,
        "seconds_per_step": state.train_seconds / max(step, 1),
        "wall_seconds": time.perf_counter() - wall_start,
        "time_budget_seconds": time_budget,
        "time_budget_sources": budget_sources,
        "time_budget_reached": (
            None if time_budget is None else state.train_seconds >= time_budget
        ),
        "converged": state.stopped_early if config.converges else None,
        "stop_reason": _stop_reason(config, state, time_budget),
        "diverged": state.diverged_at is not None,
        "diverged_at_step": state.diverged_at,
        "resumes": state.resumes,
        "selections": selections,
        "method_info": {
            "name": method.name,
            "label": method.label,
            "costs_like_rdrop": costs_like_rdrop,
            "settings": method.settings(task, config),
            **context.counters,
        },
        "environment": environment(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.write(record)
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    return record


def _stop_reason(config: RunConfig, state: _LoopState, time_budget: float | None) -> str:
    """Why training ended: ``diverged``, ``early_stop`` (converged), ``max_epochs`` (a
    converging run that never stopped early), ``time_budget``, or ``epochs``."""
    if state.diverged_at is not None:
        return "diverged"
    if config.converges:
        return "early_stop" if state.stopped_early else "max_epochs"
    if time_budget is not None and state.train_seconds >= time_budget:
        return "time_budget"
    return "epochs"


def _selection_entry(evals: list[dict[str, Any]], index: int, test: dict[str, float]) -> dict:
    e = evals[index]
    return {
        "eval_index": index,
        "step": e["step"],
        "epoch": e["epoch"],
        "train_seconds": e["train_seconds"],
        "validation": e["validation"],
        "test": test,
    }


def _converged_selections(state: _LoopState) -> dict[str, Any]:
    """A converging run: the best validation checkpoint of the whole run (``converged``)
    and of the scheduled evaluations within ``epochs`` (``equal_epochs``); both were scored
    on test when they became the best so far. Equal time is answered by the report from
    the validation curves."""
    if state.best_all is None or state.best_epochs is None:
        raise RuntimeError("no evaluation was made")
    return {
        name: _selection_entry(state.evals, index, state.evals[index]["test"])
        for name, index in (("converged", state.best_all), ("equal_epochs", state.best_epochs))
    } | {"equal_time": None}


def _budget_selections(
    config: RunConfig,
    state: _LoopState,
    snapshots: dict[int, State],
    model: nn.Module,
    data: Any,
    collate: Callable[..., Any],
    task: Task,
    costs_like_rdrop: bool,
    time_budget: float | None,
    planned: int,
    checkpoint_dir: Path | None,
) -> dict[str, Any]:
    """The checkpoints do_eval kept: the best validation score among the scheduled
    evaluations up to the planned epochs, and among all evaluations up to the one where
    the time budget was reached (all of them when the max_time_factor cap stopped training
    first; time_budget_reached then says so). The test split is scored once per selected
    checkpoint."""
    if state.best_epochs is None or state.best_time is None:
        raise RuntimeError(f"{config.run_id()}: no evaluation was made (planned {planned} steps)")
    chosen = {"equal_epochs": state.best_epochs}
    if costs_like_rdrop:
        # Same compute per step as R-Drop: equal epochs is equal time.
        chosen["equal_time"] = state.best_epochs
    elif time_budget is not None:
        chosen["equal_time"] = state.best_time
    selections: dict[str, Any] = {}
    test_scores: dict[int, dict[str, float]] = {}
    for budget, index in chosen.items():
        if index not in test_scores:
            model.load_state_dict(snapshots[index])
            test_scores[index] = evaluate(
                model, data.test, collate, task, config.eval_batch_size, final=True
            )
            if checkpoint_dir is not None and budget == "equal_epochs":
                _save_checkpoint(model, checkpoint_dir / f"{config.run_id()}.safetensors")
        selections[budget] = _selection_entry(state.evals, index, test_scores[index])
    selections.setdefault("equal_time", None)
    return selections


def _resumable_objects(context: RunContext) -> dict[str, Any]:
    return {name: get() for name, (get, _) in context.resumable.items()}


def _save_resume(
    path: Path,
    config: RunConfig,
    state: _LoopState,
    snapshots: dict[int, State],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    context: RunContext,
    order_rng: torch.Generator,
) -> None:
    save_resume_state(
        path,
        {
            "run_id": config.run_id(),
            "config": config.to_dict(),
            "loop": state.to_json(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(order_rng, context.generator),
            "snapshots": snapshots,
            "method": _resumable_objects(context),
            "counters": dict(context.counters),
        },
    )


def _resume(
    path: Path,
    config: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    context: RunContext,
    progress: Progress | None,
) -> tuple[_LoopState, dict[int, State], dict[str, Any]] | None:
    """Restore a run from its resumable checkpoint; ``None`` (with a message) when the
    file cannot be used, and the run starts again."""

    def say(text: str) -> None:
        if progress is not None:
            progress.message(text)
        else:
            print(text, file=sys.stderr)

    try:
        saved = load_resume_state(path)

        def plain(value: Any) -> Any:  # tuples and lists compare alike
            return json.loads(json.dumps(value))

        if saved.get("run_id") != config.run_id() or plain(saved.get("config")) != plain(
            config.to_dict()
        ):
            raise ResumeError(f"{path}: the checkpoint belongs to another run configuration")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for name, value in saved["method"].items():
            context.resumable[name][1](value)
        context.counters.update(saved["counters"])
        state = _LoopState.from_json(saved["loop"])
    except (ResumeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        say(f"{config.run_id()}: cannot resume ({error}); starting the run again")
        return None
    say(
        f"resuming {config.run_id()} from step {state.step} "
        f"({state.train_seconds:.0f} s of training done, {len(state.evals)} evaluations)"
    )
    return state, saved["snapshots"], saved["rng"]


def _save_checkpoint(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))


def _order(runs: Sequence[RunConfig]) -> list[RunConfig]:
    """Plain R-Drop runs of a task before the other methods (they set the equal-time
    budget). Runs trained to convergence need no budget: they keep the suite's order
    (seed by seed), so every finished seed pairs up."""
    if all(r.converges for r in runs):
        return list(runs)
    tasks = list(dict.fromkeys(r.task for r in runs))
    ordered: list[RunConfig] = []
    for task in tasks:
        of_task = [r for r in runs if r.task == task]
        ordered += [r for r in of_task if is_plain_rdrop(r)]
        ordered += [r for r in of_task if not is_plain_rdrop(r)]
    return ordered


def run_suite(
    runs: Sequence[RunConfig],
    store: ResultStore,
    *,
    data_dir: Path,
    command: str = "",
    progress_stream: Any = None,
    checkpoint_dir: Path | None = None,
    resume_dir: Path | None = None,
    checkpoint_every: float = 600.0,
) -> list[dict[str, Any]]:
    """Run every config not yet finished in ``store``; returns all their records.

    With ``resume_dir``, each run in progress writes a resumable checkpoint there every
    ``checkpoint_every`` seconds (see :mod:`rdrop_lab.resume`), and a run whose
    checkpoint exists continues from it."""
    _check_checkpoint_every(checkpoint_every)
    ordered = _order(runs)
    seen: set[str] = set()
    unique = []
    for config in ordered:
        if config.run_id() not in seen:
            seen.add(config.run_id())
            unique.append(config)
    finished = [c for c in unique if store.has(c.run_id())]
    pending = [c for c in unique if not store.has(c.run_id())]
    for config in pending:  # refuse an impossible run before hours of the others
        check_run(config)
    if pending:
        store.check_writable()
    units = {c.run_id(): estimate_units(c) for c in pending}
    progress = Progress(sum(units.values()) or 1.0, stream=progress_stream)
    if finished:
        progress.message(
            f"skipping {len(finished)} finished run(s) already in {store.runs_dir} "
            f"(delete their files or use another --results-dir to re-run them)"
        )
    for number, config in enumerate(pending, start=1):
        if store.has(config.run_id()):  # finished meanwhile by another process on this folder
            progress.message(f"skipping {config.run_id()}: finished by another process")
            progress.advance(units[config.run_id()])
            continue
        progress.set_status(f"run {number}/{len(pending)} {config.run_id()}")
        record = train_run(
            config,
            store,
            data_dir=data_dir,
            command=command,
            progress=progress,
            units=units[config.run_id()],
            checkpoint_dir=checkpoint_dir,
            resume_file=(
                None
                if resume_dir is None
                else resume_path(resume_dir, store.results_dir, config.run_id())
            ),
            checkpoint_every=checkpoint_every,
        )
        progress.message(_finished_line(config, record))
    progress.close()
    return [r for c in unique if (r := store.load(c.run_id())) is not None]


def _finished_line(config: RunConfig, record: dict[str, Any]) -> str:
    task = get_task(config.task)
    head = (
        f"finished {config.run_id()}: {record['steps']} steps, "
        f"{record['train_seconds']:.0f} s training"
    )
    if record.get("diverged"):
        return f"{head}; DIVERGED at step {record['diverged_at_step']} (non-finite loss)"
    budget = "converged" if config.converges else "equal_epochs"
    selection = record["selections"][budget]
    state = ""
    if config.converges:
        state = "; converged" if record["converged"] else "; NOT converged (hit max_epochs)"
    return (
        f"{head}{state}; test {task.primary_metric} "
        f"{selection['test'][task.primary_metric]:.4f} (selected at step {selection['step']})"
    )


def with_overrides(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``config`` with fields changed (validated again)."""
    return replace(config, **changes)
