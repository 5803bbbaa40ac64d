"""The loss modules: thin shells over :mod:`lightning_losses.functional`, each registered by a short name.

- ``CrossEntropyLoss`` (``cross_entropy``), ``MSELoss`` (``mse``)
- ``FocalLoss`` (``focal``): Lin et al. 2017
- ``ContrastiveLoss`` (``contrastive``): Hadsell, Chopra & LeCun 2006
- ``InfoNCELoss`` (``infonce``): van den Oord et al. 2018; Chen et al. 2020
- ``SupConLoss`` (``supcon``): Khosla et al. 2020
- ``KLDivergenceLoss`` (``kl_divergence``): Hinton, Vinyals & Dean 2015
- ``MultiTaskLoss`` (``multi_task``): Kendall, Gal & Cipolla 2018
- ``CombinedLoss`` (``combined``): the guide's weighted sum
- ``AdversarialLoss`` (``adversarial``): FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018)
- ``RewardShapingLoss`` (``reward_shaping``): actor-critic with shaping (Ng, Harada & Russell 1999)
- ``NLLLoss`` (``nll``): SFT, token-level negative log-likelihood
- ``ClippedPGLoss`` (``clipped_pg``): PPO (Schulman et al. 2017) / GRPO clipped policy gradient
- ``DPOLoss`` (``dpo``): Rafailov et al. 2023
- ``CustomSequenceLoss`` (``custom_sequence``): REINFORCE (Williams 1992) with NeMo RL's normalization
- ``FusedLinearCrossEntropyLoss`` (``fused_linear_cross_entropy``), ``FusedLinearDistillationLoss``
  (``fused_linear_distillation``): the LM head fused with the loss, chunked over tokens so the whole
  ``[N, V]`` logits never exist (the idea of Liger-Kernel's fused kernels, in pure PyTorch)
"""

from lightning_losses.losses.adversarial import AdversarialLoss
from lightning_losses.losses.combined import CombinedLoss
from lightning_losses.losses.contrastive import ContrastiveLoss, InfoNCELoss, SupConLoss
from lightning_losses.losses.cross_entropy import CrossEntropyLoss
from lightning_losses.losses.distillation import KLDivergenceLoss
from lightning_losses.losses.focal import FocalLoss
from lightning_losses.losses.fused_linear import FusedLinearCrossEntropyLoss, FusedLinearDistillationLoss
from lightning_losses.losses.multi_task import MultiTaskLoss
from lightning_losses.losses.nll import NLLLoss
from lightning_losses.losses.policy_gradient import ClippedPGLoss
from lightning_losses.losses.preference import DPOLoss
from lightning_losses.losses.regression import MSELoss
from lightning_losses.losses.reward_shaping import RewardShapingLoss
from lightning_losses.losses.sequence_policy import CustomSequenceLoss

__all__ = [
    "AdversarialLoss",
    "ClippedPGLoss",
    "CombinedLoss",
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "CustomSequenceLoss",
    "DPOLoss",
    "FocalLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDistillationLoss",
    "InfoNCELoss",
    "KLDivergenceLoss",
    "MSELoss",
    "MultiTaskLoss",
    "NLLLoss",
    "RewardShapingLoss",
    "SupConLoss",
]
