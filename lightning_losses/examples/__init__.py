"""Data modules, models and metrics for the example configs (real data that ships inside packages)."""

from lightning_losses.examples.cartpole import (
    ActorCritic,
    CartPoleDataModule,
    CartPoleEvaluation,
    evaluate_policy,
)
from lightning_losses.examples.causal_lm import CharVocab, TinyCausalLM
from lightning_losses.examples.digits import DictDataset, DigitsDataModule
from lightning_losses.examples.digits_bandit import DigitsBanditDataModule, PolicyMLP
from lightning_losses.examples.grpo import AdditionGRPODataModule, RewardLogger
from lightning_losses.examples.imbalanced import ImbalancedDigitsDataModule
from lightning_losses.examples.knn import KNNAccuracy
from lightning_losses.examples.models import MLP
from lightning_losses.examples.multitask import DigitsMultiTaskDataModule, TwoHeadMLP, image_statistic
from lightning_losses.examples.preference_pairs import AdditionPreferenceDataModule
from lightning_losses.examples.text_corpus import CharLMDataModule, PerplexityLogger
from lightning_losses.examples.verifiable_task import (
    AdditionSFTDataModule,
    AdditionTask,
    GreedyAccuracy,
    WarmStartLM,
    check_addition,
    greedy_accuracy,
)

__all__ = [
    "MLP",
    "ActorCritic",
    "AdditionGRPODataModule",
    "AdditionPreferenceDataModule",
    "AdditionSFTDataModule",
    "AdditionTask",
    "CartPoleDataModule",
    "CartPoleEvaluation",
    "CharLMDataModule",
    "CharVocab",
    "DictDataset",
    "DigitsBanditDataModule",
    "DigitsDataModule",
    "DigitsMultiTaskDataModule",
    "GreedyAccuracy",
    "ImbalancedDigitsDataModule",
    "KNNAccuracy",
    "PerplexityLogger",
    "PolicyMLP",
    "RewardLogger",
    "TinyCausalLM",
    "TwoHeadMLP",
    "WarmStartLM",
    "check_addition",
    "evaluate_policy",
    "greedy_accuracy",
    "image_statistic",
]
