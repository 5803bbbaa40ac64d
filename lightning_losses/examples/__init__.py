"""Data modules and small models for the example configs (real data that ships inside packages)."""

from lightning_losses.examples.digits import DictDataset, DigitsDataModule
from lightning_losses.examples.models import MLP

__all__ = ["MLP", "DictDataset", "DigitsDataModule"]
