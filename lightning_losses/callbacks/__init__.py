"""Training aids (gradient-norm logging, smoothed metrics: logging only) and adversarial evaluation."""

from lightning_losses.callbacks.adversarial import AdversarialEvaluation
from lightning_losses.callbacks.gradient_norm import GradientNormLogger, gradient_norms
from lightning_losses.callbacks.metric_ema import MetricEMA

__all__ = ["AdversarialEvaluation", "GradientNormLogger", "MetricEMA", "gradient_norms"]
