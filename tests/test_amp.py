"""R-Drop under fp16 autocast with ``torch.amp.GradScaler`` in a plain loop: a finite step
whose unscaled gradients match the float32 step with the same dropout masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rdrop


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 5))


def _step(model: nn.Module, fp16: bool) -> dict[str, torch.Tensor]:
    wrapped = rdrop.RDrop(model, alpha=1.0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=fp16)
    x = torch.linspace(-2, 2, 4 * 8).reshape(4, 8)
    y = torch.tensor([0, 3, 1, 4])
    torch.manual_seed(1)  # the same dropout masks in both steps
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        out = wrapped(x, target=y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    scaler.scale(out.loss).backward()
    scaler.unscale_(optimizer)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == (2.0**12 if fp16 else 1.0)  # no overflow, step not skipped
    return grads


def test_fp16_grad_scaler_step_is_finite_and_matches_float32() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    half = _step(model, fp16=True)
    full = _step(reference, fp16=False)
    for name, grad in half.items():
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, full[name], rtol=2e-2, atol=2e-3)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_fp16_logits_go_through_every_loss_path(implementation: str) -> None:
    z = torch.randn(6, 50, dtype=torch.float16, requires_grad=True)
    y = torch.randint(0, 50, (3,))
    out = rdrop.rdrop_loss(list(z.chunk(2)), y, 1.0, implementation=implementation)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert z.grad is not None and z.grad.dtype == torch.float16 and torch.isfinite(z.grad).all()
