"""R-Drop with PEFT LoRA adapters on a tiny randomly initialised Llama-shaped causal LM:
dropout detection sees ``lora_dropout``, the no-dropout warning names it, and the labels
of the PEFT-wrapped causal LM are shifted as the model shifts them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from rdrop import RDropWarning  # noqa: E402
from rdrop.integrations.hf import RDropTrainer  # noqa: E402

VOCAB = 48


def _lora_model(lora_dropout: float, attention_dropout: float = 0.0) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=attention_dropout,
    )  # fmt: skip
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return peft.get_peft_model(LlamaForCausalLM(config), lora)


def _args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, max_steps=2, per_device_train_batch_size=2, logging_steps=1,
        learning_rate=1e-3, seed=0, dataloader_num_workers=0,
    )  # fmt: skip


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    labels = ids.clone()
    labels[1, :2] = -100  # a prompt the loss ignores
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_lora_dropout_counts_as_dropout(tmp_path: Path) -> None:
    model = _lora_model(lora_dropout=0.1)  # the base Llama has no dropout at all
    with warnings.catch_warnings():
        warnings.simplefilter("error", RDropWarning)
        trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    model.train()
    trainer.compute_loss(model, _batch())
    assert trainer.state is not None


def test_no_dropout_warning_names_lora_dropout(tmp_path: Path) -> None:
    model = _lora_model(lora_dropout=0.0)
    with pytest.warns(RDropWarning, match=r"lora_dropout=0\.0.*LoraConfig\(lora_dropout=0\.1\)"):
        RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)


def test_peft_causal_lm_labels_are_shifted_like_the_model(tmp_path: Path) -> None:
    model = _lora_model(lora_dropout=0.0)
    with pytest.warns(RDropWarning):
        trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    model.train()
    batch = _batch()
    ours = trainer.compute_loss(model, batch)
    torch.testing.assert_close(ours, model(**batch).loss)


def test_lora_training_runs_and_moves_only_the_adapters(tmp_path: Path) -> None:
    model = _lora_model(lora_dropout=0.2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = [{k: v[i] for k, v in _batch().items()} for i in range(2)] * 2
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0, train_dataset=rows)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def _prompt_learning_model(peft_config: Any, attention_dropout: float) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attention_dropout=attention_dropout,
    )  # fmt: skip
    return peft.get_peft_model(LlamaForCausalLM(config), peft_config).train()


def test_prompt_tuning_is_refused_by_name(tmp_path: Path) -> None:
    prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = _prompt_learning_model(prompt, attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"PEFT prompt learning \(PROMPT_TUNING\).*LoRA"):
        RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)  # refused when built


@pytest.mark.filterwarnings("ignore:R-Drop cannot work")
def test_prefix_tuning_loss_equals_the_models_own_at_dropout_zero(tmp_path: Path) -> None:
    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = _prompt_learning_model(prefix, attention_dropout=0.0)
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=0.0)
    loss = trainer.compute_loss(model, _batch())
    torch.testing.assert_close(loss, model(**_batch()).loss, rtol=1e-5, atol=1e-6)
