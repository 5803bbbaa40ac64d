"""A sequence-level policy-gradient loss with an optional value (critic) term: the guide's "custom
sequence-level loss for RL", made a correct policy gradient."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_losses.functional.cross_entropy import FUSED_MIN_ELEMENTS, per_row_cross_entropy
from lightning_losses.protocol import (
    check_class_targets,
    check_floating,
    check_mask,
    check_ndim,
    check_positive,
    compute_dtype,
)
from lightning_losses.reduction import count_valid, divide_by_count, masked_sum

__all__ = [
    "SequencePolicyTerms",
    "masked_token_log_probs",
    "sequence_log_probs",
    "sequence_policy_loss",
    "taken_log_probs",
]


class SequencePolicyTerms(NamedTuple):
    """What :func:`sequence_policy_loss` returns: ``loss, policy_loss, value_loss, ... = terms``.

    Every term is a sum over this batch's valid sequences divided by the same count (``global_valid_seqs``
    or, without it, this batch's number of valid sequences), so each adds up over micro-batches.
    ``value_loss`` is 0 without ``values``, ``mean_reward`` 0 without ``rewards``.
    """

    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    mean_reward: Tensor
    mean_advantage: Tensor


def _aligned(input_ids: Tensor, token_mask: Tensor | None, shift: bool) -> tuple[Tensor, Tensor | None]:
    """The tokens the logits score and their mask: ``[:, 1:]`` with ``shift``, else as given."""
    if not shift:
        return input_ids, token_mask
    return input_ids[:, 1:], None if token_mask is None else token_mask[:, 1:]


def taken_log_probs(next_token_logits: Tensor, tokens: Tensor, shift: bool, dtype: torch.dtype) -> Tensor:
    r""":math:`\log\pi(y_t) = z_{y_t} - \operatorname{logsumexp}(z)` of the in-range ``tokens [B, T']`` the
    logits ``[B, T, V]`` score (``T' = T - 1`` with ``shift``, else ``T``), in ``dtype``; differentiable.

    The per-row cross-entropy of the whole ``[B·T, V]`` logits (a view, not a copy: with ``shift`` the
    last position of each sequence scores a dummy token 0 and is dropped, so its gradient rows are 0
    times its probabilities), which on a CPU takes the fused cross-entropy from ``FUSED_MIN_ELEMENTS``
    logits up (as :func:`~lightning_losses.functional.cross_entropy.cross_entropy` does): one softmax
    pass whose result becomes the gradient, where ``gather - logsumexp`` keeps its input for a backward
    that builds two ``[B, T, V]`` tensors more (0.2-0.3x of their time at 4096 tokens of 8k-32k).

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> taken_log_probs(logits, torch.tensor([[1]]), shift=True, dtype=torch.float32)
    tensor([[-0.6931]])
    """
    batch, steps, vocab = next_token_logits.shape
    targets = torch.cat([tokens, tokens.new_zeros(batch, 1)], dim=1) if shift else tokens
    logits = next_token_logits.to(dtype).reshape(-1, vocab)
    min_fused_bytes = FUSED_MIN_ELEMENTS * logits.element_size()
    per_row, _ = per_row_cross_entropy(logits, targets.reshape(-1), min_fused_bytes=min_fused_bytes)
    log_probs = per_row.view(batch, steps).neg()
    return log_probs[:, :-1] if shift else log_probs


def check_token_inputs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    token_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
) -> tuple[int, int]:
    """The checks every next-token loss shares: logits ``[B, T, V]``, ids ``[B, T]``, masks ``[B, T]`` /
    ``[B]``; returns ``(B, T)``.

    >>> check_token_inputs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    (2, 3)
    """
    check_floating("next_token_logits", next_token_logits)
    check_ndim("next_token_logits", next_token_logits, 3)
    batch, steps = next_token_logits.shape[:2]
    if tuple(input_ids.shape) != (batch, steps):
        raise ValueError(
            f"`input_ids` must have shape {(batch, steps)} (that of `next_token_logits` without its "
            f"vocabulary dimension), got {tuple(input_ids.shape)} with `next_token_logits` of shape "
            f"{tuple(next_token_logits.shape)}"
        )
    if token_mask is not None:
        check_mask("token_mask", token_mask, (batch, steps))
    if sample_mask is not None:
        check_mask("sample_mask", sample_mask, (batch,))
    return batch, steps


def _check_inputs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    advantages: Tensor,
    token_mask: Tensor | None,
    sample_mask: Tensor | None,
    rewards: Tensor | None,
    values: Tensor | None,
) -> None:
    batch, _ = check_token_inputs(next_token_logits, input_ids, token_mask, sample_mask)
    for name, tensor in (("advantages", advantages), ("rewards", rewards), ("values", values)):
        if tensor is None:
            continue
        check_floating(name, tensor)
        if tuple(tensor.shape) != (batch,):
            raise ValueError(
                f"`{name}` must have shape ({batch},), one per sequence of `next_token_logits` of shape "
                f"{tuple(next_token_logits.shape)}, got {tuple(tensor.shape)}"
            )
    if values is not None and rewards is None:
        raise ValueError(
            f"`values` (shape {tuple(values.shape)}) were given without `rewards`, the targets of the value "
            "term; pass `rewards` or leave `values` out"
        )


def sequence_log_probs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    token_mask: Tensor | None = None,
    *,
    shift: bool = True,
) -> Tensor:
    r"""Each sequence's masked log-probability of its taken tokens, :math:`\sum_t m_{it}\log\pi(y_{it})`.

    :math:`\log\pi(y) = z_y - \operatorname{logsumexp}(z)`, in float32 (float64 for float64 logits).
    With ``shift=True`` (NeMo RL's convention, ``next_token_logits[:, t]`` scores the token at ``t + 1``)
    logits ``[:, :-1]`` score ``input_ids[:, 1:]`` under ``token_mask[:, 1:]``; with ``shift=False`` the
    logits at ``t`` score ``input_ids[:, t]``. Masked tokens (a float mask weighs them) may hold any id.

    Args:
        next_token_logits: ``[B, T, V]``.
        input_ids: ``[B, T]`` integer token ids.
        token_mask: optional ``[B, T]``, bool or float weights.
        shift: whether to score the next token (see above).

    Returns:
        ``[B]``.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> sequence_log_probs(logits, torch.tensor([[0, 1]]), shift=False)  # log 0.5 + log 0.75
    tensor([-0.9808])
    >>> sequence_log_probs(logits, torch.tensor([[0, 1]]))  # logits at 0 score token 1: log 0.5
    tensor([-0.6931])
    """
    check_floating("next_token_logits", next_token_logits)
    check_ndim("next_token_logits", next_token_logits, 3)
    if tuple(input_ids.shape) != tuple(next_token_logits.shape[:2]):
        raise ValueError(
            f"`input_ids` must have shape {tuple(next_token_logits.shape[:2])}, got {tuple(input_ids.shape)} "
            f"with `next_token_logits` of shape {tuple(next_token_logits.shape)}"
        )
    if token_mask is not None:
        check_mask("token_mask", token_mask, input_ids.shape)
    tokens, mask = _aligned(input_ids, token_mask, shift)
    log_probs, weights = masked_token_log_probs(
        next_token_logits, tokens, mask, shift, compute_dtype(next_token_logits)
    )
    return (log_probs * weights).sum(-1)


def masked_token_log_probs(
    next_token_logits: Tensor, tokens: Tensor, mask: Tensor | None, shift: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(log_probs, weights)`` of the scored ``tokens`` under their ``mask`` (both aligned with the
    positions the logits score, see ``shift``): the weights in ``dtype`` (ones without a mask) and
    :func:`taken_log_probs`, 0 where the weight is 0 (a masked token may hold any id)."""
    check_class_targets("input_ids", tokens, next_token_logits.shape[-1], mask=mask)
    if mask is None:  # every token counts: no selects (on a GPU each `where` and its zeros is a kernel)
        weights = torch.ones(tokens.shape, dtype=dtype, device=tokens.device)
        return taken_log_probs(next_token_logits, tokens, shift, dtype), weights
    weights = mask.to(dtype)
    valid = weights != 0
    safe_tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    taken = taken_log_probs(next_token_logits, safe_tokens, shift, dtype)
    return torch.where(valid, taken, torch.zeros_like(taken)), weights


def sequence_policy_loss(
    next_token_logits: Tensor,
    input_ids: Tensor,
    advantages: Tensor,
    token_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    rewards: Tensor | None = None,
    values: Tensor | None = None,
    global_valid_seqs: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    shift: bool = True,
) -> SequencePolicyTerms:
    r"""Sequence-level REINFORCE with a baseline's advantages, plus a value-regression term.

    .. math::
        L_\pi = -\frac{1}{N}\sum_i s_i A_i \sum_t m_{it} \log \pi(y_{it}), \qquad
        L_V = \frac{1}{N}\sum_i s_i (V_i - R_i)^2, \qquad L = \alpha L_\pi + \beta L_V

    with :math:`y_{it}` the *taken* tokens (``input_ids``, scored as in :func:`sequence_log_probs`),
    :math:`m` the ``token_mask``, :math:`s` the ``sample_mask``, :math:`A` the ``advantages``, :math:`R`
    the ``rewards`` (returns) and :math:`V` the model's ``values``. :math:`N` is ``global_valid_seqs``
    (SEQUENCE_LEVEL: the valid sequences of the global batch, so the losses of micro-batches and ranks add
    up to the global batch's) or, without it, :math:`\sum_i s_i` of this batch. :math:`\nabla L_\pi` is the
    policy gradient :math:`-\frac1N\sum_i A_i \nabla\log\pi(y_i)` (Williams 1992, "Simple statistical
    gradient-following algorithms for connectionist reinforcement learning"; Sutton et al. 2000).

    ``advantages`` and ``rewards`` are constants (detached): the policy term differentiates only through
    :math:`\log\pi`, the value term only through :math:`V`. :math:`L_V = 0` without ``values``. Masked tokens
    and sequences never reach the result, not even as NaN; no valid sequence gives exactly 0. NaN/inf in
    masked sequences of ``values``, ``rewards``, ``advantages`` get a zero gradient; in the *logits* of a
    masked token a NaN stays out of the loss but may show in that row's own gradient (the softmax's gradient
    multiplies it by 0, as it does a NaN at the last position with ``shift``, which scores nothing; removing
    it would copy the whole ``[B, T, V]`` logits). A NaN that counts makes the loss NaN (no value is checked:
    ``LossModule``'s ``nan_policy`` sees it).

    Args:
        next_token_logits: ``[B, T, V]``, any floating dtype (computed in float32, float64 for float64).
        input_ids: ``[B, T]`` the sequences' token ids (the taken actions).
        advantages: ``[B]`` one advantage per sequence.
        token_mask: optional ``[B, T]`` tokens the policy term counts (e.g. the response, not the prompt).
        sample_mask: optional ``[B]`` valid sequences; bool or float weights.
        rewards: optional ``[B]`` the value term's targets (and the ``mean_reward`` metric).
        values: optional ``[B]`` the model's value estimates; need ``rewards``.
        global_valid_seqs: optional 0-dim count of valid sequences of the global batch.
        alpha: weight :math:`\alpha \ge 0` of the policy term.
        beta: weight :math:`\beta \ge 0` of the value term.
        shift: logits at ``t`` score the token at ``t + 1`` (NeMo RL's convention; default) or at ``t``.

    Returns:
        ``SequencePolicyTerms(loss, policy_loss, value_loss, mean_reward, mean_advantage)``, each a sum over
        valid sequences divided by :math:`N`.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]], [[0.9, 0.1], [0.5, 0.5]]]))
    >>> ids, advantages = torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, -1.0])
    >>> terms = sequence_policy_loss(logits, ids, advantages, shift=False)
    >>> terms.policy_loss  # -(1·(log .5 + log .75) - 1·(log .1 + log .5)) / 2
    tensor(-1.0075)
    >>> sequence_policy_loss(logits, ids, advantages, values=torch.tensor([1.0, 0.0]),
    ...                      rewards=torch.tensor([0.0, 0.0]), shift=False).value_loss  # (1² + 0²) / 2
    tensor(0.5000)
    """
    check_positive("alpha", alpha, allow_zero=True)
    check_positive("beta", beta, allow_zero=True)
    _check_inputs(next_token_logits, input_ids, advantages, token_mask, sample_mask, rewards, values)
    floating = [t for t in (next_token_logits, advantages, rewards, values) if t is not None]
    dtype = compute_dtype(*floating)
    tokens, mask = _aligned(input_ids, token_mask, shift)
    if sample_mask is not None:  # tokens of masked-out sequences count nowhere (and may hold any id)
        keep = (sample_mask.reshape(-1, 1) != 0).expand(tokens.shape)
        mask = keep if mask is None else torch.where(keep, mask, torch.zeros_like(mask))
    per_token, weights = masked_token_log_probs(next_token_logits, tokens, mask, shift, dtype)
    log_probs = (per_token * weights).sum(-1)

    count = count_valid(sample_mask, log_probs) if global_valid_seqs is None else global_valid_seqs

    def constant(per_sequence: Tensor) -> Tensor:
        # zeros where the sequence is masked out: a NaN there times a zero gradient would still be NaN
        per_sequence = per_sequence.detach().to(dtype)
        if sample_mask is None:
            return per_sequence
        return torch.where(sample_mask != 0, per_sequence, torch.zeros_like(per_sequence))

    def share(per_sequence: Tensor) -> Tensor:
        return divide_by_count(masked_sum(per_sequence, sample_mask), count)

    advantages = constant(advantages)
    policy_loss = share(-advantages * log_probs)
    zero = log_probs.new_zeros(())
    if values is not None and rewards is not None:
        if sample_mask is not None:
            values = torch.where(sample_mask != 0, values, torch.zeros_like(values))
        value_loss = share((values.to(dtype) - constant(rewards)) ** 2)
    else:
        value_loss = zero
    loss = alpha * policy_loss + beta * value_loss
    with torch.no_grad():
        mean_reward = zero if rewards is None else share(constant(rewards))
        mean_advantage = share(advantages)
    return SequencePolicyTerms(loss, policy_loss, value_loss, mean_reward, mean_advantage)
