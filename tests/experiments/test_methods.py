"""Each runner method's objective against hand-written math on tiny models.

The method's step (forward and backward) runs under one torch seed, the reference under
the same seed in the same forward order, so dropout masks agree; MixUp's draws (lam, the
permutation, the layer) are fixed through the library's sampling functions, so the
reference mixes by hand with known values.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rdrop_lab.config import ConfigError, RunConfig, is_plain_rdrop
from rdrop_lab.methods import METHODS, RunContext, get_method, method_specs
from rdrop_lab.methods.core import UnlabeledBatches
from rdrop_lab.tasks import get_task
from tests.experiments._toy import (
    B,
    C,
    T,
    ToyImage,
    ToyImageTask,
    ToyRegression,
    ToyTask,
    ToyText,
    V,
    _collate,
    examples,
    grads,
    manual_forward,
    mixed_ce,
    sym_kl,
)

# The submodules (the package re-exports functions of the same names).
mixup_module = importlib.import_module("rdrop.regularizers.mixup")
manifold_module = importlib.import_module("rdrop.regularizers.manifold")

LAM = 0.3
PERM = torch.tensor([2, 0, 3, 1])
ALPHA = 1.5


@pytest.fixture
def fixed_draws(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """MixUp / Manifold MixUp draw lam = 0.3, perm = [2, 0, 3, 1] and ``state['layer']``."""
    state: dict[str, Any] = {"layer": 0}
    for module in (mixup_module, manifold_module):
        monkeypatch.setattr(module, "sample_lam", lambda alpha, generator: LAM)
        monkeypatch.setattr(module, "sample_perm", lambda n, generator, device: PERM[:n].to(device))
    monkeypatch.setattr(manifold_module, "sample_index", lambda n, generator: state["layer"])
    return state


def setup(method: str, task: Any = None, **changes: Any) -> tuple[Any, ...]:
    torch.manual_seed(0)
    task = task or ToyTask()
    model = ToyText(classes=task.num_labels)
    ids = torch.randint(0, V, (B, T))
    target = torch.tensor([0, 1, 2, 1]) if task.kind == "classification" else torch.rand(B) * 5
    alpha = ALPHA if METHODS[method].uses_alpha else None
    config = RunConfig(task.name, method, alpha=alpha, **changes)
    METHODS[method].check(task, config)
    context = RunContext(_collate, torch.Generator().manual_seed(0))
    return task, model, ids, target, config, context


def run_step(method: str, task: Any, model: Any, ids: Any, target: Any, config: Any,
             context: Any, seed: int = 1) -> Any:  # fmt: skip
    step = METHODS[method].prepare(model, task, config, context)
    torch.manual_seed(seed)
    return step({"input_ids": ids}, target)


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- registry


def test_every_method_declares_cost_alpha_and_options() -> None:
    expected = {
        # name: (uses_alpha, costs_like_rdrop, options)
        "baseline": (False, False, set()),
        "rdrop": (
            True,
            True,
            {"every_k_steps", "num_passes", "dropout_rates", "stop_gradient", "branch_at"},
        ),
        "doubled_batch": (False, True, set()),
        "label_smoothing": (False, False, {"label_smoothing"}),
        "mixup": (False, False, {"mixup_alpha"}),
        "manifold_mixup": (False, False, {"manifold_mixup_alpha"}),
        "fgm": (False, False, {"fgm_epsilon"}),
        "rdrop_label_smoothing": (True, True, {"label_smoothing"}),
        "rdrop_mixup": (True, True, {"mixup_alpha"}),
        "rdrop_manifold_mixup": (True, True, {"manifold_mixup_alpha"}),
        "rdrop_fgm": (True, False, {"fgm_epsilon"}),
        "rdrop_semi": (True, False, {"unlabeled_size"}),
    }
    assert set(METHODS) == set(expected)
    for name, (alpha, costs, options) in expected.items():
        method = get_method(name)
        assert (method.uses_alpha, method.costs_like_rdrop, set(method.fields)) == (
            alpha,
            costs,
            options,
        ), name
    assert method_specs()["rdrop_fgm"].uses_alpha
    with pytest.raises(ValueError, match="unknown method 'mixupp'"):
        get_method("mixupp")


@pytest.mark.parametrize(
    ("changes", "plain"),
    [
        ({}, True),
        ({"every_k_steps": 5}, False),
        ({"num_passes": 3}, False),
        ({"dropout_rates": (0.1, 0.3)}, False),
        ({"stop_gradient": True}, False),
    ],
)
def test_only_plain_rdrop_costs_like_rdrop(changes: dict[str, Any], plain: bool) -> None:
    config = RunConfig("sst2", "rdrop", alpha=1.0, **changes)
    assert is_plain_rdrop(config) is plain
    assert METHODS["rdrop"].costs_like_rdrop_for(config) is plain


# --------------------------------------------------------------------------- single pass


@pytest.mark.parametrize(("smoothing", "expected"), [(None, 0.1), (0.2, 0.2)])
def test_label_smoothing_is_smoothed_cross_entropy(
    smoothing: float | None, expected: float
) -> None:
    task, model, ids, y, config, context = setup("label_smoothing", label_smoothing=smoothing)
    reference_model = copy.deepcopy(model)
    out = run_step("label_smoothing", task, model, ids, y, config, context)
    torch.manual_seed(1)
    reference = F.cross_entropy(reference_model(ids), y, label_smoothing=expected)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    assert_same_grads(grads(model), grads(reference_model))
    assert METHODS["label_smoothing"].settings(task, config) == {"label_smoothing": expected}


def test_baseline_is_plain_cross_entropy() -> None:
    task, model, ids, y, config, context = setup("baseline")
    out = run_step("baseline", task, model, ids, y, config, context)
    torch.manual_seed(1)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(ids), y))


@pytest.mark.parametrize(
    ("method", "layer"), [("mixup", "embeddings"), ("manifold_mixup", "layer0")]
)
def test_text_mixup_mixes_hidden_states_and_labels(
    fixed_draws: dict[str, Any], method: str, layer: str
) -> None:
    fixed_draws["layer"] = 1 if layer == "layer0" else 0
    task, model, ids, y, config, context = setup(method)
    reference_model = copy.deepcopy(model)
    out = run_step(method, task, model, ids, y, config, context)
    torch.manual_seed(1)
    z = manual_forward(reference_model, ids, layer, LAM, PERM)
    reference = mixed_ce(z, y, LAM, PERM)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    assert_same_grads(grads(model), grads(reference_model))
    expected_layers = ["embeddings"] if method == "mixup" else ["embeddings", "layer0"]
    assert context.counters["mixing_layers"] == expected_layers


def test_image_mixup_mixes_the_input_tensor(fixed_draws: dict[str, Any]) -> None:
    task = ToyImageTask()
    torch.manual_seed(0)
    model, reference_model = ToyImage(), None
    reference_model = copy.deepcopy(model)
    x, y = torch.randn(B, 2, 4), torch.tensor([0, 1, 2, 1])
    config = RunConfig("toy_image", "mixup")
    context = RunContext(_collate, torch.Generator().manual_seed(0))
    assert METHODS["mixup"].settings(task, config)["mixup_alpha"] == 1.0  # raw inputs
    step = METHODS["mixup"].prepare(model, task, config, context)
    torch.manual_seed(1)
    out = step({"pixel_values": x}, y)
    torch.manual_seed(1)
    reference = mixed_ce(reference_model(LAM * x + (1 - LAM) * x[PERM]), y, LAM, PERM)
    torch.testing.assert_close(out.loss, reference)
    with pytest.raises(ConfigError, match="task 'toy_image' defines no mixing layers"):
        METHODS["manifold_mixup"].prepare(ToyImage(), task, config, context)


def test_regression_mixup_mixes_targets_linearly(fixed_draws: dict[str, Any]) -> None:
    task, model, ids, y, config, context = setup("mixup", ToyRegression())
    reference_model = copy.deepcopy(model)
    out = run_step("mixup", task, model, ids, y, config, context)
    torch.manual_seed(1)
    prediction = manual_forward(reference_model, ids, "embeddings", LAM, PERM).reshape(-1)
    reference = F.mse_loss(prediction, LAM * y + (1 - LAM) * y[PERM])
    torch.testing.assert_close(out.loss, reference)


def test_mixup_alpha_defaults_and_override() -> None:
    text, image = ToyTask(), ToyImageTask()
    method, manifold = METHODS["mixup"], METHODS["manifold_mixup"]
    assert method.settings(text, RunConfig("toy", "mixup"))["mixup_alpha"] == 0.2
    assert method.settings(image, RunConfig("toy", "mixup"))["mixup_alpha"] == 1.0
    assert method.settings(text, RunConfig("toy", "mixup", mixup_alpha=0.4))["mixup_alpha"] == 0.4
    settings = manifold.settings(text, RunConfig("toy", "manifold_mixup"))
    assert settings["manifold_mixup_alpha"] == 2.0


def test_fgm_adds_the_adversarial_gradient_and_restores_the_weight() -> None:
    task, model, ids, y, config, context = setup("fgm", fgm_epsilon=0.5)
    reference_model = copy.deepcopy(model)
    original = model.embeddings.weight.detach().clone()
    seen: list[torch.Tensor] = []
    model.embeddings.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.detach().clone())
    )
    out = run_step("fgm", task, model, ids, y, config, context)
    # Reference: clean loss, backward, r = eps g / ||g||, adversarial loss, backward.
    torch.manual_seed(1)
    clean = F.cross_entropy(reference_model(ids), y)
    clean.backward()
    g = reference_model.embeddings.weight.grad.detach().clone()
    with torch.no_grad():
        reference_model.embeddings.weight += 0.5 * g / g.norm()
    adversarial = F.cross_entropy(reference_model(ids), y)
    adversarial.backward()
    with torch.no_grad():
        reference_model.embeddings.weight.copy_(original)
    torch.testing.assert_close(out.loss, clean + adversarial)
    torch.testing.assert_close(out.task_loss, clean)
    assert_same_grads(grads(model), grads(reference_model))
    assert len(seen) == 2 and torch.equal(seen[0], original)
    assert float((seen[1] - original).norm()) == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(model.embeddings.weight, original)  # restored exactly


def test_fgm_refuses_a_task_without_embeddings() -> None:
    config = RunConfig("toy_image", "fgm")
    context = RunContext(_collate, torch.Generator())
    for name in ("fgm", "rdrop_fgm"):
        with pytest.raises(ConfigError, match="task 'toy_image' defines none"):
            METHODS[name].prepare(ToyImage(), ToyImageTask(), config, context)


# --------------------------------------------------------------------------- R-Drop family


def rdrop_reference(model: ToyText, ids: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0):
    torch.manual_seed(1)
    za, zb = model(torch.cat([ids, ids])).chunk(2)
    task = 0.5 * (
        F.cross_entropy(za, y, label_smoothing=smoothing)
        + F.cross_entropy(zb, y, label_smoothing=smoothing)
    )
    return task + ALPHA / 2 * sym_kl(za, zb)


@pytest.mark.parametrize(("method", "smoothing"), [("rdrop", 0.0), ("rdrop_label_smoothing", 0.1)])
def test_rdrop_and_rdrop_label_smoothing(method: str, smoothing: float) -> None:
    task, model, ids, y, config, context = setup(method)
    reference_model = copy.deepcopy(model)
    out = run_step(method, task, model, ids, y, config, context)
    reference = rdrop_reference(reference_model, ids, y, smoothing)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    assert_same_grads(grads(model), grads(reference_model))


def test_doubled_batch_has_no_kl() -> None:
    task, model, ids, y, config, context = setup("doubled_batch")
    out = run_step("doubled_batch", task, model, ids, y, config, context)
    torch.manual_seed(1)
    za, zb = model(torch.cat([ids, ids])).chunk(2)
    torch.testing.assert_close(out.loss, 0.5 * (F.cross_entropy(za, y) + F.cross_entropy(zb, y)))


def test_rdrop_every_k_steps() -> None:
    task, model, ids, y, config, context = setup("rdrop", every_k_steps=2)
    step = METHODS["rdrop"].prepare(model, task, config, context)
    values = []
    for i in range(3):
        torch.manual_seed(10 + i)
        values.append(step({"input_ids": ids}, y))
        model.zero_grad()
    for i, out in enumerate(values):
        torch.manual_seed(10 + i)
        if i % 2 == 0:  # steps 0, 2: R-Drop
            za, zb = model(torch.cat([ids, ids])).chunk(2)
            expected = 0.5 * (F.cross_entropy(za, y) + F.cross_entropy(zb, y))
            expected = expected + ALPHA / 2 * sym_kl(za, zb)
        else:  # step 1: a plain single pass
            expected = F.cross_entropy(model(ids), y)
            assert float(out.consistency_loss) == 0.0
        torch.testing.assert_close(out.loss, expected)


def test_rdrop_three_passes() -> None:
    task, model, ids, y, config, context = setup("rdrop", num_passes=3)
    out = run_step("rdrop", task, model, ids, y, config, context)
    torch.manual_seed(1)
    z = model(torch.cat([ids, ids, ids])).chunk(3)
    logp = [zi.log_softmax(-1) for zi in z]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    kl = sum((logp[i].exp() * (logp[i] - logp[j])).sum(-1).mean() for i, j in pairs) / 6
    # The paper's m-pass objective (sum of the NLLs + alpha * kl) divided by m = 3.
    expected = (sum(F.cross_entropy(zi, y) for zi in z) + ALPHA * kl) / 3
    torch.testing.assert_close(out.loss, expected)


def test_rdrop_two_dropout_rates_run_sequential_passes() -> None:
    task, model, ids, y, config, context = setup("rdrop", dropout_rates=[0.1, 0.5])
    assert config.dropout_rates == (0.1, 0.5)
    out = run_step("rdrop", task, model, ids, y, config, context)
    torch.manual_seed(1)
    model.dropout.p = 0.1
    za = model(ids)
    model.dropout.p = 0.5
    zb = model(ids)
    model.dropout.p = 0.3
    expected = 0.5 * (F.cross_entropy(za, y) + F.cross_entropy(zb, y)) + ALPHA / 2 * sym_kl(za, zb)
    torch.testing.assert_close(out.loss, expected)
    assert METHODS["rdrop"].settings(task, config)["mode"] == "sequential"


def test_rdrop_stop_gradient() -> None:
    task, model, ids, y, config, context = setup("rdrop", stop_gradient=True)
    reference_model = copy.deepcopy(model)
    out = run_step("rdrop", task, model, ids, y, config, context)
    torch.manual_seed(1)
    za = reference_model(ids)
    with torch.no_grad():
        zb = reference_model(ids)
    expected = F.cross_entropy(za, y) + ALPHA / 2 * sym_kl(za, zb)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert_same_grads(grads(model), grads(reference_model))


@pytest.mark.parametrize(
    ("method", "layer"), [("rdrop_mixup", "embeddings"), ("rdrop_manifold_mixup", "layer0")]
)
def test_rdrop_mixup_mixes_within_each_pass(
    fixed_draws: dict[str, Any], method: str, layer: str
) -> None:
    fixed_draws["layer"] = 1 if layer == "layer0" else 0
    task, model, ids, y, config, context = setup(method)
    reference_model = copy.deepcopy(model)
    out = run_step(method, task, model, ids, y, config, context)
    torch.manual_seed(1)
    za, zb = manual_forward(reference_model, torch.cat([ids, ids]), layer, LAM, PERM).chunk(2)
    expected = 0.5 * (mixed_ce(za, y, LAM, PERM) + mixed_ce(zb, y, LAM, PERM))
    expected = expected + ALPHA / 2 * sym_kl(za, zb)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert_same_grads(grads(model), grads(reference_model))


def test_rdrop_mixup_regression_uses_mse_consistency(fixed_draws: dict[str, Any]) -> None:
    task, model, ids, y, config, context = setup("rdrop_mixup", ToyRegression())
    out = run_step("rdrop_mixup", task, model, ids, y, config, context)
    torch.manual_seed(1)
    pa, pb = manual_forward(model, torch.cat([ids, ids]), "embeddings", LAM, PERM).chunk(2)
    y_mix = LAM * y + (1 - LAM) * y[PERM]
    task_part = 0.5 * (F.mse_loss(pa.reshape(-1), y_mix) + F.mse_loss(pb.reshape(-1), y_mix))
    expected = task_part + ALPHA / 2 * ((pa - pb) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)


def test_rdrop_fgm_is_rdrop_clean_plus_one_adversarial_pass() -> None:
    task, model, ids, y, config, context = setup("rdrop_fgm")
    reference_model = copy.deepcopy(model)
    original = model.embeddings.weight.detach().clone()
    out = run_step("rdrop_fgm", task, model, ids, y, config, context)
    clean = rdrop_reference(reference_model, ids, y)
    clean.backward()
    g = reference_model.embeddings.weight.grad.detach().clone()
    with torch.no_grad():
        reference_model.embeddings.weight += 1.0 * g / g.norm()
    adversarial = F.cross_entropy(reference_model(ids), y)  # ONE dropout pass
    adversarial.backward()
    torch.testing.assert_close(out.loss, clean + adversarial)
    assert_same_grads(grads(model), grads(reference_model))
    assert torch.equal(model.embeddings.weight, original)


def test_rdrop_semi_adds_the_unlabeled_consistency() -> None:
    task, model, ids, y, config, context = setup("rdrop_semi", unlabeled_size=6)
    pool = examples(6, seed=3)
    context.unlabeled = pool
    order_generator = torch.Generator().manual_seed(0)  # the context's generator, cloned
    reference_model = copy.deepcopy(model)
    out = run_step("rdrop_semi", task, model, ids, y, config, context)
    assert context.counters["unlabeled_seen"] == B
    order = torch.randperm(len(pool), generator=order_generator).tolist()[:B]
    u = _collate([pool[i] for i in order])[0]["input_ids"]
    labelled = rdrop_reference(reference_model, ids, y)  # seeds 1, then the unlabeled pass
    ua, ub = reference_model(torch.cat([u, u])).chunk(2)
    expected = labelled + ALPHA / 2 * sym_kl(ua, ub)
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    assert_same_grads(grads(model), grads(reference_model))


def test_unlabeled_batches_cover_the_pool_then_reshuffle() -> None:
    pool = examples(5)
    batches = UnlabeledBatches(pool, _collate, torch.Generator().manual_seed(0))
    seen = [batches.next(2)["input_ids"] for _ in range(5)]  # 10 rows = 2 passes
    rows = torch.cat(seen)
    first, second = rows[:5], rows[5:]
    as_set = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_set(first) == as_set(second) == as_set(_collate(pool)[0]["input_ids"])
    assert batches.seen == 10


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("task", "method", "changes", "pattern"),
    [
        ("stsb", "label_smoothing", {}, "not defined for task 'stsb', a regression task"),
        ("stsb", "rdrop_label_smoothing", {}, "task 'stsb'"),
        ("multi30k", "mixup", {}, "not defined for task 'multi30k', a sequence task"),
        ("multi30k", "fgm", {}, "task 'multi30k'"),
        ("sst2", "rdrop_semi", {}, "needs unlabeled_size"),
        ("sst2", "baseline", {"every_k_steps": 5}, "every_k_steps=5 is not an option of"),
        (
            "sst2",
            "mixup",
            {"fgm_epsilon": 0.5},
            "fgm_epsilon=0.5 is not an option of method 'mixup'",
        ),
        ("sst2", "rdrop", {"unlabeled_size": 10}, "unlabeled_size=10 is not an option"),
    ],
)
def test_methods_refuse_what_they_cannot_run(
    task: str, method: str, changes: dict[str, Any], pattern: str
) -> None:
    alpha = 1.0 if METHODS[method].uses_alpha else None
    with pytest.raises(ConfigError, match=pattern):
        METHODS[method].check(get_task(task), RunConfig(task, method, alpha=alpha, **changes))


def test_methods_needing_alpha_refuse_none() -> None:
    with pytest.raises(ConfigError, match="needs alpha"):
        METHODS["rdrop_mixup"].check(ToyTask(), RunConfig("toy", "rdrop_mixup"))


def test_glue_hooks_name_real_minilm_modules() -> None:
    pytest.importorskip("transformers")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    task = get_task("sst2")
    names = dict(model.named_modules())
    layers = task.mixing_layers(model)
    assert layers == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert all(name in names for name in layers)
    assert task.embedding_module(model) is model.bert.embeddings.word_embeddings
    assert task.mixup_input_key is None
    assert C == 3  # the toy task's classes (sanity of the helpers)
