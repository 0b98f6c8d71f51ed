"""Regression tests for edge cases where the fused and reference paths used to disagree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rdrop


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_nan_logits_on_ignored_rows_give_finite_gradients(implementation: str) -> None:
    a, b = _logits(6, 5, seed=0), _logits(6, 5, seed=1)
    a[2] = float("nan")
    b[2] = float("nan")
    a.requires_grad_()
    b.requires_grad_()
    y = torch.tensor([0, 1, -100, 3, 4, 0])
    out = rdrop.rdrop_loss([a, b], y, 1.0, implementation=implementation)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool(torch.isfinite(a.grad).all()) and bool((a.grad[2] == 0).all())


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_one_sided_neg_inf_on_a_row_masked_out_of_the_kl(implementation: str) -> None:
    a, b = _logits(4, 6, seed=2), _logits(4, 6, seed=3)
    a[1, 0] = float("-inf")  # only in pass a, on a row the mask drops from the KL
    a.requires_grad_()
    b.requires_grad_()
    mask = torch.tensor([True, False, True, True])
    out = rdrop.rdrop_loss(
        [a, b], torch.tensor([1, 2, 3, 4]), 1.0, mask=mask, implementation=implementation
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())


def test_halves_sliced_without_grad_get_no_gradient_on_the_fused_path() -> None:
    z = _logits(8, 7, seed=4).requires_grad_()
    y = torch.tensor([0, 1, 2, 3])
    grads = {}
    for implementation in ("fused", "reference"):
        logits = z * 1.0
        a = logits[:4]
        with torch.no_grad():
            b = logits[4:]  # same base, requires_grad, but no graph: a constant target
        out = rdrop.rdrop_loss([a, b], y, 1.0, implementation=implementation)
        (grads[implementation],) = torch.autograd.grad(out.loss, z)
    torch.testing.assert_close(grads["fused"], grads["reference"])
    assert bool((grads["fused"][4:] == 0).all())


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_mask_of_the_wrong_shape_is_rejected_on_both_paths(implementation: str) -> None:
    a, b = _logits(2, 3, 5, seed=5), _logits(2, 3, 5, seed=6)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mask must have the item shape"):
        rdrop.rdrop_loss(
            [a, b], y, mask=torch.ones(3, dtype=torch.bool), implementation=implementation
        )
    with pytest.raises(TypeError, match="torch.bool"):
        rdrop.rdrop_loss([a, b], y, mask=torch.ones(2, 3), implementation=implementation)


def test_int32_targets_work_on_both_paths_and_agree() -> None:
    a, b = _logits(5, 4, seed=7), _logits(5, 4, seed=8)
    y = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)
    ref = rdrop.rdrop_loss([a, b], y, 1.0, implementation="reference").loss
    fused = rdrop.rdrop_loss([a, b], y, 1.0, implementation="fused").loss
    torch.testing.assert_close(ref, fused)


def test_kl_on_a_single_class_output_is_an_error() -> None:
    a, b = _logits(4, 1, seed=9), _logits(4, 1, seed=10)
    with pytest.raises(ValueError, match="single class"):
        rdrop.rdrop_loss([a, b], torch.rand(4), task="mse", consistency="kl")


def test_probe_leaves_batchnorm_statistics_untouched() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = rdrop.dropout_consistency(net, torch.randn(16, 4) * 5 + 3)
    assert result.consistency > 0
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m.training for m in net.modules())
