"""R-Drop under torch DistributedDataParallel, launched with torchrun (no custom launcher).

One machine, 2 processes (CPU: gloo backend; GPUs: nccl, one GPU per process)::

    torchrun --nproc_per_node 2 examples/ddp_train.py

Several machines run the very same script; torchrun starts and wires the processes::

    # on each of the N machines (same rendezvous endpoint, any free port):
    torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/ddp_train.py

(``accelerate launch`` works as well, see ``examples/accelerate_train.py``.)

Why it is safe: :class:`rdrop.RDrop` runs **one** forward on the concatenated batch
``[x; x]``, so DDP sees an ordinary forward/backward and ``find_unused_parameters=True``
works (two separate forward calls before one backward would break it). Each rank's loss
is the mean over its shard; DDP averages the gradients, which equals the gradient of the
mean over the global batch. Dropout masks are drawn per rank (seeded ``seed + rank``).

Prints one JSON line with the results (on rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import rdrop

try:  # run as a script (examples/ on sys.path) or imported as examples.ddp_train
    from _digits import digits, mlp
except ImportError:  # pragma: no cover
    from examples._digits import digits, mlp


class Classifier(torch.nn.Module):
    """The digits MLP plus an auxiliary head this script never uses (it would break a
    two-forward R-Drop under ``find_unused_parameters=True``; one forward is fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.aux_head = torch.nn.Linear(10, 2)  # unused in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, join the process group, train, and leave the group together."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--find-unused-parameters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DDP's find_unused_parameters (the model has an unused head)",
    )
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g.: torchrun --nproc_per_node 2 " + __file__)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        result = train(args)
        # train()'s DDP model is gone now. Destroy the group here, not from a DDP
        # reducer's destructor (with Gloo that can deadlock over the GIL at teardown).
        gc.collect()
        dist.barrier()  # nobody leaves while another rank still talks to it
    finally:
        dist.destroy_process_group()
    return result


def train(args: argparse.Namespace) -> dict[str, Any]:
    """R-Drop training of the digits MLP on every rank; the results on rank 0."""
    use_cuda = torch.cuda.is_available()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts them)
    module = rdrop.RDrop(Classifier(), alpha=args.alpha).to(device)
    model = DDP(
        module,
        device_ids=[local_rank] if use_cuda else None,
        find_unused_parameters=args.find_unused_parameters,
    )
    torch.manual_seed(args.seed + rank)  # independent dropout masks per rank

    train_set, val_set = digits(seed=args.seed)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    val_loader = DataLoader(
        val_set, batch_size=256, sampler=DistributedSampler(val_set, shuffle=False)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = kl_sum = 0.0
        steps = 0
        for x, y in loader:
            out = model(x.to(device), target=y.to(device))  # one forward on [x; x]
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()  # DDP all-reduces (averages) the gradients here
            optimizer.step()
            loss_sum += out.loss.item()
            kl_sum += out.consistency_loss.item()
            steps += 1
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:  # eval: one ordinary pass
                correct += int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
                total += y.numel()
        loss_sum, kl_sum, steps, correct, total = _all_sum(
            [loss_sum, kl_sum, steps, correct, total], device
        )
        history.append(
            {
                "epoch": epoch,
                "loss": loss_sum / steps,
                "consistency_loss": kl_sum / steps,
                "val_accuracy": correct / total,
            }
        )

    # All ranks must hold the same weights after DDP training.
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(gathered[0], other) for other in gathered[1:])
    result = {"world_size": world_size, "ranks_in_sync": in_sync, "history": history}
    if rank == 0:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
