"""The RDrop wrapper on several model shapes, its options, warnings and errors."""

from __future__ import annotations

import warnings
from collections import UserDict
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import rdrop
from tests import reference


def mlp(dropout: float = 0.3, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, classes))


class TinyTransformer(nn.Module):
    """Token classifier with padding: ids [B, T], padding mask [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=padding_mask))


class KeywordDictModel(nn.Module):
    """Takes keyword tensors (a tokenizer-like batch) and returns a dict with logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.EmbeddingBag(30, 12, mode="sum")
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(12, 4)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, scale: float = 1.0
    ) -> dict[str, Any]:
        pooled = self.embed(input_ids, per_sample_weights=attention_mask.float())
        return {"hidden": pooled, "logits": self.head(self.drop(pooled)) * scale}


@dataclass
class ModelOutput:
    logits: torch.Tensor


class ObjectOutputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.net(x))


class TupleOutputModel(ObjectOutputModel):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = self.net(x)
        return logits, logits.sum()


class BatchEncoding(UserDict):
    """Stands in for transformers' BatchEncoding (a UserDict subclass)."""


def data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_concat_step_equals_manual_recipe() -> None:
    net = mlp()
    x, y = data()
    wrapped = rdrop.RDrop(net, alpha=5.0)
    torch.manual_seed(123)
    out = wrapped(x, target=y)
    torch.manual_seed(123)
    logits = net(torch.cat([x, x]))
    a, b = logits.chunk(2)
    assert out.loss.item() == pytest.approx(reference.paper_eq4(a, b, y, 5.0) / 2, rel=1e-5)
    torch.testing.assert_close(out.logits, a)
    assert out.consistency_loss.item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_one_forward_on_doubled_batch() -> None:
    net = mlp()
    sizes: list[int] = []
    net.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[0]))
    x, y = data(5)
    rdrop.RDrop(net)(x, target=y)
    assert sizes == [10]
    rdrop.RDrop(net, num_passes=3)(x, target=y)
    assert sizes == [10, 15]
    rdrop.RDrop(net, mode="sequential")(x, target=y)
    assert sizes == [10, 15, 5, 5]


def test_eval_is_the_bare_model_single_pass() -> None:
    net = mlp()
    x, y = data()
    wrapped = rdrop.RDrop(net).eval()
    calls: list[int] = []
    net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    torch.testing.assert_close(wrapped(x), net(x), rtol=0, atol=0)
    assert calls == [6, 6]
    out = wrapped(x, target=y)  # eval with a target: task loss of the single pass
    assert out.consistency_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(reference.cross_entropy(net(x), y), rel=1e-5)


def test_transformer_with_padding_token_level() -> None:
    model = TinyTransformer()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (3, 7), generator=g)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    padding[2, 3:] = True
    ids[padding] = 0
    target = ids.roll(-1, dims=1).masked_fill(padding, -100)
    wrapped = rdrop.RDrop(model, alpha=1.0)
    torch.manual_seed(5)
    out = wrapped(ids, padding, target=target)
    torch.manual_seed(5)
    logits = model(torch.cat([ids, ids]), torch.cat([padding, padding]))
    a, b = logits.chunk(2)
    keep = (target != -100).numpy()
    want_kl = reference.symmetric_kl(a, b)[keep].mean()
    assert out.consistency_loss.item() == pytest.approx(want_kl, rel=1e-5)
    assert out.logits.shape == (3, 7, 20)
    out.loss.backward()


def test_keyword_inputs_dict_output_and_inputs_not_mutated() -> None:
    model = KeywordDictModel()
    g = torch.Generator().manual_seed(4)
    batch = BatchEncoding(
        input_ids=torch.randint(0, 30, (4, 5), generator=g),
        attention_mask=torch.ones(4, 5, dtype=torch.long),
    )
    before = {k: v.clone() for k, v in batch.items()}
    ids_object = batch["input_ids"]
    wrapped = rdrop.RDrop(model)
    out = wrapped(**batch, scale=2.0, target=torch.tensor([0, 1, 2, 3]))
    assert out.logits.shape == (4, 4) and isinstance(out.outputs, dict)
    assert batch["input_ids"] is ids_object
    for key, value in batch.items():
        assert value.shape == (4, 5) and torch.equal(value, before[key])
    # a mapping passed positionally is rebuilt as the same type, not mutated
    seen: list[Any] = []

    class TakesMapping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, features: Any) -> Any:
            seen.append(type(features))
            return self.inner(**features)

    rdrop.RDrop(TakesMapping())(batch, target=torch.tensor([0, 1, 2, 3]))
    assert seen == [BatchEncoding] and batch["input_ids"].shape == (4, 5)


@pytest.mark.parametrize("model_cls", [ObjectOutputModel, TupleOutputModel])
def test_object_and_tuple_outputs(model_cls: type[nn.Module]) -> None:
    x, y = data()
    out = rdrop.RDrop(model_cls())(x, target=y)
    assert out.logits.shape == (6, 3) and out.loss.requires_grad


