"""Mixed precision (bf16 autocast on CPU) and ``torch.compile`` with RDrop.

RDrop keeps a Python int step counter, so the recommended form is
``RDrop(torch.compile(model))``: the inner model is compiled, the wrapper stays eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdrop


def _net(p: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(p), torch.nn.Linear(64, 10)
    )


def _sym_kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 reference of 1/2 (KL(P_a||P_b) + KL(P_b||P_a)), mean over rows."""
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    return (0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1)).mean()


def test_bf16_autocast_gives_float32_accurate_consistency_loss() -> None:
    model = rdrop.RDrop(_net(p=0.05), alpha=1.0)  # small dropout: passes differ slightly
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, target=y)
    logits = out.outputs  # the model's raw output on [x; x]
    assert logits.dtype == torch.bfloat16  # the model really ran in bf16
    assert out.consistency_loss.dtype == torch.float32
    assert out.task_loss.dtype == torch.float32 and out.loss.dtype == torch.float32
    a, b = logits.split(64)
    want_kl = _sym_kl64(a, b)
    assert want_kl > 0
    torch.testing.assert_close(out.consistency_loss.double(), want_kl, rtol=1e-5, atol=1e-9)
    want_ce = 0.5 * (F.cross_entropy(a.double(), y) + F.cross_entropy(b.double(), y))
    torch.testing.assert_close(out.task_loss.double(), want_ce, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(
        g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads
    )


def test_bf16_consistency_is_accurate_for_nearly_equal_passes() -> None:
    """Tiny differences (the regime R-Drop drives the model to) are not lost to bf16."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(32, 10000, generator=g) * 4).to(torch.bfloat16)  # >= 2**18: chunked kernel
    b = (a.float() + 0.02 * torch.randn(a.shape, generator=g)).to(torch.bfloat16)
    got = rdrop.symmetric_kl(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _sym_kl64(a, b), rtol=1e-4, atol=1e-9)


def _compile_smoke(backend: str) -> None:
    net = _net()
    model = rdrop.RDrop(torch.compile(net, backend=backend), alpha=1.0, every_k_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    consistency = []
    for _ in range(4):  # steps 0, 2: R-Drop on [x; x]; steps 1, 3: one plain pass
        out = model(x, target=y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None for p in net.parameters())
        consistency.append(out.consistency_loss.item())
    assert model.step == 4
    assert consistency[0] > 0 and consistency[2] > 0 and consistency[1] == consistency[3] == 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))  # eval: one plain pass of the same model


def test_compile_inner_model_smoke_aot_eager() -> None:
    """Dynamo tracing and AOT autograd of the inner model, without C++ code generation."""
    _compile_smoke("aot_eager")


@pytest.mark.slow
def test_compile_inner_model_smoke_inductor() -> None:
    """The default backend (inductor) compiles C++ kernels: about 20-30 s on 2 CPU cores."""
    _compile_smoke("inductor")
