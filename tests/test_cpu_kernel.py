"""The C++ CPU row kernel (rdrop._cpu_kernel) against the float64 plain-autograd reference.

Skipped when the kernel cannot be built here (no compiler); the forced fallback
(``RDROP_NO_CPP=1``) is tested either way.
"""

from __future__ import annotations

import pytest
import torch

import rdrop
from rdrop import _cpu_kernel, _fused_kernel
from rdrop._double_backward import rows_reference
from rdrop.fused import rdrop_cross_entropy

INF = float("inf")

needs_cpp = pytest.mark.skipif(
    _cpu_kernel.load() is None, reason="the C++ kernel cannot be built here"
)


def _logits(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=g)).to(dtype)


def _rows_and_grads(fn, x, y, weights):  # type: ignore[no-untyped-def]
    """Per-row outputs of ``fn`` and the gradients of a weighted sum of them."""
    x = x.detach().clone().requires_grad_()
    y = None if y is None else y.detach().clone().requires_grad_()
    kl, ce = fn(x, y)
    total = (kl * weights[0]).sum()
    if ce is not None and ce.numel():
        total = total + (ce * weights[1]).sum()
    inputs = [x] if y is None else [x, y]
    return (kl.detach(), None if ce is None else ce.detach(), *torch.autograd.grad(total, inputs))


def _compare(x, y, target, ce_keep, kl_keep, smoothing, rel):  # type: ignore[no-untyped-def]
    rows = x.reshape(-1, x.shape[-1]).shape[0] // (2 if y is None else 1)
    weights = (_logits(rows, seed=90), _logits(2, rows, seed=91))
    got = _rows_and_grads(
        lambda a, b: _cpu_kernel.rows(a, b, target, ce_keep, kl_keep, smoothing), x, y, weights
    )
    tgt = None if target is None else target.masked_fill(target < 0, 0)
    want = _rows_and_grads(
        lambda a, b: rows_reference(a, b, tgt, ce_keep, kl_keep, smoothing),
        x.double(),
        None if y is None else y.double(),
        (weights[0].double(), weights[1].double()),
    )
    for g, w in zip(got, want):
        if w is None or (g is not None and g.numel() == 0):
            continue
        assert g.dtype == (x.dtype if g.shape == x.shape else torch.float32)
        # a gradient that is exactly 0 (one class) is matched within the weights' scale
        scale = max(float(w.abs().max()) if w.numel() else 0.0, 0.05)
        torch.testing.assert_close(g.double(), w, rtol=rel, atol=rel * scale)


@needs_cpp
@pytest.mark.parametrize("classes", [1, 7, 16, 33, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_values_and_grads_with_masks_and_ignore_index(classes: int, smoothing: float) -> None:
    rows = 13
    x = _logits(2 * rows, classes, seed=1)
    g = torch.Generator().manual_seed(2)
    ce_keep = torch.rand(rows, generator=g) > 0.3
    kl_keep = ce_keep & (torch.rand(rows, generator=g) > 0.3)
    target = torch.randint(0, classes, (rows,), generator=g).masked_fill(~ce_keep, -100)
    _compare(x, None, target, ce_keep, kl_keep, smoothing, 2e-5)
    _compare(x[:rows], x[rows:], None, None, kl_keep, 0.0, 2e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_are_computed_in_float32(dtype: torch.dtype) -> None:
    x = _logits(2 * 9, 50, seed=3, dtype=dtype)
    target = torch.randint(0, 50, (9,))
    # value in float32 of the rounded inputs; gradient rounded once to the input dtype
    _compare(x, None, target, None, None, 0.1, float(torch.finfo(dtype).eps))


@needs_cpp
def test_non_contiguous_inputs() -> None:
    a = _logits(40, 11, seed=4).t()  # [11, 40] as a transposed view
    b = _logits(40, 11, seed=5).t()
    assert not a.is_contiguous()
    _compare(a, b, None, None, None, 0.0, 2e-5)


@needs_cpp
def test_shared_neg_inf_classes_stay_in_the_kernel() -> None:
    a, b = _logits(6, 10, seed=6), _logits(6, 10, seed=7)
    banned = torch.zeros(6, 10, dtype=torch.bool)
    banned[:, 7:] = True
    a, b = a.masked_fill(banned, -INF), b.masked_fill(banned, -INF)
    assert _cpu_kernel.rows(a, b, None, None, None, 0.0) is not None
    _compare(a, b, None, None, None, 0.0, 2e-5)
    ga = _rows_and_grads(
        lambda x, y: _cpu_kernel.rows(x, y, None, None, None, 0.0), a, b, (torch.ones(6), None)
    )[2]
    assert bool((ga[banned] == 0).all())


@needs_cpp
def test_non_finite_rows_fall_back_to_the_aten_kernel() -> None:
    a, b = _logits(5, 6, seed=8), _logits(5, 6, seed=9)
    a[1, 2] = -INF  # one-sided: infinite divergence
    assert _cpu_kernel.rows(a, b, None, None, None, 0.0) is None
    value = rdrop.symmetric_kl(a, b, reduction="none")
    assert value[1].item() == INF and bool(torch.isfinite(value[[0, 2, 3, 4]]).all())
    keep = torch.tensor([True, False, True, True, True])
    a[1] = float("nan")  # a dead row may hold anything
    assert _cpu_kernel.rows(a, b, None, None, keep, 0.0) is not None


@needs_cpp
def test_public_functions_take_the_cpp_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = _cpu_kernel.rows

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_cpu_kernel, "rows", spy)
    logits = _logits(2 * 64, 1000, seed=10)
    target = torch.randint(0, 1000, (64,))
    rdrop.symmetric_kl(logits[:64], logits[64:])
    rdrop.rdrop_loss(list(logits.chunk(2)), target, 1.0)
    rdrop_cross_entropy(logits, target, 1.0)
    assert len(calls) == 3


@needs_cpp
def test_double_backward_goes_through_the_reference() -> None:
    a = _logits(4, 6, seed=11).requires_grad_()
    b = _logits(4, 6, seed=12)
    (kl, _) = _cpu_kernel.rows(a, b, None, None, None, 0.0)
    (g,) = torch.autograd.grad(kl.sum(), a, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), a)
    a2 = a.detach().clone().requires_grad_()
    (ref, _) = rows_reference(a2, b, None, None, None, 0.0)
    (g2,) = torch.autograd.grad(ref.sum(), a2, create_graph=True)
    (h2,) = torch.autograd.grad(g2.pow(2).sum(), a2)
    torch.testing.assert_close(h, h2, rtol=1e-4, atol=1e-7)


def test_forced_fallback_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDROP_NO_CPP", "1")
    assert _cpu_kernel.load() is None and not _cpu_kernel.supports(torch.zeros(1))
    logits = _logits(2 * 32, 700, seed=13).requires_grad_()
    target = torch.randint(0, 700, (32,))
    target[::5] = -100
    fused = rdrop.rdrop_loss(list(logits.chunk(2)), target, 1.0, implementation="fused")
    (grad,) = torch.autograd.grad(fused.loss, logits)
    ref = rdrop.rdrop_loss(list(logits.chunk(2)), target, 1.0, implementation="reference")
    (ref_grad,) = torch.autograd.grad(ref.loss, logits)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    assert _fused_kernel.auto_min_numel(logits, kl_only=False) == _fused_kernel.FUSED_MIN_NUMEL
