"""Data modules, models and metrics for the example configs (real data that ships inside packages)."""

from lightning_losses.examples.cartpole import ActorCritic, CartPoleDataModule, CartPoleEvaluation
from lightning_losses.examples.digits import DictDataset, DigitsDataModule
from lightning_losses.examples.digits_bandit import DigitsBanditDataModule, PolicyMLP
from lightning_losses.examples.imbalanced import ImbalancedDigitsDataModule
from lightning_losses.examples.knn import KNNAccuracy
from lightning_losses.examples.models import MLP
from lightning_losses.examples.multitask import DigitsMultiTaskDataModule, TwoHeadMLP, image_statistic

__all__ = [
    "MLP",
    "ActorCritic",
    "CartPoleDataModule",
    "CartPoleEvaluation",
    "DictDataset",
    "DigitsBanditDataModule",
    "DigitsDataModule",
    "DigitsMultiTaskDataModule",
    "ImbalancedDigitsDataModule",
    "KNNAccuracy",
    "PolicyMLP",
    "TwoHeadMLP",
    "image_statistic",
]
