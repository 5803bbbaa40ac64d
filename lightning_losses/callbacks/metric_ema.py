"""``MetricEMA``: an exponential moving average of logged training metrics, for logging only."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["MetricEMA"]


class MetricEMA(pl.Callback):
    r"""Log a smoothed copy ``<key>_ema`` of each per-step training metric; the loss itself is untouched.

    :math:`m_t = \beta m_{t-1} + (1-\beta) x_t`, logged with bias correction
    :math:`m_t / (1-\beta^t)` (so the first values are not pulled towards 0). The guide's
    "loss smoothing" (``loss = 0.9·loss + 0.1·previous_loss``) changed the gradient; this only changes
    what is plotted. The averages are tensors updated on the metrics' device (no host read) and are
    saved in checkpoints, so a resumed run continues them.

    Args:
        decay: β in [0, 1).
        prefix: which logged keys to smooth: the values last logged under keys starting with it
            (``_epoch`` and ``_ema`` keys are left alone).
    """

    def __init__(self, decay: float = 0.9, prefix: str = "train/") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}")
        self.decay = decay
        self.prefix = prefix
        self.averages: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def _keys(self, metrics: dict[str, Any]) -> list[str]:
        return [
            k
            for k, v in metrics.items()
            if k.startswith(self.prefix)
            and not k.endswith(("_epoch", "_ema"))
            and isinstance(v, Tensor)
            and v.numel() == 1
        ]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        for key in self._keys(metrics):
            value = metrics[key].detach().float().reshape(())
            previous = self.averages.get(key, torch.zeros_like(value)).to(value.device)
            average = self.decay * previous + (1 - self.decay) * value
            self.averages[key] = average
            self.counts[key] = self.counts.get(key, 0) + 1
            corrected = average / (1 - self.decay ** self.counts[key])
            pl_module.log(f"{key}_ema", corrected, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"averages": {k: v.cpu() for k, v in self.averages.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.averages = dict(state_dict.get("averages", {}))
        self.counts = dict(state_dict.get("counts", {}))
