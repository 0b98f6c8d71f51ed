"""Which rows of two passes enter the fused R-Drop loss, shared by its kernels."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["live_row_ids", "live_rows"]


def live_rows(ce_keep: Tensor | None, kl_keep: Tensor | None, has_target: bool) -> Tensor | None:
    """Rows that enter the loss (``None``: all): KL-kept, or CE-kept with a target.

    Example:
        >>> keep = torch.tensor([True, False, False])
        >>> live_rows(keep, torch.tensor([False, False, True]), has_target=True).tolist()
        [True, False, True]
    """
    if not has_target:
        return kl_keep
    return None if ce_keep is None or kl_keep is None else ce_keep | kl_keep


def live_row_ids(live: Tensor | None, num_rows: int, device: torch.device) -> Tensor:
    """The ids of the rows in ``live`` (``None``: all ``num_rows``), ascending. One host
    sync when ``live`` is given (its count).

    Example:
        >>> live_row_ids(torch.tensor([True, False, True]), 3, torch.device("cpu")).tolist()
        [0, 2]
    """
    if live is None:
        return torch.arange(num_rows, device=device)
    return live.nonzero()[:, 0]
