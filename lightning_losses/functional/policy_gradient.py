"""The clipped policy-gradient loss of PPO / GRPO, with clip-higher, dual clip and a reference-policy KL
penalty (NeMo RL's ``ClippedPGLossFn``), computed token by token on the taken tokens."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_losses.functional.sequence_policy import check_token_inputs, masked_token_log_probs
from lightning_losses.protocol import (
    check_floating,
    check_positive,
    compute_dtype,
)
from lightning_losses.reduction import count_valid, divide_by_count, masked_sum

__all__ = ["ClippedPGTerms", "clipped_pg_loss", "kl_penalty", "policy_valid_tokens"]

KLType = Literal["k1", "k2", "k3"]
Aggregation = Literal["token", "sequence"]


class ClippedPGTerms(NamedTuple):
    """What :func:`clipped_pg_loss` returns: ``loss, probs_ratio, ... = terms``.

    ``loss`` is divided by ``global_valid_toks`` (token-level) or ``global_valid_seqs`` (sequence-level);
    ``probs_ratio``, ``clip_fraction``, ``kl_penalty`` and ``approx_entropy`` are sums over valid tokens
    divided by ``global_valid_toks`` (or this batch's token count), so each adds up over micro-batches;
    ``num_valid_samples`` is this batch's :math:`\\sum_i s_i`. All but ``loss`` are detached.
    """

    loss: Tensor
    probs_ratio: Tensor
    clip_fraction: Tensor
    kl_penalty: Tensor
    approx_entropy: Tensor
    num_valid_samples: Tensor


def kl_penalty(
    logprobs: Tensor,
    reference_logprobs: Tensor,
    kl_type: KLType = "k3",
    input_clamp: float | None = None,
    output_clamp: float | None = None,
) -> Tensor:
    r"""Per-token estimators of :math:`\mathrm{KL}(\pi\,\|\,\pi_{ref})` from samples of :math:`\pi`.

    With the log reference ratio :math:`\ell = \log r' = \log\pi_{ref}(y) - \log\pi(y)` (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

    .. math::
        k_1 = -\ell, \qquad k_2 = \tfrac12 \ell^2, \qquad k_3 = e^{\ell} - 1 - \ell = r' - 1 - \log r'

    :math:`k_1` is unbiased (high variance, may be negative), :math:`k_2` biased with low variance,
    :math:`k_3` unbiased and non-negative (the GRPO paper's, Shao et al. 2024). ``input_clamp`` clamps
    :math:`\ell` to :math:`[-c, c]` before the estimator (guards :math:`e^\ell` from overflow);
    ``output_clamp`` clamps the estimate to :math:`[-c, c]`. Both are off by default (they bias).

    Args:
        logprobs: ``[...]`` :math:`\log\pi` of the taken tokens.
        reference_logprobs: same shape, :math:`\log\pi_{ref}`.

    >>> kl_penalty(torch.tensor([0.0]), torch.log(torch.tensor([2.0])), "k3")  # 2 - 1 - log 2
    tensor([0.3069])
    >>> kl_penalty(torch.tensor([0.0]), torch.tensor([-1.0]), "k1"), kl_penalty(
    ...     torch.tensor([0.0]), torch.tensor([-1.0]), "k2")
    (tensor([1.]), tensor([0.5000]))
    """
    if kl_type not in ("k1", "k2", "k3"):
        raise ValueError(f"`kl_type` must be 'k1', 'k2' or 'k3', got {kl_type!r}")
    log_ratio = reference_logprobs - logprobs
    if input_clamp is not None:
        log_ratio = log_ratio.clamp(-input_clamp, input_clamp)
    if kl_type == "k1":
        kl = -log_ratio
    elif kl_type == "k2":
        kl = 0.5 * log_ratio.square()
    else:
        kl = torch.expm1(log_ratio) - log_ratio
    if output_clamp is not None:
        kl = kl.clamp(-output_clamp, output_clamp)
    return kl


def policy_valid_tokens(token_mask: Tensor, sample_mask: Tensor | None = None, shift: bool = True) -> Tensor:
    """The token weights :func:`clipped_pg_loss` sums over: ``token_mask`` (``[:, 1:]`` with ``shift``)
    times ``sample_mask`` per row; their sum is the loss's ``global_valid_toks``.

    >>> policy_valid_tokens(torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([1, 0]))
    tensor([[1, 1],
            [0, 0]])
    """
    mask = token_mask[:, 1:] if shift else token_mask
    if sample_mask is None:
        return mask
    keep = sample_mask.reshape(-1, 1)
    if keep.dtype == torch.bool:
        return torch.where(keep, mask, torch.zeros_like(mask))
    return mask * keep


def _check_inputs(
    next_token_logits: Tensor,
    input_ids: Tensor,
    advantages: Tensor,
    prev_logprobs: Tensor,
    reference_logprobs: Tensor | None,
    token_mask: Tensor | None,
    sample_mask: Tensor | None,
) -> None:
    batch, steps = check_token_inputs(next_token_logits, input_ids, token_mask, sample_mask)
    check_floating("advantages", advantages)
    if tuple(advantages.shape) not in ((batch,), (batch, steps)):
        raise ValueError(
            f"`advantages` must have shape ({batch},) or {(batch, steps)} for `next_token_logits` of shape "
            f"{tuple(next_token_logits.shape)}, got {tuple(advantages.shape)}"
        )
    for name, tensor in (("prev_logprobs", prev_logprobs), ("reference_logprobs", reference_logprobs)):
        if tensor is None:
            continue
        check_floating(name, tensor)
        if tuple(tensor.shape) != (batch, steps):
            raise ValueError(
                f"`{name}` must have shape {(batch, steps)} (one per token of `input_ids`), "
                f"got {tuple(tensor.shape)}"
            )


def clipped_pg_loss(
    next_token_logits: Tensor,
    input_ids: Tensor,
    advantages: Tensor,
    prev_logprobs: Tensor,
    reference_logprobs: Tensor | None = None,
    token_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    global_valid_toks: Tensor | None = None,
    global_valid_seqs: Tensor | None = None,
    *,
    ratio_clip_min: float = 0.2,
    ratio_clip_max: float = 0.2,
    ratio_clip_c: float | None = None,
    disable_ppo_ratio: bool = False,
    aggregation: Aggregation = "token",
    kl_beta: float = 0.0,
    kl_type: KLType = "k3",
    kl_input_clamp: float | None = None,
    kl_output_clamp: float | None = None,
    shift: bool = True,
) -> ClippedPGTerms:
    r"""The clipped surrogate of PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") and
    GRPO (Shao et al. 2024, DeepSeekMath), per taken token :math:`y_{it}`:

    .. math::
        r_{it} = \exp(\log\pi(y_{it}) - \log\pi_{old}(y_{it})), \qquad
        \ell_{it} = \max\big(-A_{it} r_{it},\; -A_{it}\operatorname{clip}(r_{it}, 1-\epsilon_{low},
        1+\epsilon_{high})\big)

    with asymmetric :math:`\epsilon` ("clip-higher", DAPO, Yu et al. 2025). With the dual clip :math:`c > 1`
    (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL") tokens with :math:`A < 0` use
    :math:`\min(\ell_{it}, -c A_{it})`. ``disable_ppo_ratio`` gives REINFORCE: :math:`\ell_{it} = -A_{it}
    \log\pi(y_{it})`. With ``kl_beta`` :math:`\beta > 0`, :math:`\beta\,k(\log\pi, \log\pi_{ref})` is added
    per token (:func:`kl_penalty`, estimator ``kl_type``). Aggregation, with :math:`w_{it} = m_{it} s_i`:

    - ``"token"`` (TOKEN_LEVEL): :math:`L = \sum_{it} w_{it}\ell_{it} / N_{tok}`,
      :math:`N_{tok}` = ``global_valid_toks`` or :math:`\sum w` of this batch;
    - ``"sequence"`` (SEQUENCE_LEVEL): :math:`L = \sum_i s_i \big(\sum_t m_{it}\ell_{it} / \sum_t m_{it}\big)
      / N_{seq}`, :math:`N_{seq}` = ``global_valid_seqs`` or :math:`\sum_i s_i`.

    :math:`\log\pi` comes from ``next_token_logits`` (log-softmax in float32, float64 for float64 inputs);
    ``prev_logprobs``, ``reference_logprobs`` and ``advantages`` are constants. With ``shift=True`` (NeMo RL's
    convention) logits ``[:, :-1]`` score ``input_ids[:, 1:]`` and the ``[B, T]`` inputs (``prev_logprobs``,
    ``reference_logprobs``, ``token_mask``, per-token ``advantages``) are read at ``[:, 1:]``. Masked tokens
    and samples may hold anything (NaN, padding ids) and never reach the result; no valid token gives exactly
    0 with a zero gradient. In the *logits* of a masked token a NaN stays out of the loss but may show in that
    row's own gradient (the softmax's gradient multiplies it by 0, as it does a NaN at the last position with
    ``shift``, which scores nothing; removing it would copy the whole ``[B, T, V]`` logits). A NaN that counts
    makes the loss NaN (no value is checked: ``LossModule``'s ``nan_policy`` sees it).

    Args:
        next_token_logits: ``[B, T, V]`` the current policy's logits.
        input_ids: ``[B, T]`` the sampled tokens.
        advantages: ``[B]`` (one per sequence, GRPO) or ``[B, T]`` (per token).
        prev_logprobs: ``[B, T]`` :math:`\log\pi_{old}` of ``input_ids`` (the sampling policy).
        reference_logprobs: ``[B, T]`` :math:`\log\pi_{ref}`; required when ``kl_beta > 0``.
        token_mask, sample_mask: optional ``[B, T]`` / ``[B]``, bool or float weights.
        global_valid_toks, global_valid_seqs: optional 0-dim counts of the global batch.
        ratio_clip_min, ratio_clip_max: :math:`\epsilon_{low} \in [0, 1)`, :math:`\epsilon_{high} \ge 0`.
        ratio_clip_c: the dual clip :math:`c > 1`, or None.
        disable_ppo_ratio: REINFORCE instead of the clipped ratio.
        aggregation: ``"token"`` or ``"sequence"``.
        kl_beta, kl_type, kl_input_clamp, kl_output_clamp: the KL penalty (see :func:`kl_penalty`).
        shift: see above.

    Returns:
        :class:`ClippedPGTerms`.

    >>> logits = torch.zeros(1, 3, 2)  # π = 1/2 for every token
    >>> old = torch.log(torch.tensor([[0.5, 1.0, 0.5 / 1.5]]))  # ratios 1, 0.5, 1.5
    >>> terms = clipped_pg_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.tensor([1.0]), old,
    ...                         shift=False)
    >>> terms.loss  # -(1 + 0.5 + 1.2) / 3: A > 0 keeps min(r, 1.2)
    tensor(-0.9000)
    >>> terms.clip_fraction  # 0.5 and 1.5 lie outside [0.8, 1.2]
    tensor(0.6667)
    """
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"`aggregation` must be 'token' or 'sequence', got {aggregation!r}")
    if kl_type not in ("k1", "k2", "k3"):
        raise ValueError(f"`kl_type` must be 'k1', 'k2' or 'k3', got {kl_type!r}")
    check_positive("ratio_clip_min", ratio_clip_min, allow_zero=True)
    check_positive("ratio_clip_max", ratio_clip_max, allow_zero=True)
    if ratio_clip_min >= 1:
        raise ValueError(
            f"`ratio_clip_min` must be < 1 (the lower bound is 1 - ratio_clip_min), got {ratio_clip_min}"
        )
    if ratio_clip_c is not None and not ratio_clip_c > 1:
        raise ValueError(f"`ratio_clip_c` (the dual clip) must be > 1, got {ratio_clip_c}")
    check_positive("kl_beta", kl_beta, allow_zero=True)
    for name, value in (("kl_input_clamp", kl_input_clamp), ("kl_output_clamp", kl_output_clamp)):
        if value is not None:
            check_positive(name, value)
    _check_inputs(
        next_token_logits, input_ids, advantages, prev_logprobs, reference_logprobs, token_mask, sample_mask
    )
    if kl_beta > 0 and reference_logprobs is None:
        raise ValueError(f"`reference_logprobs` are required for the KL penalty (kl_beta={kl_beta})")
    use_kl = kl_beta > 0

    floating = [
        t for t in (next_token_logits, advantages, prev_logprobs, reference_logprobs) if t is not None
    ]
    dtype = compute_dtype(*floating)
    batch, steps = input_ids.shape
    device = next_token_logits.device

    def tokens_of(tensor: Tensor) -> Tensor:  # a [B, T] input at the positions the logits score
        return tensor[:, 1:] if shift else tensor

    tokens = tokens_of(input_ids)
    full_mask = torch.ones(batch, steps, dtype=dtype, device=device) if token_mask is None else token_mask
    weights = policy_valid_tokens(full_mask, sample_mask, shift).to(dtype)
    valid = weights != 0
    logprobs, _ = masked_token_log_probs(next_token_logits, tokens, weights, shift, dtype)

    def constant(tensor: Tensor) -> Tensor:  # detached, zero where not valid (a NaN there never leaks)
        tensor = tensor.detach().to(dtype)
        return torch.where(valid, tensor, torch.zeros_like(tensor))

    old = constant(tokens_of(prev_logprobs))
    adv = advantages.reshape(batch, 1).expand(batch, steps) if advantages.ndim == 1 else advantages
    adv = constant(tokens_of(adv))

    ratio = torch.exp(logprobs - old)
    low, high = 1.0 - ratio_clip_min, 1.0 + ratio_clip_max
    if disable_ppo_ratio:
        per_token = -adv * logprobs
    else:
        per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
        if ratio_clip_c is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * ratio_clip_c), per_token)
    if use_kl:
        kl = kl_penalty(
            logprobs, constant(tokens_of(reference_logprobs)), kl_type, kl_input_clamp, kl_output_clamp
        )
        per_token = per_token + kl_beta * kl
    else:
        kl = torch.zeros_like(logprobs)

    token_count = count_valid(weights, logprobs) if global_valid_toks is None else global_valid_toks
    if aggregation == "token":
        loss = divide_by_count(masked_sum(per_token, weights), token_count)
    else:
        row_weights = tokens_of(full_mask).to(dtype)
        row_weights = torch.where(valid, row_weights, torch.zeros_like(row_weights))
        row_sum = torch.where(valid, per_token * row_weights, torch.zeros_like(per_token)).sum(-1)
        per_sequence = divide_by_count(row_sum, row_weights.sum(-1))
        seq_weights = (
            torch.ones(batch, dtype=dtype, device=device) if sample_mask is None else sample_mask.to(dtype)
        )
        seq_count = count_valid(seq_weights, per_sequence) if global_valid_seqs is None else global_valid_seqs
        loss = divide_by_count(masked_sum(per_sequence, seq_weights), seq_count)

    with torch.no_grad():

        def token_share(values: Tensor) -> Tensor:
            return divide_by_count(masked_sum(values.detach(), weights), token_count)

        outside = ((ratio < low) | (ratio > high)).to(dtype)
        probs_ratio = token_share(ratio)
        clip_fraction = token_share(outside)
        kl_metric = token_share(kl)
        # -E_π[log π] estimated from samples of π_old by importance weighting
        approx_entropy = token_share(-ratio * logprobs)
        if sample_mask is None:
            num_valid_samples = torch.full((), float(batch), dtype=dtype, device=device)  # no host copy
        else:
            num_valid_samples = sample_mask.to(dtype).sum()
    return ClippedPGTerms(loss, probs_ratio, clip_fraction, kl_metric, approx_entropy, num_valid_samples)
