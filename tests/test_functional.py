"""The consistency terms against the float64 references, their properties and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rdrop
from tests import reference

IMPLEMENTATIONS = ["reference", "fused"]


def _logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 11), (2, 3, 2, 6), (1, 1)])
def test_symmetric_kl_matches_reference(impl: str, shape: tuple[int, ...]) -> None:
    a, b = _logits(*shape, seed=1), _logits(*shape, seed=2)
    got = rdrop.symmetric_kl(a, b, reduction="none", implementation=impl)
    want = reference.symmetric_kl(a, b)
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert rdrop.symmetric_kl(a, b, implementation=impl).item() == pytest.approx(
        want.mean(), rel=1e-5
    )
    assert rdrop.symmetric_kl(a, b, reduction="sum", implementation=impl).item() == pytest.approx(
        want.sum(), rel=1e-5
    )


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 9),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**16),
    impl=st.sampled_from(IMPLEMENTATIONS),
)
def test_symmetric_kl_properties(
    rows: int, classes: int, scale: float, seed: int, impl: str
) -> None:
    a, b = (
        _logits(rows, classes, seed=seed, scale=scale),
        _logits(rows, classes, seed=seed + 1, scale=scale),
    )
    ab = rdrop.symmetric_kl(a, b, reduction="none", implementation=impl)
    ba = rdrop.symmetric_kl(b, a, reduction="none", implementation=impl)
    torch.testing.assert_close(ab, ba)  # symmetric
    assert bool((ab >= -1e-6).all())  # non-negative
    assert rdrop.symmetric_kl(a, a, implementation=impl).item() == pytest.approx(0.0, abs=1e-6)
    # invariant to a per-row shift of the logits (softmax is)
    shifted = rdrop.symmetric_kl(a + 7.0, b - 3.0, reduction="none", implementation=impl)
    torch.testing.assert_close(shifted, ab, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ab.numpy(), reference.symmetric_kl(a, b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_mask_selects_items_and_mean_is_over_kept(impl: str) -> None:
    a, b = _logits(2, 5, 7, seed=3), _logits(2, 5, 7, seed=4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    per_item = torch.from_numpy(reference.symmetric_kl(a, b)).float()
    got = rdrop.symmetric_kl(a, b, mask=mask, implementation=impl)
    assert got.item() == pytest.approx(per_item[mask].mean().item(), rel=1e-5)
    none = rdrop.symmetric_kl(a, b, mask=mask, reduction="none", implementation=impl)
    assert bool((none[~mask] == 0).all())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_masked_items_may_hold_nan_without_leaking(impl: str) -> None:
    a, b = _logits(4, 6, seed=5).requires_grad_(), _logits(4, 6, seed=6).requires_grad_()
    a_bad = a.detach().clone()
    a_bad[2] = float("nan")
    a_bad.requires_grad_()
    mask = torch.tensor([True, True, False, True])
    value = rdrop.symmetric_kl(a_bad, b, mask=mask, implementation=impl)
    value.backward()
    assert torch.isfinite(value)
    assert bool(torch.isfinite(a_bad.grad).all()) and bool((a_bad.grad[2] == 0).all())
    clean = rdrop.symmetric_kl(a, b, mask=mask, implementation=impl)
    assert value.item() == pytest.approx(clean.item(), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_all_items_masked_gives_zero_not_nan(impl: str) -> None:
    a, b = _logits(3, 4, seed=7), _logits(3, 4, seed=8)
    mask = torch.zeros(3, dtype=torch.bool)
    assert rdrop.symmetric_kl(a, b, mask=mask, implementation=impl).item() == 0.0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_shared_neg_inf_logits_are_finite_and_ignored(impl: str) -> None:
    a, b = _logits(4, 8, seed=9).requires_grad_(), _logits(4, 8, seed=10).requires_grad_()
    banned = torch.zeros(4, 8, dtype=torch.bool)
    banned[:, 5:] = True
    banned[0, 0] = True
    a_inf = a.masked_fill(banned, float("-inf"))
    b_inf = b.masked_fill(banned, float("-inf"))
    value = rdrop.symmetric_kl(a_inf, b_inf, implementation=impl)
    value.backward()
    assert torch.isfinite(value)
    assert bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
    assert bool((a.grad[banned] == 0).all())
    # the same as dropping those classes
    rows = [
        rdrop.symmetric_kl(a[i][~banned[i]], b[i][~banned[i]], implementation=impl)
        for i in range(4)
    ]
    assert value.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_sided_neg_inf_is_infinite_not_nan(impl: str) -> None:
    a, b = _logits(2, 4, seed=11), _logits(2, 4, seed=12)
    a[0, 1] = float("-inf")
    value = rdrop.symmetric_kl(a, b, reduction="none", implementation=impl)
    assert value[0].item() == float("inf") and torch.isfinite(value[1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_accurate_result(impl: str, dtype: torch.dtype) -> None:
    a, b = _logits(64, 100, seed=13).to(dtype), _logits(64, 100, seed=14).to(dtype)
    got = rdrop.symmetric_kl(a, b, implementation=impl)
    assert got.dtype == torch.float32
    # reference on the *same* rounded values, computed in float64
    want = reference.symmetric_kl(a.float(), b.float()).mean()
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradcheck_float64(impl: str) -> None:
    a = _logits(3, 5, seed=15).double().requires_grad_()
    b = _logits(3, 5, seed=16).double().requires_grad_()
    mask = torch.tensor([True, False, True])
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda x, y, m=m: rdrop.symmetric_kl(x, y, mask=m, implementation=impl), (a, b)
        )
        assert torch.autograd.gradcheck(
            lambda x, y, m=m: rdrop.symmetric_kl(
                x, y, mask=m, reduction="none", implementation=impl
            ),
            (a, b),
        )


def test_chunked_matches_reference_value_and_gradient_across_chunks() -> None:
    a = _logits(37, 300, seed=17).requires_grad_()
    b = _logits(37, 300, seed=18).requires_grad_()
    mask = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.3
    ref = rdrop.symmetric_kl(a, b, mask=mask, implementation="reference")
    ga, gb = torch.autograd.grad(ref, (a, b))
    for chunk in (1, 5, 36, 37, 100):
        got = rdrop.symmetric_kl(a, b, mask=mask, implementation="fused", chunk_size=chunk)
        ca, cb = torch.autograd.grad(got, (a, b))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ca, ga, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(cb, gb, rtol=1e-5, atol=1e-8)


def test_chunked_gradient_only_for_inputs_that_need_it() -> None:
    a = _logits(4, 6, seed=19).requires_grad_()
    b = _logits(4, 6, seed=20)
    rdrop.symmetric_kl(a, b, implementation="fused").backward()
    ref_a = a.detach().clone().requires_grad_()
    rdrop.symmetric_kl(ref_a, b, implementation="reference").backward()
    torch.testing.assert_close(a.grad, ref_a.grad)


def test_auto_picks_chunked_for_large_inputs_and_agrees() -> None:
    a, b = _logits(64, 4096, seed=21), _logits(64, 4096, seed=22)
    assert rdrop.symmetric_kl(a, b).item() == pytest.approx(
        rdrop.symmetric_kl(a, b, implementation="reference").item(), rel=1e-5
    )


def test_bernoulli_kl_matches_definition() -> None:
    a, b = _logits(5, 4, seed=23, scale=2.0), _logits(5, 4, seed=24, scale=2.0)
    got = rdrop.symmetric_bernoulli_kl(a, b, reduction="none")
    np.testing.assert_allclose(
        got.numpy(), reference.bernoulli_symmetric_kl(a, b), rtol=1e-5, atol=1e-7
    )
    assert rdrop.symmetric_bernoulli_kl(a, b).item() == pytest.approx(got.mean().item())
    assert rdrop.symmetric_bernoulli_kl(a, a).item() == 0.0
    row_mask = torch.tensor([True, False, True, True, False])
    masked = rdrop.symmetric_bernoulli_kl(a, b, mask=row_mask)
    assert masked.item() == pytest.approx(got[row_mask].mean().item(), rel=1e-6)
    inf = a.clone()
    inf[0, 0] = float("-inf")
    both = rdrop.symmetric_bernoulli_kl(inf, inf.clone())
    assert both.item() == 0.0
    assert torch.autograd.gradcheck(
        rdrop.symmetric_bernoulli_kl, (a.double().requires_grad_(), b.double().requires_grad_())
    )


def test_mse_consistency() -> None:
    a, b = _logits(6, 3, seed=25), _logits(6, 3, seed=26)
    want = ((a.double() - b.double()) ** 2).mean(dim=-1)
    torch.testing.assert_close(
        rdrop.mse_consistency(a, b, reduction="none").double(), want, rtol=1e-6, atol=1e-6
    )
    flat_a, flat_b = a[:, 0], b[:, 0]
    assert rdrop.mse_consistency(flat_a, flat_b).item() == pytest.approx(
        ((flat_a - flat_b) ** 2).mean().item(), rel=1e-6
    )
    mask = torch.tensor([True, True, False, False, True, True])
    assert rdrop.mse_consistency(a, b, mask=mask).item() == pytest.approx(
        want[mask].mean().item(), rel=1e-6
    )


def test_multi_pass_matches_paper_formula() -> None:
    outs = [_logits(6, 5, seed=s) for s in range(30, 34)]
    for m in (2, 3, 4):
        got = rdrop.multi_pass_consistency(outs[:m]).item()
        assert got == pytest.approx(reference.multi_pass_kl(outs[:m]), rel=1e-5)
    assert rdrop.multi_pass_consistency(outs[:2]).item() == pytest.approx(
        rdrop.symmetric_kl(outs[0], outs[1]).item()
    )
    mse = rdrop.multi_pass_consistency(outs[:3], kind="mse").item()
    pairs = [rdrop.mse_consistency(outs[i], outs[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert mse == pytest.approx(torch.stack(pairs).mean().item())


def test_consistency_dispatch_and_module() -> None:
    a, b = _logits(3, 4, seed=40), _logits(3, 4, seed=41)
    assert rdrop.consistency("kl", a, b).item() == rdrop.symmetric_kl(a, b).item()
    assert rdrop.consistency("mse", a, b).item() == rdrop.mse_consistency(a, b).item()
    assert (
        rdrop.consistency("bernoulli_kl", a, b).item() == rdrop.symmetric_bernoulli_kl(a, b).item()
    )
    assert rdrop.ConsistencyLoss("kl")(a, b).item() == pytest.approx(
        rdrop.symmetric_kl(a, b).item()
    )
    with pytest.raises(ValueError, match="kind"):
        rdrop.ConsistencyLoss("js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction must be one of"):
        rdrop.ConsistencyLoss("kl", reduction="avg")  # at construction, not at the first call


def test_compiles() -> None:
    compiled = torch.compile(rdrop.symmetric_kl, backend="eager", fullgraph=True)
    a, b = _logits(4, 6, seed=42), _logits(4, 6, seed=43)
    assert compiled(a, b).item() == pytest.approx(rdrop.symmetric_kl(a, b).item())


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 4)),
            ValueError,
            r"same shape.*\(2, 3\).*\(2, 4\)",
        ),
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)),
            TypeError,
            "same dtype",
        ),
        (
            lambda: rdrop.symmetric_kl(
                torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
            ),
            TypeError,
            "floating-point",
        ),
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), [0.0]),
            TypeError,
            "logits_b must be a torch.Tensor",
        ),
        (
            lambda: rdrop.symmetric_kl([0.0], torch.zeros(2, 3)),
            TypeError,
            "logits_a must be a torch.Tensor",
        ),
        (
            lambda: rdrop.symmetric_kl(
                torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool)
            ),
            ValueError,
            r"mask must have the item shape \(2,\)",
        ),
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2)),
            TypeError,
            "torch.bool",
        ),
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg"),
            ValueError,
            "reduction",
        ),
        (
            lambda: rdrop.symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3), implementation="fast"),
            ValueError,
            "implementation",
        ),
        (
            lambda: rdrop.symmetric_kl(
                torch.zeros(2, 3), torch.zeros(2, 3), implementation="fused", chunk_size=0
            ),
            ValueError,
            "chunk_size",
        ),
        (
            lambda: rdrop.mse_consistency(torch.zeros(2), torch.zeros(3)),
            ValueError,
            "pred_a and pred_b",
        ),
        (lambda: rdrop.multi_pass_consistency([torch.zeros(2, 3)]), ValueError, "m >= 2"),
        (lambda: rdrop.multi_pass_consistency(torch.zeros(2, 2, 3)), TypeError, "sequence"),
        (lambda: rdrop.consistency("js", torch.zeros(1, 2), torch.zeros(1, 2)), ValueError, "kind"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_errors(call, error, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=pattern):
        call()


def test_chunked_is_a_deprecated_alias_of_fused() -> None:
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    with pytest.warns(
        FutureWarning, match=r"implementation='chunked'\) is deprecated: use 'fused'"
    ):
        old = rdrop.symmetric_kl(a, b, implementation="chunked")
    torch.testing.assert_close(old, rdrop.symmetric_kl(a, b, implementation="fused"))
