"""Aggregate a loss's metrics dict with torchmetrics, one ``MeanMetric`` per key, created on first sight.

The aggregators are registered submodules, so they move with the module's device and Lightning syncs
them over DDP ranks when it computes the epoch value. Their states are not persistent: checkpoints
do not change when a new key appears. ``nan_strategy="disable"`` keeps ``update`` free of the NaN check
that would read the value (a host-device sync on an accelerator); a non-finite value stays visible in
the epoch mean instead of being dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

__all__ = ["MetricAggregator"]


class MetricAggregator(nn.Module):
    """A ``MeanMetric`` per metric key, created lazily.

    >>> agg = MetricAggregator()
    >>> for value in (1.0, 3.0):
    ...     _ = agg.update({"loss": torch.tensor(value)})
    >>> agg["loss"].compute()
    tensor(2.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._attribute_of: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._attribute_of

    def __getitem__(self, key: str) -> MeanMetric:
        return getattr(self, self._attribute_of[key])

    def keys(self) -> list[str]:
        return list(self._attribute_of)

    def attribute(self, key: str) -> str:
        """The submodule name holding ``key``'s aggregator (metric keys may hold '/' or '.')."""
        return self._attribute_of[key]

    def get_or_create(self, key: str, device: torch.device) -> MeanMetric:
        if key not in self._attribute_of:
            base = "metric_" + re.sub(r"\W", "_", key)
            name, suffix = base, 1
            while hasattr(self, name):
                suffix += 1
                name = f"{base}_{suffix}"
            self.add_module(name, MeanMetric(nan_strategy="disable").to(device))
            self._attribute_of[key] = name
        return self[key]

    def update(self, metrics: Mapping[str, Tensor]) -> dict[str, MeanMetric]:
        """Add one value per key; returns the aggregators that were updated."""
        updated = {}
        for key, value in metrics.items():
            metric = self.get_or_create(key, value.device)
            metric.update(value)
            updated[key] = metric
        return updated
