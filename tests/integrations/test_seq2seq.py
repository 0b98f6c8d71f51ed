"""RDropTrainerMixin on Hugging Face's Seq2SeqTrainer with tiny random BART and T5 models:
decoder inputs come from the labels (never from the source), the loss at dropout 0 is the
model's own, and evaluation with ``predict_with_generate=True`` works."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

from rdrop import RDropWarning  # noqa: E402
from rdrop.integrations.hf import RDropTrainerMixin  # noqa: E402

VOCAB = 40


class RDropSeq2SeqTrainer(RDropTrainerMixin, Seq2SeqTrainer):
    pass


def _bart(dropout: float) -> Any:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, dropout=dropout,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def _t5(dropout: float) -> Any:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=dropout, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


MODELS = {"bart": _bart, "t5": _t5}


def _rows(n: int, source: int, target: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (source,), generator=g),
            "attention_mask": torch.ones(source, dtype=torch.long),
            "labels": torch.randint(3, VOCAB, (target,), generator=g),
        }
        for _ in range(n)
    ]


def _args(tmp_path: Path, **overrides: Any) -> Seq2SeqTrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True,
        "save_strategy": "no", "disable_tqdm": True, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4, "max_steps": 2, "logging_steps": 1,
        "learning_rate": 1e-3, "seed": 0, "dataloader_num_workers": 0,
    }  # fmt: skip
    options.update(overrides)
    return Seq2SeqTrainingArguments(**options)


def _batch(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("source", "target"), [(7, 5), (6, 6)])
def test_loss_at_dropout_zero_is_the_models_own(
    tmp_path: Path, name: str, source: int, target: int
) -> None:
    model = MODELS[name](0.0)
    rows = _rows(4, source, target)
    setting = {"bart": "dropout=0.1", "t5": "dropout_rate=0.1"}[name]
    with pytest.warns(RDropWarning, match=rf"from_pretrained\(\.\.\., {setting}\)"):
        trainer = RDropSeq2SeqTrainer(model=model, args=_args(tmp_path), train_dataset=rows)
    batch = _batch(rows)
    model.train()
    ours = trainer.compute_loss(model, batch)
    theirs = model(**batch).loss  # the model builds decoder inputs from the labels
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", list(MODELS))
def test_trains_and_evaluates_with_generate(tmp_path: Path, name: str) -> None:
    model = MODELS[name](0.1)
    rows = _rows(8, 7, 5)
    args = _args(tmp_path, predict_with_generate=True, generation_max_length=6)
    trainer = RDropSeq2SeqTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    predictions = trainer.predict(rows[:4])
    assert predictions.predictions.shape[0] == 4


def test_decoder_inputs_from_the_collator_are_kept(tmp_path: Path) -> None:
    model = _bart(0.0)
    rows = _rows(4, 7, 5)
    batch = _batch(rows)
    batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with pytest.warns(RDropWarning):
        trainer = RDropSeq2SeqTrainer(model=model, args=_args(tmp_path), train_dataset=rows)
    model.train()
    ours = trainer.compute_loss(model, batch)
    torch.testing.assert_close(ours, model(**batch).loss)
