"""Aggregate a loss's metrics dict with torchmetrics, one weighted mean per key, created on first sight.

The aggregators are registered submodules, so they move with the module's device and Lightning syncs
them over DDP ranks when it computes the epoch value. Their states are not persistent: checkpoints
do not change when a new key appears. ``update`` reads no value (no NaN check: that would be a
host-device sync on an accelerator); a non-finite value stays visible in the epoch mean instead of
being dropped. (torchmetrics' ``MeanMetric`` would check for NaN, and with ``nan_strategy="disable"``
it ignores the weights, in torchmetrics 1.9.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["CounterValue", "LoggedPerEpoch", "MetricAggregator", "WeightedMean"]


class LoggedPerEpoch(Metric):
    """A ``Metric`` that a LightningModule logs as an object once per epoch (``self.log(name, metric,
    on_epoch=True)``): Lightning keeps it, computes it at the epoch's end and resets it.

    ``claim_logging(trainer)`` says whether to log it now (not yet logged to this trainer since the last
    reset) and marks it logged. The reset also follows a tuner's run (learning-rate or batch-size
    finder), after which Lightning drops the logged object, so an epoch number would not do as the mark.
    """

    def __init__(self) -> None:
        super().__init__()
        self.logged_to: int | None = None  # id of the trainer it was logged to since the last reset

    def claim_logging(self, trainer: object) -> bool:
        if self.logged_to == id(trainer):
            return False
        self.logged_to = id(trainer)
        return True

    def reset(self) -> None:
        super().reset()
        self.logged_to = None


class WeightedMean(LoggedPerEpoch):
    """``Σ w·x / Σ w`` over updates, summed over DDP ranks when computed.

    >>> mean = WeightedMean()
    >>> mean.update(torch.tensor(1.0), 3); mean.update(torch.tensor(5.0), 1)
    >>> mean.compute()
    tensor(2.)
    """

    full_state_update = False
    total: Tensor
    weight: Tensor
    one: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")
        self.register_buffer("one", torch.ones(()), persistent=False)  # see `_add`

    def update(self, value: Tensor, weight: float | Tensor = 1.0, keep: Tensor | None = None) -> None:
        """Add ``value`` counted ``weight`` times; where the bool scalar ``keep`` is False, nothing (a
        non-finite value included), with no host read."""
        if keep is not None:
            value = torch.where(keep, value, 0)
        self._add(value, weight, keep)

    def accumulate(self, value: Tensor, weight: float | Tensor = 1.0, keep: Tensor | None = None) -> None:
        """``update`` without torchmetrics' wrapper around it, for the update a training step makes;
        with ``keep``, ``value`` must already be 0 where ``keep`` is False (the caller logged it so).

        The wrapper costs ~5 µs a call (two ``nn.Module.__setattr__`` calls and a grad-mode context);
        of what it does this metric needs only two things, done here directly: drop the cached
        ``compute()`` value and count the update. (No grad mode is needed: the value is detached and
        the states take no gradient.)
        """
        attributes = self.__dict__  # plain attributes of an nn.Module live here; no __setattr__ checks
        attributes["_computed"] = None
        attributes["_update_count"] += 1
        self._add(value, weight, keep)

    def _add(self, value: Tensor, weight: float | Tensor, keep: Tensor | None) -> None:
        value = value.detach()
        if value.ndim:
            value = value.sum()
        if self.total.is_inference() and not torch.is_inference_mode_enabled():
            # states first created under `trainer.validate` are inference tensors, which an in-place
            # update outside inference mode (a later `fit`) refuses: continue from normal copies
            self.total, self.weight = self.total.clone(), self.weight.clone()
        # in place: a training step updates these every step, and out of place each update would be
        # two more `nn.Module.__setattr__` calls (~20 µs, a percent of a small model's step)
        # the weight added is `weight` times `keep` (0 or 1) when given
        if isinstance(weight, Tensor):
            weight = weight.detach()
            self.total.addcmul_(value, weight)
            if keep is None:
                self.weight.add_(weight)
            else:
                self.weight.addcmul_(weight, keep)
        else:  # a number, added as `one` (or `keep`) times it: `add_(number)` makes a tensor of it (~1.4 µs)
            self.total.add_(value, alpha=weight)
            unit = self._buffers["one"] if keep is None else keep  # not `self.one`: ~3 µs in a training loop
            self.weight.add_(unit, alpha=weight)

    def compute(self) -> Tensor:
        return self.total / self.weight


class CounterValue(LoggedPerEpoch):
    """The value of a counter tensor, updated in place, when computed (as float).

    Logged as an object once per epoch (``self.log(name, metric, on_epoch=True)``), it is read when
    Lightning computes it at the epoch's end; logging the counter itself each step would cost a
    ``self.log`` call a step (~0.4 ms). The counter must be the same on every rank: there is no state
    to sync.

    >>> count = torch.zeros((), dtype=torch.long)
    >>> value = CounterValue()
    >>> value.update(count)
    >>> _ = count.add_(2)
    >>> value.compute()
    tensor(2.)
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.counter: Tensor | None = None

    def update(self, counter: Tensor) -> None:
        self.counter = counter

    def compute(self) -> Tensor:
        if self.counter is None:
            raise ValueError("`CounterValue.compute` before `update`: no counter to read")
        return self.counter.float()


class MetricAggregator(nn.Module):
    """A ``WeightedMean`` per metric key, created lazily.

    >>> agg = MetricAggregator()
    >>> for value in (1.0, 3.0):
    ...     _ = agg.update({"loss": torch.tensor(value)})
    >>> agg["loss"].compute()
    tensor(2.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._attribute_of: dict[str, str] = {}
        # the same submodules by key: `getattr` on an nn.Module costs ~1 µs per key and step
        self._metric_of: dict[str, WeightedMean] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._attribute_of

    def __getitem__(self, key: str) -> WeightedMean:
        return self._metric_of[key]

    def keys(self) -> list[str]:
        return list(self._attribute_of)

    def attribute(self, key: str) -> str:
        """The submodule name holding ``key``'s aggregator (metric keys may hold '/' or '.')."""
        return self._attribute_of[key]

    def get_or_create(self, key: str, device: torch.device) -> WeightedMean:
        if key not in self._attribute_of:
            base = "metric_" + re.sub(r"\W", "_", key)
            name, suffix = base, 1
            while hasattr(self, name):
                suffix += 1
                name = f"{base}_{suffix}"
            # made on the device (torchmetrics records the default device): `.to(device)` would copy its
            # states from the host, a host-device sync in the first training step
            with torch.device(device):
                metric = WeightedMean()
            self.add_module(name, metric)
            self._attribute_of[key] = name
            self._metric_of[key] = metric
        return self._metric_of[key]

    def update(
        self,
        metrics: Mapping[str, Tensor],
        weights: Mapping[str, float | Tensor] | float = 1.0,
        keep: Tensor | None = None,
    ) -> dict[str, WeightedMean]:
        """Add one value per key, counted ``weights[key]`` times (or ``weights`` times); returns the
        aggregators that were updated. ``keep``: see ``WeightedMean.accumulate`` (values already 0 where
        it is False)."""
        updated = {}
        per_key = isinstance(weights, Mapping)
        for key, value in metrics.items():
            metric = self._metric_of.get(key)
            if metric is None:
                metric = self.get_or_create(key, value.device)
            metric.accumulate(value, weights[key] if per_key else weights, keep)
            updated[key] = metric
        return updated
