import numpy as np
import pytest
import torch

from lightning_losses.examples import MLP, DigitsDataModule
from lightning_losses.examples.digits import load_digits_arrays


def split(seed: int = 0, **kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(seed=seed, **kwargs)
    dm.setup("fit")
    return dm


def test_split_is_a_partition_of_the_real_digits():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 64) and labels.shape == (1797,)
    assert images.min() == 0.0 and images.max() == 1.0
    dm = split()
    parts = [dm.indices[stage] for stage in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1797))
    for part, dataset in zip(parts, (dm.train_set, dm.val_set, dm.test_set), strict=True):
        assert torch.equal(dataset.tensors["inputs"], torch.from_numpy(images[part]))
        assert torch.equal(dataset.tensors["target"], torch.from_numpy(labels[part]))


def test_split_is_stratified_and_seeded():
    dm = split()
    _, labels = load_digits_arrays()
    overall = np.bincount(labels) / len(labels)
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        share = np.bincount(dataset.tensors["target"].numpy(), minlength=10) / len(dataset)
        assert np.abs(share - overall).max() < 0.01
    again, other = split(0), split(1)
    assert torch.equal(again.val_set.tensors["inputs"], dm.val_set.tensors["inputs"])
    assert not torch.equal(other.val_set.tensors["inputs"], dm.val_set.tensors["inputs"])


def test_image_shape_and_model():
    dm = split(image_shape=True, batch_size=8)
    batch = next(iter(dm.val_dataloader()))
    assert batch["inputs"].shape == (8, 1, 8, 8) and batch["target"].dtype == torch.long
    assert MLP(64, 10)(batch["inputs"]).shape == (8, 10)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"val_fraction": 0.0}, "val_fraction"), ({"batch_size": 0}, "batch_size")]
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)
