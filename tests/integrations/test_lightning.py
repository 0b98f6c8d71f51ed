"""R-Drop in Lightning's training_step: real ``Trainer(max_steps=...)`` runs on CPU."""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import rdrop
from tests.integrations._helpers import ROOT, TinyNet, make_deterministic

L = pytest.importorskip("lightning")

from rdrop.integrations.lightning import RDropLightningMixin, log_rdrop  # noqa: E402


@pytest.fixture(scope="module")
def example() -> Any:
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield importlib.import_module("lightning_train")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _trainer(**overrides: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(**options)


def test_example_trains_and_logs_the_consistency_term(example: Any) -> None:
    metrics = example.main(["--max-steps", "50", "--accumulate", "2"])
    assert metrics["train/consistency_loss"] > 0
    assert metrics["train/loss"] == pytest.approx(
        metrics["train/task_loss"] + 0.5 * metrics["train/consistency_loss"], rel=1e-5
    )
    assert metrics["train/alpha"] == 1.0
    assert metrics["val/acc"] > 0.8  # real digits, 50 optimizer steps (0.91 when written)


class TinyModule(RDropLightningMixin, L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = rdrop.RDrop(net, alpha=2.0, warn=False)
        self.grads: dict[str, torch.Tensor] = {}
        self.unlabeled = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.rdrop_step(self.net, x, target=None if self.unlabeled else y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None
            }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))


def _first_grads(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = TinyModule(make_deterministic(TinyNet(p=0.4)))
    _trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(
        module, DataLoader(_tiny_data(), batch_size=batch_size, shuffle=False)
    )
    return module.grads


def test_accumulate_grad_batches_equals_full_batch() -> None:
    """Lightning divides by accumulate_grad_batches once; R-Drop must not divide again."""
    full, accumulated = _first_grads(8, 1), _first_grads(4, 2)
    assert full.keys() == accumulated.keys() and len(full) == 4
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unlabeled_batches_use_the_consistency_term_only() -> None:
    torch.manual_seed(0)
    module = TinyModule(TinyNet(p=0.4))
    module.unlabeled = True
    trainer = _trainer(max_steps=2)
    trainer.fit(module, DataLoader(_tiny_data(), batch_size=4))
    metrics = trainer.callback_metrics
    assert float(metrics["train/task_loss"]) == 0.0
    assert float(metrics["train/consistency_loss"]) > 0
    assert float(metrics["train/loss"]) == pytest.approx(float(metrics["train/consistency_loss"]))


def test_rdrop_step_rejects_an_unwrapped_model_or_eval_mode() -> None:
    module = TinyModule(TinyNet())
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    with pytest.raises(TypeError, match=r"rdrop\.RDrop"):
        module.rdrop_step(module.net.model, x, target=y)  # type: ignore[arg-type]
    module.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        module.rdrop_step(module.net, x, target=y)
    with pytest.raises(TypeError, match="RDropOutput"):
        log_rdrop(module, torch.tensor(1.0))  # type: ignore[arg-type]
