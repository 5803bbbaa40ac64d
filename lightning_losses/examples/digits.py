"""scikit-learn's digits as a LightningDataModule: 1,797 real 8×8 handwritten digits, no download."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DictDataset", "DigitsDataModule", "load_digits_arrays"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as ``[1797, 64]`` float32 and labels ``[1797]`` int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the digits examples need scikit-learn: pip install 'lightning-losses[examples]'"
        ) from error
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


class DictDataset(Dataset):
    """Rows of equally long tensors as dicts, so that batches are ``{name: tensor}``."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = tensors
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


class DigitsDataModule(pl.LightningDataModule):
    """Seeded, stratified train/val/test split of the digits; batches ``{"inputs", "target"}``.

    Args:
        batch_size: training batch size (evaluation uses the same).
        val_fraction / test_fraction: shares of the 1,797 images held out, stratified by digit.
        seed: the split's seed (the training order follows ``seed_everything``).
        image_shape: ``False`` gives ``inputs [B, 64]``; ``True`` gives ``[B, 1, 8, 8]`` for a CNN.
        num_workers: DataLoader workers.

    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["inputs"].shape, batch["target"].shape
    (torch.Size([32, 64]), torch.Size([32]))
    >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
    (1257, 270, 270)
    """

    num_classes = 10
    num_features = 64

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        image_shape: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum below 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.image_shape = image_shape
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_arrays()
        index = np.arange(len(labels))
        held_out = self.val_fraction + self.test_fraction
        train_idx, rest_idx = train_test_split(
            index, test_size=held_out, stratify=labels, random_state=self.seed
        )
        val_idx, test_idx = train_test_split(
            rest_idx,
            test_size=self.test_fraction / held_out,
            stratify=labels[rest_idx],
            random_state=self.seed,
        )
        self.indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        inputs = torch.from_numpy(images)
        if self.image_shape:
            inputs = inputs.reshape(-1, 1, 8, 8)
        target = torch.from_numpy(labels)
        self.train_set, self.val_set, self.test_set = (
            DictDataset(inputs=inputs[idx], target=target[idx]) for idx in (train_idx, val_idx, test_idx)
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        kwargs: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
