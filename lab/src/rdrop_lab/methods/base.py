"""What a training method is: per run, a step function that turns a batch into gradients.

A :class:`Method` is registered once (``METHODS``); :meth:`Method.prepare` is called once
per run and returns a :data:`TrainStep`: ``step(inputs, target) -> StepOutput`` computes
the loss **and runs its backward pass(es)** (FGM needs two backwards per step), leaving
the gradients in ``.grad`` for the runner's clipping and optimizer step. The runner zeroes
the gradients before each call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import rdrop
from rdrop import extract_logits
from rdrop_lab.config import ConfigError, MethodSpec, RunConfig, changed_fields
from rdrop_lab.tasks.base import Collator, Example, Task

__all__ = [
    "Method",
    "RunContext",
    "StepOutput",
    "TrainStep",
    "logits_of",
    "plain_task_loss",
    "require_kind",
]


@dataclass
class StepOutput:
    """The (detached-for-logging) parts of one training step's objective."""

    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor | None = None


TrainStep = Callable[[dict[str, torch.Tensor], torch.Tensor], StepOutput]


@dataclass
class RunContext:
    """What a method may need besides the model: the collator, the unlabeled pool of a
    semi-supervised run and a random generator of its own (MixUp draws, unlabeled order),
    seeded from the run's seed so every method's draws are reproducible."""

    collate: Collator
    generator: torch.Generator
    unlabeled: Sequence[Example] = ()
    #: Counters a method reports in the run record (e.g. unlabeled examples seen).
    counters: dict[str, Any] = field(default_factory=dict)
    #: State a method keeps between steps besides the model and the generators (a step
    #: counter, an unlabeled order): name -> (get, set) of a JSON-compatible value, saved
    #: in resumable checkpoints so a resumed run continues exactly.
    resumable: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = field(
        default_factory=dict
    )


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model output (a tensor, ``output["logits"]``, ``output.logits`` or
    ``output[0]``; the rule of :class:`rdrop.RDrop`)."""
    return extract_logits(output, None)


def plain_task_loss(
    logits: torch.Tensor, target: torch.Tensor, task: Task, label_smoothing: float | None = None
) -> torch.Tensor:
    """The task loss of one pass, with the task's label smoothing unless overridden."""
    return rdrop.task_loss(
        logits,
        target,
        task.loss_task,
        ignore_index=task.ignore_index,
        label_smoothing=task.label_smoothing if label_smoothing is None else label_smoothing,
    )


class Method(ABC):
    """A training method of the runner.

    Attributes:
        name: registry name (``RunConfig.method``).
        label: display name.
        uses_alpha: takes R-Drop's alpha (the suite expands its ``alphas``).
        costs_like_rdrop: a step costs what a plain R-Drop step costs, so its equal-time
            model is its equal-epochs model (see :meth:`costs_like_rdrop_for`). Any method
            that is cheaper **or dearer** per step says ``False``: the runner then measures
            it against the R-Drop time budget (a cheaper one trains on to the budget; a
            dearer one is selected among the evaluations before the budget ran out).
        fields: the options of :data:`rdrop_lab.config.METHOD_FIELDS` it reads.
        relative_cost: rough cost of a step in plain steps (for the progress ETA only).
    """

    name: str
    label: str
    uses_alpha: bool = False
    costs_like_rdrop: bool = False
    fields: frozenset[str] = frozenset()
    relative_cost: float = 1.0

    def spec(self) -> MethodSpec:
        return MethodSpec(uses_alpha=self.uses_alpha, fields=self.fields)

    def costs_like_rdrop_for(self, config: RunConfig) -> bool:
        """Whether this run's steps cost what plain R-Drop steps cost."""
        return self.costs_like_rdrop

    def cost_for(self, config: RunConfig) -> float:
        """Rough cost of one step of this run, in plain steps (for the ETA)."""
        return self.relative_cost

    def check(self, task: Task, config: RunConfig) -> None:
        """Raise :class:`ConfigError` (naming the task and the option) when this method
        cannot run ``config`` on ``task``; called before any data is loaded."""
        if self.uses_alpha and config.alpha is None:
            raise ConfigError(f"method {self.name!r} needs alpha (got None)")
        for key in sorted(changed_fields(config) - self.fields):
            raise ConfigError(
                f"{key}={getattr(config, key)!r} is not an option of method {self.name!r}"
                + (f" (its options: {', '.join(sorted(self.fields))})" if self.fields else "")
            )

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        """The resolved hyper-parameters of this run (recorded with it)."""
        return {}

    @abstractmethod
    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        """Build the per-run step function (called once, after seeding, on a fresh model)."""


def require_kind(method: Method, task: Task, kinds: tuple[str, ...], what: str) -> None:
    """:class:`ConfigError` naming the task unless its kind is one of ``kinds``."""
    if task.kind not in kinds:
        raise ConfigError(
            f"method {method.name!r} ({what}) is not defined for task {task.name!r}, a "
            f"{task.kind} task; it supports {' and '.join(kinds)} tasks"
        )
