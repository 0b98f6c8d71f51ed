"""R-Drop under DistributedDataParallel with 2 real processes (gloo, CPU).

The dropout of the tiny model is replaced by a per-copy deterministic mask (see
``_helpers.PerCopyDropout``), so the gradients of one R-Drop step on 2 ranks x 4 rows must
equal those of a single process on the combined 8 rows, whatever the wrapping order.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import rdrop
from tests.integrations._helpers import ROOT, TinyNet, free_port, make_deterministic

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
ROWS = 8
ALPHA = 2.0


def _net() -> TinyNet:
    torch.manual_seed(0)
    return make_deterministic(TinyNet(p=0.4))  # type: ignore[return-value]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, 8, generator=g), torch.randint(0, 3, (ROWS,), generator=g)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
    }


def _one_rank(rank: int, out_dir: str) -> None:
    x, y = _data()
    shard = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    results = {}
    # DDP outside: what Accelerate/Lightning build from RDrop(net).
    net = _net()
    outer = DDP(rdrop.RDrop(net, alpha=ALPHA), find_unused_parameters=True)
    out = outer(x[shard], target=y[shard])
    out.loss.backward()
    results["ddp_outside"] = _grads(net)
    results["ddp_outside_loss"] = out.loss.detach()
    # DDP inside: RDrop(DDP(net)) -- still one forward on [x; x] through DDP.
    net = _net()
    inner = rdrop.RDrop(DDP(net, find_unused_parameters=True), alpha=ALPHA)
    out = inner(x[shard], target=y[shard])
    out.loss.backward()
    results["ddp_inside"] = _grads(net)
    # Further steps with an optimizer: find_unused_parameters across steps, ranks in sync.
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        outer(x[shard], target=y[shard]).loss.backward()
        optimizer.step()
    results["after_two_steps"] = {n: p.detach().clone() for n, p in outer.named_parameters()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _one_rank(rank, out_dir)
        # The DDP models are gone now; destroying the Gloo group from a DDP reducer's
        # destructor can deadlock over the GIL (a torch teardown race), so destroy it here.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process_on_combined_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, y = _data()
    net = _net()
    single = rdrop.RDrop(net, alpha=ALPHA)
    out = single(x, target=y)
    assert out.consistency_loss > 0  # the deterministic passes differ: this is R-Drop
    out.loss.backward()
    want = _grads(net)
    assert want["unused.weight"] is None
    checked = 0
    for result in ranks:
        for form in ("ddp_outside", "ddp_inside"):
            got = result[form]
            for name, grad in want.items():
                if grad is None:  # the unused head: no gradient anywhere
                    assert got[name] is None or not got[name].any(), (form, name)
                    continue
                torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=(form, name))
                checked += 1
    assert checked == WORLD * 2 * 4  # 2 ranks x 2 forms x (body + head weights and biases)
    # The per-rank losses are the shard means; their average is the combined batch's loss.
    mean_loss = sum(r["ddp_outside_loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    # And both ranks hold identical weights after further optimizer steps.
    for name, value in ranks[0]["after_two_steps"].items():
        torch.testing.assert_close(ranks[1]["after_two_steps"][name], value, rtol=0, atol=0)


def test_ddp_example_converges_with_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        str(ROOT / "examples" / "ddp_train.py"),
        "--epochs",
        "3",
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == WORLD
    assert result["ranks_in_sync"]
    history = result["history"]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.85
    assert all(h["consistency_loss"] > 0 for h in history)
