"""Reference implementations the fast paths are measured against."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def official_readme_kl(p: Tensor, q: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """``compute_kl_loss`` exactly as the official R-Drop README writes it.

    Softmax targets, ``reduction="none"``, then a sum (github.com/dropreg/R-Drop).
    """
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")
    if pad_mask is not None:
        p_loss.masked_fill_(pad_mask, 0.0)
        q_loss.masked_fill_(pad_mask, 0.0)
    p_loss = p_loss.sum()
    q_loss = q_loss.sum()
    return (p_loss + q_loss) / 2


def log_target_kl(p: Tensor, q: Tensor) -> Tensor:
    """Symmetric KL with ``log_target=True``, mean over rows (rdrop's value convention)."""
    lp, lq = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
    kl_pq = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    kl_qp = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)  # KL(q || p)
    return (0.5 * (kl_pq + kl_qp)).mean()


def official_readme_loss(logits: Tensor, target: Tensor, alpha: float) -> Tensor:
    """The official README's training objective on the two halves of ``logits``."""
    a, b = logits.chunk(2)
    ce = 0.5 * (F.cross_entropy(a, target) + F.cross_entropy(b, target))
    return ce + alpha * official_readme_kl(a, b)


def relative_error(got: Tensor, want: Tensor) -> float:
    """``||got - want|| / ||want||`` in float64."""
    got, want = got.detach().double(), want.detach().double()
    norm = float(want.norm())
    return float((got - want).norm()) / norm if norm else float((got - want).norm())


__all__ = ["log_target_kl", "official_readme_kl", "official_readme_loss", "relative_error"]
