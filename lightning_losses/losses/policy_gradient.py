"""``ClippedPGLoss`` (``clipped_pg``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_losses.functional.policy_gradient import clipped_pg_loss, policy_valid_tokens
from lightning_losses.protocol import LossFunction, LossOutput, LossType, check_positive
from lightning_losses.registry import register_loss

__all__ = ["ClippedPGLoss"]


@register_loss("clipped_pg")
class ClippedPGLoss(LossFunction):
    r"""PPO / GRPO's clipped policy-gradient loss (Schulman et al. 2017; Shao et al. 2024) with
    clip-higher, dual clip (Ye et al. 2020), REINFORCE mode and a KL penalty to a reference policy.

    Per taken token, :math:`\max(-A r, -A\,\operatorname{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high}))`
    with :math:`r = \exp(\log\pi - \log\pi_{old})`, plus :math:`\beta\,k` (:math:`k_1 | k_2 | k_3`,
    Schulman 2020); summed and divided by ``global_valid_toks`` (``aggregation="token"``, TOKEN_LEVEL) or
    averaged per sequence and divided by ``global_valid_seqs`` (``"sequence"``, SEQUENCE_LEVEL). See
    :func:`lightning_losses.functional.policy_gradient.clipped_pg_loss` for the formula, shapes and masks.

    Inputs, resolved by name under ``LossModule``: ``next_token_logits`` ``[B, T, V]``, ``input_ids``
    ``[B, T]``, ``advantages`` ``[B]`` or ``[B, T]``, ``prev_logprobs`` ``[B, T]``, optional
    ``reference_logprobs`` ``[B, T]``, ``token_mask`` ``[B, T]``, ``sample_mask`` ``[B]``.
    :meth:`valid_tokens` is ``token_mask[:, 1:]`` (with ``shift``) times ``sample_mask``, exactly the
    token-level denominator.

    Args:
        ratio_clip_min, ratio_clip_max: :math:`\epsilon_{low}`, :math:`\epsilon_{high}`.
        ratio_clip_c: dual clip :math:`c > 1` for :math:`A < 0` (None: off).
        disable_ppo_ratio: REINFORCE, :math:`-A\log\pi`.
        aggregation: ``"token"`` or ``"sequence"``.
        kl_beta: :math:`\beta \ge 0` (0: no penalty, ``reference_logprobs`` not needed).
        kl_type: ``"k1"``, ``"k2"`` or ``"k3"``.
        kl_input_clamp, kl_output_clamp: optional clamps of the log-ratio and of the estimate.
        shift: logits at ``t`` score ``input_ids[:, t + 1]`` (default) or ``input_ids[:, t]``.

    Metrics: ``loss``, ``probs_ratio``, ``clip_fraction``, ``kl_penalty``, ``approx_entropy`` (partial sums
    over ``global_valid_toks``) and ``num_valid_samples`` (this batch's count; summed over ranks).

    >>> import torch
    >>> loss_fn = ClippedPGLoss(ratio_clip_min=0.2, ratio_clip_max=0.2)
    >>> logits = torch.zeros(1, 4, 2)  # π = 1/2; shifted: tokens 1..3 are scored
    >>> old = torch.log(torch.tensor([[0.5, 0.5, 1.0, 0.5 / 1.5]]))  # ratios 1, 0.5, 1.5
    >>> loss, metrics = loss_fn(logits, torch.zeros(1, 4, dtype=torch.long), torch.tensor([-1.0]), old)
    >>> round(loss.item(), 4)  # A < 0 keeps max(r, 0.8): (1 + 0.8 + 1.5) / 3
    1.1
    """

    partial_metrics = ("probs_ratio", "clip_fraction", "kl_penalty", "approx_entropy", "num_valid_samples")

    def __init__(
        self,
        ratio_clip_min: float = 0.2,
        ratio_clip_max: float = 0.2,
        ratio_clip_c: float | None = None,
        disable_ppo_ratio: bool = False,
        aggregation: str = "token",
        kl_beta: float = 0.0,
        kl_type: str = "k3",
        kl_input_clamp: float | None = None,
        kl_output_clamp: float | None = None,
        shift: bool = True,
    ) -> None:
        super().__init__()
        if aggregation not in ("token", "sequence"):
            raise ValueError(f"`aggregation` must be 'token' or 'sequence', got {aggregation!r}")
        if kl_type not in ("k1", "k2", "k3"):
            raise ValueError(f"`kl_type` must be 'k1', 'k2' or 'k3', got {kl_type!r}")
        check_positive("ratio_clip_min", ratio_clip_min, allow_zero=True)
        check_positive("ratio_clip_max", ratio_clip_max, allow_zero=True)
        if ratio_clip_min >= 1:
            raise ValueError(f"`ratio_clip_min` must be < 1, got {ratio_clip_min}")
        if ratio_clip_c is not None and not ratio_clip_c > 1:
            raise ValueError(f"`ratio_clip_c` (the dual clip) must be > 1, got {ratio_clip_c}")
        check_positive("kl_beta", kl_beta, allow_zero=True)
        self.ratio_clip_min = ratio_clip_min
        self.ratio_clip_max = ratio_clip_max
        self.ratio_clip_c = ratio_clip_c
        self.disable_ppo_ratio = disable_ppo_ratio
        self.aggregation = aggregation
        self.kl_beta = kl_beta
        self.kl_type = kl_type
        self.kl_input_clamp = kl_input_clamp
        self.kl_output_clamp = kl_output_clamp
        self.shift = shift
        self.loss_type = LossType.TOKEN_LEVEL if aggregation == "token" else LossType.SEQUENCE_LEVEL

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor | None:
        """``token_mask`` (``[:, 1:]`` with ``shift``) times ``sample_mask``: the token-level denominator."""
        token_mask = inputs.get("token_mask")
        if token_mask is None:
            input_ids = inputs.get("input_ids")
            if input_ids is None:
                return None
            token_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return policy_valid_tokens(token_mask, inputs.get("sample_mask"), self.shift)

    def forward(
        self,
        next_token_logits: Tensor,
        input_ids: Tensor,
        advantages: Tensor,
        prev_logprobs: Tensor,
        reference_logprobs: Tensor | None = None,
        token_mask: Tensor | None = None,
        sample_mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
        global_valid_seqs: Tensor | None = None,
    ) -> LossOutput:
        terms = clipped_pg_loss(
            next_token_logits,
            input_ids,
            advantages,
            prev_logprobs,
            reference_logprobs,
            token_mask,
            sample_mask,
            global_valid_toks,
            global_valid_seqs,
            ratio_clip_min=self.ratio_clip_min,
            ratio_clip_max=self.ratio_clip_max,
            ratio_clip_c=self.ratio_clip_c,
            disable_ppo_ratio=self.disable_ppo_ratio,
            aggregation=self.aggregation,
            kl_beta=self.kl_beta,
            kl_type=self.kl_type,
            kl_input_clamp=self.kl_input_clamp,
            kl_output_clamp=self.kl_output_clamp,
            shift=self.shift,
        )
        metrics = {"loss": terms.loss.detach()}
        for key in self.partial_metrics:
            metrics[key] = getattr(terms, key).detach()
        return LossOutput(terms.loss, metrics)

    def extra_repr(self) -> str:
        return (
            f"ratio_clip=({self.ratio_clip_min}, {self.ratio_clip_max}), ratio_clip_c={self.ratio_clip_c}, "
            f"disable_ppo_ratio={self.disable_ppo_ratio}, aggregation={self.aggregation!r}, "
            f"kl_beta={self.kl_beta}, kl_type={self.kl_type!r}, shift={self.shift}"
        )
