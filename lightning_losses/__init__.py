"""lightning-losses: training objectives for PyTorch Lightning.

Every loss is an ``nn.Module`` returning ``LossOutput(loss, metrics)``; ``LossModule`` trains any model
with any loss and logs the metrics; ``lightning-losses fit --config ...`` drives it from YAML.
"""

from lightning_losses.loss_logger import LossLogger
from lightning_losses.metrics import MetricAggregator
from lightning_losses.module import LossModule
from lightning_losses.protocol import LossFunction, LossOutput, LossType, set_value_checks
from lightning_losses.registry import available_losses, build_loss, register_loss

__all__ = [
    "LossFunction",
    "LossLogger",
    "LossModule",
    "LossOutput",
    "LossType",
    "MetricAggregator",
    "available_losses",
    "build_loss",
    "register_loss",
    "set_value_checks",
]
__version__ = "0.1.0"
