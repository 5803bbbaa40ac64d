"""``LossLogger``: log any loss's metrics from your own LightningModule, as ``LossModule`` does.

For a project that already has its ``training_step``: keep it, call a library loss, and hand the
``LossOutput`` to a ``LossLogger`` attribute of the module. Every metric key gets a weighted mean per
stage (a torchmetrics ``Metric``, so Lightning syncs it over DDP ranks and resets it each epoch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_losses.metrics import MetricAggregator
from lightning_losses.protocol import split_output

__all__ = ["LossLogger"]


class LossLogger(nn.Module):
    """Log a loss's ``(loss, metrics)`` from any LightningModule; returns the loss to backpropagate.

    Logged names: ``train/<key>`` (each step, this rank's value, no sync) and ``train/<key>_epoch``; for
    other stages ``<stage>/<key>`` (epoch means over elements, synced over DDP ranks). An epoch mean
    weighs each step by ``weights[key]`` (a global count for a globally normalized value) or else by
    ``batch_size``, so uneven last batches do not skew it.

    Args:
        prog_bar: the metric key shown in the progress bar (``None``: none).

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> from lightning_losses.losses import FocalLoss
        >>> class Classifier(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 3)
        ...         self.loss_fn = FocalLoss(gamma=2.0)
        ...         self.loss_logger = LossLogger()  # 1: own one
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         output = self.loss_fn(self.net(x), y)  # 2: (loss, metrics)
        ...         return self.loss_logger(self, "train", output, batch_size=len(x))  # 3: log, backprop
        ...
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> sorted(k for k in trainer.callback_metrics if k.endswith("_epoch"))  # FocalLoss's metrics
        ['train/accuracy_epoch', 'train/loss_epoch', 'train/p_t_epoch']
    """

    def __init__(self, prog_bar: str | None = "loss") -> None:
        super().__init__()
        self.prog_bar = prog_bar
        self._attribute_of: dict[str, str] = {}  # stage -> submodule name
        self._aggregator_of: dict[str, MetricAggregator] = {}  # the same submodules (no nn.Module getattr)
        self._path: str | None = None  # this logger's attribute path in the LightningModule

    def __getitem__(self, stage: str) -> MetricAggregator:
        """The aggregator of ``stage`` (its ``[key].compute()`` is the running epoch mean)."""
        aggregator = self._aggregator_of.get(stage)
        if aggregator is None:
            name = re.sub(r"\W", "_", stage) + "_metrics"
            while hasattr(self, name):
                name += "_"
            aggregator = MetricAggregator()
            self.add_module(name, aggregator)
            self._attribute_of[stage] = name
            self._aggregator_of[stage] = aggregator
        return aggregator

    def forward(
        self,
        module: pl.LightningModule,
        stage: str,
        output: Any,
        batch_size: int | None = None,
        weights: Mapping[str, Tensor | float] | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Log ``output`` (a ``LossOutput``, a ``(loss, metrics)`` pair or a loss tensor) under ``stage``.

        Args:
            module: the LightningModule that owns this logger (its ``log`` is used).
            stage: ``"train"``, ``"val"``, ``"test"`` or any name.
            output: what the loss returned.
            batch_size: the weight of this step's values in the epoch means (default 1).
            weights: per-key weights overriding ``batch_size`` (e.g. a global token count).
            keep: a bool scalar tensor; where False (a step you skip, e.g. ``torch.isfinite(loss)``) the
                step's values are logged as 0 and stay out of the epoch means, with no host read.

        Returns:
            The loss tensor, unchanged.
        """
        loss, metrics = split_output(output)
        self.log_metrics(module, stage, metrics, weights, 1 if batch_size is None else batch_size, keep)
        return loss

    def log_metrics(
        self,
        module: pl.LightningModule,
        stage: str,
        metrics: Mapping[str, Tensor],
        weights: Mapping[str, Tensor | float] | None = None,
        default_weight: Tensor | float = 1,
        keep: Tensor | None = None,
    ) -> None:
        """Update the epoch means of ``metrics`` and log them (see the class docstring and ``forward``)."""
        if not isinstance(module, pl.LightningModule):
            raise TypeError(f"`module` must be the LightningModule that owns this logger, got {type(module)}")
        if not metrics:
            return
        path = self._attribute_path(module)  # first: a stray logger is an error before anything is logged
        weights = weights or {}
        if keep is not None:  # 0 keeps the dtype
            metrics = {key: torch.where(keep, value, 0) for key, value in metrics.items()}
        aggregator = self._aggregator_of.get(stage) or self[stage]  # one call less a step
        updated = aggregator.update(metrics, {k: weights.get(k, default_weight) for k in metrics}, keep)
        for key, metric in updated.items():
            shown = key == self.prog_bar
            if stage == "train":
                module.log(f"train/{key}", metrics[key], on_step=True, on_epoch=False, prog_bar=shown)
                # The epoch mean is a Metric object Lightning keeps a reference to until the epoch ends:
                # logging it once per epoch suffices, and each `self.log` costs ~0.4 ms of a training step.
                if not metric.claim_logging(module._trainer):  # the property costs ~3 µs in a loop
                    continue
                name, shown = f"train/{key}_epoch", False
            else:
                name = f"{stage}/{key}"
            attribute = f"{path}.{self._attribute_of[stage]}.{aggregator.attribute(key)}"
            module.log(name, metric, on_step=False, on_epoch=True, metric_attribute=attribute, prog_bar=shown)

    def _attribute_path(self, module: pl.LightningModule) -> str:
        if self._path is None:
            found = [name for name, child in module.named_modules() if child is self]
            if not found:
                raise ValueError(
                    f"this LossLogger is not an attribute of {type(module).__name__}; assign it in "
                    "`__init__` (`self.loss_logger = LossLogger()`) so Lightning can sync and restore it"
                )
            self._path = found[0]
        return self._path
