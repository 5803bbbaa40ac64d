"""``MSELoss`` (``mse``)."""

from __future__ import annotations

from torch import Tensor

from lightning_losses.functional.regression import mse
from lightning_losses.protocol import LossFunction, LossOutput, LossType
from lightning_losses.registry import register_loss

__all__ = ["MSELoss"]


@register_loss("mse")
class MSELoss(LossFunction):
    """Mean squared error with an optional mask or weights; TOKEN_LEVEL when given ``global_valid_toks``.

    See :func:`lightning_losses.functional.mse`.

    >>> import torch
    >>> MSELoss()(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).loss
    tensor(5.)
    """

    loss_type = LossType.TOKEN_LEVEL
    token_mask_key = "mask"

    def forward(
        self,
        preds: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> LossOutput:
        loss = mse(preds, target, mask, global_valid_toks)
        return LossOutput(loss, {"loss": loss.detach()})
