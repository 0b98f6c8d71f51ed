"""R-Drop for the Hugging Face ``Trainer``: :class:`RDropTrainer` and :class:`RDropTrainerMixin`.

The trainer's ``compute_loss`` calls the model **once** on the concatenated batch
``[x; x]`` *without* ``labels`` (so the model does not compute a loss of its own), splits
the logits into the passes and returns the R-Drop objective of :func:`rdrop.rdrop_loss`::

    loss = 1/2 (task(P_1) + task(P_2)) + (alpha / 2) * D(P_1, P_2)

The task follows the model config like Hugging Face's own heads do: ``num_labels == 1``
(or ``problem_type="regression"``) is regression with the MSE consistency term,
``problem_type="multi_label_classification"`` (or float labels) is multi-label with the
Bernoulli KL, integer labels are cross-entropy with the symmetric KL; token-level labels
``[B, T]`` with ``-100`` are masked out of both terms, and causal language models have
their labels shifted as the model would. ``TrainingArguments.label_smoothing_factor``
smooths the task loss only, never the consistency term.

Evaluation and prediction do a single ordinary pass. The mean task loss and the
consistency term ``D`` (before ``alpha / 2``) are logged as ``task_loss`` and
``consistency_loss`` next to the Trainer's ``loss``.

Gradient accumulation: when the Trainer counts the items of the accumulated batch
(``num_items_in_batch``), the loss is normalised by that count, so gradients with
``gradient_accumulation_steps=n`` equal those of the ``n`` times larger batch even when
micro-batches hold different numbers of real tokens; otherwise it is divided by the
number of accumulated micro-batches. Either way the Trainer does not divide it again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

try:
    import transformers
    from packaging.version import Version
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "rdrop.integrations.hf needs the 'transformers' package: "
        "pip install 'torch-rdrop[hf]' (or pip install transformers accelerate)"
    ) from error

from rdrop._batch import LogitsGetter, extract_logits
from rdrop._branch import resolve_branch
from rdrop._checks import check_bool, check_int
from rdrop._output_layer import output_layer_bypassed
from rdrop._passes import forward_passes
from rdrop.functional import _KINDS, ConsistencyKind
from rdrop.fused import rdrop_linear_cross_entropy
from rdrop.integrations._hf_batch import (
    add_decoder_inputs,
    missing_dropout_message,
    refuse_packed_batches,
    refuse_prompt_learning,
)
from rdrop.losses import (
    _BUILTIN_TASKS,
    BuiltinTask,
    RDropOutput,
    TaskLoss,
    rdrop_loss,
    task_loss,
)
from rdrop.schedules import ConsistencySchedule
from rdrop.wrapper import RDropWarning

__all__ = ["RDropTrainer", "RDropTrainerMixin", "scale_for_gradient_accumulation"]

HFTask = Literal["auto"] | BuiltinTask | TaskLoss
Alpha = float | Callable[[int], float]

#: The hidden-state loss is the default from this many logits of the doubled batch on
#: (1 GiB in float32): below it the logits path is as fast and its memory is affordable.
_HIDDEN_STATE_MIN_LOGITS = 1 << 28


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _item_count(target: Tensor, ignore_index: int) -> int:
    """The items a loss averages: class-id targets without ``ignore_index``, every value
    of float targets (what the Trainer's ``num_items_in_batch`` counts)."""
    if target.is_floating_point():
        return target.numel()
    return int((target != ignore_index).sum())


def _with_router_aux_loss(loss: Tensor, model: nn.Module, outputs: Any) -> Tensor:
    """``loss + router_aux_loss_coef * aux_loss`` for a mixture-of-experts model that
    returned its router's load-balancing loss (``output_router_logits=True``), as the model
    adds it to its own loss when given labels; ``loss`` otherwise."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None and isinstance(outputs, Mapping):
        aux = outputs.get("aux_loss")
    base = _base_model(model)
    coefficient = getattr(getattr(base, "config", None), "router_aux_loss_coef", None)
    if not isinstance(aux, Tensor) or not coefficient:
        return loss
    return loss + coefficient * aux.to(loss.device)


#: Config keys of models that transform the logits after the output projection.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# transformers >= 5 lets compute_loss declare that it already scaled the loss for
# gradient accumulation; older versions decide from ``model_accepts_loss_kwargs``.
_TRAINER_HAS_GA_FLAG = hasattr(Trainer, "loss_is_scaled_for_ga")
# transformers 4.48 - 4.x divide a custom compute_loss's result by the accumulation steps
# when model_accepts_loss_kwargs is False; 4.46 and 4.47 never divide it.
_TRAINER_DIVIDES_WITHOUT_LOSS_KWARGS = Version(transformers.__version__) >= Version("4.48")


def _trainer_divides_for_accumulation(trainer: Any) -> bool:
    """Whether ``Trainer.training_step`` divides the returned loss by the accumulation steps."""
    if _TRAINER_HAS_GA_FLAG:
        return False  # the mixin declares loss_is_scaled_for_ga = True
    return _TRAINER_DIVIDES_WITHOUT_LOSS_KWARGS and not trainer.model_accepts_loss_kwargs


def scale_for_gradient_accumulation(
    loss: Tensor, n_local: int, num_items_in_batch: Tensor | int | None, trainer: Trainer
) -> Tensor:
    """Scale a micro-batch's mean loss so that the accumulated gradient is the mean over
    the whole accumulated batch, as ``Trainer.compute_loss`` does for a model's own loss.

    With ``N`` the items (tokens or examples) of all accumulated micro-batches and ``n``
    those of this one::

        loss * n / N                    when the Trainer counted N (num_items_in_batch)
        loss / gradient_accumulation    otherwise (equal micro-batches)

    and, with ``average_tokens_across_devices``, times the number of processes (``N`` is
    then the count over all of them, while DDP averages the gradients). Where the Trainer
    itself divides the loss by the accumulation steps (transformers 4.48 to 4.x without
    ``model_accepts_loss_kwargs``) the loss is returned as it is.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(n_gpu=1, average_tokens_across_devices=False,
        ...                        gradient_accumulation_steps=2)
        >>> trainer = SimpleNamespace(args=args)
        >>> float(scale_for_gradient_accumulation(torch.tensor(3.0), 2, 6, trainer))
        1.0

    Args:
        loss: the mean loss over this micro-batch's ``n_local`` items.
        n_local: items averaged in ``loss``.
        num_items_in_batch: the Trainer's count ``N``, or ``None`` when it counts other
            items than ``loss`` averages (then micro-batches weigh equally).
        trainer: the Trainer (its ``args``, ``accelerator`` and accumulation steps).

    Returns:
        The loss to backpropagate.
    """
    if _trainer_divides_for_accumulation(trainer):
        return loss
    args: Any = trainer.args
    if num_items_in_batch is not None and args.n_gpu <= 1:
        loss = loss * n_local / num_items_in_batch
        if getattr(args, "average_tokens_across_devices", False):
            tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
            loss = loss * (trainer.accelerator.num_processes // max(tp_size, 1))
        return loss
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    return loss / (steps or args.gradient_accumulation_steps)


@dataclass
class _LabeledBatch:
    """A Trainer batch split into the model's inputs and R-Drop's target."""

    features: dict[str, Any]
    labels: Tensor | None
    shift_labels: Tensor | None
    label_name: str

    @property
    def has_labels(self) -> bool:
        return self.labels is not None or self.shift_labels is not None

    def batch_size(self) -> int:
        """Rows of the batch, from the labels (which must have a batch dimension)."""
        target = self.labels if self.labels is not None else self.shift_labels
        if not isinstance(target, Tensor) or target.ndim == 0:
            raise ValueError(
                f"the labels {self.label_name!r} must be a tensor with a batch dimension, "
                f"got {type(target).__name__}"
                + (f" of shape {tuple(target.shape)}" if isinstance(target, Tensor) else "")
            )
        return target.shape[0]


class RDropTrainerMixin:
    """Add R-Drop to any ``transformers.Trainer`` subclass (put the mixin first).

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer
        >>> from transformers import TrainingArguments
        >>> from rdrop.integrations.hf import RDropTrainerMixin
        >>> class MyTrainer(RDropTrainerMixin, Trainer):  # your own Trainer subclass
        ...     pass
        >>> config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=32, num_labels=3)
        >>> model = BertForSequenceClassification(config)
        >>> args = TrainingArguments(tempfile.mkdtemp(), report_to="none", use_cpu=True)
        >>> trainer = MyTrainer(model=model, args=args, alpha=1.0)
        >>> batch = {"input_ids": torch.randint(1, 64, (4, 7)),
        ...          "labels": torch.tensor([0, 2, 1, 0])}
        >>> loss = trainer.compute_loss(model.train(), batch)  # one forward on [x; x]
        >>> loss.backward()

    Args (keyword-only, besides the Trainer's own):
        alpha: consistency weight ``>= 0`` (the paper's alpha: 1.0 for most GLUE tasks,
            0.5 for CoLA/MNLI/QQP), or a callable ``global_step -> alpha`` such as
            :func:`rdrop.linear_warmup`.
        num_passes: ``m >= 2`` dropout passes (rows of the concatenated batch).
        every_k_steps: use the consistency term on optimizer steps ``0, k, 2k, ...`` only;
            the other steps are a plain single pass.
        task: ``"auto"`` (from the model config and the labels' dtype, see the module
            docstring), ``"cross_entropy"``, ``"mse"``, ``"bce"`` or a callable
            ``(logits, labels) -> mean loss``.
        consistency: ``"kl"``, ``"mse"`` or ``"bernoulli_kl"``; default follows the task.
        ignore_index: label value excluded from the task loss and the consistency term.
        shift_labels: predict token ``t + 1`` from position ``t`` (causal LM); ``None``
            shifts for the decoder-only models of transformers' causal-LM auto mapping
            (never for encoder-decoder models). A ``shift_labels`` key in the batch is
            used as the target as it is.
        logits_key: where the logits are in the model output (default ``"logits"``, a
            ``.logits`` attribute or the first tuple item; see :class:`rdrop.RDrop`).
        branch_at: partial-depth R-Drop (see :class:`rdrop.RDrop`): the module or dotted
            name (e.g. ``"bert.encoder.layer.4"``, or ``"dropout"`` before a classifier
            head) from which the layers run on ``num_passes`` copies; the layers below it
            run once. **Not in the paper.**
        stop_gradient: run passes 2..m in a forward of their own under ``torch.no_grad()``,
            as consistency targets only (the task loss and the gradient come from pass 1;
            see :class:`rdrop.RDrop`). A step then costs about one backward less. Not with
            ``branch_at`` or ``hidden_state_loss=True``, and the automatic hidden-state
            loss (``hidden_state_loss=None``) is off: every pass holds its full logits.
            **Not in the paper.**
        hidden_state_loss: compute the R-Drop loss from the last hidden states and the
            output projection (``model.get_output_embeddings()``, an ``nn.Linear``) with
            :func:`rdrop.rdrop_linear_cross_entropy`, so that the vocabulary logits of
            the doubled batch ``[2B, T, V]`` never exist at once: the projection is
            bypassed during the R-Drop forward (the output's ``logits`` are then the
            hidden states). ``None`` (default) does so when the doubled batch would
            hold at least 2**28 logits (1 GiB in float32) and the model allows it;
            ``True`` always (an error names what prevents it), ``False`` never. Needs two
            passes, a cross-entropy task with the KL, and a model that does not
            transform its logits after the projection (``final_logit_softcapping``,
            ``logit_scale``, ``logits_scaling``).
    """

    # The loss returned by compute_loss is already scaled for gradient accumulation.
    loss_is_scaled_for_ga: bool | None = True if _TRAINER_HAS_GA_FLAG else None

    def __init__(
        self,
        *args: Any,
        alpha: Alpha = 1.0,
        num_passes: int = 2,
        every_k_steps: int = 1,
        task: HFTask = "auto",
        consistency: ConsistencyKind | None = None,
        ignore_index: int = -100,
        shift_labels: bool | None = None,
        logits_key: LogitsGetter = None,
        hidden_state_loss: bool | None = None,
        branch_at: nn.Module | str | None = None,
        stop_gradient: bool = False,
        **kwargs: Any,
    ) -> None:
        num_passes = check_int("num_passes", num_passes, 2, " (m >= 2 dropout passes)")
        stop_gradient = check_bool("stop_gradient", stop_gradient)
        if stop_gradient and (branch_at is not None or hidden_state_loss is True):
            raise ValueError(
                "stop_gradient=True runs passes 2..m as separate forwards, so it cannot be "
                "combined with branch_at or hidden_state_loss=True (both need one forward on "
                "the repeated batch)"
            )
        if not callable(task) and task != "auto" and task not in _BUILTIN_TASKS:
            raise ValueError(
                f"task must be 'auto', one of {_BUILTIN_TASKS} or a callable, got {task!r}"
            )
        if consistency is not None and consistency not in _KINDS:
            raise ValueError(f"consistency must be None or one of {_KINDS}, got {consistency!r}")
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be None or a bool, got {shift_labels!r}")
        #: Alpha and every-k per optimizer step: the rule of :class:`rdrop.RDrop`.
        self.rdrop_schedule = ConsistencySchedule(alpha, every_k_steps)
        self.rdrop_num_passes = num_passes
        self.rdrop_task: HFTask = task
        self.rdrop_consistency: ConsistencyKind | None = consistency
        self.rdrop_ignore_index = ignore_index
        self.rdrop_shift_labels = shift_labels
        self.rdrop_logits_key: LogitsGetter = logits_key
        if hidden_state_loss is not None and not isinstance(hidden_state_loss, bool):
            raise TypeError(f"hidden_state_loss must be None or a bool, got {hidden_state_loss!r}")
        self.rdrop_hidden_state_loss = hidden_state_loss
        if branch_at is not None and not isinstance(branch_at, (str, nn.Module)):
            raise TypeError(
                f"branch_at must be a module or its name, got {type(branch_at).__name__}"
            )
        self.rdrop_branch_at = branch_at
        self.rdrop_stop_gradient = stop_gradient
        # (model, branch module) of the last model resolved: one lookup per model, not step
        self._rdrop_branch_resolved: tuple[nn.Module, nn.Module] | None = None
        self._rdrop_checked = False
        self._rdrop_reset_logs()
        super().__init__(*args, **kwargs)

        trainer: Any = self
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "compute_loss_func cannot be combined with R-Drop: the trainer computes the "
                "loss itself; pass task=<callable (logits, labels) -> loss> instead"
            )
        if not _TRAINER_HAS_GA_FLAG:
            # transformers 4.48 - 4.x: with this False the Trainer divides the per-batch
            # mean by the accumulation steps (and logs it so). 4.46 - 4.47 never divide:
            # with True they count the items, the mixin scales by them, and the logged
            # loss (not divided there either) stays right.
            trainer.model_accepts_loss_kwargs = not _TRAINER_DIVIDES_WITHOUT_LOSS_KWARGS
        if trainer.model is not None:
            self._rdrop_check_setup(trainer.model)
            self._rdrop_branch(trainer.model)  # a wrong branch_at fails here, not mid-run

    # -- the loss ------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """R-Drop loss in training (one forward on ``[x; x]``), task loss of one pass in eval.

        Follows ``Trainer.compute_loss(model, inputs, return_outputs=False,
        num_items_in_batch=None)``. With ``return_outputs=True`` in training, the outputs
        are the model's raw output on the concatenated batch (``num_passes * B`` rows;
        with ``stop_gradient=True`` pass 1's output, ``B`` rows).
        """
        batch = self._rdrop_labeled_batch(model, inputs)
        if not batch.has_labels:
            if model.training:
                raise ValueError(
                    f"R-Drop needs labels in every training batch, but the batch has no "
                    f"{batch.label_name!r} key (keys: {sorted(batch.features)}). Check that "
                    "the dataset has a 'label'/'labels' column and TrainingArguments.label_names"
                )
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if model.training:
            loss, outputs = self._rdrop_training_loss(model, batch, num_items_in_batch)
        else:
            loss, outputs = self._rdrop_evaluation_loss(model, batch)
        return (loss, outputs) if return_outputs else loss

    def _rdrop_training_loss(
        self, model: nn.Module, batch: _LabeledBatch, num_items_in_batch: Tensor | int | None
    ) -> tuple[Tensor, Any]:
        """The R-Drop objective on one forward of ``num_passes`` copies of the batch."""
        trainer: Any = self
        unwrapped = trainer.accelerator.unwrap_model(model)
        self._rdrop_check_setup(unwrapped)
        refuse_packed_batches(batch.features)
        step = int(trainer.state.global_step)
        alpha = self.rdrop_schedule.alpha_at(step)
        use_rdrop = self.rdrop_schedule.applies_at(step)
        num_passes = self.rdrop_num_passes if use_rdrop else 1
        detached = self.rdrop_stop_gradient and num_passes > 1
        layer = None if detached else self._rdrop_hidden_state_layer(unwrapped, batch, num_passes)
        with nullcontext() if layer is None else output_layer_bypassed(layer):
            # (copies, with gradient) per forward: stop_gradient runs passes 2..m apart.
            plan = [(1, True), (num_passes - 1, False)] if detached else [(num_passes, True)]
            passes: list[Tensor] = []
            outputs: Any = None
            for copies, grad in plan:
                with nullcontext() if grad else torch.no_grad():
                    more, output = forward_passes(
                        model,
                        (),
                        batch.features,
                        batch_size=batch.batch_size(),
                        num_passes=copies,
                        logits_key=self.rdrop_logits_key,
                        remedy="Fix the model, or lower per_device_train_batch_size if memory "
                        "is the problem",
                        split_hint="select the logits with logits_key=",
                        branch=self._rdrop_branch(unwrapped) if copies > 1 else None,
                    )
                passes += more
                outputs = output if outputs is None else outputs
        shift = self._rdrop_shifts(unwrapped)
        aligned = [self._rdrop_align(logits, batch, shift) for logits in passes]
        passes, target = [logits for logits, _ in aligned], aligned[0][1]
        task = self._rdrop_resolve_task(unwrapped, target)
        if layer is None:
            result, n_local = self._rdrop_objective(
                passes, target, task, alpha, task_passes=1 if detached else None
            )
            result.logits = passes[0]
        else:
            result, n_local = self._rdrop_hidden_state_objective(passes, layer, target, alpha)
        result.outputs = outputs
        self._rdrop_record(result, use_rdrop and n_local > 0, alpha)
        counts_alike = self._rdrop_counts_like_trainer(target, batch, shift)
        counted = num_items_in_batch if counts_alike else None
        loss = scale_for_gradient_accumulation(result.loss, n_local, counted, trainer)
        return _with_router_aux_loss(loss, unwrapped, outputs), outputs

    def _rdrop_evaluation_loss(self, model: nn.Module, batch: _LabeledBatch) -> tuple[Tensor, Any]:
        """The task loss of one ordinary pass."""
        trainer: Any = self
        unwrapped = trainer.accelerator.unwrap_model(model)
        outputs = model(**batch.features)
        logits = extract_logits(outputs, self.rdrop_logits_key)
        logits, target = self._rdrop_align(logits, batch, self._rdrop_shifts(unwrapped))
        task = self._rdrop_resolve_task(unwrapped, target)
        loss = task_loss(
            logits,
            target,
            task,
            ignore_index=self.rdrop_ignore_index,
            label_smoothing=self._rdrop_label_smoothing(task),
        )
        loss = _with_router_aux_loss(loss, unwrapped, outputs)
        if isinstance(outputs, tuple):
            # A model given labels returns (loss, logits, ...), and Trainer.prediction_step
            # reads a tuple output that way: keep its logits where it looks for them.
            outputs = (loss, *outputs)
        return loss, outputs

    def _rdrop_objective(
        self,
        passes: list[Tensor],
        target: Tensor,
        task: BuiltinTask | TaskLoss,
        alpha: float,
        task_passes: int | None = None,
    ) -> tuple[RDropOutput, int]:
        """The loss of the passes (R-Drop for two or more, the task loss for one) and the
        number of items it averages (``task_passes``: the task loss of the first passes
        only, see :func:`rdrop.rdrop_loss`)."""
        ignore, smoothing = self.rdrop_ignore_index, self._rdrop_label_smoothing(task)
        n_local = _item_count(target, ignore)
        if n_local == 0:  # nothing to learn from in this micro-batch: keep the graph, add 0
            zero = passes[0].float().sum() * 0.0
            return RDropOutput(zero, zero.detach(), zero.detach(), alpha), 0
        if len(passes) == 1:
            value = task_loss(
                passes[0], target, task, ignore_index=ignore, label_smoothing=smoothing
            )
            return RDropOutput(value, value, value.new_zeros(()), alpha), n_local
        result = rdrop_loss(
            passes,
            target,
            alpha,
            task=task,
            consistency=self.rdrop_consistency,
            ignore_index=ignore,
            label_smoothing=smoothing,
            task_passes=task_passes,
        )
        return result, n_local

    def _rdrop_branch(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """``(model, branch module)`` for partial-depth R-Drop, or ``None``."""
        if self.rdrop_branch_at is None:
            return None
        resolved = self._rdrop_branch_resolved
        if resolved is None or resolved[0] is not model:
            resolved = (model, resolve_branch(model, self.rdrop_branch_at)[1])
            self._rdrop_branch_resolved = resolved
        return resolved

    def _rdrop_hidden_state_objective(
        self, hidden: list[Tensor], layer: nn.Linear, target: Tensor, alpha: float
    ) -> tuple[RDropOutput, int]:
        """The R-Drop loss of two passes from their hidden states (no vocabulary logits)."""
        n_local = _item_count(target, self.rdrop_ignore_index)
        if n_local == 0:
            zero = hidden[0].float().sum() * 0.0
            return RDropOutput(zero, zero.detach(), zero.detach(), alpha), 0
        result = rdrop_linear_cross_entropy(
            torch.cat(hidden),
            layer.weight,
            target,
            alpha,
            bias=layer.bias,
            ignore_index=self.rdrop_ignore_index,
            label_smoothing=self._rdrop_label_smoothing("cross_entropy"),
        )
        return result, n_local

    def _rdrop_hidden_state_layer(
        self, model: nn.Module, batch: _LabeledBatch, num_passes: int
    ) -> nn.Linear | None:
        """The output projection to bypass for the hidden-state loss, or ``None``."""
        setting = self.rdrop_hidden_state_loss
        if setting is False or num_passes != 2:
            return None
        labels = batch.labels if batch.labels is not None else batch.shift_labels
        assert labels is not None
        layer = getattr(model, "get_output_embeddings", lambda: None)()
        reason = self._rdrop_hidden_state_unsupported(model, layer, labels)
        if reason is not None:
            if setting is True:
                raise ValueError(f"hidden_state_loss=True is not possible here: {reason}")
            return None
        assert isinstance(layer, nn.Linear)
        if setting is None and 2 * labels.numel() * layer.out_features < _HIDDEN_STATE_MIN_LOGITS:
            return None
        return layer

    def _rdrop_hidden_state_unsupported(
        self, model: nn.Module, layer: Any, labels: Tensor
    ) -> str | None:
        """Why the loss cannot be computed from the hidden states (``None``: it can)."""
        if not isinstance(layer, nn.Linear):
            return f"model.get_output_embeddings() is not an nn.Linear (got {type(layer).__name__})"
        if self.rdrop_logits_key is not None:
            return "a logits_key is set (the hidden-state loss reads the projection's input)"
        if self.rdrop_consistency not in (None, "kl"):
            return f"consistency={self.rdrop_consistency!r} (it computes the KL)"
        if self._rdrop_resolve_task(model, labels) != "cross_entropy":
            return "the task is not cross-entropy"
        base = _base_model(model)
        if getattr(base, "final_logits_bias", None) is not None:
            return "the model adds final_logits_bias after the projection (BART-like models)"
        if self._rdrop_ddp_marks_the_layer_unused(model, layer):
            return (
                "under DDP with find_unused_parameters (the Trainer's default for a "
                "PreTrainedModel) an untied output layer, used only outside the forward, "
                "would be marked ready twice; set ddp_find_unused_parameters=False"
            )
        config = getattr(model, "config", None)
        for key in _LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value is not None and value != 1:
                return f"the model transforms its logits after the projection ({key}={value})"
        return None

    def _rdrop_ddp_marks_the_layer_unused(self, model: nn.Module, layer: nn.Linear) -> bool:
        """Whether DDP's unused-parameter search would mark the bypassed output layer
        unused: several processes, ``find_unused_parameters`` not off, weights not tied."""
        args = getattr(self, "args", None)
        if int(getattr(args, "world_size", 1) or 1) <= 1:
            return False
        if getattr(args, "ddp_find_unused_parameters", None) is False:
            return False
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        return getattr(embeddings, "weight", None) is not layer.weight

    def _rdrop_counts_like_trainer(self, target: Tensor, batch: _LabeledBatch, shift: bool) -> bool:
        """Whether the Trainer's ``num_items_in_batch`` counts the items averaged here: it
        counts ``labels != -100`` (of ``labels[..., 1:]`` when it thinks the model shifts,
        of ``shift_labels`` when given)."""
        # Trainer._loss_shifts_labels (private; transformers >= 5) is the Trainer's own
        # decision to count shifted labels; transformers < 5 lacks it and counts all labels.
        trainer_shifts = bool(getattr(self, "_loss_shifts_labels", False))
        return (target.is_floating_point() or self.rdrop_ignore_index == -100) and (
            batch.shift_labels is not None or shift == trainer_shifts
        )

    # -- the batch -----------------------------------------------------------------------
    def _rdrop_labeled_batch(self, model: nn.Module, inputs: Mapping[str, Any]) -> _LabeledBatch:
        trainer: Any = self
        label_name = self._rdrop_label_name()
        features = dict(inputs)
        labels = features.pop(label_name, None)
        shift_labels = features.pop("shift_labels", None)
        add_decoder_inputs(trainer.accelerator.unwrap_model(model), features, labels)
        return _LabeledBatch(features, labels, shift_labels, label_name)

    def _rdrop_align(
        self, logits: Tensor, batch: _LabeledBatch, shift: bool
    ) -> tuple[Tensor, Tensor]:
        """(logits, target) with causal-LM shifting applied."""
        if batch.shift_labels is not None:
            return logits, batch.shift_labels
        assert batch.labels is not None
        if shift:
            return logits[..., :-1, :], batch.labels[..., 1:]
        return logits, batch.labels

    # -- options -------------------------------------------------------------------------
    def _rdrop_label_name(self) -> str:
        names = list(getattr(self, "label_names", None) or ["labels"])
        if len(names) != 1:
            raise ValueError(
                f"R-Drop needs one label tensor per batch, but label_names={names}. For a "
                "model with one head, set TrainingArguments(label_names=[...]) to its label "
                "key; several heads (extractive QA start/end positions, multi-task models) "
                "are not supported by this mixin: apply rdrop.rdrop_loss to each head's "
                "passes in your own compute_loss"
            )
        return names[0]

    def _rdrop_resolve_task(self, model: nn.Module, labels: Tensor) -> BuiltinTask | TaskLoss:
        if self.rdrop_task != "auto":
            return self.rdrop_task
        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem == "regression":
            return "mse"
        if problem == "multi_label_classification":
            return "bce"
        if problem == "single_label_classification":
            return "cross_entropy"
        if getattr(config, "num_labels", None) == 1 and not self._rdrop_shifts(model):
            return "mse"
        return "bce" if labels.is_floating_point() else "cross_entropy"

    def _rdrop_label_smoothing(self, task: BuiltinTask | TaskLoss) -> float:
        factor = float(getattr(getattr(self, "args", None), "label_smoothing_factor", 0.0) or 0.0)
        if factor and task != "cross_entropy":
            name = getattr(task, "__name__", task)
            raise ValueError(
                f"TrainingArguments.label_smoothing_factor={factor} applies to "
                f"classification (cross-entropy) only, but the R-Drop task is {name!r}; "
                "set label_smoothing_factor=0"
            )
        return factor

    def _rdrop_shifts(self, model: nn.Module) -> bool:
        """Whether labels are shifted (causal LM: position ``t`` predicts token ``t + 1``)."""
        if self.rdrop_shift_labels is not None:
            return self.rdrop_shift_labels
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return False
        if getattr(self, "_loss_shifts_labels", False) is True:  # transformers >= 5
            return True
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        except ImportError:  # pragma: no cover
            return False
        # A PEFT model wraps the transformers model (PeftModelForCausalLM): look inside.
        base = _base_model(model)
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        # A user subclass of a causal LM (class MyLlama(LlamaForCausalLM)) shifts like it.
        return any(cls.__name__ in causal for cls in type(base).__mro__)

    def _rdrop_check_setup(self, model: nn.Module) -> None:
        if self._rdrop_checked:
            return
        refuse_prompt_learning(model)  # before the flag: a refused model stays refused
        self._rdrop_checked = True
        message = missing_dropout_message(model, self.rdrop_num_passes)
        if message is not None:
            warnings.warn(message, RDropWarning, stacklevel=3)

    # -- logging -------------------------------------------------------------------------
    def _rdrop_reset_logs(self) -> None:
        self._rdrop_task_sum: Tensor | None = None
        self._rdrop_consistency_sum: Tensor | None = None
        self._rdrop_task_n = 0
        self._rdrop_consistency_n = 0
        self._rdrop_last_alpha: float | None = None

    def _rdrop_record(self, result: RDropOutput, has_consistency: bool, alpha: float) -> None:
        """Add a step's terms to the sums logged next; device tensors, no host sync."""
        task_value = result.task_loss.detach().float()
        self._rdrop_task_sum = (
            task_value if self._rdrop_task_sum is None else self._rdrop_task_sum + task_value
        )
        self._rdrop_task_n += 1
        if has_consistency:
            value = result.consistency_loss.detach().float()
            self._rdrop_consistency_sum = (
                value
                if self._rdrop_consistency_sum is None
                else self._rdrop_consistency_sum + value
            )
            self._rdrop_consistency_n += 1
        self._rdrop_last_alpha = alpha

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``task_loss`` and ``consistency_loss`` (means since the last log) to train logs."""
        if "loss" in logs and self._rdrop_task_sum is not None:
            trainer: Any = self
            device = self._rdrop_task_sum.device
            zero = torch.zeros((), device=device)
            totals = torch.stack(
                [
                    self._rdrop_task_sum,
                    torch.tensor(float(self._rdrop_task_n), device=device),
                    zero if self._rdrop_consistency_sum is None else self._rdrop_consistency_sum,
                    torch.tensor(float(self._rdrop_consistency_n), device=device),
                ]
            )
            if trainer.accelerator.num_processes > 1:  # every rank logs the training loss
                totals = trainer.accelerator.reduce(totals, reduction="sum")
            task_sum, task_n, cons_sum, cons_n = totals.tolist()
            logs["task_loss"] = task_sum / max(task_n, 1.0)
            if cons_n:
                logs["consistency_loss"] = cons_sum / cons_n
            if callable(self.rdrop_schedule.alpha) and self._rdrop_last_alpha is not None:
                logs["rdrop_alpha"] = self._rdrop_last_alpha
            self._rdrop_reset_logs()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class RDropTrainer(RDropTrainerMixin, Trainer):
    """``transformers.Trainer`` with R-Drop: the options of :class:`RDropTrainerMixin`.

    Example::

        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModelForSequenceClassification, TrainingArguments
        from rdrop.integrations.hf import RDropTrainer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        trainer = RDropTrainer(
            model=model,
            args=TrainingArguments("out", learning_rate=1e-5, gradient_accumulation_steps=2),
            train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
            alpha=1.0,             # the paper's GLUE setting
        )
        trainer.train()            # logs loss, task_loss, consistency_loss
        trainer.evaluate()         # one ordinary pass
    """
