"""The loss modules: thin shells over :mod:`lightning_losses.functional`, each registered by a short name."""

from lightning_losses.losses.cross_entropy import CrossEntropyLoss
from lightning_losses.losses.regression import MSELoss

__all__ = ["CrossEntropyLoss", "MSELoss"]