def test_logits_key_options() -> None:
    model = KeywordDictModel()
    ids, mask = torch.randint(0, 30, (2, 3)), torch.ones(2, 3)
    y = torch.tensor([0, 1])
    out = rdrop.RDrop(model, logits_key=lambda o: o["logits"])(ids, mask, target=y)
    assert out.logits.shape == (2, 4)
    with pytest.raises(
        ValueError, match="no key or attribute 'scores'.*keys: \\['hidden', 'logits'\\]"
    ):
        rdrop.RDrop(model, logits_key="scores")(ids, mask, target=y)

    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "no logits"

    with pytest.raises(ValueError, match="could not find logits in the model output of type str"):
        rdrop.RDrop(Nothing(), warn=False)(torch.zeros(2, 3), target=y)


def test_every_k_steps() -> None:
    net = mlp()
    sizes: list[int] = []
    net.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].shape[0]))
    wrapped = rdrop.RDrop(net, every_k_steps=2)
    x, y = data(4)
    outs = [wrapped(x, target=y) for _ in range(4)]
    assert sizes == [8, 4, 8, 4]
    assert [o.consistency_loss.item() > 0 for o in outs] == [True, False, True, False]
    assert outs[1].loss.item() == pytest.approx(outs[1].task_loss.item())
    assert wrapped.step == 4


def test_alpha_schedule_and_state_dict_keeps_step() -> None:
    net = mlp()
    wrapped = rdrop.RDrop(net, alpha=rdrop.linear_warmup(4.0, 4))
    x, y = data()
    alphas = [wrapped(x, target=y).alpha for _ in range(5)]
    assert alphas == [1.0, 2.0, 3.0, 4.0, 4.0]
    state = wrapped.state_dict()
    fresh = rdrop.RDrop(mlp(), alpha=rdrop.linear_warmup(4.0, 4))
    fresh.load_state_dict(state)
    assert fresh.step == 5
    custom = rdrop.RDrop(mlp(), alpha=lambda step: -1.0)
    with pytest.raises(ValueError, match="alpha schedule returned -1.0 at step 0"):
        custom(x, target=y)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        rdrop.linear_warmup(float("inf"), 10)
    with pytest.raises(TypeError, match="alpha must be a real number, got str"):
        rdrop.linear_warmup("5", 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        rdrop.linear_warmup(5.0, 10.0)  # type: ignore[arg-type]


def test_alpha_from_a_given_loss() -> None:
    criterion = rdrop.RDropLoss(alpha=0.7, label_smoothing=0.1)
    assert rdrop.RDrop(mlp(), loss=criterion).current_alpha() == 0.7
    assert rdrop.RDrop(mlp(), loss=criterion, alpha=2.0).current_alpha() == 2.0
    assert criterion.alpha == 0.7
    with pytest.raises(ValueError, match="label_smoothing, check_finite would be ignored"):
        rdrop.RDrop(mlp(), loss=criterion, label_smoothing=0.2, check_finite=False)


def test_sequential_dropout_rates_per_pass() -> None:
    net = mlp(dropout=0.1)
    rates: list[float] = []
    net[2].register_forward_hook(lambda module, inputs, output: rates.append(module.p))
    x, y = data()
    out = rdrop.RDrop(net, mode="sequential", dropout_rates=(0.1, 0.3))(x, target=y)
    assert rates == [0.1, 0.3] and net[2].p == 0.1
    out.loss.backward()


def test_stop_gradient_variant() -> None:
    net = mlp()
    x, y = data()
    wrapped = rdrop.RDrop(net, alpha=2.0, stop_gradient=True)
    torch.manual_seed(7)
    out = wrapped(x, target=y)
    out.loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(7)
    a = net(x)
    with torch.no_grad():
        b = net(x)
    want = torch.nn.functional.cross_entropy(a, y) + rdrop.symmetric_kl(a, b)
    want.backward()
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert out.task_loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(a, y).item(), rel=1e-6
    )


def test_unlabeled_step() -> None:
    net = mlp()
    x, _ = data()
    out = rdrop.RDrop(net, alpha=4.0).unlabeled(x)
    assert out.task_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(2.0 * out.consistency_loss.item())
    out.loss.backward()


