"""``RewardShapingLoss`` (``reward_shaping``)."""

from __future__ import annotations

from torch import Tensor

from lightning_losses.functional.reward_shaping import reward_shaping_terms
from lightning_losses.protocol import LossFunction, LossOutput, LossType, check_positive
from lightning_losses.registry import register_loss

__all__ = ["RewardShapingLoss"]


@register_loss("reward_shaping")
class RewardShapingLoss(LossFunction):
    r"""Actor-critic loss with potential-based reward shaping (Ng, Harada & Russell, ICML 1999).

    :math:`L = L_\pi + c_v L_V - c_H H + c_F L_F`; see :mod:`lightning_losses.functional.reward_shaping`
    for each term and why the shaping term leaves the optimal policy unchanged. The actions come from the
    rollout in the batch (never sampled here); advantages, returns and potentials are constants.

    Inputs (resolved by name by ``LossModule``): ``policy_logits [N, A]`` and ``values [N]`` from the model;
    ``actions [N]``, ``advantages [N]``, ``returns [N]`` and optionally ``potentials``, ``next_potentials``,
    ``terminated``, ``mask [N]`` from the batch. SEQUENCE_LEVEL: each transition is a "sequence", divided
    by ``global_valid_seqs`` (counted from the batch key ``mask``, or the batch size), so micro-batches and
    DDP ranks add up exactly.

    Args:
        value_weight: :math:`c_v` (guide default 0.5).
        entropy_weight: :math:`c_H` (guide default 0.01).
        shaping_weight: :math:`c_F` (guide default 0.1).
        discount: :math:`\gamma` of the shaping reward :math:`F = \gamma\Phi(s') - \Phi(s)`; use the
            rollout's discount.

    Metrics (the guide's keys; the weighted terms add up to ``total_loss``): ``policy_loss``,
    ``value_loss`` (unweighted MSE), ``entropy_loss`` (:math:`-c_H H`), ``shaping_loss`` (:math:`c_F L_F`),
    ``total_loss``, ``entropy``, ``mean_advantage``.

    >>> import torch
    >>> loss_fn = RewardShapingLoss(entropy_weight=0.0)
    >>> out = loss_fn(torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 1]), torch.ones(2), torch.ones(2))
    >>> round(out.loss.item(), 4), round(out.metrics["policy_loss"].item(), 4)
    (1.1931, 0.6931)
    """

    loss_type = LossType.SEQUENCE_LEVEL
    sample_mask_key = "mask"
    partial_metrics = (
        "policy_loss",
        "value_loss",
        "entropy_loss",
        "shaping_loss",
        "total_loss",
        "entropy",
        "mean_advantage",
    )

    def __init__(
        self,
        value_weight: float = 0.5,
        entropy_weight: float = 0.01,
        shaping_weight: float = 0.1,
        discount: float = 0.99,
    ) -> None:
        super().__init__()
        check_positive("value_weight", value_weight, allow_zero=True)
        check_positive("entropy_weight", entropy_weight, allow_zero=True)
        check_positive("shaping_weight", shaping_weight, allow_zero=True)
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"`discount` must be in [0, 1], got {discount}")
        self.value_weight = value_weight
        self.entropy_weight = entropy_weight
        self.shaping_weight = shaping_weight
        self.discount = discount

    def forward(
        self,
        policy_logits: Tensor,
        values: Tensor,
        actions: Tensor,
        advantages: Tensor,
        returns: Tensor,
        potentials: Tensor | None = None,
        next_potentials: Tensor | None = None,
        terminated: Tensor | None = None,
        mask: Tensor | None = None,
        global_valid_seqs: Tensor | None = None,
    ) -> LossOutput:
        terms = reward_shaping_terms(
            policy_logits,
            values,
            actions,
            advantages,
            returns,
            potentials,
            next_potentials,
            terminated,
            mask,
            global_valid_seqs,
            discount=self.discount,
        )
        entropy_loss = -self.entropy_weight * terms.entropy
        shaping_loss = self.shaping_weight * terms.shaping_loss
        loss = terms.policy_loss + self.value_weight * terms.value_loss + entropy_loss + shaping_loss
        total = loss.detach()
        metrics = {
            "loss": total,
            "policy_loss": terms.policy_loss.detach(),
            "value_loss": terms.value_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            "shaping_loss": shaping_loss.detach(),
            "total_loss": total,
            "entropy": terms.entropy.detach(),
            "mean_advantage": terms.mean_advantage,
        }
        return LossOutput(loss, metrics)
