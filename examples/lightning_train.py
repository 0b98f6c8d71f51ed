"""R-Drop with Lightning: the loss is computed in ``training_step`` (a callback cannot change it).

::

    class DigitsClassifier(RDropLightningMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = rdrop.RDrop(mlp(), alpha=1.0)        # eval mode: one plain pass

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.rdrop_step(self.net, x, target=y)   # logs train/consistency_loss

Run::

    python examples/lightning_train.py --max-steps 300
    python examples/lightning_train.py --devices 2 --strategy ddp   # same code under DDP

Lightning divides the returned loss by ``accumulate_grad_batches`` itself; do not divide
it again. Prints one JSON line with the results.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import rdrop
from rdrop.integrations.lightning import RDropLightningMixin

try:  # run as a script (examples/ on sys.path) or imported as examples.lightning_train
    from _digits import digits, mlp
except ImportError:  # pragma: no cover
    from examples._digits import digits, mlp


class DigitsClassifier(RDropLightningMixin, L.LightningModule):
    """An MLP on the digits with R-Drop in ``training_step``."""

    def __init__(
        self, net: torch.nn.Module | None = None, alpha: float = 1.0, lr: float = 2e-3
    ) -> None:
        super().__init__()
        self.net = rdrop.RDrop(net if net is not None else mlp(), alpha=alpha)
        self.lr = lr

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return self.rdrop_step(self.net, x, target=y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)  # RDrop in eval mode: the bare model, one pass
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_set, val_set = digits(seed=args.seed)
    model = DigitsClassifier(alpha=args.alpha)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(val_set, batch_size=256),
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
