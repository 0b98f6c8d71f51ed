"""RDropSFTTrainer on TRL's SFTTrainer with a tiny Llama-shaped causal LM and a tiny
tokenizer built offline: completion-only and assistant-only masks survive, TRL's metrics
are logged, TRL's keys never reach the model; with and without LoRA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from rdrop.integrations.trl import RDropSFTTrainer  # noqa: E402

VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghij ")}}


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _model(dropout: float = 0.1) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attention_dropout=dropout,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _dataset() -> Any:
    rows = [{"prompt": "abc ", "completion": "def"}, {"prompt": "ghi ", "completion": "jab"}]
    return datasets.Dataset.from_list(rows * 4)


def _config(tmp_path: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "max_steps": 2,
        "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no",
        "disable_tqdm": True, "dataloader_num_workers": 0, "learning_rate": 1e-3,
    }  # fmt: skip
    options.update(overrides)
    return trl.SFTConfig(**options)


class KeyRecorder(torch.nn.Module):
    """Records the keyword arguments every forward receives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[set[str]] = []

    def hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.seen.append(set(kwargs))


def test_trains_with_trl_metrics_and_completion_only_labels(tmp_path: Path) -> None:
    model = _model()
    recorder = KeyRecorder()
    model.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    trainer = RDropSFTTrainer(
        model=model, args=_config(tmp_path), train_dataset=_dataset(),
        processing_class=_tokenizer(), alpha=1.0,
    )  # fmt: skip
    row = trainer.train_dataset[0]
    assert row["labels"][:4] == [-100] * 4  # the prompt is masked out of the loss
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(
        {"entropy", "mean_token_accuracy", "num_tokens", "consistency_loss"} <= set(e)
        for e in logged
    )
    assert logged[-1]["num_tokens"] == 32  # 2 steps x 2 rows x 8 tokens
    allowed = {"input_ids", "attention_mask", "use_cache", "position_ids"}
    assert all(keys <= allowed for keys in recorder.seen), recorder.seen


def test_completion_only_loss_equals_the_models_own_at_dropout_zero(tmp_path: Path) -> None:
    model = _model(dropout=0.0)
    with pytest.warns(Warning):  # no dropout: R-Drop warns it can do nothing
        trainer = RDropSFTTrainer(
            model=model, args=_config(tmp_path), train_dataset=_dataset(),
            processing_class=_tokenizer(), alpha=1.0,
        )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    ours = trainer.compute_loss(model, batch)
    theirs = model(**batch).loss  # the model's loss over the completion tokens
    torch.testing.assert_close(ours, theirs)


def test_with_lora_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")  # fmt: skip
    trainer = RDropSFTTrainer(
        model=_model(dropout=0.0), args=_config(tmp_path), train_dataset=_dataset(),
        processing_class=_tokenizer(), peft_config=lora, alpha=1.0,
    )  # fmt: skip
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged[-1]["consistency_loss"] > 0  # LoRA dropout makes the passes differ


def test_padding_free_is_refused_by_name(tmp_path: Path) -> None:
    trainer = RDropSFTTrainer(
        model=_model(), args=_config(tmp_path, padding_free=True, max_length=None), train_dataset=_dataset(),
        processing_class=_tokenizer(), alpha=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="padding_free=False"):
        trainer.train()


def test_a_loss_type_other_than_nll_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loss_type='dft'"):
        RDropSFTTrainer(
            model=_model(), args=_config(tmp_path, loss_type="dft"), train_dataset=_dataset(),
            processing_class=_tokenizer(), alpha=1.0,
        )  # fmt: skip
