"""Pure tensor math of every loss: no state, no Lightning."""

from lightning_losses.functional.cross_entropy import cross_entropy
from lightning_losses.functional.regression import mse

__all__ = ["cross_entropy", "mse"]
