"""Mean squared error with an optional mask or weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.protocol import check_floating, check_same_shape, compute_dtype
from lightning_losses.reduction import divide_by_count

__all__ = ["FUSED_MIN_ELEMENTS", "MASKED_FUSED_MIN_ELEMENTS", "broadcastable_mask", "mse"]

# Below these sizes the fused sum of squares' Python (an autograd.Function: ~25 us a call on a CPU) costs
# more than the passes it saves; measured against plain ops on this project's 2-core CPU machine. Without
# a mask, F.mse_loss is one op each way, so the fused path pays off only at larger sizes.
FUSED_MIN_ELEMENTS = 1 << 18
MASKED_FUSED_MIN_ELEMENTS = 1 << 15


def broadcastable_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """``mask`` of ``like``'s shape or of its leading dimensions, as a view that broadcasts over the
    trailing ones (size-1 dimensions appended; nothing is expanded or copied).

    >>> broadcastable_mask(torch.tensor([1, 0]), torch.zeros(2, 3))
    tensor([[1],
            [0]])
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
    return mask.reshape(*mask.shape, *([1] * (like.ndim - mask.ndim)))


def _masked_difference(preds: Tensor, target: Tensor, drop: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``preds - target`` in ``dtype`` (contiguous), 0 where ``drop`` is True: a NaN there reaches no
    product."""
    diff = torch.sub(preds.to(dtype), target.to(dtype)).contiguous()
    return diff if drop is None else diff.masked_fill_(drop, 0.0)


class _SquaredErrorSum(torch.autograd.Function):
    r""":math:`\sum_i w_i d_i^2` with :math:`d = \hat y - y` zeroed where ``drop`` is True, and its
    gradient :math:`\pm 2 g\, w_i d_i`.

    Where ``(F.mse_loss(p, t, reduction="none") * w).sum()`` makes four full-size tensors (two in each
    pass), this makes one, ``d`` (two with weights: ``w d`` too): the sum is a BLAS ``dot`` of ``w d``
    and ``d``, and the first backward scales ``w d`` in place into the gradient; another backward
    (``retain_graph=True``) recomputes it from the inputs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        preds: Tensor,
        target: Tensor,
        drop: Tensor | None,
        weights: Tensor | None,
        dtype: torch.dtype,
    ) -> Tensor:
        diff = _masked_difference(preds, target, drop, dtype)
        weighted = diff if weights is None else diff * weights
        total = torch.dot(weighted.view(-1), diff.view(-1))
        ctx.save_for_backward(preds, target, drop, weights)
        ctx.dtype, ctx.weighted = dtype, weighted
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        need_preds, need_target = ctx.needs_input_grad[:2]
        preds, target, drop, weights = ctx.saved_tensors
        grad, ctx.weighted = ctx.weighted, None
        if grad is None:  # a second backward: the first one handed the forward's w d out
            grad = _masked_difference(preds, target, drop, ctx.dtype)
            if weights is not None:
                grad.mul_(weights)
        grad.mul_(2 * grad_total)
        grad_target = (-grad if need_preds else grad.neg_()).to(target.dtype) if need_target else None
        return grad.to(preds.dtype) if need_preds else None, grad_target, None, None, None


def mse(
    preds: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error :math:`\sum_i m_i (\hat y_i - y_i)^2 / \sum_i m_i`.

    ``mask`` (bool, or integer/float weights) has the shape of ``preds`` or of its leading dimensions
    (a per-sample mask for vector outputs). With ``global_valid_toks`` (TOKEN_LEVEL: the global count
    of valid mask entries) the denominator is that count times the elements each mask entry covers.
    All masked (or an empty batch) gives 0 with zero gradient.

    Non-finite values: a NaN (inf) in an element that counts makes the loss NaN (inf), as the formula
    does (no value is checked: ``LossModule``'s ``nan_policy`` sees it); masked-out elements never reach
    the loss nor, even when NaN or inf, its gradient (exactly 0 there).

    From :data:`MASKED_FUSED_MIN_ELEMENTS` elements with a mask (:data:`FUSED_MIN_ELEMENTS` without) a
    fused function computes it (a BLAS ``dot``, the gradient made in the forward), which has first
    derivatives only (a double backward raises); smaller inputs take plain ops (``F.mse_loss`` alone
    without a mask). The loss is float64 if either input is, else float32.

    >>> mse(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 1, 0]))
    tensor(2.)
    """
    check_floating("preds", preds)
    check_same_shape("preds", preds, "target", target)
    dtype = compute_dtype(preds, target)
    if mask is None and global_valid_toks is None and 0 < preds.numel() < FUSED_MIN_ELEMENTS:
        return F.mse_loss(preds.to(dtype), target.to(dtype))  # the whole loss in one op each way
    drop = weights = None
    count, per_entry = preds.numel(), 1
    if mask is not None:
        mask_view = broadcastable_mask(mask, preds)
        per_entry = preds.shape[mask.ndim :].numel()  # the elements each mask entry covers
        if mask.dtype == torch.bool:
            drop = ~mask_view
        else:
            weights = mask_view.to(dtype)
            drop = ~weights.bool()  # bool(): 5x faster on a CPU than `== 0`, and equal (NaN too)
        if global_valid_toks is None:  # count_nonzero: a bool sum would first copy the mask to int64
            count = torch.count_nonzero(mask) if weights is None else weights.sum()
    if global_valid_toks is not None:
        count = global_valid_toks
    if preds.numel() >= (FUSED_MIN_ELEMENTS if mask is None else MASKED_FUSED_MIN_ELEMENTS):
        total = _SquaredErrorSum.apply(preds, target, drop, weights, dtype)
    elif drop is None:
        total = F.mse_loss(preds.to(dtype), target.to(dtype), reduction="sum")
    else:
        squared = _masked_difference(preds, target, drop, dtype).square()
        total = (squared if weights is None else squared * weights).sum()
    return divide_by_count(total, count if per_entry == 1 else count * per_entry)
