"""The dropout-consistency probe: how different are two dropout passes of a model?

The authors' diagnostic: measure the symmetric KL between two dropout passes on a batch.
If it is ~0 the model has (almost) no active dropout and R-Drop cannot do anything;
without R-Drop it tends to grow during training, with R-Drop it stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from rdrop._batch import LogitsGetter, find_batch_size
from rdrop._dropout import active_dropout_modules
from rdrop._passes import forward_passes
from rdrop.functional import ConsistencyKind, multi_pass_consistency

__all__ = ["ProbeResult", "dropout_consistency"]


@dataclass(frozen=True)
class ProbeResult:
    """Result of :func:`dropout_consistency`.

    Attributes:
        consistency: mean consistency term ``D`` between the passes (symmetric KL in nats
            for ``kind="kl"``), averaged over kept items and repeats.
        std: standard deviation of the per-item values (over items and repeats).
        num_items: number of items measured per repeat.
        dropout_modules: names of the dropout modules active during the probe.
    """

    consistency: float
    std: float
    num_items: int
    dropout_modules: tuple[str, ...]


@torch.no_grad()
def dropout_consistency(
    model: nn.Module,
    *args: Any,
    consistency_mask: Tensor | None = None,
    kind: ConsistencyKind = "kl",
    repeats: int = 1,
    logits_key: LogitsGetter = None,
    **kwargs: Any,
) -> ProbeResult:
    """Measure the consistency term between two dropout passes of ``model`` on a batch.

    Runs one forward on ``[x; x]`` in training mode (dropout on) without gradients, and
    restores the model's mode and the global RNG state afterwards, so probing during
    training changes neither the training nor its random stream.

    Example:
        >>> import torch, rdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3),
        ...                           torch.nn.Linear(32, 4))
        >>> result = rdrop.dropout_consistency(net, torch.randn(64, 8))
        >>> result.consistency > 0
        True

    Args:
        model: the model to probe.
        *args, **kwargs: the model's inputs (batch in dim 0). Every keyword other than
            the four below goes to the model, so a model argument named ``mask`` (an
            attention or padding mask) reaches the model.
        consistency_mask: optional item mask for the consistency term (e.g. real tokens),
            as ``mask`` of :func:`rdrop.symmetric_kl`; the model never sees it.
        kind: ``"kl"``, ``"mse"`` or ``"bernoulli_kl"``.
        repeats: number of independent pairs of passes to average.
        logits_key: where the logits are in the output (see :class:`rdrop.RDrop`).

    Returns:
        A :class:`ProbeResult`.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    batch_size = find_batch_size((args, kwargs))
    if batch_size is None:
        raise ValueError("could not find a batched tensor in the inputs to probe")
    modes = {module: module.training for module in model.modules()}
    values = []
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            # Dropout on, but layers with running statistics stay frozen: the probe must
            # not change the model (BatchNorm would update its running mean otherwise).
            for module in model.modules():
                if isinstance(module, _NormBase) and module.track_running_stats:
                    module.eval()
            active = tuple(active_dropout_modules(model))
            for _ in range(repeats):
                passes, _ = forward_passes(
                    model,
                    args,
                    kwargs,
                    batch_size=batch_size,
                    num_passes=2,
                    logits_key=logits_key,
                    remedy="Probe a smaller batch, or fix the model",
                    split_hint="pass logits_key= to pick the logits out of the output, or "
                    "move the batch to dim 0",
                )
                per_item = multi_pass_consistency(passes, consistency_mask, "none", kind=kind)
                if consistency_mask is not None:
                    keep = consistency_mask
                    if keep.shape != per_item.shape:
                        keep = keep.unsqueeze(-1)
                    per_item = per_item[keep.expand_as(per_item)]
                values.append(per_item)
    finally:
        for module, training in modes.items():
            module.training = training
    flat = torch.cat([v.reshape(-1) for v in values])
    return ProbeResult(
        consistency=float(flat.mean()) if flat.numel() else 0.0,
        std=float(flat.std()) if flat.numel() > 1 else 0.0,
        num_items=flat.numel() // repeats,
        dropout_modules=active,
    )
