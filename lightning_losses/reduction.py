"""Masked sums and the one place that divides by a (global) count.

Every mean in the library is ``masked_sum / count``: over the valid elements of this batch, or over a
``global_count`` of the whole global batch (``global_valid_toks`` / ``global_valid_seqs``). A count of
zero gives exactly 0 with a zero gradient, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["count_valid", "divide_by_count", "masked_mean", "masked_sum"]


def masked_sum(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (all of them when ``mask`` is None).

    A floating mask acts as weights. Masked-out entries never reach the result, not even as NaN.

    >>> masked_sum(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([True, False, True]))
    tensor(4.)
    """
    if mask is None:
        return values.sum()
    if mask.dtype == torch.bool:
        return torch.where(mask, values, values.new_zeros(())).sum()
    weights = mask.to(values.dtype)
    return torch.where(weights != 0, values * weights, values.new_zeros(())).sum()


def count_valid(mask: Tensor | None, like: Tensor) -> Tensor:
    """Number (or total weight) of valid entries: ``mask.sum()``, or ``like.numel()`` without a mask."""
    if mask is None:
        return torch.full((), like.numel(), dtype=like.dtype, device=like.device)  # no host-to-device copy
    return mask.sum(dtype=like.dtype if like.is_floating_point() else None)


def divide_by_count(total: Tensor, count: Tensor | float | int) -> Tensor:
    """``total / count``, with ``count == 0`` giving 0 (the total of nothing) instead of NaN.

    ``count`` is a local or global count; it carries no gradient.

    >>> divide_by_count(torch.tensor(0.0), torch.tensor(0))
    tensor(0.)
    """
    if not isinstance(count, Tensor):  # a Python number: a tensor of it would be a host-to-device copy
        return total / (count if count > 0 else 1)
    if not count.is_floating_point():  # an integer count: one op less than the `where` below
        return total / count.clamp_min(1)
    count = count.detach().to(total.dtype)
    return total / torch.where(count > 0, count, 1.0)


def masked_mean(values: Tensor, mask: Tensor | None = None, global_count: Tensor | None = None) -> Tensor:
    """Masked mean: ``masked_sum(values, mask) / count``.

    ``count`` is ``global_count`` when given (the global batch's number of valid elements, so that
    partial results over micro-batches and ranks add up), else this batch's number of valid elements.

    >>> masked_mean(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0]))
    tensor(1.5000)
    >>> masked_mean(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0]), global_count=torch.tensor(4))
    tensor(0.7500)
    """
    if mask is None and global_count is None:  # the count is known on the host: one op, no count tensor
        return values.sum() / max(values.numel(), 1)
    total = masked_sum(values, mask)
    count = count_valid(mask, values) if global_count is None else global_count
    return divide_by_count(total, count)
