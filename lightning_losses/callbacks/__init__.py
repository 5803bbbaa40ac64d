"""Training aids (gradient-norm logging, smoothed metrics: logging only), adversarial evaluation, and exact
resumption of killed runs (``ResumableTraining``, ``check_checkpoint``)."""

from lightning_losses.callbacks.adversarial import AdversarialEvaluation
from lightning_losses.callbacks.gradient_norm import GradientNormLogger, gradient_norms
from lightning_losses.callbacks.metric_ema import MetricEMA
from lightning_losses.callbacks.resume import (
    CheckpointError,
    ResumableLoader,
    ResumableTraining,
    check_checkpoint,
)

__all__ = [
    "AdversarialEvaluation",
    "CheckpointError",
    "GradientNormLogger",
    "MetricEMA",
    "ResumableLoader",
    "ResumableTraining",
    "check_checkpoint",
    "gradient_norms",
]
