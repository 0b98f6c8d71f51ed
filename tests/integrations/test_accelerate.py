"""The Accelerate recipe (examples/accelerate_train.py): prepare, accumulate, bf16 autocast."""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import rdrop
from tests.integrations._helpers import ROOT, TinyNet, make_deterministic

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate's state is a process-wide singleton: reset it around every test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def example() -> Any:
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield importlib.import_module("accelerate_train")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_example_bf16_with_gradient_accumulation(example: Any) -> None:
    result = example.main(["--epochs", "2", "--cpu", "--mixed-precision", "bf16"])
    assert result["mixed_precision"] == "bf16" and result["grad_accum"] == 2
    assert result["consistency_dtype"] == "torch.float32"
    history = result["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.8
    assert all(h["consistency_loss"] > 0 for h in history)


def _params_after_one_update(
    example: Any, net: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], accum: int
) -> dict[str, torch.Tensor]:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = rdrop.RDrop(net, alpha=2.0, warn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -gradient
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in batches:
        example.train_step(accelerator, model, optimizer, batch)
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_accumulation_does_not_divide_twice(example: Any) -> None:
    """Two accumulated micro-batches of 4 make the same update as one batch of 8."""
    torch.manual_seed(0)
    base = make_deterministic(TinyNet(p=0.4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    full = _params_after_one_update(example, copy.deepcopy(base), [(x, y)], accum=1)
    accumulated = _params_after_one_update(
        example, copy.deepcopy(base), [(x[:4], y[:4]), (x[4:], y[4:])], accum=2
    )
    before = dict(base.named_parameters())
    moved = [n for n in full if not torch.equal(full[n], before[n])]
    assert len(moved) == 4  # body and head weights/biases were updated (not the unused head)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_prepared_bf16_model_returns_float32_losses() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    torch.manual_seed(0)
    model = accelerator.prepare(rdrop.RDrop(TinyNet(p=0.2), alpha=1.0))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    out = model(x, target=y)
    assert out.outputs.dtype == torch.bfloat16  # the forward ran under bf16 autocast
    assert out.loss.dtype == out.consistency_loss.dtype == torch.float32
    a, b = out.outputs.double().split(16)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    want = (0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1)).mean()
    torch.testing.assert_close(out.consistency_loss.double(), want, rtol=1e-5, atol=1e-9)
