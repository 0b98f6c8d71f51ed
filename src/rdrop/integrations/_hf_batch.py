"""Checks and preparation of a Hugging Face batch for R-Drop's forward on ``[x; x]``.

Used by :mod:`rdrop.integrations.hf`: dropout detection and the setting that enables it,
the refusal of packed (padding-free) batches, and decoder inputs for encoder-decoder
models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = [
    "add_decoder_inputs",
    "missing_dropout_message",
    "refuse_packed_batches",
    "refuse_prompt_learning",
]

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

#: Keys of padding-free (packed) batches: sequence boundaries that a doubled batch would
#: not double.
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


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


def _dropout_hint(settings: dict[str, float]) -> str:
    """How to enable dropout for this model: the setting its own config uses."""
    key = next((k for k in _MAIN_DROPOUT_KEYS if k in settings), next(iter(settings), None))
    if key == "lora_dropout":
        return "set LoraConfig(lora_dropout=0.1) (or enable the base model's dropout)"
    if key is not None:
        return f"e.g. from_pretrained(..., {key}=0.1)"
    return "add dropout to the model (nn.Dropout with p > 0)"


def missing_dropout_message(model: nn.Module, num_passes: int) -> str | None:
    """The warning for a model whose dropout is off everywhere, naming the setting that
    turns it on for this model family; ``None`` when some dropout is active."""
    modules, settings = _dropout_settings(model)
    if modules or any(value > 0 for value in settings.values()):
        return None
    if settings:
        named = ", ".join(f"{key}={value}" for key, value in settings.items())
        where = f"the model config sets {named}"
    else:
        where = "the model has no nn.Dropout module with p > 0 and no dropout setting"
    return (
        f"R-Drop cannot work: {where}, so the {num_passes} passes are identical, the "
        "consistency term is 0 and training is a plain (costlier) fine-tune. Enable "
        f"dropout: {_dropout_hint(settings)}"
    )


def _position_resets(positions: Tensor, attention_mask: Any) -> Tensor:
    """Where a row's ``position_ids`` fall back between two attended tokens: a new packed
    sequence. Padding (``attention_mask == 0``) may carry any positions."""
    resets = positions[:, 1:] < positions[:, :-1]
    if isinstance(attention_mask, Tensor) and attention_mask.shape == positions.shape:
        attended = attention_mask.bool()
        resets &= attended[:, 1:] & attended[:, :-1]
    return resets


def refuse_packed_batches(features: Mapping[str, Any]) -> None:
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
        and bool(_position_resets(positions, features.get("attention_mask")).any())
    ):
        packed = ["position_ids (resets inside a row)"]
    if packed:
        raise ValueError(
            f"R-Drop does not support packed (padding-free) batches, found {', '.join(packed)}: "
            "one forward on [x; x] would not double the sequence boundaries. Use padded "
            "batches: TRL SFTConfig(padding_free=False, packing=False), or a padding "
            "collator instead of DataCollatorWithFlattening"
        )


#: PEFT methods that prepend virtual tokens to the sequence (prefix tuning does not: it
#: feeds them as past keys and values).
_VIRTUAL_TOKEN_PEFT = frozenset({"PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"})


def refuse_prompt_learning(model: nn.Module) -> None:
    """Raise for PEFT prompt tuning and P-tuning: their virtual tokens lengthen the logits
    beyond the labels, which PEFT pads only when it gets the labels itself."""
    config = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(config, "peft_type", None), "value", None)
    if kind in _VIRTUAL_TOKEN_PEFT:
        raise ValueError(
            f"R-Drop does not support PEFT prompt learning ({kind}): its virtual tokens make "
            "the logits longer than the labels. Use an adapter that keeps the sequence "
            "length, such as LoRA"
        )


def add_decoder_inputs(model: nn.Module, features: dict[str, Any], labels: Any) -> None:
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
