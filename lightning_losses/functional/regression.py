"""Mean squared error with an optional mask or weights."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_losses.protocol import check_floating, check_same_shape, compute_dtype
from lightning_losses.reduction import divide_by_count

__all__ = ["expand_mask", "mse"]


def expand_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """``mask`` of ``like``'s shape or of its leading dimensions, broadcast over the trailing ones.

    >>> expand_mask(torch.tensor([1, 0]), torch.zeros(2, 3))
    tensor([[1, 1, 1],
            [0, 0, 0]])
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(
            f"`{name}` must be a bool, integer or floating mask, got shape {tuple(mask.shape)} and dtype "
            f"{mask.dtype}"
        )
    if mask.shape != like.shape[: mask.ndim]:
        raise ValueError(
            f"`{name}` must have the shape of the predictions {tuple(like.shape)} or of their leading "
            f"dimensions, got {tuple(mask.shape)}"
        )
    return mask.reshape(*mask.shape, *([1] * (like.ndim - mask.ndim))).expand_as(like)


def mse(
    preds: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error :math:`\sum_i m_i (\hat y_i - y_i)^2 / \sum_i m_i`.

    ``mask`` (bool, or float weights) has the shape of ``preds`` or of its leading dimensions (a
    per-sample mask for vector outputs). With ``global_valid_toks`` (TOKEN_LEVEL: the global count of
    valid mask entries) the denominator is that count times the elements each mask entry covers. All
    masked (or an empty batch) gives 0 with zero gradient.

    Non-finite values: a NaN (inf) in an element that counts makes the loss NaN (inf), as the formula
    does (no value is checked: ``LossModule``'s ``nan_policy`` sees it); masked-out elements never reach
    the loss nor, even when NaN or inf, its gradient (exactly 0 there).

    >>> mse(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 1, 0]))
    tensor(2.)
    """
    check_floating("preds", preds)
    check_same_shape("preds", preds, "target", target)
    dtype = compute_dtype(preds)
    preds, target = preds.to(dtype), target.to(dtype)
    if mask is None:
        squared = (preds - target) ** 2
        total, count, per_entry = squared.sum(), squared.numel(), 1
    else:
        weights = expand_mask(mask, preds).to(dtype)
        keep = weights != 0
        # masked-out values are replaced *before* any arithmetic: a NaN there gets a zero gradient too
        zero = preds.new_zeros(())
        squared = (torch.where(keep, preds, zero) - torch.where(keep, target, zero)) ** 2
        total = (squared * weights).sum()
        count, per_entry = weights.sum(), preds.shape[mask.ndim :].numel()
    return divide_by_count(total, count if global_valid_toks is None else global_valid_toks * per_entry)
