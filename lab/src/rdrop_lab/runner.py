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
   *Equal training time* (process CPU seconds): methods cheaper per step than R-Drop (the
   baseline) keep training until they have used as many training seconds as R-Drop needed
   for ``epochs`` epochs on the same task (the median over finished R-Drop runs with the same thread
   count; at most ``max_time_factor`` times the planned steps), are evaluated when they
   reach it, and the best validation checkpoint within that time is selected. Methods that
   cost what R-Drop costs (``doubled_batch``, R-Drop + MixUp, ...) use their equal-epochs
   checkpoint. Methods that cost more per step (FGM, R-Drop + FGM, m = 3, semi-supervised
   R-Drop) are measured the same way as the cheaper ones: they train their epochs, and the
   equal-time selection only looks at the evaluations made before the budget ran out. The
   budget comes from plain R-Drop runs only (k = 1, m = 2, no stop-gradient, one rate).
5. The test split is scored once per selected checkpoint. It is never used for selection.
6. Trained to convergence (``patience`` set): the run trains up to ``max_epochs`` and stops
   once ``patience`` scheduled evaluations in a row brought no new best validation score,
   or none better than the last counted best by more than ``min_delta`` (never before
   ``min_steps``); it is *converged* only if it stopped that way. Every
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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import rdrop
from rdrop_lab.config import ConfigError, RunConfig, config_value, is_plain_rdrop
from rdrop_lab.data_regimes import select_training_data
from rdrop_lab.hardware import native_bfloat16, this_machine
from rdrop_lab.methods import Method, RunContext, get_method
from rdrop_lab.precision import keep_float32, precision_context
from rdrop_lab.progress import Progress
from rdrop_lab.record import SCHEMA, RunRecord
from rdrop_lab.resume import (
    ResumeError,
    load_resume_state,
    resume_path,
    save_resume_state,
)
from rdrop_lab.store import ResultStore, environment
from rdrop_lab.tasks import Example, Task, get_task
from rdrop_lab.tasks.base import TaskData

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
    precision: str = "fp32",
) -> dict[str, float]:
    """Task metrics of ``model`` (in eval mode) on ``examples``, its forward passes in
    ``precision`` (:func:`precision_context`): see :meth:`Task.evaluate`."""
    with precision_context(precision):
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
        "precision",
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
        if config.precision == "bf16" and task.output_module is None:
            raise ConfigError(
                f"precision='bf16' keeps the model's output layer in float32, and task "
                f"{task.name!r} names none (Task.output_module): train it in fp32"
            )
        if config.shots_per_class is not None and task.kind != "classification":
            raise ConfigError(
                f"shots_per_class: few-shot sampling needs classes, and task {task.name!r} "
                f"is a {task.kind} task"
            )
    except ConfigError as error:
        raise ConfigError(f"run {config.run_id()}: {error}") from None


def _strictly_better(value: float, best: float, higher: bool) -> bool:
    """Whether a validation score beats the best so far (a tie keeps the earlier one; a
    NaN never beats)."""
    return value > best if higher else value < best


