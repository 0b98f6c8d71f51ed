"""The baseline, R-Drop with the paper's ablations, its controls and its semi-supervised use.

* ``baseline``: dropout only, one pass.
* ``label_smoothing``: the baseline with label smoothing on the task loss (default 0.1).
* ``rdrop``: R-Drop (:class:`rdrop.RDrop`), one forward on ``[x; x]``, alpha from the run;
  the run options ``every_k_steps``, ``num_passes``, ``dropout_rates`` (sequential passes)
  and ``stop_gradient`` give the paper's ablations (and the stop-gradient variant).
* ``doubled_batch``: the paper's control: the same forward on ``[x; x]`` and the same task
  loss, without the KL (alpha = 0). If R-Drop beats it, the gain is the KL, not the batch.
* ``rdrop_label_smoothing``: R-Drop with label smoothing on the task part only.
* ``rdrop_semi``: R-Drop on the labelled batch plus the consistency term alone on an
  unlabeled batch of the same size (:meth:`rdrop.RDrop.unlabeled`), both weighted by alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import rdrop
from rdrop_lab.config import (
    ABLATION_DEFAULTS,
    ConfigError,
    RunConfig,
    is_plain_rdrop,
)
from rdrop_lab.methods.base import (
    Method,
    RunContext,
    StepOutput,
    TrainStep,
    logits_of,
    plain_task_loss,
    require_kind,
)
from rdrop_lab.tasks.base import Collator, Example, Task

__all__ = [
    "DEFAULT_LABEL_SMOOTHING",
    "Baseline",
    "DoubledBatch",
    "LabelSmoothing",
    "RDropLabelSmoothing",
    "RDropMethod",
    "RDropSemi",
    "UnlabeledBatches",
]

#: Label smoothing of the ``label_smoothing`` methods unless the run sets it (Szegedy et
#: al., 2016; the paper's translation setting).
DEFAULT_LABEL_SMOOTHING = 0.1


def _label_smoothing(config: RunConfig) -> float:
    return DEFAULT_LABEL_SMOOTHING if config.label_smoothing is None else config.label_smoothing


def _alpha(method: Method, config: RunConfig) -> float:
    if config.alpha is None:
        raise ConfigError(f"method {method.name!r} needs alpha (got None)")
    return config.alpha


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def rdrop_wrapper(
    model: nn.Module,
    task: Task,
    alpha: float,
    *,
    label_smoothing: float | None = None,
    config: RunConfig | None = None,
    loss_task: Any = None,
    context: RunContext | None = None,
) -> rdrop.RDrop:
    """:class:`rdrop.RDrop` around ``model`` for ``task`` (and the ablations of ``config``).

    With ``context``, the wrapper's step counter (every-k steps) is registered as
    resumable state."""
    options: dict[str, Any] = {}
    if config is not None:
        options = {
            "num_passes": config.num_passes,
            "every_k_steps": config.every_k_steps,
            "dropout_rates": config.dropout_rates,
            "stop_gradient": config.stop_gradient,
            "mode": "sequential" if config.dropout_rates is not None else "concat",
            "branch_at": config.branch_at,
        }
    wrapped = rdrop.RDrop(
        model,
        alpha=alpha,
        task=task.loss_task if loss_task is None else loss_task,
        ignore_index=task.ignore_index,
        label_smoothing=task.label_smoothing if label_smoothing is None else label_smoothing,
        **options,
    )
    wrapped.train()
    if context is not None:
        context.resumable["rdrop_step"] = (
            lambda: wrapped.step,
            lambda value: setattr(wrapped, "step", int(value)),
        )
        context.resumable["rdrop_unlabeled_step"] = (
            lambda: wrapped.unlabeled_step,
            lambda value: setattr(wrapped, "unlabeled_step", int(value)),
        )
    return wrapped


def _wrapped_step(wrapped: rdrop.RDrop) -> TrainStep:
    """A training step through an :class:`rdrop.RDrop` wrapper: forward, backward, output."""

    def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
        out = wrapped(**inputs, target=target)
        _backward(out.loss)
        return _rdrop_output(out)

    return step


def _rdrop_output(out: rdrop.RDropOutput) -> StepOutput:
    return StepOutput(out.loss, out.task_loss, out.consistency_loss)


class Baseline(Method):
    name = "baseline"
    label = "baseline"

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            value = plain_task_loss(logits_of(model(**inputs)), target, task)
            _backward(value)
            return StepOutput(value, value)

        return step


class _SmoothedTargets(Method):
    """A method with the ``label_smoothing`` option (classification and sequence tasks)."""

    fields = frozenset({"label_smoothing"})

    def check(self, task: Task, config: RunConfig) -> None:
        super().check(task, config)
        require_kind(self, task, ("classification", "sequence"), "label smoothing")

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        return {"label_smoothing": _label_smoothing(config)}


class LabelSmoothing(_SmoothedTargets):
    name = "label_smoothing"
    label = "label smoothing"

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        smoothing = _label_smoothing(config)

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            value = plain_task_loss(logits_of(model(**inputs)), target, task, smoothing)
            _backward(value)
            return StepOutput(value, value)

        return step


class RDropMethod(Method):
    name = "rdrop"
    label = "R-Drop"
    uses_alpha = True
    costs_like_rdrop = True
    fields = frozenset(ABLATION_DEFAULTS)
    relative_cost = 2.0

    def costs_like_rdrop_for(self, config: RunConfig) -> bool:
        # Only plain R-Drop costs what plain R-Drop costs: every-k steps and stop-gradient
        # are cheaper, m = 3 dearer, sequential per-rate passes differ; those runs are
        # measured against the R-Drop time budget like every other method.
        return is_plain_rdrop(config)

    def cost_for(self, config: RunConfig) -> float:
        m, k = config.num_passes, config.every_k_steps
        per_consistency_step = 1.0 + 0.35 * (m - 1) if config.stop_gradient else float(m)
        if config.branch_at is not None:  # an estimate for the progress display only
            per_consistency_step = 1.0 + 0.5 * (m - 1)
        return (per_consistency_step + (k - 1)) / k

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        return {
            "every_k_steps": config.every_k_steps,
            "num_passes": config.num_passes,
            "dropout_rates": None if config.dropout_rates is None else list(config.dropout_rates),
            "stop_gradient": config.stop_gradient,
            "mode": "sequential" if config.dropout_rates is not None else "concat",
            "branch_at": config.branch_at,
        }

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        wrapped = rdrop_wrapper(model, task, _alpha(self, config), config=config, context=context)
        return _wrapped_step(wrapped)


class DoubledBatch(Method):
    name = "doubled_batch"
    label = "doubled batch (no KL)"
    costs_like_rdrop = True
    relative_cost = 2.0

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        wrapped = rdrop_wrapper(model, task, 0.0, context=context)
        return _wrapped_step(wrapped)


class RDropLabelSmoothing(_SmoothedTargets):
    name = "rdrop_label_smoothing"
    label = "R-Drop + label smoothing"
    uses_alpha = True
    costs_like_rdrop = True
    relative_cost = 2.0

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        wrapped = rdrop_wrapper(
            model,
            task,
            _alpha(self, config),
            label_smoothing=_label_smoothing(config),
            context=context,
        )
        return _wrapped_step(wrapped)


class UnlabeledBatches:
    """Batches from an unlabeled pool: a fresh random order on every pass over the pool
    (``generator``), ``next(n)`` returns the inputs of the next ``n`` examples (wrapping
    around the end of a pass)."""

    def __init__(
        self, pool: Sequence[Example], collate: Collator, generator: torch.Generator
    ) -> None:
        if not pool:
            raise ConfigError("the unlabeled pool is empty")
        self.pool = pool
        self.collate = collate
        self.generator = generator
        self._order: list[int] = []
        self.seen = 0

    def state(self) -> dict[str, Any]:
        """The position in the current pass (for resumable checkpoints)."""
        return {"order": list(self._order), "seen": self.seen}

    def load_state(self, state: dict[str, Any]) -> None:
        self._order, self.seen = [int(i) for i in state["order"]], int(state["seen"])

    def next(self, n: int) -> dict[str, torch.Tensor]:
        chosen: list[int] = []
        while len(chosen) < n:
            if not self._order:
                self._order = torch.randperm(len(self.pool), generator=self.generator).tolist()
            take = min(n - len(chosen), len(self._order))
            chosen += self._order[:take]
            self._order = self._order[take:]
        self.seen += n
        inputs, _ = self.collate([self.pool[i] for i in chosen])  # labels were stripped
        return inputs


class RDropSemi(Method):
    name = "rdrop_semi"
    label = "R-Drop semi-supervised"
    uses_alpha = True
    fields = frozenset({"unlabeled_size"})
    # A labelled doubled forward plus an unlabeled one: about twice an R-Drop step, so the
    # runner measures it against the R-Drop time budget.
    costs_like_rdrop = False
    relative_cost = 4.0

    def check(self, task: Task, config: RunConfig) -> None:
        super().check(task, config)
        require_kind(self, task, ("classification", "regression"), "semi-supervised R-Drop")
        if config.unlabeled_size is None:
            raise ConfigError(
                f"method {self.name!r} needs unlabeled_size (the size of the unlabeled pool)"
            )

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        return {"unlabeled_size": config.unlabeled_size, "unlabeled_batch": "= labelled batch"}

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        wrapped = rdrop_wrapper(model, task, _alpha(self, config), context=context)
        batches = UnlabeledBatches(context.unlabeled, context.collate, context.generator)
        context.counters["unlabeled_seen"] = 0
        context.resumable["unlabeled"] = (batches.state, batches.load_state)

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            labelled = wrapped(**inputs, target=target)
            unlabeled = wrapped.unlabeled(**batches.next(int(target.shape[0])))
            loss = labelled.loss + unlabeled.loss
            _backward(loss)
            context.counters["unlabeled_seen"] = batches.seen
            consistency = labelled.consistency_loss + unlabeled.consistency_loss
            return StepOutput(loss, labelled.task_loss, consistency)

        return step
