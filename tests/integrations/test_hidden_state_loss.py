"""The R-Drop loss from the hidden states (no [2B, T, V] logits): the wrapper's
``output_layer=`` and the Trainer mixin's ``hidden_state_loss=`` give the logits path's
loss and gradients, and refuse what they cannot do by name."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import rdrop
from rdrop import _output_layer

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from rdrop.integrations.hf import RDropTrainer  # noqa: E402


def _llama(vocab: int = 97, **config: Any) -> Any:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.2,
            pad_token_id=0, tie_word_embeddings=False, **config,
        )
    )  # fmt: skip


def _batch(vocab: int = 97) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(trainer: Any, model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks on both paths
    loss = trainer.compute_loss(model.train(), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _trainer(model: Any, **options: Any) -> RDropTrainer:
    args = TrainingArguments(tempfile.mkdtemp(), report_to="none", use_cpu=True)
    return RDropTrainer(model=model, args=args, alpha=2.0, **options)


def test_trainer_hidden_state_loss_equals_the_logits_path() -> None:
    model = _llama()
    twin = copy.deepcopy(model)
    ref_loss, ref_grads = _loss_and_grads(_trainer(twin, hidden_state_loss=False), twin, _batch())
    trainer = _trainer(model, hidden_state_loss=True)
    seen: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    loss, grads = _loss_and_grads(trainer, model, _batch())
    hook.remove()
    assert seen == [(6, 9, 16)]  # the projection returned the hidden states, not [6, 9, 97]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert model.lm_head(torch.zeros(1, 16)).shape == (1, 97)  # the layer is restored


def test_trainer_default_uses_logits_below_the_size_and_hidden_states_above(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rdrop.integrations import hf

    model = _llama()
    trainer = _trainer(model)
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    trainer.compute_loss(model.train(), _batch())
    monkeypatch.setattr(hf, "_HIDDEN_STATE_MIN_LOGITS", 2 * 3 * 9 * 97)  # exactly this batch
    trainer.compute_loss(model.train(), _batch())
    assert seen == [97, 16]


def test_trainer_refuses_a_model_that_transforms_its_logits() -> None:
    model = _llama()
    model.config.logit_scale = 0.5
    trainer = _trainer(model, hidden_state_loss=True)
    with pytest.raises(ValueError, match=r"hidden_state_loss=True .*logit_scale=0.5"):
        trainer.compute_loss(model.train(), _batch())
    assert _trainer(model).compute_loss(model.train(), _batch()).ndim == 0  # auto: logits
    with pytest.raises(TypeError, match="hidden_state_loss must be None or a bool"):
        _trainer(model, hidden_state_loss="yes")


def test_wrapper_output_layer_equals_the_logits_path() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300)
    net = torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Dropout(0.3), head)
    x = torch.randint(0, 40, (4, 6))
    y = torch.randint(0, 300, (4, 6))
    y[1, 4:] = -100
    results = []
    for layer in (None, "2"):
        net.zero_grad()
        torch.manual_seed(3)
        out = rdrop.RDrop(net, alpha=1.5, label_smoothing=0.1, output_layer=layer)(x, target=y)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    assert got.logits is None and ref.logits is not None
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.consistency_loss, ref.consistency_loss.detach())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "output_layer" not in "".join(rdrop.RDrop(net, output_layer=head).state_dict())


class _FlatTokens(torch.nn.Module):
    """Runs its layers on [B * T, d] rows and views the logits back to [B, T, V]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(40, 16)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.3))
        self.head = torch.nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.body(self.embedding(x).reshape(-1, 16))
        return self.head(rows).view(*x.shape, -1)


class _SequenceFirst(torch.nn.Module):
    """Runs sequence-first ([T, B, d]) and transposes the logits back to [B, T, V]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(40, 16)
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.embedding(x).transpose(0, 1))
        return self.head(hidden).transpose(0, 1)


@pytest.mark.parametrize("model_class", [_FlatTokens, _SequenceFirst])
def test_wrapper_output_layer_with_an_output_reshaped_after_the_layer(model_class: type) -> None:
    torch.manual_seed(0)
    net = model_class()
    x, y = torch.randint(0, 40, (4, 8)), torch.randint(0, 50, (4, 8))
    results = []
    for layer in (None, "head"):
        net.zero_grad()
        torch.manual_seed(3)
        out = rdrop.RDrop(net, alpha=1.0, output_layer=layer)(x, target=y)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got.task_loss, ref.task_loss.detach())
    torch.testing.assert_close(got.consistency_loss, ref.consistency_loss.detach())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_wrapper_output_layer_bad_input_is_named() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 5))
    with pytest.raises(ValueError, match="'head' is not a submodule"):
        rdrop.RDrop(net, output_layer="head")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        rdrop.RDrop(net, output_layer="1")
    with pytest.raises(ValueError, match="must be a submodule of the wrapped model"):
        rdrop.RDrop(net, output_layer=torch.nn.Linear(4, 5))
    with pytest.raises(ValueError, match="num_passes, mode"):
        rdrop.RDrop(net, output_layer="2", num_passes=3, mode="sequential")
    with pytest.raises(ValueError, match="task"):
        rdrop.RDrop(net, output_layer="2", task="mse")


def test_bypass_restores_the_layer_after_an_error() -> None:
    head = torch.nn.Linear(2, 3)
    with pytest.raises(RuntimeError), _output_layer.output_layer_bypassed(head):
        raise RuntimeError
    assert head(torch.zeros(1, 2)).shape == (1, 3)


def test_trainer_refuses_a_final_logits_bias_by_name() -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.2,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    ids = torch.randint(3, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with pytest.raises(ValueError, match="final_logits_bias"):
        _trainer(model, hidden_state_loss=True).compute_loss(model.train(), batch)
    assert torch.isfinite(_trainer(model).compute_loss(model.train(), batch))  # auto: logits


def test_trainer_under_ddp_keeps_an_untied_head_out_of_the_unused_parameter_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    model = _llama()  # untied lm_head
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        _trainer(model, hidden_state_loss=True).compute_loss(model.train(), _batch())
    args = TrainingArguments(
        tempfile.mkdtemp(), report_to="none", use_cpu=True, ddp_find_unused_parameters=False
    )
    trainer = RDropTrainer(model=model, args=args, alpha=2.0, hidden_state_loss=True)
    assert torch.isfinite(trainer.compute_loss(model.train(), _batch()))
