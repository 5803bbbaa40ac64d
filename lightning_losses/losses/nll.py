"""``NLLLoss`` (``nll``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_losses.functional.nll import nll_loss
from lightning_losses.protocol import LossFunction, LossOutput, LossType
from lightning_losses.registry import register_loss

__all__ = ["NLLLoss"]


@register_loss("nll")
class NLLLoss(LossFunction):
    r"""Supervised fine-tuning: :math:`L = -\sum_{i,t} m_{it}\log\pi(y_{it}) / N`, TOKEN_LEVEL.

    :math:`N` is ``global_valid_toks`` (``LossModule`` counts it with :meth:`valid_tokens`, the mask of the
    *scored* tokens, so it is exactly this loss's denominator): exact under micro-batching and DDP. See
    :func:`lightning_losses.functional.nll_loss` for the formula and the ``shift`` convention.

    Inputs, resolved by name under ``LossModule``: ``next_token_logits`` ``[B, T, V]``, ``input_ids``
    ``[B, T]`` and optional ``token_mask`` ``[B, T]``.

    Args:
        shift: ``next_token_logits[:, t]`` scores ``input_ids[:, t + 1]`` (NeMo RL's convention; default),
            or ``input_ids[:, t]`` with ``shift=False``.

    Metrics: ``loss`` (a partial sum of the global batch's mean, like the loss).

    >>> loss_fn = NLLLoss(shift=False)
    >>> logits = torch.zeros(1, 2, 4)  # uniform: -log π = log 4 per token
    >>> loss, metrics = loss_fn(logits, torch.tensor([[0, 3]]))
    >>> round(loss.item(), 4)
    1.3863
    """

    loss_type = LossType.TOKEN_LEVEL

    def __init__(self, shift: bool = True) -> None:
        super().__init__()
        self.shift = shift

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """The weights of the scored tokens: ``token_mask[:, 1:]`` with ``shift`` (else ``token_mask``),
        ones without a mask."""
        mask = inputs.get("token_mask")
        if mask is None:
            ids = inputs["input_ids"]
            mask = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        return mask[:, 1:] if self.shift else mask

    def forward(
        self,
        next_token_logits: Tensor,
        input_ids: Tensor,
        token_mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> LossOutput:
        loss = nll_loss(next_token_logits, input_ids, token_mask, global_valid_toks, shift=self.shift)
        return LossOutput(loss, {"loss": loss.detach()})

    def extra_repr(self) -> str:
        return f"shift={self.shift}"
