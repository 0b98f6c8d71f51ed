"""Run by test_hf.py under ``torchrun --nproc_per_node 2``: one RDropTrainer step under DDP.

Saves the gradients (identical on every rank after DDP's all-reduce) and the Trainer's
log history from rank 0 to the file given as the first argument.
"""

from __future__ import annotations

import gc
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.distributed as dist
from transformers import BertForTokenClassification

from rdrop.integrations.hf import RDropTrainer
from tests.integrations._helpers import make_deterministic
from tests.integrations.test_hf import (
    GradCapture,
    _args,
    _tiny_bert,
    _token_rows,
)


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    model = make_deterministic(_tiny_bert(BertForTokenClassification))
    capture = GradCapture()
    trainer = RDropTrainer(
        model=model,
        args=_args(os.path.dirname(out_path), per_device_train_batch_size=4, max_steps=1),
        train_dataset=_token_rows(8),
        callbacks=[capture],
        alpha=3.0,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(
            {
                "grads": capture.grads,
                "logs": trainer.state.log_history,
                "world_size": trainer.args.world_size,
            },
            out_path,
        )


if __name__ == "__main__":
    main(sys.argv[1])
    # Free the Trainer's DDP model (its reducer holds the process group) *before* the group
    # is destroyed: a Gloo group destroyed from the reducer's destructor can deadlock with
    # its worker threads over the GIL (a torch teardown race). Then leave together.
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
