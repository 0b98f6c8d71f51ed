"""Second-order gradients through every fast path equal those of the plain autograd graph
(gradient penalties, Hessian-vector products): never silently zero."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import rdrop

F64 = torch.float64
N, V, H = 8, 300, 12


def _reference_loss(z: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    return rdrop.rdrop_loss(list(z.chunk(2)), y, 1.0, implementation="reference", **kw).loss


def _penalised_grad(
    loss_of: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> torch.Tensor:
    z = z.detach().requires_grad_()
    loss = loss_of(z)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    assert g.requires_grad, "the gradient must carry a graph when create_graph=True"
    (total,) = torch.autograd.grad(loss + 1e3 * g.pow(2).sum(), z)
    return total


def _hvp(loss_of: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    v = torch.linspace(-1, 1, z.numel(), dtype=F64).reshape(z.shape)
    return torch.autograd.functional.hvp(loss_of, z.detach(), v)[1]


def _targets(with_ignored: bool) -> torch.Tensor:
    y = torch.arange(N) * 7 % V
    if with_ignored:
        y[1] = -100
    return y


FAST_PATHS = {
    "rdrop_loss fused": lambda y, **kw: (
        lambda z: rdrop.rdrop_loss(list(z.chunk(2)), y, 1.0, implementation="fused", **kw).loss
    ),
    "RDropLoss fused": lambda y, **kw: (
        lambda z: rdrop.RDropLoss(1.0, implementation="fused", **kw)(*z.chunk(2), target=y).loss
    ),
    "rdrop_cross_entropy": lambda y, **kw: (
        lambda z: rdrop.rdrop_cross_entropy(z, y, 1.0, chunk_size=3, **kw).loss
    ),
}


@pytest.mark.parametrize("name", list(FAST_PATHS))
@pytest.mark.parametrize("with_ignored", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gradient_penalty_and_hvp_match_the_reference(
    name: str, with_ignored: bool, smoothing: float
) -> None:
    torch.manual_seed(0)
    z = torch.randn(2 * N, V, dtype=F64)
    y = _targets(with_ignored)
    fast = FAST_PATHS[name](y, label_smoothing=smoothing)
    reference = lambda z: _reference_loss(z, y, label_smoothing=smoothing)  # noqa: E731
    torch.testing.assert_close(_penalised_grad(fast, z), _penalised_grad(reference, z))
    hvp = _hvp(fast, z)
    assert hvp.abs().sum() > 0
    torch.testing.assert_close(hvp, _hvp(reference, z))


def test_chunked_symmetric_kl_double_backward() -> None:
    torch.manual_seed(1)
    b = torch.randn(2 * N, V, dtype=F64)
    keep = torch.ones(2 * N, dtype=torch.bool)
    keep[3] = False

    def loss_of(implementation: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda a: rdrop.symmetric_kl(a, b, keep, implementation=implementation, chunk_size=5)

    a = torch.randn(2 * N, V, dtype=F64)
    torch.testing.assert_close(
        _penalised_grad(loss_of("fused"), a), _penalised_grad(loss_of("reference"), a)
    )
    torch.testing.assert_close(_hvp(loss_of("fused"), a), _hvp(loss_of("reference"), a))


def test_linear_cross_entropy_double_backward_through_hidden_and_weight() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(2 * N, H, dtype=F64, requires_grad=True)
    weight = torch.randn(V, H, dtype=F64, requires_grad=True)
    y = _targets(True)

    def penalty(logits_path: bool) -> tuple[torch.Tensor, ...]:
        if logits_path:
            loss = _reference_loss(hidden @ weight.T, y)
        else:
            loss = rdrop.rdrop_linear_cross_entropy(hidden, weight, y, 1.0, chunk_size=4).loss
        grads = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
        total = loss + sum(g.pow(2).sum() for g in grads)
        return torch.autograd.grad(total, (hidden, weight))

    for fast, reference in zip(penalty(False), penalty(True)):
        torch.testing.assert_close(fast, reference)
