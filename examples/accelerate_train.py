"""R-Drop with Hugging Face Accelerate: prepare, gradient accumulation, bf16 autocast.

The whole recipe is four lines in an ordinary Accelerate loop::

    model = rdrop.RDrop(net, alpha=1.0)                    # one forward on [x; x]
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            out = model(x, target=y)                       # runs under autocast
            accelerator.backward(out.loss)                 # divides by the accumulation steps
            optimizer.step()
            optimizer.zero_grad()

* Do **not** divide ``out.loss`` by ``gradient_accumulation_steps`` yourself:
  ``accelerator.backward`` already does, and R-Drop's loss is a per-batch mean like any
  other loss, so the accumulated gradient equals the gradient of the larger batch.
* With ``mixed_precision="bf16"`` the model runs in bf16 autocast; R-Drop computes the
  task loss and the KL from the bf16 logits in float32 (``log_softmax`` in log space), so
  the consistency term is float32-accurate.
* ``accelerator.prepare`` wraps the model in ``DistributedDataParallel`` when launched
  on several processes; R-Drop's single forward is DDP-safe (also with
  ``find_unused_parameters=True``). Same script on one or many machines::

      python examples/accelerate_train.py                              # one process
      accelerate launch --num_processes 2 examples/accelerate_train.py # 2 processes
      accelerate launch --num_machines N --machine_rank R --main_process_ip HOST \\
          --num_processes P examples/accelerate_train.py               # N machines

Prints one JSON line with the results (on the main process).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import rdrop

try:  # run as a script (examples/ on sys.path) or imported as examples.accelerate_train
    from _digits import digits, mlp
except ImportError:  # pragma: no cover
    from examples._digits import digits, mlp


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> rdrop.RDropOutput:
    """One (micro-)batch of the recipe. The prepared optimizer steps only on sync steps."""
    x, y = batch
    with accelerator.accumulate(model):
        out: rdrop.RDropOutput = model(x, target=y)
        accelerator.backward(out.loss)  # no extra division: backward divides by the steps
        optimizer.step()
        optimizer.zero_grad()
    return out


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    """Accuracy of single ordinary passes (RDrop in eval mode is the bare model)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(x)
        hits, n = accelerator.gather_for_metrics(((logits.argmax(-1) == y).long(), y))
        correct += int(hits.sum())
        total += n.numel()
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    args = parser.parse_args(argv)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        cpu=args.cpu,
    )
    torch.manual_seed(args.seed)
    train_set, val_set = digits(seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)

    model = rdrop.RDrop(mlp(), alpha=args.alpha)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader
    )

    history: list[dict[str, float]] = []
    for epoch in range(args.epochs):
        sums = torch.zeros(3)
        for batch in train_loader:
            out = train_step(accelerator, model, optimizer, batch)
            sums += torch.stack(
                [
                    out.loss.detach().float().cpu(),
                    out.consistency_loss.detach().cpu(),
                    torch.ones(()),
                ]
            )
        loss, kl, n = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
        history.append(
            {
                "epoch": epoch,
                "loss": loss / n,
                "consistency_loss": kl / n,
                "val_accuracy": evaluate(accelerator, model, val_loader),
            }
        )
    result = {
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "grad_accum": args.grad_accum,
        "consistency_dtype": str(out.consistency_loss.dtype),
        "history": history,
    }
    if accelerator.is_main_process:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
