"""R-Drop for TRL's ``SFTTrainer``: the R-Drop loss in training, TRL's own behaviour
everywhere else.

TRL folds completion-only and assistant-only masks into ``labels`` (``-100`` on the
prompt) when it prepares the dataset, so the R-Drop loss of :class:`RDropTrainerMixin`
(cross-entropy of both passes plus the symmetric KL, token-level, shifted like a causal
LM) trains on exactly the tokens TRL would. TRL's logged training metrics
(``mean_token_accuracy``, ``entropy``, ``num_tokens``) are computed from the first
dropout pass as TRL computes them from its single pass; evaluation is TRL's own.

Example (needs ``pip install trl``)::

    from rdrop.integrations.trl import RDropSFTTrainer

    trainer = RDropSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset,
                              processing_class=tokenizer, alpha=1.0)
    trainer.train()

The loss, with ``P_1, P_2`` the token distributions of the two passes over the completion
tokens ``T``::

    L = 1/2 (CE(P_1) + CE(P_2)) + alpha/2 * mean_{t in T} 1/2 (KL(P_1||P_2) + KL(P_2||P_1))

Packed and padding-free batches (``SFTConfig(packing=True)`` or ``padding_free=True``)
are refused with an error naming the option (see :mod:`rdrop.integrations.hf`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError("rdrop.integrations.trl needs TRL: pip install trl") from error

from rdrop.integrations.hf import RDropTrainerMixin

__all__ = ["RDropSFTTrainer"]


class RDropSFTTrainer(RDropTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` trained with the R-Drop loss; takes ``SFTTrainer``'s
    arguments plus those of :class:`rdrop.integrations.hf.RDropTrainerMixin`
    (``alpha``, ``num_passes``, ``every_k_steps``, ...).

    Raises:
        ValueError: ``SFTConfig(loss_type=...)`` other than ``"nll"`` (R-Drop's task term
            is the token cross-entropy; TRL's other losses, e.g. ``"dft"``, would apply in
            evaluation only).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loss_type = getattr(self.args, "loss_type", "nll")
        if loss_type not in (None, "nll"):
            raise ValueError(
                f"SFTConfig(loss_type={loss_type!r}) is not supported by RDropSFTTrainer: "
                "its task term is the token cross-entropy (loss_type='nll'), so training "
                "would ignore the setting while evaluation used it"
            )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if not model.training:  # evaluation: TRL's own loss and metrics
            return SFTTrainer.compute_loss(
                self, model, dict(inputs), return_outputs, num_items_in_batch
            )
        features = {**inputs, "use_cache": False}  # what TRL passes to the model
        loss, outputs = RDropTrainerMixin.compute_loss(
            self, model, features, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._rdrop_trl_metrics(inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _rdrop_trl_metrics(self, inputs: Mapping[str, Any], outputs: Any) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, from pass 1."""
        labels = inputs.get("labels")
        if not isinstance(labels, Tensor):
            return
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if isinstance(head, nn.Linear) and logits.shape[-1] != head.out_features:
            # The hidden-state loss ran (hidden_state_loss): no vocabulary logits to score;
            # entropy and mean_token_accuracy are not logged for this step.
            logits = None
        if logits is None:
            self._rdrop_count_tokens(inputs, labels)
            return
        with torch.no_grad():
            first = logits[: labels.shape[0], :-1, :].float()
            target = labels[:, 1:]
            valid = target != -100
            log_p = first.log_softmax(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            correct = (first.argmax(-1) == target) & valid
            gather = self.accelerator.gather_for_metrics
            count = gather(valid.sum()).sum()
            entropy_sum = gather((entropy * valid).sum()).sum()
            correct_sum = gather(correct.sum()).sum()
        # SFTTrainer._metrics, ._total_train_tokens and ._tp_size are TRL-private (TRL 1.x):
        # the only place its logged training metrics live.
        metrics = self._metrics["train"]
        metrics["entropy"].append((entropy_sum / count).item() if count > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct_sum / count).item() if count > 0 else 0.0)
        self._rdrop_count_tokens(inputs, labels)

    def _rdrop_count_tokens(self, inputs: Mapping[str, Any], labels: Tensor) -> None:
        """TRL's ``num_tokens``: the attention-mask tokens seen so far (all processes)."""
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if isinstance(mask, Tensor) else torch.tensor(labels.numel())
        gathered = self.accelerator.gather_for_metrics(tokens).sum()
        self._total_train_tokens += int(gathered.item()) // getattr(self, "_tp_size", 1)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
