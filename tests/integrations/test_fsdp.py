"""R-Drop under FSDP2 (``torch.distributed.fsdp.fully_shard``) with 2 real processes
(gloo, CPU): the gradients of one R-Drop step on 2 ranks x 4 rows, gathered from the
shards, equal those of a single process on the combined 8 rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rdrop
from tests.integrations._helpers import free_port, make_deterministic

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

WORLD = 2
ROWS = 8
ALPHA = 2.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.4))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return make_deterministic(Net())


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, 8, generator=g), torch.randint(0, 3, (ROWS,), generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        net = _net()
        fully_shard(net.body, mesh=mesh)
        fully_shard(net, mesh=mesh)
        x, y = _data()
        shard = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        out = rdrop.RDrop(net, alpha=ALPHA)(x[shard], target=y[shard])
        out.loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in net.named_parameters()}
        torch.save({"grads": grads, "loss": out.loss.detach()}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_equal_single_process_on_combined_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _data()
    net = _net()
    out = rdrop.RDrop(net, alpha=ALPHA)(x, target=y)
    assert out.consistency_loss > 0
    out.loss.backward()
    for result in ranks:
        for name, p in net.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-7)
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
