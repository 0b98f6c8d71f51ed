"""MixUp, Manifold MixUp and FGM in the runner, alone and combined with R-Drop.

The regularizers and their combination rules are the library's (:mod:`rdrop.regularizers`,
README "Combining R-Drop with other regularizers"):

* ``mixup`` (Zhang et al., ICLR 2018): one ``lam ~ Beta(a, a)`` and one permutation per
  batch. Raw float inputs (``Task.mixup_input_key``, e.g. images) are mixed directly; text
  is mixed at the output of the embedding layer (``Task.mixing_layers(model)[0]``; each
  row keeps its own attention mask). Default ``a``: the task's ``mixup_alpha``, else 1.0
  for raw inputs (the paper's CIFAR value) and 0.2 for text embeddings (the paper's
  ImageNet range 0.1-0.4: a mild mixing for a pretrained encoder).
* ``manifold_mixup`` (Verma et al., ICML 2019): the same at a layer drawn uniformly from
  ``Task.mixing_layers(model)`` (embedding output and every encoder layer), ``a = 2.0``.
* ``fgm`` (Miyato et al., ICLR 2017): clean backward, ``r = eps g / ||g||_2`` added to the
  embedding weight (``Task.embedding_module``), adversarial backward, restore; ``eps = 1``.
* ``rdrop_mixup`` / ``rdrop_manifold_mixup``: mix once, both dropout passes see the same
  mixed batch (the hook mixes within each half of ``[x; x]``), mixed task loss averaged
  over the passes + ``(alpha / 2)`` symmetric KL between the passes on the mixed input.
* ``rdrop_fgm``: the R-Drop loss on the clean doubled batch, backward, attack, the task
  loss of **one** dropout pass on the perturbed embeddings, backward, restore.

Regression (STS-B): MixUp mixes the float targets linearly, ``y_mix = lam y_a + (1 - lam)
y_b``, with the MSE loss (its gradient equals that of ``lam MSE(y_a) + (1 - lam)
MSE(y_b)``, which differs by a constant); R-Drop's consistency is then the MSE between
the passes. Token-level (sequence) tasks are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import rdrop
from rdrop_lab.config import ConfigError, RunConfig
from rdrop_lab.methods.base import (
    Method,
    RunContext,
    StepOutput,
    TrainStep,
    logits_of,
    plain_task_loss,
    require_kind,
)
from rdrop_lab.methods.core import rdrop_wrapper
from rdrop_lab.tasks.base import Task

__all__ = [
    "DEFAULT_FGM_EPSILON",
    "DEFAULT_MANIFOLD_MIXUP_ALPHA",
    "FGMMethod",
    "Mix",
    "Mixer",
    "ManifoldMixupMethod",
    "MixUpMethod",
    "RDropFGM",
    "RDropManifoldMixup",
    "RDropMixUp",
    "mixup_alpha",
]

#: Manifold MixUp's Beta(a, a) parameter (Verma et al. use 2.0).
DEFAULT_MANIFOLD_MIXUP_ALPHA = 2.0
#: FGM's perturbation norm (the common FGM recipe for text models).
DEFAULT_FGM_EPSILON = 1.0
_MIXUP_ALPHA_RAW_INPUTS = 1.0
_MIXUP_ALPHA_EMBEDDINGS = 0.2


def mixup_alpha(task: Task, config: RunConfig) -> float:
    """MixUp's alpha for a run: the run's, else the task's, else 1.0 for raw inputs and
    0.2 for text embeddings."""
    if config.mixup_alpha is not None:
        return config.mixup_alpha
    if task.mixup_alpha is not None:
        return task.mixup_alpha
    return _MIXUP_ALPHA_RAW_INPUTS if task.mixup_input_key else _MIXUP_ALPHA_EMBEDDINGS


def _manifold_alpha(config: RunConfig) -> float:
    value = config.manifold_mixup_alpha
    return DEFAULT_MANIFOLD_MIXUP_ALPHA if value is None else value


def _fgm_epsilon(config: RunConfig) -> float:
    return DEFAULT_FGM_EPSILON if config.fgm_epsilon is None else config.fgm_epsilon


@dataclass
class Mix:
    """One mixing draw of a step, and the targets it implies."""

    mixed: rdrop.MixedBatch
    regression_target: torch.Tensor | None
    num_classes: int
    label_smoothing: float
    ignore_index: int

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The mixed task loss of one pass."""
        if self.regression_target is not None:
            return rdrop.task_loss(logits, self.regression_target, "mse")
        return self.mixed.loss(logits, self.label_smoothing, ignore_index=self.ignore_index)

    def rdrop_target(self) -> torch.Tensor:
        """The target for :class:`rdrop.RDrop` built with :meth:`Mixer.rdrop_task`: the
        mixed float target (regression) or the mixed soft target (classification)."""
        if self.regression_target is not None:
            return self.regression_target
        return self.mixed.soft_targets(self.num_classes, self.label_smoothing)