def _clone_state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: One training step's (loss, task loss, consistency loss): detached tensors, read back
#: from the device only at curve, evaluation and checkpoint points (plain floats once a
#: resumable checkpoint has held them; the consistency loss is ``None`` without one).
StepLosses = list[Any]


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
    #: The :data:`StepLosses` of the steps since the last evaluation (consecutive steps
    #: ending at ``step``).
    window: list[StepLosses] = field(default_factory=list)
    best_all: int | None = None
    best_epochs: int | None = None
    best_time: int | None = None
    time_cut: int | None = None  # the evaluation at which the time budget was reached
    stopped_early: bool = False
    diverged_at: int | None = None
    #: Where the run was resumed: ``{"step", "train_seconds"}`` per resume.
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The state as JSON values (the window's losses read back as floats).

        Returns:
            ``{field: value}`` for every field.
        """
        data = dataclasses.asdict(replace(self, window=[]))
        data["window"] = [[_host(value) for value in losses] for losses in self.window]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _LoopState:
        """The state :meth:`to_json` wrote.

        Args:
            data: the ``loop`` entry of a resumable checkpoint.

        Returns:
            The loop state.
        """
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


# --------------------------------------------------------------------------- time budget


@dataclass(frozen=True)
class _Budget:
    """How long a run trains and how often it is measured."""

    steps_per_epoch: int
    #: Steps in ``epochs`` epochs: the equal-epochs budget.
    planned: int
    #: The most steps the run may take (``max_epochs``, or the equal-time cap).
    max_steps: int
    #: The equal-time budget in training seconds (``None``: no equal-time training).
    seconds: float | None
    #: The R-Drop runs the budget is the median of (``None``: none was looked up).
    sources: list[str] | None
    #: Steps between scheduled evaluations.
    eval_interval: int
    #: Steps between training-curve points.
    curve_every: int


def _plan_budget(
    config: RunConfig,
    store: ResultStore,
    train_examples: int,
    costs_like_rdrop: bool,
    progress: Progress | None,
) -> _Budget:
    """The steps, the equal-time budget and the evaluation schedule of a run.

    Args:
        config: the run.
        store: where the equal-time budget's R-Drop runs are.
        train_examples: the size of the training set.
        costs_like_rdrop: whether the method costs what R-Drop costs per step.
        progress: where to say that no equal-time budget was found.

    Returns:
        The run's budget.
    """
    steps_per_epoch, planned = _planned_steps(config, train_examples)
    seconds, sources = _equal_time_budget(config, store, costs_like_rdrop, progress)
    eval_interval = max(1, steps_per_epoch // config.evals_per_epoch)
    return _Budget(
        steps_per_epoch=steps_per_epoch,
        planned=planned,
        max_steps=_max_steps(config, steps_per_epoch, planned, seconds),
        seconds=seconds,
        sources=sources,
        eval_interval=eval_interval,
        curve_every=max(1, eval_interval // 4),
    )


def _equal_time_budget(
    config: RunConfig, store: ResultStore, costs_like_rdrop: bool, progress: Progress | None
) -> tuple[float | None, list[str] | None]:
    """The equal-time budget in seconds and the run ids it comes from.

    Returns:
        ``(None, None)`` for a run that needs none: equal time off, a method that costs
        what R-Drop costs, or a converging run (it trains to its own early stop, and the
        report answers any time budget from its validation curve). ``(None, [])`` when
        no R-Drop run to take it from is finished (with a message).
    """
    if not config.equal_time or costs_like_rdrop or config.converges:
        return None, None
    sources = time_budget_sources(config, store)
    seconds = _median_budget(sources)
    if seconds is None and progress is not None:
        progress.message(
            f"{config.run_id()}: no finished plain R-Drop run with the same data, epochs "
            f"and torch threads in {store.runs_dir}, so this run gets no equal-time "
            "selection (its record will not be redone later): run R-Drop first"
        )
    return seconds, sorted(sources)


def _max_steps(
    config: RunConfig, steps_per_epoch: int, planned: int, budget_seconds: float | None
) -> int:
    """The step cap: ``max_epochs`` for a converging run, ``max_time_factor`` times the
    planned steps for a run with an equal-time budget, else the planned steps."""
    if config.converges:
        max_epochs = config.max_epochs if config.max_epochs is not None else config.epochs
        return max(planned, math.ceil(max_epochs * steps_per_epoch))
    if budget_seconds is None:
        return planned
    return math.ceil(planned * config.max_time_factor)


# --------------------------------------------------------------------------- training


@dataclass
class _Training:
    """The live objects of one run: model, optimizer, data and random streams."""

    config: RunConfig
    task: Task
    data: TaskData
    model: nn.Module
    collate: Callable[..., Any]
    context: RunContext
    #: The method's forward and backward for one batch.
    train_step: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    #: The order of the training examples, epoch after epoch.
    order_rng: torch.Generator
    #: The probe's fixed batch of training examples and its consistency mask.
    probe_inputs: dict[str, Any]
    probe_mask: Any
    #: Where the selected model is saved (``None``: it is not).
    checkpoint_dir: Path | None


def _build_training(
    config: RunConfig,
    task: Task,
    method: Method,
    data: TaskData,
    unlabeled: Any,
    planned: int,
    checkpoint_dir: Path | None,
) -> _Training:
    """Seed, build the model and the method's step, the optimizer and the schedule.

    Args:
        config: the run.
        task: its task.
        method: its method.
        data: its training, validation and test splits.
        unlabeled: the unlabeled pool (semi-supervised methods) or ``None``.
        planned: the planned steps (the warm-up is a share of them).
        checkpoint_dir: where the selected model is saved (``None``: it is not).

    Returns:
        The run's live objects (the model in training mode).
    """
    _seed_everything(config.seed)
    model, collate = task.build(dropout=config.dropout, max_length=config.max_length, data=data)
    if config.precision == "bf16" and task.output_module is not None:
        keep_float32(model.get_submodule(task.output_module))
        if native_bfloat16() is False:
            warnings.warn(
                f"run {config.run_id()}: precision='bf16' on a CPU without native bfloat16 "
                f"arithmetic ({this_machine()}, no AVX512-BF16 or AMX): autocast emulates "
                "it, and its matrix products run many times slower than float32's "
                "(rdrop_lab.hardware); train it in fp32 on this machine",
                RuntimeWarning,
                stacklevel=2,
            )
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
    return _Training(
        config=config,
        task=task,
        data=data,
        model=model,
        collate=collate,
        context=context,
        train_step=train_step,
        optimizer=optimizer,
        scheduler=scheduler,
        order_rng=order_rng,
        probe_inputs=probe_inputs,
        probe_mask=task.probe_mask(probe_target),
        checkpoint_dir=checkpoint_dir,
    )


def _training_step(training: _Training, state: _LoopState) -> StepLosses | None:
    """One optimizer step on the next batch of the epoch's order.

    Returns:
        The step's losses (detached, still on the device), or ``None`` when the method's
        own loss check (R-Drop's) raised :class:`rdrop.NonFiniteLossError`: that step is
        not taken.
    """
    config, train = training.config, training.data.train
    if not state.epoch_order:
        state.epoch_order = torch.randperm(len(train), generator=training.order_rng).tolist()
    batch_indices = state.epoch_order[: config.batch_size]
    state.epoch_order = state.epoch_order[config.batch_size :]
    inputs, target = training.collate([train[i] for i in batch_indices])
    tick_cpu, tick_wall = time.process_time(), time.perf_counter()
    training.optimizer.zero_grad(set_to_none=True)
    try:
        # A method's step runs its own backward passes (FGM: two forwards and two
        # backwards), so the region covers them; each backward op takes the dtype autocast
        # gave its forward op, and gradients land in the float32 weights' dtype.
        with precision_context(config.precision):
            out = training.train_step(inputs, target)
    except rdrop.NonFiniteLossError:
        return None
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), config.max_grad_norm)
    training.optimizer.step()
    training.scheduler.step()
    state.train_seconds += time.process_time() - tick_cpu
    state.train_wall_seconds += time.perf_counter() - tick_wall
    state.step += 1
    consistency = None if out.consistency_loss is None else out.consistency_loss.detach()
    return [out.loss.detach(), out.task_loss.detach(), consistency]


def _host(value: torch.Tensor | float | None) -> float | None:
    """A loss as a Python float (for a tensor: a read back from the device)."""
    return None if value is None else float(value)


def _first_nonfinite(window: list[StepLosses]) -> int | None:
    """The index of the first step in ``window`` with a NaN or infinite loss (``None``:
    all finite). One device read for the whole window; the steps are looked at one by one
    only when some loss is not finite. Floats in the window (restored from a resumable
    checkpoint) were checked before the checkpoint was written."""
    tensors = [
        value.float().reshape(()) for losses in window for value in losses
        if isinstance(value, torch.Tensor)
    ]  # fmt: skip
    if not tensors or bool(torch.isfinite(torch.stack(tensors)).all()):
        return None
    for index, losses in enumerate(window):
        if not all(math.isfinite(v) for v in map(_host, losses) if v is not None):
            return index
    return None


def _stop_at_divergence(state: _LoopState) -> bool:
    """Whether a loss in the window is not finite; if so the run is marked diverged at
    the first such step.

    The losses are read from the device only at curve, evaluation and checkpoint points,
    so the steps between the first non-finite loss and this check were trained too. A
    diverged run's model is discarded, and its record counts the steps up to the
    divergence (``steps == diverged_at_step``, what a check at every step gives); the
    seconds of the steps after it stay in ``train_seconds``.

    Returns:
        ``True`` when the run diverged (``state.diverged_at`` set, ``state.step`` the
        step that diverged).
    """
    index = _first_nonfinite(state.window)
    if index is None:
        return False
    state.diverged_at = state.step - len(state.window) + 1 + index
    state.step = state.diverged_at
    del state.window[index:]
    return True


def _curve_point(state: _LoopState) -> dict[str, Any]:
    """The training-curve entry of the latest step."""
    loss, task_loss, consistency = map(_host, state.window[-1])
    return {
        "step": state.step,
        "train_seconds": state.train_seconds,
        "loss": loss,
        "task_loss": task_loss,
        "consistency_loss": consistency,
    }


class _StepPlan(NamedTuple):
    """What follows a training step."""

    #: A scheduled evaluation: every ``eval_interval`` steps and at the planned end.
    scheduled: bool
    #: Training ends after this step.
    finished: bool
    #: This step reached the equal-time budget.
    budget_crossed: bool

    @property
    def evaluates(self) -> bool:
        """Whether the step is followed by an evaluation."""
        return self.scheduled or self.finished or self.budget_crossed


def _plan_step(config: RunConfig, budget: _Budget, state: _LoopState) -> _StepPlan:
    """Whether the step just taken is evaluated and whether training ends there.

    A converging run trains to ``max_steps`` (or its early stop). Any other run trains
    its planned steps, and with an equal-time budget on until the budget (or the
    ``max_time_factor`` cap) is reached.
    """
    step = state.step
    if config.converges:
        scheduled = step % budget.eval_interval == 0 or step in (budget.planned, budget.max_steps)
        return _StepPlan(scheduled, step >= budget.max_steps, False)
    seconds = budget.seconds
    over_budget = seconds is not None and state.train_seconds >= seconds
    finished = step >= budget.planned and (
        seconds is None or over_budget or step >= budget.max_steps
    )
    scheduled = step % budget.eval_interval == 0 or step == budget.planned
    return _StepPlan(scheduled, finished, over_budget and state.time_cut is None)


class _ProgressShare:
    """This run's share of the suite's progress units, advanced step by step."""

    def __init__(
        self, progress: Progress | None, units: float, expected: int, done: int, status: str
    ) -> None:
        """Args:
        progress: the suite's display (``None``: nothing is shown).
        units: this run's share of the suite's units.
        expected: the steps the run is expected to take.
        done: the steps already taken (a resumed run).
        status: the run's label on the display.
        """
        self.progress, self.units, self.expected, self.status = progress, units, expected, status
        self.consumed = units * min(1.0, done / max(expected, 1))
        if progress is not None and self.consumed:
            progress.advance(self.consumed)

    def advance(self, step: int) -> None:
        """Count one more step (``step``: the steps taken)."""
        if self.progress is None:
            return
        share = min(self.units / max(self.expected, 1), self.units - self.consumed)
        self.consumed += share
        self.progress.advance(share, f"{self.status} | step {step}/{self.expected}")

    def finish(self) -> None:
        """Count what is left of the share (a run that ended early)."""
        if self.progress is not None and self.units > self.consumed:
            self.progress.advance(self.units - self.consumed)


def _status_text(task: Task, method: Method, config: RunConfig) -> str:
    """The run's label on the progress display: task, method, alpha, seed."""
    alpha = f" α={config.alpha:g}" if method.uses_alpha else ""
    return f"{task.name} {method.label}{alpha} seed {config.seed}"


def _train_loop(
    training: _Training,
    budget: _Budget,
    state: _LoopState,
    snapshots: dict[int, State],
    share: _ProgressShare,
    resume_file: Path | None,
    checkpoint_every: float,
) -> None:
    """Train until the run finishes, stops early or diverges.

    Args:
        training: the run's live objects.
        budget: its steps and evaluation schedule.
        state: the loop state (changed in place).
        snapshots: the models kept for selection, by evaluation index (changed in place).
        share: the run's progress.
        resume_file: where resumable checkpoints go (``None``: none are written).
        checkpoint_every: wall-clock seconds between resumable checkpoints.
    """
    last_save = time.monotonic()
    while True:
        losses = _training_step(training, state)
        if losses is None:
            if not _stop_at_divergence(state):
                state.diverged_at = state.step + 1
            return
        state.window.append(losses)
        plan = _plan_step(training.config, budget, state)
        at_curve = state.step % budget.curve_every == 0
        if (at_curve or plan.evaluates) and _stop_at_divergence(state):
            return
        if at_curve:
            state.curve.append(_curve_point(state))
        if plan.evaluates:
            _evaluate_point(training, budget, state, snapshots, scheduled=plan.scheduled)
        share.advance(state.step)
        if plan.finished or state.stopped_early:
            return
        if resume_file is not None and time.monotonic() - last_save >= checkpoint_every:
            if _stop_at_divergence(state):  # a checkpoint holds finite losses only
                return
            _save_resume(resume_file, training, state, snapshots)
            last_save = time.monotonic()


# --------------------------------------------------------------------------- evaluation


def _window_mean(window: list[StepLosses], column: int) -> float | None:
    """The mean of one loss over the window (``None``: no steps, or no such loss)."""
    if not window or window[0][column] is None:
        return None
    return float(np.mean([_host(losses[column]) for losses in window]))


def _score_test(training: _Training) -> dict[str, float]:
    """The test metrics of the model as it is now (selected checkpoints only)."""
    t = training
    return evaluate(
        t.model,
        t.data.test,
        t.collate,
        t.task,
        t.config.eval_batch_size,
        final=True,
        precision=t.config.precision,
    )


def _save_selected_model(training: _Training) -> None:
    """Save the model as it is now to ``--save-checkpoints``' folder, if one is given."""
    if training.checkpoint_dir is not None:
        path = training.checkpoint_dir / f"{training.config.run_id()}.safetensors"
        _save_checkpoint(training.model, path)


def _evaluation_entry(
    training: _Training, budget: _Budget, state: _LoopState, scheduled: bool
) -> dict[str, Any]:
    """Validation metrics, the probe and the window's mean losses at the current step."""
    t = training
    validation = evaluate(
        t.model,
        t.data.validation,
        t.collate,
        t.task,
        t.config.eval_batch_size,
        precision=t.config.precision,
    )
    probe = rdrop.dropout_consistency(
        t.model, **t.probe_inputs, consistency_mask=t.probe_mask, kind=t.task.consistency_kind
    )
    t.model.train()
    return {
        "step": state.step,
        "epoch": state.step / budget.steps_per_epoch,
        "train_seconds": state.train_seconds,
        "train_wall_seconds": state.train_wall_seconds,
        "train_loss": _window_mean(state.window, 0),
        "task_loss": _window_mean(state.window, 1),
        "consistency_loss": _window_mean(state.window, 2),
        "probe_kl": probe.consistency,
        "validation": validation,
        "scheduled": scheduled,
    }


def _evaluate_point(
    training: _Training,
    budget: _Budget,
    state: _LoopState,
    snapshots: dict[int, State],
    *,
    scheduled: bool,
) -> None:
    """Evaluate the model, start a new loss window, and update the best checkpoints and
    the early stop (a converging run) or the snapshots kept for selection (any other).

    Args:
        training: the run's live objects.
        budget: its steps and schedule.
        state: the loop state (changed in place).
        snapshots: the models kept for selection (changed in place).
        scheduled: whether this is a scheduled evaluation (equal epochs chooses among
            those only).
    """
    state.evals.append(_evaluation_entry(training, budget, state, scheduled))
    state.window = []
    index = len(state.evals) - 1
    _update_best(training, budget, state, index)
    if not training.config.converges:
        _keep_snapshots(training.model, budget, state, snapshots, index)
    elif _patience_ran_out(training, state, index):
        state.stopped_early = True


def _update_best(training: _Training, budget: _Budget, state: _LoopState, index: int) -> None:
    """Make evaluation ``index`` the best of the run and/or of the equal-epochs budget
    when its validation score beats theirs (a tie keeps the earlier one)."""
    entry = state.evals[index]
    primary, higher = training.task.primary_metric, training.task.higher_is_better

    value = entry["validation"][primary]

    def improves(current: int | None) -> bool:
        if math.isnan(value):  # a NaN score is never a best, not even the first
            return False
        return current is None or _strictly_better(
            value, state.evals[current]["validation"][primary], higher
        )

    if improves(state.best_all):
        state.best_all = index
        if training.config.converges:
            # Every best-so-far checkpoint is the one some time budget selects: score it
            # now (selection never reads the test split) so the report can answer any
            # budget after the fact.
            entry["test"] = _score_test(training)
            _save_selected_model(training)
    # Equal epochs chooses among the scheduled evaluations only, so a method that reaches
    # the time budget early does not get one more candidate than the others.
    if entry["scheduled"] and state.step <= budget.planned and improves(state.best_epochs):
        state.best_epochs = index


def _patience_ran_out(training: _Training, state: _LoopState, index: int) -> bool:
    """Whether ``patience`` evaluations in a row up to ``index`` brought no gain of more
    than ``min_delta`` over the last evaluation that did (and the run is past
    ``min_steps``): a converging run stops there. With ``min_delta = 0`` that evaluation
    is the best so far.

    The count is recomputed from the evaluation history, so a resumed run counts alike.
    """
    config = training.config
    primary, higher = training.task.primary_metric, training.task.higher_is_better
    sign = 1.0 if higher else -1.0
    counted: float | None = None  # the score of the last evaluation that restarted the count
    since = 0
    for entry in state.evals[: index + 1]:
        value = entry["validation"][primary]
        if not math.isnan(value) and (
            counted is None or _strictly_better(value - sign * config.min_delta, counted, higher)
        ):
            counted, since = value, 0
        elif counted is not None:
            since += 1
    return (
        config.patience is not None and since >= config.patience and state.step >= config.min_steps
    )


def _keep_snapshots(
    model: nn.Module,
    budget: _Budget,
    state: _LoopState,
    snapshots: dict[int, State],
    index: int,
) -> None:
    """Copy the model at a new best, note the evaluation where the time budget was
    reached, and drop the copies no selection can choose any more."""
    if index in (state.best_all, state.best_epochs):
        snapshots[index] = _clone_state(model)
    if state.time_cut is None:
        state.best_time = state.best_all
        if budget.seconds is not None and state.train_seconds >= budget.seconds:
            state.time_cut = index
    for key in list(snapshots):
        if key not in (state.best_all, state.best_epochs, state.best_time):
            del snapshots[key]


# --------------------------------------------------------------------------- selection


def _select_checkpoints(
    training: _Training,
    budget: _Budget,
    state: _LoopState,
    snapshots: dict[int, State],
    costs_like_rdrop: bool,
) -> dict[str, Any]:
    """The record's selections: ``None`` for each budget of a diverged run, the
    checkpoints of :func:`_converged_selections` for a converging run, else those of
    :func:`_budget_choices`, each scored once on the test split.

    Args:
        training: the run's live objects (the model is loaded with each selection).
        budget: its steps and equal-time budget.
        state: the loop state at the end.
        snapshots: the models :func:`_keep_snapshots` kept.
        costs_like_rdrop: whether the method costs what R-Drop costs per step.

    Returns:
        ``{"equal_epochs", "equal_time"(, "converged")}`` -> selection entry or ``None``.
    """
    converges = training.config.converges
    if state.diverged_at is not None or state.best_all is None:
        # Diverged, or no finite validation score at all: nothing to select.
        names = ("equal_epochs", "equal_time", "converged") if converges else (
            "equal_epochs", "equal_time"
        )  # fmt: skip
        return dict.fromkeys(names)
    if converges:
        return _converged_selections(state)
    selections: dict[str, Any] = {}
    test_scores: dict[int, dict[str, float]] = {}
    for name, index in _budget_choices(training, budget, state, costs_like_rdrop).items():
        if index not in test_scores:
            training.model.load_state_dict(snapshots[index])
            test_scores[index] = _score_test(training)
            if name == "equal_epochs":
                _save_selected_model(training)
        selections[name] = _selection_entry(state.evals, index, test_scores[index])
    selections.setdefault("equal_epochs", None)
    selections.setdefault("equal_time", None)
    return selections


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
    return {
        name: None
        if index is None
        else _selection_entry(state.evals, index, state.evals[index]["test"])
        for name, index in (("converged", state.best_all), ("equal_epochs", state.best_epochs))
    } | {"equal_time": None}


def _budget_choices(
    training: _Training, budget: _Budget, state: _LoopState, costs_like_rdrop: bool
) -> dict[str, int]:
    """The evaluations a fixed-budget run selects: the best validation score among the
    scheduled evaluations up to the planned epochs (``equal_epochs``), and among all
    evaluations up to the one where the time budget was reached (``equal_time``; all of
    them when the max_time_factor cap stopped training first, time_budget_reached then
    says so). A method that costs what R-Drop costs selects its equal-epochs checkpoint
    for equal time; without a budget there is no equal-time choice.

    Returns:
        selection name -> evaluation index.
    """
    if state.best_epochs is None:  # no finite score among the scheduled evaluations
        return {}
    chosen = {"equal_epochs": state.best_epochs}
    if costs_like_rdrop:
        # Same compute per step as R-Drop: equal epochs is equal time.
        chosen["equal_time"] = state.best_epochs
    elif budget.seconds is not None and state.best_time is not None:
        chosen["equal_time"] = state.best_time
    return chosen


# --------------------------------------------------------------------------- the record


def _run_record(
    training: _Training,
    method: Method,
    budget: _Budget,
    state: _LoopState,
    selections: dict[str, Any],
    *,
    command: str,
    started: datetime,
    wall_start: float,
    costs_like_rdrop: bool,
) -> RunRecord:
    """The record of a finished run.

    Args:
        training: the run's live objects.
        method: its method.
        budget: its steps and equal-time budget.
        state: the loop state at the end.
        selections: from :func:`_select_checkpoints`.
        command: the command line.
        started: when the run started (UTC).
        wall_start: :func:`time.perf_counter` when the run started.
        costs_like_rdrop: whether the method costs what R-Drop costs per step.

    Returns:
        The record (schema :data:`rdrop_lab.record.SCHEMA`).
    """
    config, task, step = training.config, training.task, state.step
    time_budget = budget.seconds
    return RunRecord(
        schema=SCHEMA,
        run_id=config.run_id(),
        command=command,
        config=config.to_dict(),
        task={**task.describe(), **training.data.info},
        evals=state.evals,
        train_curve=state.curve,
        steps=step,
        planned_steps=budget.planned,
        max_steps=budget.max_steps,
        epochs_run=step / budget.steps_per_epoch,
        steps_per_epoch=budget.steps_per_epoch,
        clock=TRAINING_CLOCK,
        train_seconds=state.train_seconds,
        train_wall_seconds=state.train_wall_seconds,
        seconds_per_step=state.train_seconds / max(step, 1),
        wall_seconds=time.perf_counter() - wall_start,
        time_budget_seconds=time_budget,
        time_budget_sources=budget.sources,
        time_budget_reached=(None if time_budget is None else state.train_seconds >= time_budget),
        converged=state.stopped_early if config.converges else None,
        stop_reason=_stop_reason(config, state, time_budget),
        diverged=state.diverged_at is not None,
        diverged_at_step=state.diverged_at,
        resumes=state.resumes,
        selections=selections,
        method_info={
            "name": method.name,
            "label": method.label,
            "costs_like_rdrop": costs_like_rdrop,
            "settings": method.settings(task, config),
            **training.context.counters,
        },
        environment=environment(),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


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

    Returns:
        The record as written to ``store`` (see :class:`rdrop_lab.record.RunRecord`).
    """
    check_run(config)
    _check_checkpoint_every(checkpoint_every)
    task = get_task(config.task)
    method = get_method(config.method)
    costs_like_rdrop = method.costs_like_rdrop_for(config)
    started = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    data, unlabeled = select_training_data(task, data_dir, config)
    budget = _plan_budget(config, store, len(data.train), costs_like_rdrop, progress)
    training = _build_training(
        config, task, method, data, unlabeled, budget.planned, checkpoint_dir
    )
    state, snapshots = _start_state(training, resume_file, progress)
    # A run without an equal-time budget has max_steps == planned steps.
    share = _ProgressShare(
        progress, units, budget.max_steps, state.step, _status_text(task, method, config)
    )
    training.model.train()
    _train_loop(training, budget, state, snapshots, share, resume_file, checkpoint_every)
    share.finish()
    selections = _select_checkpoints(training, budget, state, snapshots, costs_like_rdrop)
    record = _run_record(
        training, method, budget, state, selections,
        command=command, started=started, wall_start=wall_start,
        costs_like_rdrop=costs_like_rdrop,
    )  # fmt: skip
    written = record.to_dict()
    store.write(written)
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------- resuming


def _resumable_objects(context: RunContext) -> dict[str, Any]:
    return {name: get() for name, (get, _) in context.resumable.items()}


def _save_resume(
    path: Path, training: _Training, state: _LoopState, snapshots: dict[int, State]
) -> None:
    """Write the run's resumable checkpoint (see :mod:`rdrop_lab.resume`)."""
    t = training
    save_resume_state(
        path,
        {
            "run_id": t.config.run_id(),
            "config": t.config.to_dict(),
            "loop": state.to_json(),
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "rng": _rng_state(t.order_rng, t.context.generator),
            "snapshots": snapshots,
            "method": _resumable_objects(t.context),
            "counters": dict(t.context.counters),
            "torch_threads": torch.get_num_threads(),
            "machine": this_machine(),
        },
    )


def _say(progress: Progress | None, text: str) -> None:
    """A message on the progress display, or on stderr without one."""
    if progress is not None:
        progress.message(text)
    else:
        print(text, file=sys.stderr)


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples and lists compare alike)."""
    return json.loads(json.dumps(value))


def _start_state(
    training: _Training, resume_file: Path | None, progress: Progress | None
) -> tuple[_LoopState, dict[int, State]]:
    """A fresh loop state, or the one of the run's resumable checkpoint when it exists
    and can be used (the model, optimizer and random streams are restored with it).

    Returns:
        ``(loop state, snapshots kept for selection)``.
    """
    if resume_file is None or not resume_file.is_file():
        return _LoopState(), {}
    resumed = _resume(resume_file, training, progress)
    if resumed is None:
        return _LoopState(), {}
    state, snapshots, rng = resumed
    _set_rng_state(rng, training.order_rng, training.context.generator)
    state.resumes.append({"step": state.step, "train_seconds": state.train_seconds})
    return state, snapshots


def _resume(
    path: Path, training: _Training, progress: Progress | None
) -> tuple[_LoopState, dict[int, State], dict[str, Any]] | None:
    """Restore a run from its resumable checkpoint; ``None`` (with a message) when the
    file cannot be used, and the run starts again."""
    t = training
    config = t.config
    try:
        saved = load_resume_state(path)
        if saved.get("run_id") != config.run_id() or _plain(saved.get("config")) != _plain(
            config.to_dict()
        ):
            raise ResumeError(f"{path}: the checkpoint belongs to another run configuration")
        t.model.load_state_dict(saved["model"])
        t.optimizer.load_state_dict(saved["optimizer"])
        t.scheduler.load_state_dict(saved["scheduler"])
        for name, value in saved["method"].items():
            t.context.resumable[name][1](value)
        t.context.counters.update(saved["counters"])
        state = _LoopState.from_json(saved["loop"])
        saved_threads = saved.get("torch_threads")
        saved_machine = saved.get("machine")
    except (ResumeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        _say(progress, f"{config.run_id()}: cannot resume ({error}); starting the run again")
        return None
    _check_same_clock(config, path, saved_threads, saved_machine)
    _say(
        progress,
        f"resuming {config.run_id()} from step {state.step} "
        f"({state.train_seconds:.0f} s of training done, {len(state.evals)} evaluations)",
    )
    return state, saved["snapshots"], saved["rng"]


def _check_same_clock(
    config: RunConfig, path: Path, saved_threads: int | None, saved_machine: str | None
) -> None:
    """Refuse a checkpoint trained with another thread count or on another kind of
    machine (checkpoints that predate a field pass it): the training clock sums CPU time
    over threads, and seconds per step are a machine's own, so one run must mix neither.

    Raises:
        ConfigError: naming the run, the checkpoint, both values and the way out.
    """
    threads, here = torch.get_num_threads(), this_machine()
    clocks = [
        (
            saved_threads,
            threads,
            f"was trained with --threads {saved_threads}, this process has {threads}",
            f"resume with --threads {saved_threads}",
            "thread counts",
        ),
        (
            saved_machine,
            here,
            f"was trained on {saved_machine}, this process runs on {here}",
            "resume it on that kind of machine",
            "machines",
        ),
    ]
    for saved, current, differs, remedy, mixed in clocks:
        if saved is not None and saved != current:
            raise ConfigError(
                f"run {config.run_id()}: its resumable checkpoint {path} {differs}; {remedy} "
                f"(the training clock must not mix {mixed}), or delete the checkpoint to "
                "start the run again"
            )


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
