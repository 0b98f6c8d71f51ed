"""Double backward for the fused kernels: when a backward pass itself builds a graph
(``create_graph=True``, ``torch.autograd.functional.hvp``, gradient penalties), the
kernels recompute their outputs from the saved inputs with plain autograd ops and
differentiate those, so second-order gradients are exact instead of silently zero.

The fast path is untouched: the engine runs a backward with grad mode on only when the
caller asked for a graph of the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def building_graph() -> bool:
    """Whether the backward pass being run must itself be differentiable."""
    return torch.is_grad_enabled()


def _cross_entropy_rows(z: Tensor, target: Tensor, keep: Tensor | None, smoothing: float) -> Tensor:
    t = target if keep is None else target.masked_fill(~keep, 0)
    ce = F.cross_entropy(z, t, reduction="none", label_smoothing=smoothing)
    return ce if keep is None else torch.where(keep, ce, torch.zeros((), dtype=ce.dtype))


def rows_reference(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
) -> tuple[Tensor, Tensor | None]:
    """Per-row ``(kl [R], ce [2, R] or None)`` of two passes, as the fused kernel
    defines them (``y=None``: ``x`` holds both passes, pass a first)."""
    from rdrop.functional import symmetric_kl_reference

    dtype = torch.promote_types(x.dtype, torch.float32)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    if y is None:
        a, b = x2.chunk(2)
    else:
        a, b = x2, y.reshape(-1, y.shape[-1]).to(dtype)
    kl = symmetric_kl_reference(a, b, kl_keep, "none")
    if target is None:
        return kl, None
    ce = torch.stack(
        [
            _cross_entropy_rows(a, target, ce_keep, smoothing),
            _cross_entropy_rows(b, target, ce_keep, smoothing),
        ]
    )
    return kl, ce


def linear_reference_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    n_ce: int,
    n_kl: int,
    alpha: float,
    smoothing: float,
) -> Tensor:
    """The loss of the fused hidden-state kernel, through the full logits."""
    from rdrop.functional import symmetric_kl_reference

    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).to(dtype)
    a, b = z.chunk(2)
    kl = symmetric_kl_reference(a, b, kl_keep, "sum") / max(n_kl, 1)
    loss = (alpha / 2.0) * kl
    if target is not None:
        ce = _cross_entropy_rows(a, target, ce_keep, smoothing)
        ce = ce + _cross_entropy_rows(b, target, ce_keep, smoothing)
        loss = loss + ce.sum() / max(2 * n_ce, 1)
    return loss


def differentiable_grads(
    outputs: Sequence[Tensor | None],
    grad_outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """``d(outputs)/d(inputs)`` weighted by ``grad_outputs``, with a graph of its own;
    ``None`` for the inputs in ``needs`` that are not wanted (or ``None``)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
    wanted = [i for i, (x, need) in enumerate(zip(inputs, needs)) if need and x is not None]
    grads: list[Tensor | None] = [None] * len(inputs)
    if not wanted or not pairs:
        return grads
    found = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wanted],  # type: ignore[misc]
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
    )
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])  # type: ignore[arg-type]
    return grads


def rows_second_order(
    x: Tensor,
    y: Tensor | None,
    target: Tensor | None,
    ce_keep: Tensor | None,
    kl_keep: Tensor | None,
    smoothing: float,
    grad_kl: Tensor,
    grad_ce: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The differentiable gradients ``(d/dx, d/dy)`` of the per-row kernels' outputs
    weighted by ``grad_kl``, ``grad_ce``: what their backward returns in a double backward."""
    with torch.enable_grad():
        kl, ce = rows_reference(x, y, target, ce_keep, kl_keep, smoothing)
    return differentiable_grads([kl, ce], [grad_kl, grad_ce], [x, y], needs)


def linear_second_order(
    inputs: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    reference_args: tuple[int, int, float, float],
    grad_loss: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The differentiable gradients w.r.t. ``hidden, weight, bias`` of the hidden-state
    loss (``inputs``: hidden, weight, bias, target, ce_keep, kl_keep; ``reference_args``:
    n_ce, n_kl, alpha, smoothing), for its backward in a double backward."""
    hidden, weight, bias = inputs[:3]
    with torch.enable_grad():
        loss = linear_reference_loss(*inputs, *reference_args)
    return differentiable_grads([loss], [grad_loss], [hidden, weight, bias], needs)
