"""Pure tensor math of every loss: no state, no Lightning."""

from lightning_losses.functional.adversarial import AdversarialTerms, adversarial_loss, pgd_attack
from lightning_losses.functional.contrastive import (
    contrastive_loss,
    info_nce_loss,
    supervised_contrastive_loss,
)
from lightning_losses.functional.cross_entropy import cross_entropy
from lightning_losses.functional.distillation import DistillationTerms, distillation_loss, kl_divergence
from lightning_losses.functional.focal import focal_loss
from lightning_losses.functional.fused_linear import fused_linear_cross_entropy, fused_linear_distillation
from lightning_losses.functional.multi_task import effective_task_weights, multi_task_loss
from lightning_losses.functional.nll import nll_loss, token_log_probs
from lightning_losses.functional.policy_gradient import ClippedPGTerms, clipped_pg_loss, kl_penalty
from lightning_losses.functional.preference import DPOTerms, dpo_loss
from lightning_losses.functional.regression import mse
from lightning_losses.functional.reward_shaping import (
    RewardShapingTerms,
    discounted_returns,
    generalized_advantage_estimate,
    potential_shaping_reward,
    reward_shaping_loss,
    reward_shaping_terms,
)
from lightning_losses.functional.sequence_policy import (
    SequencePolicyTerms,
    sequence_log_probs,
    sequence_policy_loss,
)

__all__ = [
    "AdversarialTerms",
    "ClippedPGTerms",
    "DPOTerms",
    "DistillationTerms",
    "RewardShapingTerms",
    "SequencePolicyTerms",
    "adversarial_loss",
    "clipped_pg_loss",
    "contrastive_loss",
    "cross_entropy",
    "discounted_returns",
    "distillation_loss",
    "dpo_loss",
    "effective_task_weights",
    "focal_loss",
    "fused_linear_cross_entropy",
    "fused_linear_distillation",
    "generalized_advantage_estimate",
    "info_nce_loss",
    "kl_divergence",
    "kl_penalty",
    "mse",
    "multi_task_loss",
    "nll_loss",
    "pgd_attack",
    "potential_shaping_reward",
    "reward_shaping_loss",
    "reward_shaping_terms",
    "sequence_log_probs",
    "sequence_policy_loss",
    "supervised_contrastive_loss",
    "token_log_probs",
]
