"""Two tasks on the digits: the class and a regression target measured on the image itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_losses.examples.digits import DictDataset, DigitsDataModule

__all__ = ["DigitsMultiTaskDataModule", "TwoHeadMLP", "image_statistic"]

ImageStatistic = Literal["ink", "vertical_center", "horizontal_center"]


def image_statistic(images: Tensor, statistic: ImageStatistic) -> Tensor:
    r"""A per-image number measured on 8×8 digits ``images [N, 64]`` (or ``[N, 1, 8, 8]``), in [0, 1] units.

    - ``"ink"``: the mean pixel intensity.
    - ``"vertical_center"`` / ``"horizontal_center"``: the intensity-weighted mean row / column
      (0 = top / left, 7 = bottom / right), the image's centre of mass; 3.5 for an empty image.

    >>> image = torch.zeros(1, 8, 8)
    >>> image[0, 6, 1] = 1.0
    >>> image_statistic(image.reshape(1, 64), "vertical_center"), image_statistic(image.reshape(1, 64), "ink")
    (tensor([6.]), tensor([0.0156]))
    """
    pixels = images.reshape(images.shape[0], 8, 8).to(torch.float32)
    if statistic == "ink":
        return pixels.mean(dim=(1, 2))
    if statistic not in ("vertical_center", "horizontal_center"):
        raise ValueError(
            f"`statistic` must be 'ink', 'vertical_center' or 'horizontal_center', got {statistic!r}"
        )
    profile = pixels.sum(dim=2 if statistic == "vertical_center" else 1)  # [N, 8]
    positions = torch.arange(8, dtype=pixels.dtype)
    mass = profile.sum(dim=1)
    center = (profile * positions).sum(dim=1) / torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, center, torch.full_like(center, 3.5))


class DigitsMultiTaskDataModule(DigitsDataModule):
    """The digits split of :class:`DigitsDataModule` with a regression target added to every batch.

    Batches are ``{"inputs": [B, 64], "target": [B] (the digit), <statistic>: [B] float32}``, where
    ``<statistic>`` is measured on the image (:func:`image_statistic`). With ``standardize`` the target
    is shifted and scaled by the training split's mean and standard deviation (kept as
    ``target_mean`` / ``target_std`` to map predictions back).

    Args:
        statistic: ``"ink"``, ``"vertical_center"`` or ``"horizontal_center"``; also the batch key.
        standardize: zero mean and unit variance on the training split.
        **kwargs: those of :class:`DigitsDataModule`.

    >>> dm = DigitsMultiTaskDataModule(batch_size=16, statistic="vertical_center")
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch), batch["vertical_center"].shape
    (['inputs', 'target', 'vertical_center'], torch.Size([16]))
    >>> round(dm.train_set.tensors["vertical_center"].mean().item(), 4)
    0.0
    """

    def __init__(
        self,
        statistic: ImageStatistic = "vertical_center",
        standardize: bool = True,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        image_shape: bool = False,
        num_workers: int = 0,
    ) -> None:
        if statistic not in ("ink", "vertical_center", "horizontal_center"):
            raise ValueError(
                f"`statistic` must be 'ink', 'vertical_center' or 'horizontal_center', got {statistic!r}"
            )
        super().__init__(batch_size, val_fraction, test_fraction, seed, image_shape, num_workers)
        self.statistic = statistic
        self.standardize = standardize

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        super().setup(stage)
        splits = [self.train_set, self.val_set, self.test_set]
        values = [image_statistic(split.tensors["inputs"], self.statistic) for split in splits]
        self.target_mean, self.target_std = 0.0, 1.0
        if self.standardize:
            self.target_mean = values[0].mean().item()
            self.target_std = values[0].std().item()
        self.train_set, self.val_set, self.test_set = (
            DictDataset(**split.tensors, **{self.statistic: (value - self.target_mean) / self.target_std})
            for split, value in zip(splits, values, strict=True)
        )


class TwoHeadMLP(nn.Module):
    """A shared MLP trunk with a classification head and a scalar regression head.

    ``inputs [B, in_features]`` (or any shape, flattened) → ``{class_key: [B, num_classes],
    regression_key: [B]}``.

    >>> outputs = TwoHeadMLP(64, 10, hidden=(32,))(torch.zeros(5, 64))
    >>> {key: tuple(value.shape) for key, value in outputs.items()}
    {'digit_logits': (5, 10), 'regression': (5,)}
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        class_key: str = "digit_logits",
        regression_key: str = "regression",
    ) -> None:
        super().__init__()
        if class_key == regression_key:
            raise ValueError(f"`class_key` and `regression_key` must differ, both are {class_key!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.trunk = nn.Sequential(*layers)
        self.class_head = nn.Linear(width, num_classes)
        self.regression_head = nn.Linear(width, 1)
        self.class_key = class_key
        self.regression_key = regression_key

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        features = self.trunk(inputs)
        return {
            self.class_key: self.class_head(features),
            self.regression_key: self.regression_head(features).squeeze(-1),
        }
