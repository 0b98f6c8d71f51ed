"""Partial-depth R-Drop on Hugging Face models: ``branch_at=`` in the Trainer mixin (BERT,
an encoder layer and the classifier head's dropout) and in the wrapper (a Llama-shaped
causal LM, whose layers take an attention mask and rotary embeddings from their parent)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import rdrop  # noqa: E402
from rdrop.integrations.hf import RDropTrainer  # noqa: E402


def _rows_seen(model: torch.nn.Module, names: list[str]) -> dict[str, int]:
    """Rows of each named module's output (recorded after R-Drop's own input hooks ran)."""
    rows: dict[str, int] = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: rows.__setitem__(
                name, (out[0] if isinstance(out, tuple) else out).shape[0]
            )
        )
    return rows


def _bert() -> Any:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


@pytest.mark.parametrize(
    ("branch_at", "doubled_from"), [("bert.encoder.layer.1", 1), ("dropout", 2)]
)
def test_trainer_branch_at_runs_the_lower_layers_once(branch_at: str, doubled_from: int) -> None:
    model = _bert()
    args = TrainingArguments(tempfile.mkdtemp(), report_to="none", use_cpu=True)
    trainer = RDropTrainer(model=model, args=args, alpha=1.0, branch_at=branch_at)
    names = ["bert.encoder.layer.0", "bert.encoder.layer.1", "classifier"]
    rows = _rows_seen(model, names)
    ids = torch.randint(1, 64, (4, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 0])}
    loss = trainer.compute_loss(model.train(), batch)
    loss.backward()
    assert [rows[n] for n in names] == [4 if i < doubled_from else 8 for i in range(3)]
    assert trainer._rdrop_consistency_sum is not None and trainer._rdrop_consistency_sum > 0
    with pytest.raises(ValueError, match="is not a submodule"):
        RDropTrainer(model=model, args=args, branch_at="bert.encoder.layer.7")


def test_wrapper_branch_at_a_llama_layer() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.2,
        )
    )  # fmt: skip
    names = ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    rows = _rows_seen(model, names)
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding
    # Llama drops attention weights with functional dropout, which the no-dropout check
    # cannot see.
    wrapped = rdrop.RDrop(model, alpha=1.0, branch_at="model.layers.1", warn=False)
    out = wrapped(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], target=ids[:, 1:])
    out.loss.backward()
    assert [rows[n] for n in names] == [3, 6, 6, 6]
    assert out.consistency_loss > 0 and torch.isfinite(out.loss)