def test_unlabeled_calls_keep_their_own_step_count() -> None:
    # One labeled and one unlabeled call per iteration: with every_k_steps=2 both terms
    # apply on iterations 0, 2, ... and a warm-up ramps both alphas at the same rate.
    wrapped = rdrop.RDrop(mlp(), alpha=rdrop.linear_warmup(3.0, 3), every_k_steps=2)
    x, y = data()
    labeled, unlabeled = [], []
    for _ in range(4):
        labeled.append(wrapped(x, target=y))
        unlabeled.append(wrapped.unlabeled(x))
    assert [o.consistency_loss.item() > 0 for o in labeled] == [True, False, True, False]
    assert [o.consistency_loss.item() > 0 for o in unlabeled] == [True, False, True, False]
    assert [o.alpha for o in unlabeled] == [o.alpha for o in labeled] == [1.0, 2.0, 3.0, 3.0]
    assert (wrapped.step, wrapped.unlabeled_step) == (4, 4)
    fresh = rdrop.RDrop(mlp(), alpha=1.0)
    fresh.load_state_dict(wrapped.state_dict())
    assert (fresh.step, fresh.unlabeled_step) == (4, 4)


def test_flags_and_logits_key_are_checked_when_the_wrapper_is_built() -> None:
    for name in ("stop_gradient", "warn", "check_finite"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got str 'False'"):
            rdrop.RDrop(mlp(), **{name: "False"})
    with pytest.raises(TypeError, match="check_finite must be a bool, got int"):
        rdrop.RDropLoss(check_finite=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logits_key must be None, a str, an int or a callable"):
        rdrop.RDrop(mlp(), logits_key=1.5)  # type: ignore[arg-type]


def test_numpy_numbers_are_accepted_like_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    wrapped = rdrop.RDrop(mlp(), alpha=np.float32(0.5), num_passes=np.int64(3))
    assert wrapped.num_passes == 3 and type(wrapped.num_passes) is int
    assert wrapped.current_alpha() == 0.5
    x, y = data()
    assert torch.isfinite(wrapped(x, target=y).loss)
    with pytest.raises(TypeError, match="num_passes must be an int, got float64"):
        rdrop.RDrop(mlp(), num_passes=np.float64(3))


def test_training_reduces_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    wrapped = rdrop.RDrop(mlp(), alpha=1.0)
    opt = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = wrapped(x, target=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.task_loss.item()
    assert out.task_loss.item() < 0.5 * first
    wrapped.eval()
    accuracy = (wrapped(x).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.85


def test_warns_without_active_dropout() -> None:
    x, y = data()
    with pytest.warns(rdrop.RDropWarning, match="no active dropout"):
        out = rdrop.RDrop(mlp(dropout=0.0))(x, target=y)
    assert out.consistency_loss.item() == 0.0


def test_warns_when_inner_model_is_in_eval_mode() -> None:
    net = mlp()
    wrapped = rdrop.RDrop(net)
    net.eval()
    with pytest.warns(rdrop.RDropWarning, match="wrapped model is in eval mode"):
        wrapped(*data()[:1], target=data()[1])


def test_warns_about_batchnorm_once() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 3))
    wrapped = rdrop.RDrop(net)
    x, y = data()
    with pytest.warns(rdrop.RDropWarning, match="BatchNorm layers in training mode \\(1\\)"):
        wrapped(x, target=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x, target=y)


def test_no_warning_for_a_normal_model() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rdrop.RDrop(mlp())(*data()[:1], target=data()[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"alpha": -0.5}, ValueError, "alpha must be a finite number >= 0, got -0.5"),
        ({"every_k_steps": 0}, ValueError, "every_k_steps must be >= 1, got 0"),
        ({"num_passes": 1}, ValueError, "num_passes must be >= 2"),
        ({"num_passes": 2.0}, TypeError, "num_passes must be an int"),
        ({"mode": "parallel"}, ValueError, "mode must be"),
        ({"dropout_rates": (0.1, 0.3)}, ValueError, "dropout_rates needs mode='sequential'"),
        ({"dropout_rates": (0.1,), "mode": "sequential"}, ValueError, "one rate per pass"),
        ({"dropout_rates": (0.1, 1.0), "mode": "sequential"}, ValueError, r"\[0, 1\)"),
        ({"loss": torch.nn.CrossEntropyLoss()}, TypeError, "loss must be an rdrop.RDropLoss"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        rdrop.RDrop(mlp(), **kwargs)


def test_missing_target_and_not_a_module() -> None:
    with pytest.raises(ValueError, match="target is required in training mode"):
        rdrop.RDrop(mlp())(torch.zeros(2, 8))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rdrop.RDrop(lambda x: x)  # type: ignore[arg-type]


def test_model_that_cannot_take_the_doubled_batch() -> None:
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("bias", torch.zeros(6, 3))
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + self.bias

    x, y = data()
    with pytest.raises(
        RuntimeError, match="concatenated R-Drop batch of 2 x 6 rows.*mode='sequential'"
    ):
        rdrop.RDrop(FixedBatch())(x, target=y)
    out = rdrop.RDrop(FixedBatch(), mode="sequential")(x, target=y)
    assert out.logits.shape == (6, 3)

    class SequenceFirst(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(x, 0.1).unsqueeze(0)

    with pytest.raises(ValueError, match="expects the batch in dim 0"):
        rdrop.RDrop(SequenceFirst(), warn=False)(x, target=y)
