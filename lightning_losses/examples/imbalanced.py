"""scikit-learn's digits with a class-imbalanced training set (balanced validation and test sets)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lightning_losses.examples.digits import DictDataset, DigitsDataModule

__all__ = ["ImbalancedDigitsDataModule"]


class ImbalancedDigitsDataModule(DigitsDataModule):
    """``DigitsDataModule`` whose **training** set keeps only a fraction of some classes.

    The validation and test sets are exactly those of ``DigitsDataModule`` with the same ``seed`` (still
    stratified, so balanced): scores on them show how well the rare classes were learned. From the
    training split, each class in ``minority_classes`` keeps ``ceil(keep_fraction × count)`` of its
    images (at least one), drawn without replacement by ``subsample_seed``; the other classes keep all.

    Args:
        minority_classes: the digits to subsample.
        keep_fraction: the share of each minority class kept, in (0, 1].
        subsample_seed: the seed of the draw.
        **kwargs: the arguments of ``DigitsDataModule`` (``batch_size``, ``seed``, ...).

    >>> dm = ImbalancedDigitsDataModule(minority_classes=[0, 1, 2, 3, 4], keep_fraction=0.1)
    >>> dm.setup("fit")
    >>> import numpy as np
    >>> np.bincount(dm.train_set.tensors["target"].numpy()).tolist()
    [13, 13, 13, 13, 13, 127, 127, 125, 122, 126]
    >>> len(dm.val_set), len(dm.test_set)
    (270, 270)
    """

    def __init__(
        self,
        minority_classes: Sequence[int] = (0, 1, 2, 3, 4),
        keep_fraction: float = 0.1,
        subsample_seed: int = 0,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        image_shape: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            image_shape=image_shape,
            num_workers=num_workers,
        )
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"`keep_fraction` must be in (0, 1], got {keep_fraction}")
        classes = list(minority_classes)
        if len(set(classes)) != len(classes) or not all(0 <= c < self.num_classes for c in classes):
            raise ValueError(
                f"`minority_classes` must be distinct digits in [0, {self.num_classes}), got {classes}"
            )
        self.minority_classes = tuple(sorted(classes))
        self.keep_fraction = keep_fraction
        self.subsample_seed = subsample_seed

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "_subsampled", False):
            return
        super().setup(stage)
        train_idx = self.indices["train"]
        target = self.train_set.tensors["target"].numpy()
        rng = np.random.default_rng(self.subsample_seed)
        keep = np.ones(len(train_idx), dtype=bool)
        for digit in self.minority_classes:
            rows = np.flatnonzero(target == digit)
            kept = max(1, math.ceil(self.keep_fraction * len(rows))) if len(rows) else 0
            dropped = rng.permutation(rows)[kept:]
            keep[dropped] = False
        self.indices["train"] = train_idx[keep]
        rows_kept = torch.from_numpy(keep)
        self.train_set = DictDataset(**{name: t[rows_kept] for name, t in self.train_set.tensors.items()})
        self._subsampled = True

    def class_counts(self) -> list[int]:
        """Images per digit in the (subsampled) training set; call after ``setup``."""
        target = self.train_set.tensors["target"].numpy()
        return np.bincount(target, minlength=self.num_classes).tolist()
