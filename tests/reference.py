"""Independent references written directly from the paper's formulas, in float64 NumPy."""

from __future__ import annotations

import numpy as np
import torch


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).cpu().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, with 0 * log(0 / q) = 0."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per item 1/2 (KL(P_a||P_b) + KL(P_b||P_a))."""
    la, lb = log_softmax(_np(a)), log_softmax(_np(b))
    return 0.5 * (kl(la, lb) + kl(lb, la))


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, smoothing: float = 0.0
) -> float:
    lp = log_softmax(_np(logits)).reshape(-1, logits.shape[-1])
    t = target.reshape(-1).numpy()
    keep = t != ignore_index
    if not keep.any():
        return float("nan")
    lp, t = lp[keep], t[keep]
    nll = -lp[np.arange(len(t)), t]
    smooth = -lp.mean(axis=-1)
    return float(((1 - smoothing) * nll + smoothing * smooth).mean())


def paper_eq4(
    logits_1: torch.Tensor, logits_2: torch.Tensor, target: torch.Tensor, alpha: float
) -> float:
    """Eq. 4: NLL(P1) + NLL(P2) + alpha/2 [KL(P1||P2) + KL(P2||P1)], means over items."""
    nll = cross_entropy(logits_1, target) + cross_entropy(logits_2, target)
    la = log_softmax(_np(logits_1)).reshape(-1, logits_1.shape[-1])
    lb = log_softmax(_np(logits_2)).reshape(-1, logits_1.shape[-1])
    return float(nll + alpha / 2 * (kl(la, lb).mean() + kl(lb, la).mean()))


def bernoulli_symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per element 1/2 (KL(Ber(p)||Ber(q)) + KL(Ber(q)||Ber(p))) from the definition."""
    p, q = 1 / (1 + np.exp(-_np(a))), 1 / (1 + np.exp(-_np(b)))

    def ber_kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x * np.log(x / y) + (1 - x) * np.log((1 - x) / (1 - y))

    return 0.5 * (ber_kl(p, q) + ber_kl(q, p))


def multi_pass_kl(outputs: list[torch.Tensor]) -> float:
    """1 / (m (m - 1)) * sum_{i != j} KL(P_i || P_j), mean over items."""
    m = len(outputs)
    logs = [log_softmax(_np(o)).reshape(-1, o.shape[-1]) for o in outputs]
    total = sum(kl(logs[i], logs[j]).mean() for i in range(m) for j in range(m) if i != j)
    return float(total / (m * (m - 1)))


def paper_multi_pass(outputs: list[torch.Tensor], target: torch.Tensor, alpha: float) -> float:
    """The paper's m-pass objective: sum_i NLL(P_i) + alpha / (m (m - 1)) sum_{i != j} KL."""
    nll = sum(cross_entropy(o, target) for o in outputs)
    return float(nll + alpha * multi_pass_kl(outputs))
