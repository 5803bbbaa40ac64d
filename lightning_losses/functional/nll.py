"""Negative log-likelihood of the taken tokens (supervised fine-tuning), NeMo RL's token-level SFT loss."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_losses.functional.sequence_policy import _aligned, check_token_inputs, masked_token_log_probs
from lightning_losses.protocol import (
    compute_dtype,
)
from lightning_losses.reduction import divide_by_count

__all__ = ["nll_loss", "token_log_probs"]


def token_log_probs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    token_mask: Tensor | None = None,
    *,
    shift: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-token :math:`\log\pi(y_t) = z_{y_t} - \operatorname{logsumexp}(z)` and the weights of the tokens.

    With ``shift=True`` (NeMo RL's convention) logits ``[:, :-1]`` score ``input_ids[:, 1:]`` under
    ``token_mask[:, 1:]``; with ``shift=False`` the logits at ``t`` score ``input_ids[:, t]``. Masked tokens
    may hold any id (e.g. ``-100``) and give exactly 0.

    Args:
        next_token_logits: ``[B, T, V]``.
        input_ids: ``[B, T]`` integer token ids.
        token_mask: optional ``[B, T]``, bool or float weights.
        shift: whether logits score the next token.
        dtype: compute dtype (default: float32, float64 for float64 logits).

    Returns:
        ``(log_probs, weights)``, both ``[B, T - 1]`` with ``shift`` (else ``[B, T]``), in ``dtype``;
        ``log_probs`` is 0 where the weight is 0.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> token_log_probs(logits, torch.tensor([[0, 1]]), shift=False)[0]
    tensor([[-0.6931, -0.2877]])
    """
    check_token_inputs(next_token_logits, input_ids, token_mask)
    dtype = compute_dtype(next_token_logits) if dtype is None else dtype
    tokens, mask = _aligned(input_ids, token_mask, shift)
    return masked_token_log_probs(next_token_logits, tokens, mask, shift, dtype)


def nll_loss(
    next_token_logits: Tensor,
    input_ids: Tensor,
    token_mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    *,
    shift: bool = True,
) -> Tensor:
    r"""Token-level negative log-likelihood of the taken tokens (SFT).

    .. math::
        L = -\frac{1}{N}\sum_{i,t} m_{it}\,\log\pi(y_{it}), \qquad
        \log\pi(y) = z_y - \operatorname{logsumexp}(z)

    with :math:`m` the ``token_mask`` (aligned with the scored tokens, see :func:`token_log_probs`) and
    :math:`N` ``global_valid_toks`` (TOKEN_LEVEL: the valid tokens of the global batch, so the losses of
    micro-batches and DDP ranks add up to the global batch's mean) or, without it, :math:`\sum m` of this
    batch. Maximum likelihood / teacher forcing; NeMo RL's ``NLLLoss``. Computed in float32 (float64 for
    float64 logits). No valid token gives exactly 0 with a zero gradient. A NaN in a token that counts makes
    the loss NaN (no value is checked: ``LossModule``'s ``nan_policy`` sees it); in the logits of a masked
    token it stays out of the loss but may show in that row's own gradient (the softmax's gradient multiplies
    it by 0, as it does a NaN at the last position with ``shift``, which scores nothing; removing it would
    copy the whole ``[B, T, V]`` logits).

    Args:
        next_token_logits: ``[B, T, V]``, any floating dtype.
        input_ids: ``[B, T]`` token ids (masked positions may hold any id, e.g. ``-100``).
        token_mask: optional ``[B, T]`` tokens to train on (e.g. the response, not the prompt).
        global_valid_toks: optional 0-dim count of valid scored tokens of the global batch.
        shift: ``next_token_logits[:, t]`` scores ``input_ids[:, t + 1]`` (default) or ``input_ids[:, t]``.

    Returns:
        A 0-dim tensor.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> nll_loss(logits, torch.tensor([[0, 1]]), shift=False)  # -(log 0.5 + log 0.75) / 2
    tensor(0.4904)
    >>> nll_loss(logits, torch.tensor([[0, 1]]), global_valid_toks=torch.tensor(4), shift=False)
    tensor(0.2452)
    """
    log_probs, weights = token_log_probs(next_token_logits, input_ids, token_mask, shift=shift)
    total = -(log_probs * weights).sum()
    count = weights.sum() if global_valid_toks is None else global_valid_toks
    return divide_by_count(total, count)
