"""Bad input to the library gets an error naming the argument; degenerate input gets a
defined value, never NaN."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import rdrop

INF = float("inf")


def test_a_single_tensor_is_not_mistaken_for_a_list_of_passes() -> None:
    with pytest.raises(TypeError, match="passes must be a list or tuple"):
        rdrop.rdrop_loss(torch.randn(4, 5), None)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_rows_that_are_all_minus_inf_never_give_nan(implementation: str) -> None:
    x = torch.randn(3, 4)
    x[1] = -INF
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    value = rdrop.symmetric_kl(a, b, implementation=implementation)
    value.backward()
    assert value.item() == 0.0
    assert not a.grad.isnan().any() and not b.grad.isnan().any()
    other = x.clone()
    other[1] = 0.0  # possible in one input only: the divergence is infinite
    per_item = rdrop.symmetric_kl(x, other, reduction="none", implementation=implementation)
    assert per_item[1].item() == math.inf and per_item[0].item() == 0.0
    keep = torch.tensor([True, False, True])
    masked = rdrop.symmetric_kl(x, other, mask=keep, implementation=implementation)
    assert masked.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ignore_index": "x"}, "ignore_index must be an int"),
        ({"task_passes": 1.5}, "task_passes must be an int"),
    ],
)
def test_loss_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        rdrop.rdrop_loss([torch.randn(2, 3)] * 2, torch.tensor([0, 1]), **kwargs)


def test_rdrop_loss_module_checks_ignore_index() -> None:
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        rdrop.RDropLoss(1.0, ignore_index="x")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))


def test_dropout_rates_must_be_numbers() -> None:
    with pytest.raises(TypeError, match="dropout_rates must be a sequence of numbers"):
        rdrop.RDrop(_model(), 1.0, dropout_rates=(0.1, "a"), mode="sequential")


def test_zero_dropout_rates_warn_that_rdrop_does_nothing() -> None:
    wrapped = rdrop.RDrop(_model(), 1.0, dropout_rates=(0.0, 0.0), mode="sequential")
    with pytest.warns(rdrop.RDropWarning, match=r"dropout_rates=\(0.0, 0.0\) are all 0"):
        out = wrapped(torch.randn(2, 3), target=torch.tensor([0, 1]))
    assert out.consistency_loss.item() == 0.0


def test_empty_batches_are_refused_by_name() -> None:
    wrapped = rdrop.RDrop(_model(), 1.0).train()
    with pytest.raises(ValueError, match=r"the batch is empty \(0 rows\)"):
        wrapped(torch.randn(0, 3), target=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the batch is empty \(0 rows\)"):
        rdrop.dropout_consistency(_model(), torch.randn(0, 3))


def test_non_finite_loss_raises_a_dedicated_error() -> None:
    z = torch.full((2, 3), float("nan"))
    with pytest.raises(rdrop.NonFiniteLossError, match="R-Drop loss is not finite"):
        rdrop.rdrop_loss([z, z], torch.tensor([0, 1]))
    assert issubclass(rdrop.NonFiniteLossError, ValueError)  # callers catching ValueError


def test_no_warning_on_well_formed_input() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rdrop.rdrop_loss([torch.randn(2, 3), torch.randn(2, 3)], torch.tensor([0, 1]))
