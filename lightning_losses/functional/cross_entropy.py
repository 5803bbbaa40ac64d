"""Cross-entropy over the last dimension, with masks, ignore_index, label smoothing and class weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    compute_dtype,
)
from lightning_losses.reduction import divide_by_count

__all__ = ["cross_entropy", "valid_mask"]


def valid_mask(
    target: Tensor, mask: Tensor | None, ignore_index: int | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Weights of the valid elements as `dtype`: `mask` (bool or weights) where `target != ignore_index`."""
    valid = torch.ones_like(target, dtype=dtype) if mask is None else mask.to(dtype)
    if ignore_index is not None:
        valid = valid * (target != ignore_index)
    return valid


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Cross-entropy of ``logits`` (classes on the **last** dimension) against class indices.

    Per valid element :math:`i` with target :math:`y_i`, class weights :math:`w` (1 by default) and
    smoothing :math:`\varepsilon` over :math:`C` classes,
    :math:`\ell_i = -(1-\varepsilon)\,w_{y_i}\log p_{i,y_i} - \tfrac{\varepsilon}{C}\sum_c w_c \log p_{i,c}`.
    Valid elements have ``target != ignore_index`` and a non-zero ``mask`` (a float mask weighs them).

    - Without ``global_valid_toks``: :math:`\sum_i m_i \ell_i / \sum_i m_i w_{y_i}`, which is
      ``F.cross_entropy(..., reduction="mean")``.
    - With ``global_valid_toks`` (TOKEN_LEVEL): :math:`\sum_i m_i \ell_i / \text{global\_valid\_toks}`, this
      micro-batch's share of the global batch's mean; class weights then scale tokens.

    No valid element gives 0 (with zero gradient), not NaN.

    Args:
        logits: ``[N, C]`` or ``[B, T, V]``, any floating dtype (computed in float32 or float64).
        target: ``[N]`` or ``[B, T]`` integer class indices.
        mask: optional, the shape of ``target``; bool or float weights.
        global_valid_toks: optional 0-dim count of valid elements in the global batch.
        ignore_index: target value to skip.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        weight: optional ``[C]`` class weights.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> cross_entropy(logits, torch.tensor([0, 1]))
    tensor(0.1269)
    >>> cross_entropy(logits, torch.tensor([0, -100]))  # the ignored element does not count
    tensor(0.1269)
    """
    check_floating("logits", logits)
    check_ndim("logits", logits, (2, 3))
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"`target` must have shape {tuple(logits.shape[:-1])} (that of `logits` without its class "
            f"dimension), got {tuple(target.shape)} with `logits` of shape {tuple(logits.shape)}"
        )
    num_classes = logits.shape[-1]
    if mask is not None:
        check_mask("mask", mask, target.shape)
    check_class_targets("target", target, num_classes, ignore_index, mask)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}")
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise ValueError(f"`weight` must have shape ({num_classes},), got {tuple(weight.shape)}")

    dtype = compute_dtype(logits)
    valid = valid_mask(target, mask, ignore_index, dtype)
    safe_target = torch.where(valid != 0, target, torch.zeros_like(target)).reshape(-1)
    flat_logits = logits.reshape(-1, num_classes).to(dtype)
    class_weight = None if weight is None else weight.to(device=logits.device, dtype=dtype)
    per_element = F.cross_entropy(
        flat_logits, safe_target, weight=class_weight, reduction="none", label_smoothing=label_smoothing
    ).reshape(target.shape)
    total = torch.where(valid != 0, per_element * valid, torch.zeros_like(per_element)).sum()
    if global_valid_toks is not None:
        return divide_by_count(total, global_valid_toks)
    target_weight = valid if class_weight is None else valid * class_weight[safe_target].reshape(target.shape)
    return divide_by_count(total, target_weight.sum())
