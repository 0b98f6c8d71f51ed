"""The chunked symmetric-KL kernel against the plain-autograd reference (value and gradient)."""

from __future__ import annotations

import pytest
import torch

import rdrop
from rdrop import _fused_kernel as _kl_kernel
from tests import reference

INF = float("inf")


def _logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _value_and_grads(
    impl: str,
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    kwargs = {"chunk_size": chunk_size} if impl == "fused" else {}
    value = rdrop.symmetric_kl(a, b, mask, reduction, implementation=impl, **kwargs)  # type: ignore[arg-type]
    scalar = value if weights is None else (value * weights).sum()
    ga, gb = torch.autograd.grad(scalar, (a, b))
    return value.detach(), ga, gb


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` relative to the tensor's scale (elementwise and in norm)."""
    got, want = got.detach(), want.detach()
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale + 1e-12)
    if want.numel() and float(want.norm()) > 0:
        assert float((got - want).norm() / want.norm()) <= rel


def _assert_matches_reference(a, b, mask=None, reduction="mean", weights=None, chunk_size=None):  # type: ignore[no-untyped-def]
    ref = _value_and_grads("reference", a, b, mask, reduction, weights)
    got = _value_and_grads("fused", a, b, mask, reduction, weights, chunk_size)
    for g, r in zip(got, ref):
        assert_close_rel(g, r)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 8, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_gradient_match_reference(chunk_size: int | None, reduction: str) -> None:
    a, b = _logits(2, 9, 33, seed=1), _logits(2, 9, 33, seed=2)
    weights = None if reduction != "none" else _logits(2, 9, seed=3)  # arbitrary grad_out
    _assert_matches_reference(a, b, None, reduction, weights, chunk_size)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.05, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masks_in_both_row_layouts(keep_fraction: float, chunk_size: int | None) -> None:
    # few dead rows: processed in place and zeroed; many: gathered away (compacted).
    a, b = _logits(40, 17, seed=4), _logits(40, 17, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(40, generator=g) < keep_fraction
    for reduction in ("mean", "none"):
        weights = None if reduction == "mean" else _logits(40, seed=7)
        _assert_matches_reference(a, b, mask, reduction, weights, chunk_size)


@pytest.mark.parametrize("dead_rows", [1, 30])
def test_masked_rows_with_nan_and_inf_do_not_leak(dead_rows: int) -> None:
    a, b = _logits(40, 12, seed=8), _logits(40, 12, seed=9)
    mask = torch.ones(40, dtype=torch.bool)
    mask[:dead_rows] = False
    a[0] = float("nan")
    b[0, 3] = INF
    a[dead_rows - 1, :5] = -INF  # one-sided -inf in a dead row
    value, ga, gb = _value_and_grads("fused", a, b, mask, "mean")
    ref, ra, rb = _value_and_grads("reference", a, b, mask, "mean")
    assert torch.isfinite(value) and bool(torch.isfinite(ga).all() & torch.isfinite(gb).all())
    assert bool((ga[~mask] == 0).all()) and bool((gb[~mask] == 0).all())
    for got, want in ((value, ref), (ga, ra), (gb, rb)):
        assert_close_rel(got, want)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_shared_neg_inf_classes_match_reference(chunk_size: int | None) -> None:
    a, b = _logits(6, 10, seed=10), _logits(6, 10, seed=11)
    banned = torch.zeros(6, 10, dtype=torch.bool)
    banned[:, 7:] = True
    banned[2, 0] = True
    a, b = a.masked_fill(banned, -INF), b.masked_fill(banned, -INF)
    value, ga, gb = _value_and_grads("fused", a, b, chunk_size=chunk_size)
    ref, ra, rb = _value_and_grads("reference", a, b)
    for got, want in ((value, ref), (ga, ra), (gb, rb)):
        assert_close_rel(got, want)
    assert bool((ga[banned] == 0).all()) and bool((gb[banned] == 0).all())


def test_one_sided_neg_inf_is_inf_only_in_its_row() -> None:
    a, b = _logits(5, 6, seed=12), _logits(5, 6, seed=13)
    a[1, 2] = -INF
    b[3, 0] = -INF
    value = rdrop.symmetric_kl(a, b, reduction="none", implementation="fused", chunk_size=2)
    assert value[1].item() == INF and value[3].item() == INF
    want = torch.from_numpy(reference.symmetric_kl(a, b)).float()
    keep = torch.tensor([True, False, True, False, True])
    torch.testing.assert_close(value[keep], want[keep], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_low_precision_inputs(dtype: torch.dtype, masked: bool) -> None:
    a, b = _logits(24, 50, seed=14).to(dtype), _logits(24, 50, seed=15).to(dtype)
    mask = (torch.arange(24) % 3 != 0) if masked else None  # 1/3 dead: the gather path
    value, ga, gb = _value_and_grads("fused", a, b, mask, chunk_size=5)
    ref, ra, rb = _value_and_grads("reference", a.float(), b.float(), mask)
    assert value.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)
    # the gradient is computed in float32 and rounded once to the input dtype
    eps = torch.finfo(dtype).eps
    for got, want in ((ga, ra), (gb, rb)):
        torch.testing.assert_close(got.float(), want, rtol=eps, atol=1e-5 * float(want.abs().max()))


def test_float64_gradcheck_with_masks_and_chunks() -> None:
    a = _logits(7, 5, seed=16).double().requires_grad_()
    b = _logits(7, 5, seed=17).double().requires_grad_()
    for mask in (None, torch.tensor([True, False, True, True, False, False, True])):
        for chunk in (None, 2):
            assert torch.autograd.gradcheck(
                lambda x, y, m=mask, c=chunk: rdrop.symmetric_kl(
                    x, y, m, "none", implementation="fused", chunk_size=c
                ),
                (a, b),
            )


def test_non_contiguous_and_single_grad_inputs() -> None:
    base = _logits(12, 8, seed=18)
    a, b = base[:, ::2].t(), _logits(4, 12, seed=19)  # a is a transposed, strided view
    _assert_matches_reference(a, b, chunk_size=5)
    leaf = a.clone().requires_grad_()
    rdrop.symmetric_kl(leaf, b, implementation="fused").backward()
    ref = a.clone().requires_grad_()
    rdrop.symmetric_kl(ref, b, implementation="reference").backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_accurate_when_the_passes_almost_agree() -> None:
    # The R-Drop regime: large logits, a small KL. The kernel sums (p - q) (z_a - z_b - c),
    # whose terms are small, so it stays within 1e-5 of the float64 truth.
    a = _logits(16, 2000, seed=20, scale=4.0) + 30.0
    b = a + 1e-2 * _logits(16, 2000, seed=21, scale=1.0)
    got = rdrop.symmetric_kl(a, b, reduction="none", implementation="fused")
    truth = torch.from_numpy(reference.symmetric_kl(a, b))
    assert float(truth.min()) < 1e-3
    torch.testing.assert_close(got.double(), truth, rtol=1e-4, atol=0)


def test_concatenated_input_gives_one_gradient() -> None:
    x = _logits(2 * 6, 9, seed=22).requires_grad_()
    kl, ce = _kl_kernel.fused_rows(x, None, None, None, None, 0.0, 4)
    assert ce.numel() == 0
    (kl * torch.arange(6.0)).sum().backward()
    a, b = x.detach()[:6].clone().requires_grad_(), x.detach()[6:].clone().requires_grad_()
    ref = rdrop.symmetric_kl(a, b, reduction="none", implementation="reference")
    (ref * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, torch.cat([a.grad, b.grad]), rtol=1e-5, atol=1e-7)


def test_no_grad_forward_and_default_chunking() -> None:
    assert _kl_kernel._rows_per_chunk(32000, None) == _kl_kernel.DEFAULT_CHUNK_NUMEL // 32000
    assert _kl_kernel._rows_per_chunk(10**9, None) == 1
    a, b = _logits(3, 4, seed=23), _logits(3, 4, seed=24)
    with torch.no_grad():
        value = rdrop.symmetric_kl(a, b, implementation="fused")
    assert value.item() == pytest.approx(float(reference.symmetric_kl(a, b).mean()), rel=1e-5)