class Mixer:
    """MixUp (raw inputs or embedding output) or Manifold MixUp for one run of a task.

    ``with mixer.mixing(inputs, target) as (mixed_inputs, mix): out = model(**mixed_inputs)``
    draws ``lam``, the permutation (and the layer) once; for text the forward hook that
    mixes is active only inside the block.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        alpha: float,
        manifold: bool,
        generator: torch.Generator,
    ) -> None:
        self.task = task
        self.alpha = alpha
        self.generator = generator
        self.regression = task.kind == "regression"
        self.input_key = None if manifold else task.mixup_input_key
        self.hooks: rdrop.ManifoldMixup | None = None
        if self.input_key is None:
            layers = task.mixing_layers(model)
            if not layers:
                raise ConfigError(f"task {task.name!r}: mixing_layers() returned no layer")
            self.hooks = rdrop.ManifoldMixup(model, layers if manifold else layers[:1], alpha)

    @property
    def layers(self) -> list[str]:
        return [] if self.hooks is None else list(self.hooks.layer_names)

    def _class_target(self, target: torch.Tensor) -> torch.Tensor:
        # Regression: the draw needs class ids only for its own checks; the float targets
        # are mixed with the same lam and permutation below.
        if self.regression:
            return torch.arange(target.shape[0], device=target.device)
        return target

    def _mix(self, mixed: rdrop.MixedBatch, target: torch.Tensor) -> Mix:
        regression_target = None
        if self.regression:
            perm = mixed.perm.to(target.device)
            regression_target = mixed.lam * target + (1.0 - mixed.lam) * target[perm]
        return Mix(
            mixed,
            regression_target,
            self.task.num_labels,
            self.task.label_smoothing,
            self.task.ignore_index,
        )

    @contextmanager
    def mixing(
        self, inputs: dict[str, torch.Tensor], target: torch.Tensor
    ) -> Iterator[tuple[dict[str, torch.Tensor], Mix]]:
        class_target = self._class_target(target)
        num_classes = None if self.regression else self.task.num_labels
        if self.input_key is not None:
            if self.input_key not in inputs:
                raise ConfigError(
                    f"task {self.task.name!r}: mixup_input_key {self.input_key!r} is not an "
                    f"input of its model (inputs: {sorted(inputs)})"
                )
            mixed = rdrop.mixup(
                inputs[self.input_key],
                class_target,
                alpha=self.alpha,
                num_classes=num_classes,
                generator=self.generator,
            )
            assert mixed.inputs is not None
            yield {**inputs, self.input_key: mixed.inputs}, self._mix(mixed, target)
            return
        assert self.hooks is not None
        with self.hooks.mixing(
            class_target, num_classes=num_classes, generator=self.generator
        ) as mixed:
            yield inputs, self._mix(mixed, target)

    def rdrop_task(self) -> Any:
        """The ``task=`` of an :class:`rdrop.RDrop` trained on :meth:`Mix.rdrop_target`."""
        return "mse" if self.regression else rdrop.soft_cross_entropy


class _MixingMethod(Method):
    manifold = False

    def check(self, task: Task, config: RunConfig) -> None:
        super().check(task, config)
        require_kind(self, task, ("classification", "regression"), self.label)

    def _alpha_of(self, task: Task, config: RunConfig) -> float:
        return _manifold_alpha(config) if self.manifold else mixup_alpha(task, config)

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        key = "manifold_mixup_alpha" if self.manifold else "mixup_alpha"
        where = (
            "hidden states at a random layer"
            if self.manifold
            else (
                f"inputs[{task.mixup_input_key!r}]" if task.mixup_input_key else "embedding output"
            )
        )
        return {key: self._alpha_of(task, config), "mixes": where}

    def _mixer(self, model: nn.Module, task: Task, config: RunConfig, context: RunContext) -> Mixer:
        mixer = Mixer(
            model,
            task,
            alpha=self._alpha_of(task, config),
            manifold=self.manifold,
            generator=context.generator,
        )
        if mixer.layers:
            context.counters["mixing_layers"] = mixer.layers
        return mixer


class MixUpMethod(_MixingMethod):
    name = "mixup"
    label = "MixUp"
    fields = frozenset({"mixup_alpha"})

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        mixer = self._mixer(model, task, config, context)

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            with mixer.mixing(inputs, target) as (mixed_inputs, mix):
                logits = logits_of(model(**mixed_inputs))
            value = mix.loss(logits)
            value.backward()
            return StepOutput(value, value)

        return step


class ManifoldMixupMethod(MixUpMethod):
    name = "manifold_mixup"
    label = "Manifold MixUp"
    manifold = True
    fields = frozenset({"manifold_mixup_alpha"})


class RDropMixUp(_MixingMethod):
    name = "rdrop_mixup"
    label = "R-Drop + MixUp"
    uses_alpha = True
    costs_like_rdrop = True
    fields = frozenset({"mixup_alpha"})
    relative_cost = 2.0

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        mixer = self._mixer(model, task, config, context)
        assert config.alpha is not None
        wrapped = rdrop_wrapper(
            model, task, config.alpha, loss_task=mixer.rdrop_task(), context=context
        )

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            with mixer.mixing(inputs, target) as (mixed_inputs, mix):
                out = wrapped(**mixed_inputs, target=mix.rdrop_target())
            out.loss.backward()
            return StepOutput(out.loss, out.task_loss, out.consistency_loss)

        return step


class RDropManifoldMixup(RDropMixUp):
    name = "rdrop_manifold_mixup"
    label = "R-Drop + Manifold MixUp"
    manifold = True
    fields = frozenset({"manifold_mixup_alpha"})


class _FGMBase(Method):
    fields = frozenset({"fgm_epsilon"})

    def check(self, task: Task, config: RunConfig) -> None:
        super().check(task, config)
        require_kind(self, task, ("classification", "regression"), "FGM")
        if not task.has_token_embeddings:
            raise ConfigError(
                f"method {self.name!r} perturbs token embeddings, and task {task.name!r} has "
                "none (Task.has_token_embeddings is False)"
            )

    def settings(self, task: Task, config: RunConfig) -> dict[str, Any]:
        return {"fgm_epsilon": _fgm_epsilon(config), "perturbs": "embedding weight"}

    def _fgm(self, model: nn.Module, task: Task, config: RunConfig) -> rdrop.FGM:
        module = task.embedding_module(model)
        if module is None:
            raise ConfigError(
                f"method {self.name!r} needs an embedding layer to perturb, and task "
                f"{task.name!r} defines none (Task.embedding_module returned None)"
            )
        return rdrop.FGM(model, epsilon=_fgm_epsilon(config), param_names=module)


class FGMMethod(_FGMBase):
    name = "fgm"
    label = "FGM"
    # A clean and an adversarial forward/backward on the batch: about one R-Drop step, but
    # not the same computation, so it is measured against the R-Drop time budget.
    costs_like_rdrop = False
    relative_cost = 2.0

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        fgm = self._fgm(model, task, config)

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            def loss() -> torch.Tensor:
                return plain_task_loss(logits_of(model(**inputs)), target, task)

            clean, adversarial = rdrop.fgm_step(fgm, loss, loss)
            return StepOutput(clean + adversarial, clean)

        return step


class RDropFGM(_FGMBase):
    name = "rdrop_fgm"
    label = "R-Drop + FGM"
    uses_alpha = True
    # The doubled clean forward/backward plus a single adversarial one: ~1.5 R-Drop steps.
    costs_like_rdrop = False
    relative_cost = 3.0

    def prepare(
        self, model: nn.Module, task: Task, config: RunConfig, context: RunContext
    ) -> TrainStep:
        fgm = self._fgm(model, task, config)
        assert config.alpha is not None
        wrapped = rdrop_wrapper(model, task, config.alpha, context=context)

        def step(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> StepOutput:
            outputs: list[rdrop.RDropOutput] = []

            def clean() -> torch.Tensor:
                outputs.append(wrapped(**inputs, target=target))
                return outputs[-1].loss

            def adversarial() -> torch.Tensor:
                return plain_task_loss(logits_of(model(**inputs)), target, task)

            clean_loss, adversarial_loss = rdrop.fgm_step(fgm, clean, adversarial)
            out = outputs[0]
            return StepOutput(
                clean_loss + adversarial_loss, out.task_loss.detach(), out.consistency_loss.detach()
            )

        return step
