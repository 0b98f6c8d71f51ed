"""Train one run, select checkpoints on validation, score the held-out test split once.

Protocol (the same for every method):

1. Seed everything with the run's seed; the training subsample and the splits depend only
   on ``data_seed``, so every method and seed sees the same data (few-shot sets and
   unlabeled pools too: :mod:`rdrop.experiments.data_regimes`).
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
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rdrop
from rdrop.experiments.config import ConfigError, RunConfig, config_value, is_plain_rdrop
from rdrop.experiments.data_regimes import select_training_data
from rdrop.experiments.methods import RunContext, get_method
from rdrop.experiments.progress import Progress
from rdrop.experiments.store import ResultStore, environment
from rdrop.experiments.tasks import Example, Task, get_task

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
    rate) with the same data and epoch budget, measured with the same number of torch
    threads as this process uses: ``{run_id: train_seconds}``."""
    threads = torch.get_num_threads()
    return {
        str(record.get("run_id")): float(record["train_seconds"])
        for record in store.records()
        if is_plain_rdrop(record.get("config", {}))
        and _same_budget(record.get("config", {}), config)
        and record.get("environment", {}).get("torch_threads") == threads
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


def train_run(
    config: RunConfig,
    store: ResultStore,
    *,
    data_dir: Path,
    command: str = "",
    progress: Progress | None = None,
    units: float = 0.0,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one run to completion and write its record; returns the record."""
    check_run(config)
    task = get_task(config.task)
    method = get_method(config.method)
    costs_like_rdrop = method.costs_like_rdrop_for(config)
    started = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    data, unlabeled = select_training_data(task, data_dir, config)
    steps_per_epoch, planned = _planned_steps(config, len(data.train))
    time_budget, budget_sources = None, None
    if config.equal_time and not costs_like_rdrop:
        sources = time_budget_sources(config, store)
        budget_sources = sorted(sources)
        time_budget = _median_budget(sources)
        if time_budget is None and progress is not None:
            progress.message(
                f"{config.run_id()}: no finished plain R-Drop run with the same data, epochs "
                f"and torch threads in {store.runs_dir}, so this run gets no equal-time "
                "selection (its record will not be redone later): run R-Drop first"
            )
    max_steps = planned if time_budget is None else math.ceil(planned * config.max_time_factor)
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

    evals: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    snapshots: dict[int, State] = {}
    best_all: int | None = None
    best_epochs: int | None = None
    best_time: int | None = None
    time_cut: int | None = None  # the evaluation at which the time budget was reached
    train_seconds = 0.0
    window: list[tuple[float, float, float | None]] = []
    curve_every = max(1, eval_interval // 4)
    step = 0
    consumed = 0.0
    epoch_order: list[int] = []
    model.train()
    status = f"{task.name} {method.label}" + (f" α={config.alpha:g}" if method.uses_alpha else "")
    status += f" seed {config.seed}"

    def do_eval(scheduled: bool) -> None:
        nonlocal best_all, best_epochs, best_time, time_cut
        validation = evaluate(model, data.validation, collate, task, config.eval_batch_size)
        probe = rdrop.dropout_consistency(
            model, **probe_inputs, consistency_mask=probe_mask, kind=task.consistency_kind
        )
        model.train()
        recent = [w for w in window]
        evals.append(
            {
                "step": step,
                "epoch": step / steps_per_epoch,
                "train_seconds": train_seconds,
                "train_loss": float(np.mean([w[0] for w in recent])) if recent else None,
                "task_loss": float(np.mean([w[1] for w in recent])) if recent else None,
                "consistency_loss": (
                    float(np.mean([w[2] for w in recent]))
                    if recent and recent[0][2] is not None
                    else None
                ),
                "probe_kl": probe.consistency,
                "validation": validation,
                "scheduled": scheduled,
            }
        )
        window.clear()
        index = len(evals) - 1
        primary, higher = task.primary_metric, task.higher_is_better

        def improves(current: int | None) -> bool:
            return current is None or _strictly_better(
                validation[primary], evals[current]["validation"][primary], higher
            )

        if improves(best_all):
            best_all = index
        # Equal epochs chooses among the scheduled evaluations only, so a method that
        # reaches the time budget early does not get one more candidate than the others.
        if scheduled and step <= planned and improves(best_epochs):
            best_epochs = index
        if index in (best_all, best_epochs):
            snapshots[index] = _clone_state(model)
        if time_cut is None:
            best_time = best_all
            if time_budget is not None and train_seconds >= time_budget:
                time_cut = index
        for key in list(snapshots):
            if key not in (best_all, best_epochs, best_time):
                del snapshots[key]

    while True:
        if not epoch_order:
            epoch_order = torch.randperm(len(data.train), generator=order_rng).tolist()
        batch_indices, epoch_order = (
            epoch_order[: config.batch_size],
            epoch_order[config.batch_size :],
        )
        inputs, target = collate([data.train[i] for i in batch_indices])
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = train_step(inputs, target)  # forward and backward (FGM: two of each)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        train_seconds += time.perf_counter() - tick
        step += 1
        consistency = None if out.consistency_loss is None else float(out.consistency_loss.detach())
        loss_value, task_value = float(out.loss.detach()), float(out.task_loss.detach())
        window.append((loss_value, task_value, consistency))
        if step % curve_every == 0:
            curve.append(
                {
                    "step": step,
                    "train_seconds": train_seconds,
                    "loss": loss_value,
                    "task_loss": task_value,
                    "consistency_loss": consistency,
                }
            )
        finished = step >= planned and (
            time_budget is None or train_seconds >= time_budget or step >= max_steps
        )
        budget_crossed = (
            time_budget is not None and time_cut is None and train_seconds >= time_budget
        )
        scheduled = step % eval_interval == 0 or step == planned
        if scheduled or finished or budget_crossed:
            do_eval(scheduled)
        if progress is not None:
            expected = max_steps if time_budget is not None else planned
            share = min(units / max(expected, 1), units - consumed)
            consumed += share
            progress.advance(share, f"{status} | step {step}/{expected}")
        if finished:
            break

    if progress is not None and units > consumed:
        progress.advance(units - consumed)

    # -- selections and the single test evaluation per selected checkpoint -------------
    # The checkpoints do_eval kept: the best validation score among the scheduled
    # evaluations up to the planned epochs, and among all evaluations up to the one where
    # the time budget was reached (all of them when the max_time_factor cap stopped
    # training first; time_budget_reached then says so).
    if best_epochs is None or best_time is None:
        raise RuntimeError(f"{config.run_id()}: no evaluation was made (planned {planned} steps)")
    selections: dict[str, Any] = {}
    chosen = {"equal_epochs": best_epochs}
    if costs_like_rdrop:
        # Same compute per step as R-Drop: equal epochs is equal time.
        chosen["equal_time"] = best_epochs
    elif time_budget is not None:
        chosen["equal_time"] = best_time
    test_scores: dict[int, dict[str, float]] = {}
    for budget, index in chosen.items():
        if index not in test_scores:
            model.load_state_dict(snapshots[index])
            test_scores[index] = evaluate(
                model, data.test, collate, task, config.eval_batch_size, final=True
            )
            if checkpoint_dir is not None and budget == "equal_epochs":
                _save_checkpoint(model, checkpoint_dir / f"{config.run_id()}.safetensors")
        e = evals[index]
        selections[budget] = {
            "eval_index": index,
            "step": e["step"],
            "epoch": e["epoch"],
            "train_seconds": e["train_seconds"],
            "validation": e["validation"],
            "test": test_scores[index],
        }
    selections.setdefault("equal_time", None)

    record = {
        "schema": 1,
        "run_id": config.run_id(),
        "command": command,
        "config": config.to_dict(),
        "task": {**task.describe(), **data.info},
        "evals": evals,
        "train_curve": curve,
        "steps": step,
        "planned_steps": planned,
        "epochs_run": step / steps_per_epoch,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / step,
        "wall_seconds": time.perf_counter() - wall_start,
        "time_budget_seconds": time_budget,
        "time_budget_sources": budget_sources,
        "time_budget_reached": None if time_budget is None else train_seconds >= time_budget,
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
    return record


def _save_checkpoint(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))


def _order(runs: Sequence[RunConfig]) -> list[RunConfig]:
    """Plain R-Drop runs of a task before the other methods (they set the equal-time
    budget)."""
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
) -> list[dict[str, Any]]:
    """Run every config not yet finished in ``store``; returns all their records."""
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
        )
        selection = record["selections"]["equal_epochs"]
        task = get_task(config.task)
        progress.message(
            f"finished {config.run_id()}: {record['steps']} steps, "
            f"{record['train_seconds']:.0f} s training; test {task.primary_metric} "
            f"{selection['test'][task.primary_metric]:.4f} (selected at step {selection['step']})"
        )
    progress.close()
    return [r for c in unique if (r := store.load(c.run_id())) is not None]


def with_overrides(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``config`` with fields changed (validated again)."""
    return replace(config, **changes)
