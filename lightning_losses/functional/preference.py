"""Direct Preference Optimization (Rafailov et al. 2023) over preference pairs, NeMo RL's batch layout."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.functional.nll import token_log_probs
from lightning_losses.functional.sequence_policy import check_token_inputs
from lightning_losses.protocol import (
    check_floating,
    check_mask,
    check_positive,
    compute_dtype,
    value_checks_enabled,
)
from lightning_losses.reduction import count_valid, divide_by_count, masked_sum

__all__ = ["DPOTerms", "dpo_loss"]


class DPOTerms(NamedTuple):
    """What :func:`dpo_loss` returns: ``loss, dpo_loss, sft_loss, ... = terms``.

    Every term is a sum over this batch's valid pairs divided by the same count of pairs
    (``global_valid_pairs`` or, without it, this batch's), so each adds up over micro-batches and ranks.
    """

    loss: Tensor
    dpo_loss: Tensor
    sft_loss: Tensor
    accuracy: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    margin: Tensor


def _check_inputs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    reference_logprobs: Tensor,
    token_mask: Tensor | None,
    sample_mask: Tensor | None,
) -> None:
    check_token_inputs(next_token_logits, input_ids, token_mask)
    batch = next_token_logits.shape[0]
    if batch % 2 != 0:
        raise ValueError(
            "`next_token_logits` must hold preference pairs interleaved (chosen at even rows, rejected at "
            f"odd rows), so an even number of sequences; got shape {tuple(next_token_logits.shape)}"
        )
    check_floating("reference_logprobs", reference_logprobs)
    if reference_logprobs.shape != input_ids.shape:
        raise ValueError(
            f"`reference_logprobs` must have the shape of `input_ids` {tuple(input_ids.shape)} (one log-prob "
            f"per token), got {tuple(reference_logprobs.shape)}"
        )
    if sample_mask is not None:
        check_mask("sample_mask", sample_mask, (batch,))
        if value_checks_enabled(sample_mask) and not bool((sample_mask[0::2] == sample_mask[1::2]).all()):
            raise ValueError(
                "`sample_mask` must mark both sequences of a pair (rows 2i and 2i + 1) alike, got "
                f"{sample_mask.tolist()}"
            )


def dpo_loss(
    next_token_logits: Tensor,
    input_ids: Tensor,
    reference_logprobs: Tensor,
    token_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    global_valid_pairs: Tensor | None = None,
    *,
    beta: float = 0.1,
    average_log_probs: bool = False,
    sft_weight: float = 0.0,
    shift: bool = True,
) -> DPOTerms:
    r"""The DPO loss of preference pairs, with an optional SFT term on the chosen sequences.

    .. math::
        r_s = \beta\,(\ell_\pi(s) - \ell_{\text{ref}}(s)), \qquad
        L_{\text{DPO}} = -\frac{1}{N}\sum_p w_p \log\sigma(r_{c_p} - r_{r_p}), \qquad
        L_{\text{SFT}} = -\frac{1}{N}\sum_p w_p\,\ell_\pi(c_p), \qquad
        L = L_{\text{DPO}} + \lambda L_{\text{SFT}}

    where :math:`\ell(s) = \sum_t m_{st}\log\pi(y_{st})` is a sequence's log-probability over its masked
    tokens, divided by :math:`\sum_t m_{st}` with ``average_log_probs`` (length-averaged, as in SimPO/IPO
    variants and NeMo RL's ``preference_average_log_probs``), :math:`c_p, r_p` the chosen and rejected
    sequences of pair :math:`p`, :math:`w_p` its ``sample_mask`` and :math:`N` ``global_valid_pairs``
    (SEQUENCE_LEVEL over pairs) or, without it, :math:`\sum_p w_p` of this batch. Rafailov et al. 2023,
    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".

    **Batch layout** (NeMo RL's): one batch of :math:`2P` sequences with the pairs interleaved, chosen at
    rows ``0, 2, 4, ...`` and rejected at rows ``1, 3, 5, ...``. ``reference_logprobs[s, t]`` is the
    frozen reference policy's log-probability of ``input_ids[s, t]`` (the layout of ``input_ids``; with
    ``shift`` its column 0 is never read), a constant (detached). ``sample_mask`` must mark both sequences
    of a pair alike (checked where value checks run); the pair's weight is its chosen row's entry.

    Masked tokens and pairs never reach the result, not even as NaN; no valid pair gives exactly 0 with a zero
    gradient. Computed in float32 for bf16/fp16 inputs (float64 for float64). NaN/inf at masked positions of
    ``reference_logprobs`` get no gradient (it is a constant); in the *logits* of a masked token a NaN stays
    out of the loss but may show in that row's own gradient (the softmax's gradient multiplies it by 0, as it
    does a NaN at the last position with ``shift``, which scores nothing; removing it would copy the whole
    ``[B, T, V]`` logits). A NaN that counts makes the loss NaN (no value is checked: ``LossModule``'s
    ``nan_policy`` sees it).

    Args:
        next_token_logits: ``[2P, T, V]`` the policy's logits.
        input_ids: ``[2P, T]`` token ids.
        reference_logprobs: ``[2P, T]`` the reference policy's per-token log-probs of ``input_ids``.
        token_mask: optional ``[2P, T]`` tokens that count (the response, not the prompt).
        sample_mask: optional ``[2P]`` valid sequences, equal within each pair; bool or float weights.
        global_valid_pairs: optional 0-dim count of valid pairs in the global batch.
        beta: :math:`\beta > 0`, the strength of the implicit KL constraint.
        average_log_probs: length-average :math:`\ell` (for both the DPO and the SFT term).
        sft_weight: :math:`\lambda \ge 0`, weight of the NLL of the chosen sequences.
        shift: ``next_token_logits[:, t]`` scores ``input_ids[:, t + 1]`` (default) or ``input_ids[:, t]``.

    Returns:
        ``DPOTerms(loss, dpo_loss, sft_loss, accuracy, chosen_reward, rejected_reward, margin)``: each a sum
        over valid pairs divided by :math:`N` (``accuracy`` counts pairs with :math:`r_c > r_r`; the rewards
        and margin are :math:`r_c`, :math:`r_r`, :math:`r_c - r_r`).

    >>> logits = torch.log(torch.tensor([[[0.8, 0.2]], [[0.5, 0.5]]]))  # one pair, one token each
    >>> ids, ref = torch.tensor([[0], [1]]), torch.log(torch.tensor([[0.5], [0.5]]))
    >>> terms = dpo_loss(logits, ids, ref, beta=1.0, shift=False)
    >>> terms.margin  # (log .8 - log .5) - (log .5 - log .5) = log 1.6
    tensor(0.4700)
    >>> terms.dpo_loss  # -log σ(log 1.6) = log(1 + 1/1.6)
    tensor(0.4855)
    """
    check_positive("beta", beta)
    check_positive("sft_weight", sft_weight, allow_zero=True)
    _check_inputs(next_token_logits, input_ids, reference_logprobs, token_mask, sample_mask)
    dtype = compute_dtype(next_token_logits, reference_logprobs)
    mask = token_mask
    if sample_mask is not None:  # tokens of masked-out sequences count nowhere (and may hold any id)
        keep = (sample_mask.reshape(-1, 1) != 0).expand(input_ids.shape)
        mask = keep if mask is None else torch.where(keep, mask, torch.zeros_like(mask))
    log_probs, weights = token_log_probs(next_token_logits, input_ids, mask, shift=shift, dtype=dtype)
    reference = reference_logprobs[:, 1:] if shift else reference_logprobs
    reference = reference.detach().to(dtype)
    valid = weights != 0
    reference = torch.where(valid, reference * weights, torch.zeros_like(reference)).sum(-1)
    policy = (log_probs * weights).sum(-1)
    if average_log_probs:
        lengths = weights.sum(-1)
        policy, reference = divide_by_count(policy, lengths), divide_by_count(reference, lengths)

    pair_weight = None if sample_mask is None else sample_mask[0::2]
    keep_pair = None if pair_weight is None else pair_weight != 0
    rewards = beta * (policy - reference)
    margin = rewards[0::2] - rewards[1::2]
    if keep_pair is not None:
        margin = torch.where(keep_pair, margin, torch.zeros_like(margin))
    count = count_valid(pair_weight, margin) if global_valid_pairs is None else global_valid_pairs

    def share(per_pair: Tensor) -> Tensor:
        return divide_by_count(masked_sum(per_pair, pair_weight), count)

    dpo = share(-F.logsigmoid(margin))
    sft = share(-policy[0::2])
    loss = dpo + sft_weight * sft if sft_weight else dpo
    with torch.no_grad():
        accuracy = share((margin > 0).to(dtype))
        chosen = share(rewards[0::2])
        rejected = share(rewards[1::2])
        mean_margin = share(margin)
    return DPOTerms(loss, dpo, sft, accuracy, chosen, rejected, mean_margin)
