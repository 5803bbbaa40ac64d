"""``FocalLoss`` (``focal``): Lin et al., 2017, "Focal Loss for Dense Object Detection"."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_losses.functional.cross_entropy import valid_mask
from lightning_losses.functional.focal import FocalMode, check_focal_options, focal_loss_with_metrics
from lightning_losses.protocol import LossFunction, LossOutput, LossType
from lightning_losses.registry import register_loss

__all__ = ["FocalLoss"]


@register_loss("focal")
class FocalLoss(LossFunction):
    r"""Focal loss :math:`-\alpha_t (1-p_t)^\gamma \log p_t` over a softmax (multiclass) or sigmoids.

    Lin, Goyal, Girshick, He, Dollár, ICCV 2017 (arXiv:1708.02002). See
    :func:`lightning_losses.functional.focal.focal_loss` for the formula and the shapes. Given
    ``global_valid_toks`` (``LossModule`` sums :meth:`valid_tokens`: the batch key ``mask`` without
    ``ignore_index`` targets) it is TOKEN_LEVEL: exact under micro-batching and DDP; otherwise a mean over
    this batch's valid elements.

    Args:
        mode: ``"multiclass"``: ``logits [N, C]`` / ``[B, T, C]`` and integer ``target [N]`` / ``[B, T]``.
            ``"binary"`` / ``"multilabel"``: ``logits`` and ``target`` (in [0, 1]) of the same shape.
        gamma: focusing parameter γ ≥ 0 (0 with no ``alpha`` is cross-entropy).
        alpha: multiclass: a number is a constant factor (the guide's ``alpha: 1.0`` changes nothing), a
            list ``[C]`` weighs each element by its true class. binary/multilabel: a number in [0, 1]
            weighs positives by α and negatives by 1 − α (the paper's 0.25; torchvision's
            ``sigmoid_focal_loss``); multilabel also takes a list ``[C]`` of such numbers, one per
            class. None: no weighting.
        ignore_index: target value to skip (None: skip nothing).

    Metrics: ``loss``; ``p_t``, the mean probability given to the true class (multiclass) or to the
    true label (sigmoid) over the valid elements of this batch, which rises towards 1 as training
    fits; ``accuracy`` (argmax; sigmoid: ``logit > 0`` against ``target > 0.5``) over the same elements.

    >>> loss_fn = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])
    >>> loss, metrics = loss_fn(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    >>> round(loss.item(), 4), round(metrics["p_t"].item(), 4), metrics["accuracy"].item()
    (0.3458, 0.5, 0.5)
    """

    loss_type = LossType.TOKEN_LEVEL
    token_mask_key = "mask"

    def __init__(
        self,
        mode: FocalMode = "multiclass",
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        ignore_index: int | None = -100,
    ) -> None:
        super().__init__()
        check_focal_options(mode, gamma)
        values = [] if alpha is None else [alpha] if isinstance(alpha, (int, float)) else list(alpha)
        if mode == "binary" and not isinstance(alpha, (int, float, type(None))):
            raise ValueError(f"`alpha` must be a number or None in binary mode, got {alpha!r}")
        if mode != "multiclass" and not all(0 <= a <= 1 for a in values):
            raise ValueError(f"`alpha` must lie in [0, 1] in {mode} mode, got {alpha!r}")
        if not all(math.isfinite(a) and a >= 0 for a in values):
            raise ValueError(f"`alpha` must be finite and >= 0, got {alpha!r}")
        if alpha is not None and not isinstance(alpha, (int, float)) and len(values) == 0:
            raise ValueError("`alpha` must hold one value per class, got an empty list")
        self.mode = mode
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.alpha = float(alpha) if isinstance(alpha, (int, float)) else None
        class_alpha = None if alpha is None or isinstance(alpha, (int, float)) else torch.tensor(values)
        self.register_buffer("class_alpha", None if class_alpha is None else class_alpha.float())

    def extra_repr(self) -> str:
        alpha = self.alpha if self.class_alpha is None else self.class_alpha.tolist()
        return f"mode={self.mode!r}, gamma={self.gamma}, alpha={alpha}, ignore_index={self.ignore_index}"

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """The weights the loss averages over: ``mask`` where ``target != ignore_index``, per element of
        ``target`` (multiclass: per row of ``logits``; binary/multilabel: per logit, the shape of
        ``logits``), so ``global_valid_toks`` is exactly the denominator of the local mean."""
        return valid_mask(inputs["target"], inputs.get("mask"), self.ignore_index)

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> LossOutput:
        loss, metrics = focal_loss_with_metrics(
            logits,
            target,
            mask,
            global_valid_toks,
            mode=self.mode,
            gamma=self.gamma,
            alpha=self.alpha if self.class_alpha is None else self.class_alpha,
            ignore_index=self.ignore_index,
        )
        return LossOutput(loss, {"loss": loss.detach(), **metrics})
