"""Training aids: gradient-norm logging and smoothed metrics (logging only, the loss is untouched)."""

from lightning_losses.callbacks.gradient_norm import GradientNormLogger, gradient_norms
from lightning_losses.callbacks.metric_ema import MetricEMA

__all__ = ["GradientNormLogger", "MetricEMA", "gradient_norms"]
