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
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "rdrop.integrations.hf needs the 'transformers' package: "
        "pip install 'torch-rdrop[hf]' (or pip install transformers accelerate)"
    ) from error

from rdrop._batch import LogitsGetter, extract_logits, repeat_batch, split_passes
from rdrop._checks import check_alpha, check_int, check_scheduled_alpha
from rdrop.functional import _KINDS, ConsistencyKind
from rdrop.losses import (
    _BUILTIN_TASKS,
    BuiltinTask,
    RDropOutput,
    TaskLoss,
    rdrop_loss,
    task_loss,
)
from rdrop.wrapper import RDropWarning

__all__ = ["RDropTrainer", "RDropTrainerMixin"]

HFTask = Literal["auto"] | BuiltinTask | TaskLoss
Alpha = float | Callable[[int], float]

# transformers >= 5 lets compute_loss declare that it already scaled the loss for
# gradient accumulation; older versions decide from ``model_accepts_loss_kwargs``.
_TRAINER_HAS_GA_FLAG = hasattr(Trainer, "loss_is_scaled_for_ga")


def _dropout_settings(model: nn.Module) -> tuple[list[str], dict[str, float]]:
    """Dropout modules with ``p > 0`` (in any mode) and numeric ``*dropout*`` config values."""
    modules = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if (isinstance(module, _DropoutNd) and module.p > 0)
        or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
    ]
    config = getattr(model, "config", None)
    settings: dict[str, float] = {}
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        for key, value in items.items():
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                settings[key] = float(value)
    # PEFT adapters keep their dropout in their own config (LoraConfig.lora_dropout).
    for adapter in (getattr(model, "peft_config", None) or {}).values():
        value = getattr(adapter, "lora_dropout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            settings["lora_dropout"] = max(settings.get("lora_dropout", 0.0), float(value))
    return modules, settings


#: The config key that sets a model family's main dropout, in order of preference.
_MAIN_DROPOUT_KEYS = (
    "lora_dropout",
    "hidden_dropout_prob",
    "dropout",
    "dropout_rate",
    "resid_pdrop",
    "hidden_dropout",
    "attention_dropout",
)


def _dropout_hint(settings: dict[str, float]) -> str:
    """How to enable dropout for this model: the setting its own config uses."""
    key = next((k for k in _MAIN_DROPOUT_KEYS if k in settings), next(iter(settings), None))
    if key == "lora_dropout":
        return "set LoraConfig(lora_dropout=0.1) (or enable the base model's dropout)"
    if key is not None:
        return f"e.g. from_pretrained(..., {key}=0.1)"
    return "add dropout to the model (nn.Dropout with p > 0)"


#: Keys of padding-free (packed) batches: sequence boundaries that a doubled batch would
#: not double.
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _refuse_packed_batches(features: Mapping[str, Any]) -> None:
    """Raise for padding-free (packed) batches: R-Drop's forward on ``[x; x]`` copies the
    batch dimension, but a packed batch is one row of concatenated sequences whose
    boundaries (``position_ids`` resets, ``cu_seq_lens_*``) would then be wrong."""
    packed = [key for key in _PACKED_KEYS if key in features]
    positions = features.get("position_ids")
    if (
        not packed
        and isinstance(positions, Tensor)
        and positions.ndim == 2
        and positions.shape[-1] > 1
        and bool((positions[:, 1:] < positions[:, :-1]).any())
    ):
        packed = ["position_ids (resets inside a row)"]
    if packed:
        raise ValueError(
            f"R-Drop does not support packed (padding-free) batches, found {', '.join(packed)}: "
            "one forward on [x; x] would not double the sequence boundaries. Use padded "
            "batches: TRL SFTConfig(padding_free=False, packing=False), or a padding "
            "collator instead of DataCollatorWithFlattening"
        )


def _add_decoder_inputs(model: nn.Module, features: dict[str, Any], labels: Any) -> None:
    """For an encoder-decoder model, build ``decoder_input_ids`` from the labels as the
    model itself does when it gets ``labels`` (``prepare_decoder_input_ids_from_labels``),
    unless the collator already did: R-Drop removes ``labels`` before the forward, and
    without decoder inputs the model would decode from the *source* ids."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not isinstance(labels, Tensor):
        return
    if "decoder_input_ids" in features or "decoder_inputs_embeds" in features:
        return
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model without "
            "prepare_decoder_input_ids_from_labels: give decoder_input_ids in the batch "
            "(e.g. DataCollatorForSeq2Seq(tokenizer, model=model))"
        )
    features["decoder_input_ids"] = prepare(labels=labels)


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
        **kwargs: Any,
    ) -> None:
        if not callable(alpha):
            alpha = check_alpha(alpha)
        check_int("num_passes", num_passes, 2, " (m >= 2 dropout passes)")
        check_int("every_k_steps", every_k_steps, 1)
        if not callable(task) and task != "auto" and task not in _BUILTIN_TASKS:
            raise ValueError(
                f"task must be 'auto', one of {_BUILTIN_TASKS} or a callable, got {task!r}"
            )
        if consistency is not None and consistency not in _KINDS:
            raise ValueError(f"consistency must be None or one of {_KINDS}, got {consistency!r}")
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be None or a bool, got {shift_labels!r}")
        self.rdrop_alpha: Alpha = alpha
        self.rdrop_num_passes = num_passes
        self.rdrop_every_k_steps = every_k_steps
        self.rdrop_task: HFTask = task
        self.rdrop_consistency: ConsistencyKind | None = consistency
        self.rdrop_ignore_index = ignore_index
        self.rdrop_shift_labels = shift_labels
        self.rdrop_logits_key: LogitsGetter = logits_key
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
            # Older transformers: with this False the Trainer divides the (per-batch mean)
            # loss by gradient_accumulation_steps exactly once.
            trainer.model_accepts_loss_kwargs = False
        if trainer.model is not None:
            self._rdrop_check_setup(trainer.model)

    # -- options -------------------------------------------------------------------------
    def _rdrop_alpha_at(self, step: int) -> float:
        if not callable(self.rdrop_alpha):
            return float(self.rdrop_alpha)
        return check_scheduled_alpha(self.rdrop_alpha(step), step)

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
        if getattr(self, "_loss_shifts_labels", False) is True:
            return True
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        except ImportError:  # pragma: no cover
            return False
        return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    # -- checks --------------------------------------------------------------------------
    def _rdrop_check_setup(self, model: nn.Module) -> None:
        if self._rdrop_checked:
            return
        self._rdrop_checked = True
        modules, settings = _dropout_settings(model)
        if modules or any(value > 0 for value in settings.values()):
            return
        if settings:
            named = ", ".join(f"{key}={value}" for key, value in settings.items())
            where = f"the model config sets {named}"
        else:
            where = "the model has no nn.Dropout module with p > 0 and no dropout setting"
        warnings.warn(
            f"R-Drop cannot work: {where}, so the {self.rdrop_num_passes} passes are identical, "
            "the consistency term is 0 and training is a plain (costlier) fine-tune. Enable "
            f"dropout: {_dropout_hint(settings)}",
            RDropWarning,
            stacklevel=3,
        )

    # -- the loss ------------------------------------------------------------------------
    def _rdrop_align(
        self, logits: Tensor, labels: Tensor | None, shift_labels: Tensor | None, shift: bool
    ) -> tuple[Tensor, Tensor]:
        """(logits, target) with causal-LM shifting applied."""
        if shift_labels is not None:
            return logits, shift_labels
        assert labels is not None
        if shift:
            return logits[..., :-1, :], labels[..., 1:]
        return logits, labels

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
        are the model's raw output on the concatenated batch (``num_passes * B`` rows).
        """
        trainer: Any = self
        label_name = self._rdrop_label_name()
        features = dict(inputs)
        labels = features.pop(label_name, None)
        shift_labels = features.pop("shift_labels", None)
        unwrapped = trainer.accelerator.unwrap_model(model)
        _add_decoder_inputs(unwrapped, features, labels)

        if not model.training:
            if labels is None and shift_labels is None:
                return super().compute_loss(  # type: ignore[misc]
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
            outputs = model(**features)
            logits, target = self._rdrop_align(
                extract_logits(outputs, self.rdrop_logits_key),
                labels,
                shift_labels,
                self._rdrop_shifts(unwrapped),
            )
            task = self._rdrop_resolve_task(unwrapped, target)
            loss = task_loss(
                logits,
                target,
                task,
                ignore_index=self.rdrop_ignore_index,
                label_smoothing=self._rdrop_label_smoothing(task),
            )
            return (loss, outputs) if return_outputs else loss

        if labels is None and shift_labels is None:
            raise ValueError(
                f"R-Drop needs labels in every training batch, but the batch has no "
                f"{label_name!r} key (keys: {sorted(features)}). Check that the dataset has "
                "a 'label'/'labels' column and TrainingArguments.label_names"
            )
        self._rdrop_check_setup(unwrapped)
        _refuse_packed_batches(features)
        raw_target = labels if labels is not None else shift_labels
        assert raw_target is not None
        if not isinstance(raw_target, Tensor) or raw_target.ndim == 0:
            raise ValueError(
                f"the labels {label_name!r} must be a tensor with a batch dimension, got "
                f"{type(raw_target).__name__}"
                + (f" of shape {tuple(raw_target.shape)}" if isinstance(raw_target, Tensor) else "")
            )
        batch_size = raw_target.shape[0]
        step = int(trainer.state.global_step)
        alpha = self._rdrop_alpha_at(step)
        use_rdrop = step % self.rdrop_every_k_steps == 0
        m = self.rdrop_num_passes if use_rdrop else 1
        try:
            outputs = model(**(repeat_batch(features, batch_size, m) if m > 1 else features))
        except RuntimeError as error:
            if m == 1:
                raise
            raise RuntimeError(
                f"the model failed on the concatenated R-Drop batch of {m} x {batch_size} rows "
                f"({type(error).__name__}: {error}). R-Drop runs one forward on num_passes "
                f"copies of the batch; the model must accept a batch of {m * batch_size} rows "
                f"(no buffers of a fixed batch size). Fix the model, or lower "
                "per_device_train_batch_size if memory is the problem"
            ) from error
        logits = extract_logits(outputs, self.rdrop_logits_key)
        split = split_passes(logits, batch_size, m, "select the logits with logits_key=")
        shift = self._rdrop_shifts(unwrapped)
        pairs = [self._rdrop_align(p, labels, shift_labels, shift) for p in split]
        passes = [p for p, _ in pairs]
        target = pairs[0][1]
        task = self._rdrop_resolve_task(unwrapped, target)
        smoothing = self._rdrop_label_smoothing(task)

        counts_items = task == "cross_entropy"
        n_local = int((target != self.rdrop_ignore_index).sum()) if counts_items else target.numel()
        if n_local == 0:  # nothing to learn from in this micro-batch: keep the graph, add 0
            zero = logits.float().sum() * 0.0
            result = RDropOutput(zero, zero.detach(), zero.detach(), alpha)
        elif m > 1:
            result = rdrop_loss(
                passes,
                target,
                alpha,
                task=task,
                consistency=self.rdrop_consistency,
                ignore_index=self.rdrop_ignore_index,
                label_smoothing=smoothing,
            )
        else:
            value = task_loss(
                passes[0],
                target,
                task,
                ignore_index=self.rdrop_ignore_index,
                label_smoothing=smoothing,
            )
            result = RDropOutput(value, value, value.new_zeros(()), alpha)
        result.logits, result.outputs = passes[0], outputs
        self._rdrop_record(result, use_rdrop and n_local > 0, alpha)
        # The Trainer counts ``labels != -100`` (of ``labels[..., 1:]`` when it thinks the
        # model shifts, of ``shift_labels`` when given); use its count only when it counts
        # exactly the items averaged here.
        counted_alike = (task != "cross_entropy" or self.rdrop_ignore_index == -100) and (
            shift_labels is not None or shift == bool(getattr(self, "_loss_shifts_labels", False))
        )
        loss = self._rdrop_scale_for_accumulation(
            result.loss, n_local, num_items_in_batch if counted_alike else None
        )
        return (loss, outputs) if return_outputs else loss

    def _rdrop_scale_for_accumulation(
        self,
        loss: Tensor,
        n_local: int,
        num_items_in_batch: Tensor | int | None,
    ) -> Tensor:
        """Scale the per-micro-batch mean so the accumulated gradient is the full-batch mean."""
        if not _TRAINER_HAS_GA_FLAG:
            return loss  # the Trainer divides by gradient_accumulation_steps
        trainer: Any = self
        args = trainer.args
        if num_items_in_batch is not None and args.n_gpu <= 1:
            loss = loss * n_local / num_items_in_batch
            if getattr(args, "average_tokens_across_devices", False):
                # num_items_in_batch is the count over all processes, while DDP averages
                # the gradients: undo that average (as Trainer.compute_loss does).
                tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
                loss = loss * (trainer.accelerator.num_processes // max(tp_size, 1))
            return loss
        steps = getattr(trainer, "current_gradient_accumulation_steps", None)
        return loss / (steps or args.gradient_accumulation_steps)

    # -- logging -------------------------------------------------------------------------
    def _rdrop_reset_logs(self) -> None:
        self._rdrop_task_sum: Tensor | None = None
        self._rdrop_consistency_sum: Tensor | None = None
        self._rdrop_task_n = 0
        self._rdrop_consistency_n = 0
        self._rdrop_last_alpha: float | None = None

    def _rdrop_record(self, result: RDropOutput, has_consistency: bool, alpha: float) -> None:
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
            if callable(self.rdrop_alpha) and self._rdrop_last_alpha is not None:
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
