"""``fgm_step`` runs the training loop's own backward (a GradScaler, Lightning's
``manual_backward``, ``accelerator.backward``) and gives the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

import rdrop


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Dropout(0.0), torch.nn.Linear(8, 2)
    )


def _step(net: torch.nn.Module, backward=None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    fgm = rdrop.FGM(net, epsilon=0.5, param_names=net[0])
    ids, y = torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([0, 1, 1])
    loss = lambda: rdrop.task_loss(net(ids), y)  # noqa: E731
    rdrop.fgm_step(fgm, loss, backward=backward)
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def test_custom_backward_is_called_for_both_losses() -> None:
    calls = []

    def backward(loss: torch.Tensor) -> None:
        calls.append(float(loss.detach()))
        loss.backward()

    net = _net()
    reference = copy.deepcopy(net)
    got = _step(net, backward)
    assert len(calls) == 2
    for name, grad in _step(reference).items():
        torch.testing.assert_close(got[name], grad)


def test_grad_scaler_backward_gives_the_scaled_gradients() -> None:
    scale = 2.0**8
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    net = _net()
    reference = copy.deepcopy(net)
    got = _step(net, lambda loss: scaler.scale(loss).backward())
    for name, grad in _step(reference).items():
        torch.testing.assert_close(got[name] / scale, grad)  # FGM's attack is scale-free


def test_backward_must_be_callable() -> None:
    net = _net()
    with pytest.raises(TypeError, match="backward must be callable"):
        rdrop.fgm_step(rdrop.FGM(net, param_names=net[0]), lambda: torch.zeros(()), backward=3)
