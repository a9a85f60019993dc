"""The global item count that makes accumulated and data-parallel reductions exact."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def num_items(mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
              labels: torch.Tensor | Sequence[torch.Tensor] | None = None, *, ignore_index: int = -100,
              sequences: bool = False, process_group=None) -> torch.Tensor:
    """Count what a reduction divides by, over every micro-batch of a step and every rank.

    Pass the masks (or labels) of all the micro-batches that make up one optimizer step (a
    tensor or a list of them); the count is summed across the ranks of ``process_group`` (the
    default group) when torch.distributed is initialized. Give the result to
    ``loss_fn(..., num_items=...)`` in every micro-batch and the accumulated gradient equals the
    gradient of the one big batch. ``sequences=True`` counts sequences (the first dimension) for
    ``reduction="sequence"`` and ``"batchmean"`` instead of unmasked tokens.

    Returns a 0-dim int64 tensor on the inputs' device (no host synchronization).
    """
    if (mask is None) == (labels is None):
        raise ValueError("kdplug.num_items: pass mask= or labels=, exactly one of them")
    items = mask if mask is not None else labels
    items = [items] if isinstance(items, torch.Tensor) else list(items)
    if not items or not all(isinstance(x, torch.Tensor) for x in items):
        raise TypeError("kdplug.num_items: expected a tensor or a non-empty list of tensors")
    total = torch.zeros((), dtype=torch.int64, device=items[0].device)
    for x in items:
        if sequences:
            if x.dim() == 0:
                raise ValueError("kdplug.num_items: sequences=True needs a batch dimension")
            total = total + x.shape[0]
        else:
            keep = x.bool() if mask is not None else x != ignore_index
            total = total + keep.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=process_group)
    return total
