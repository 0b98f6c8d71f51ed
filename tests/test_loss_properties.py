"""Property-based tests: every implementation path of the losses against the float64
plain-autograd reference and the NumPy formulas, on random shapes, masks, dtypes,
ignored targets and ``-inf`` logits; values and gradients."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdrop
from tests import reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Values are computed in float32 or wider whatever the input dtype; gradients are returned
# in the input's dtype, so a bf16 gradient carries bf16 rounding (2**-8 relative).
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-5}
GRAD_TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 8e-3}
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: st.DrawFn) -> dict:
    rows = draw(st.integers(1, 6))
    tokens = draw(st.sampled_from([None, 1, 3]))
    classes = draw(st.integers(2, 40))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = (rows, classes) if tokens is None else (rows, tokens, classes)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    a = (torch.randn(shape, generator=g) * scale).to(dtype)
    b = (torch.randn(shape, generator=g) * scale).to(dtype)
    if draw(st.booleans()) and classes > 2:  # a vocabulary entry impossible in both passes
        column = draw(st.integers(0, classes - 1))
        a[..., column] = -float("inf")
        b[..., column] = -float("inf")
    item_shape = shape[:-1]
    target = torch.randint(0, classes, item_shape, generator=g)
    finite_target = ~torch.isneginf(a.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    target = torch.where(finite_target, target, (target + 1) % classes)
    if draw(st.booleans()):
        target = target.masked_fill(torch.rand(item_shape, generator=g) < 0.3, -100)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(item_shape, generator=g) < 0.7
    return {
        "a": a,
        "b": b,
        "target": target,
        "mask": mask,
        "smoothing": draw(st.sampled_from([0.0, 0.1])),
        "alpha": draw(st.sampled_from([0.0, 1.0, 5.0])),
        "chunk": draw(st.integers(1, 8)),
    }


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [g.double() for g in torch.autograd.grad(loss, inputs)]


def _close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, grad: bool = False
) -> None:
    tol = (GRAD_TOLERANCE if grad else TOLERANCE)[dtype]
    atol = 1e-5 if grad and dtype == torch.bfloat16 else tol
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol)


@SETTINGS
@given(cases())
def test_symmetric_kl_paths_match_the_numpy_formula(case: dict) -> None:
    a, b, mask = case["a"], case["b"], case["mask"]
    per_item = reference.symmetric_kl(a, b)
    keep = np.ones(per_item.shape, bool) if mask is None else mask.numpy()
    expected = per_item[keep].sum() / max(keep.sum(), 1)
    for implementation in ("reference", "fused"):
        value = rdrop.symmetric_kl(
            a, b, mask, implementation=implementation,
            chunk_size=case["chunk"] if implementation == "fused" else None,
        )  # fmt: skip
        np.testing.assert_allclose(value.double().item(), expected, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(cases())
def test_symmetric_kl_gradients_match_the_float64_reference(case: dict) -> None:
    a = case["a"].detach().requires_grad_()
    b = case["b"].detach().requires_grad_()
    a64 = case["a"].double().requires_grad_()
    b64 = case["b"].double().requires_grad_()
    chunked = rdrop.symmetric_kl(a, b, case["mask"], implementation="fused",
                                 chunk_size=case["chunk"])  # fmt: skip
    plain = rdrop.symmetric_kl(a64, b64, case["mask"], implementation="reference")
    _close(chunked, plain, case["a"].dtype)
    for fast, slow in zip(_grads(chunked, a, b), _grads(plain, a64, b64)):
        _close(fast, slow, case["a"].dtype, grad=True)


@SETTINGS
@given(cases())
def test_fused_rdrop_loss_matches_the_reference_in_value_and_gradient(case: dict) -> None:
    a = case["a"].detach().requires_grad_()
    b = case["b"].detach().requires_grad_()
    a64 = case["a"].double().requires_grad_()
    b64 = case["b"].double().requires_grad_()
    options = {"label_smoothing": case["smoothing"], "mask": case["mask"], "check_finite": False}
    fused = rdrop.rdrop_loss([a, b], case["target"], case["alpha"], implementation="fused",
                             **options)  # fmt: skip
    plain = rdrop.rdrop_loss([a64, b64], case["target"], case["alpha"],
                             implementation="reference", **options)  # fmt: skip
    for name in ("loss", "task_loss", "consistency_loss"):
        _close(getattr(fused, name), getattr(plain, name), case["a"].dtype)
    for fast, slow in zip(_grads(fused.loss, a, b), _grads(plain.loss, a64, b64)):
        _close(fast, slow, case["a"].dtype, grad=True)


@SETTINGS
@given(cases())
def test_concatenated_cross_entropy_matches_the_reference(case: dict) -> None:
    both = torch.cat([case["a"], case["b"]]).detach().requires_grad_()
    both64 = both.detach().double().requires_grad_()
    fused = rdrop.rdrop_cross_entropy(
        both, case["target"], case["alpha"], label_smoothing=case["smoothing"],
        mask=case["mask"], chunk_size=case["chunk"], check_finite=False,
    )  # fmt: skip
    a64, b64 = both64.chunk(2)
    plain = rdrop.rdrop_loss(
        [a64, b64], case["target"], case["alpha"], label_smoothing=case["smoothing"],
        mask=case["mask"], implementation="reference", check_finite=False,
    )  # fmt: skip
    _close(fused.loss, plain.loss, both.dtype)
    _close(_grads(fused.loss, both)[0], _grads(plain.loss, both64)[0], both.dtype, grad=True)


@SETTINGS
@given(
    rows=st.integers(1, 5),
    hidden=st.integers(1, 9),
    classes=st.integers(2, 30),
    seed=st.integers(0, 2**16),
    ignored=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1]),
    chunk=st.integers(1, 6),
    bias=st.booleans(),
)
def test_linear_cross_entropy_matches_the_logits_reference(
    rows: int, hidden: int, classes: int, seed: int, ignored: bool, smoothing: float,
    chunk: int, bias: bool,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * rows, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(classes, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(classes, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    target = torch.randint(0, classes, (rows,), generator=g)
    if ignored:
        target[0] = -100
    fused = rdrop.rdrop_linear_cross_entropy(
        h, w, target, 1.0, bias=b, label_smoothing=smoothing, chunk_size=chunk,
        check_finite=False,
    )  # fmt: skip
    logits = torch.nn.functional.linear(h, w, b)
    plain = rdrop.rdrop_loss(
        list(logits.chunk(2)), target, 1.0, label_smoothing=smoothing,
        implementation="reference", check_finite=False,
    )  # fmt: skip
    params = [h, w] + ([b] if b is not None else [])
    torch.testing.assert_close(fused.loss, plain.loss)
    for fast, slow in zip(_grads(fused.loss, *params), _grads(plain.loss, *params)):
        torch.testing.assert_close(fast, slow)
