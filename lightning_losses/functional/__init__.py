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
from lightning_losses.functional.multi_task import effective_task_weights, multi_task_loss
from lightning_losses.functional.regression import mse
from lightning_losses.functional.sequence_policy import (
    SequencePolicyTerms,
    sequence_log_probs,
    sequence_policy_loss,
)

__all__ = [
    "AdversarialTerms",
    "DistillationTerms",
    "SequencePolicyTerms",
    "adversarial_loss",
    "contrastive_loss",
    "cross_entropy",
    "distillation_loss",
    "effective_task_weights",
    "focal_loss",
    "info_nce_loss",
    "kl_divergence",
    "mse",
    "multi_task_loss",
    "pgd_attack",
    "sequence_log_probs",
    "sequence_policy_loss",
    "supervised_contrastive_loss",
]
