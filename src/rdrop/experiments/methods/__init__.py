"""Training methods the runner compares: how one step turns a batch into a loss.

* ``baseline``: dropout only, one pass.
* ``rdrop``: R-Drop (:class:`rdrop.RDrop`), one forward on ``[x; x]``, alpha from the run.
* ``doubled_batch``: the paper's control: the same forward on ``[x; x]`` and the same task
  loss, without the KL (alpha = 0). If R-Drop beats it, the gain is the KL, not the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

import rdrop
from rdrop.experiments.config import RunConfig
from rdrop.experiments.tasks.base import Task

__all__ = ["METHODS", "Method", "StepOutput", "get_method"]


@dataclass
class StepOutput:
    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor | None = None


class Method(ABC):
    """How a training step computes its loss. ``prepare`` wraps the model once per run."""

    name: str
    label: str
    uses_alpha: bool = False
    #: One step costs what an R-Drop step costs (a forward/backward on the doubled batch),
    #: so its equal-time budget is its equal-epochs budget.
    costs_like_rdrop: bool = False

    def prepare(self, model: nn.Module, task: Task, config: RunConfig) -> nn.Module:
        return model

    @abstractmethod
    def step(
        self, module: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor, task: Task
    ) -> StepOutput:
        """Loss of one training batch (the module is in training mode)."""


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


class Baseline(Method):
    name = "baseline"
    label = "baseline"

    def step(
        self, module: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor, task: Task
    ) -> StepOutput:
        value = rdrop.task_loss(
            _logits(module(**inputs)),
            target,
            task.loss_task,
            ignore_index=task.ignore_index,
            label_smoothing=task.label_smoothing,
        )
        return StepOutput(value, value)


class RDropMethod(Method):
    name = "rdrop"
    label = "R-Drop"
    uses_alpha = True
    costs_like_rdrop = True

    def _alpha(self, config: RunConfig) -> float:
        if config.alpha is None:
            raise ValueError(f"method {self.name!r} needs alpha (got None)")
        return config.alpha

    def prepare(self, model: nn.Module, task: Task, config: RunConfig) -> nn.Module:
        return rdrop.RDrop(
            model,
            alpha=self._alpha(config),
            task=task.loss_task,
            ignore_index=task.ignore_index,
            label_smoothing=task.label_smoothing,
        )

    def step(
        self, module: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor, task: Task
    ) -> StepOutput:
        out = module(**inputs, target=target)
        return StepOutput(out.loss, out.task_loss, out.consistency_loss)


class DoubledBatch(RDropMethod):
    name = "doubled_batch"
    label = "doubled batch (no KL)"
    uses_alpha = False

    def _alpha(self, config: RunConfig) -> float:
        return 0.0


METHODS: dict[str, Method] = {m.name: m for m in (Baseline(), RDropMethod(), DoubledBatch())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None
