"""``CrossEntropyLoss`` (``cross_entropy``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_losses.functional.cross_entropy import cross_entropy, cross_entropy_with_metrics, valid_mask
from lightning_losses.protocol import LossFunction, LossOutput, LossType
from lightning_losses.registry import register_loss

__all__ = ["CrossEntropyLoss"]


@register_loss("cross_entropy")
class CrossEntropyLoss(LossFunction):
    """Cross-entropy for ``[N, C]`` classification and token-level ``[B, T, V]`` language modelling.

    See :func:`lightning_losses.functional.cross_entropy` for the formula. Given ``global_valid_toks``
    (``LossModule`` counts it from the batch key of ``mask``) it is TOKEN_LEVEL: exact under micro-batching
    and DDP; otherwise a mean over this batch's valid elements.

    Args:
        ignore_index: target value to skip.
        label_smoothing: ε in [0, 1].
        weight: ``[C]`` class weights; a single number instead scales the loss (the guide's
            ``cross_entropy: {params: {weight: 1.0}}``).

    Metrics: ``loss`` and ``accuracy`` (argmax over valid elements of this batch, found in the loss's own
    pass over the logits).

    >>> loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    >>> loss, metrics = loss_fn(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    >>> round(loss.item(), 4), metrics["accuracy"].item()
    (1.5486, 0.5)
    """

    loss_type = LossType.TOKEN_LEVEL
    token_mask_key = "mask"

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        weight: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.scale = float(weight) if isinstance(weight, (int, float)) else 1.0
        class_weight = None if weight is None or isinstance(weight, (int, float)) else torch.as_tensor(weight)
        self.register_buffer("class_weight", None if class_weight is None else class_weight.float())

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """Valid elements weighted by their class weight: the denominator of the mean."""
        valid = valid_mask(inputs["target"], inputs.get("mask"), self.ignore_index)
        if self.class_weight is None:
            return valid
        target = torch.where(valid != 0, inputs["target"], torch.zeros_like(inputs["target"]))
        return valid * self.class_weight.to(valid.device)[target]

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> LossOutput:
        loss, metrics = cross_entropy_with_metrics(logits, target, mask, global_valid_toks, **self._options())
        loss = self._scaled(loss)
        return LossOutput(loss, {"loss": loss.detach(), **metrics})

    def loss_only(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> Tensor:
        """The loss without the accuracy (no argmax pass over the logits)."""
        return self._scaled(cross_entropy(logits, target, mask, global_valid_toks, **self._options()))

    def _options(self) -> dict[str, Any]:
        return {
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
            "weight": self.class_weight,
        }

    def _scaled(self, loss: Tensor) -> Tensor:
        return self.scale * loss if self.scale != 1.0 else loss  # a multiply and its autograd node less
