import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_losses.examples import DigitsDataModule
from lightning_losses.examples.digits import load_digits_arrays
from lightning_losses.examples.imbalanced import ImbalancedDigitsDataModule


def setup(module):
    module.setup("fit")
    return module


def test_val_and_test_are_the_balanced_split_and_train_a_subset():
    balanced = setup(DigitsDataModule(seed=3))
    imbalanced = setup(ImbalancedDigitsDataModule(seed=3, minority_classes=[0, 4, 7], keep_fraction=0.2))
    for stage, a, b in (
        ("val", balanced.val_set, imbalanced.val_set),
        ("test", balanced.test_set, imbalanced.test_set),
    ):
        assert np.array_equal(balanced.indices[stage], imbalanced.indices[stage])
        for key in ("inputs", "target"):
            assert torch.equal(a.tensors[key], b.tensors[key]), (stage, key)
    kept = imbalanced.indices["train"]
    assert set(kept.tolist()) <= set(balanced.indices["train"].tolist()) and len(set(kept.tolist())) == len(
        kept
    )
    # the training tensors are the real images of the kept indices
    images, labels = load_digits_arrays()
    assert torch.equal(imbalanced.train_set.tensors["inputs"], torch.from_numpy(images[kept]))
    assert torch.equal(imbalanced.train_set.tensors["target"], torch.from_numpy(labels[kept]))


@pytest.mark.parametrize("keep_fraction", [0.1, 0.37, 1.0])
def test_minority_counts_follow_keep_fraction_and_others_are_untouched(keep_fraction):
    balanced = np.bincount(setup(DigitsDataModule()).train_set.tensors["target"].numpy())
    module = setup(ImbalancedDigitsDataModule(minority_classes=[1, 2, 3], keep_fraction=keep_fraction))
    counts = module.class_counts()
    for digit in range(10):
        if digit in (1, 2, 3):
            assert counts[digit] == math.ceil(keep_fraction * balanced[digit]), digit
        else:
            assert counts[digit] == balanced[digit], digit


def test_subsample_is_seeded():
    def kept(seed):
        return setup(ImbalancedDigitsDataModule(subsample_seed=seed)).indices["train"]

    assert np.array_equal(kept(0), kept(0))
    assert not np.array_equal(kept(0), kept(1))


def test_setup_twice_does_not_subsample_again():
    module = setup(ImbalancedDigitsDataModule(keep_fraction=0.5))
    before = module.class_counts()
    module.setup("test")
    assert module.class_counts() == before


def test_batches_are_dicts_of_the_digits_shapes():
    module = setup(ImbalancedDigitsDataModule(batch_size=16))
    batch = next(iter(module.train_dataloader()))
    assert batch["inputs"].shape == (16, 64) and batch["target"].dtype == torch.long


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"minority_classes": [3, 10]}, "minority_classes"),
        ({"minority_classes": [2, 2]}, "minority_classes"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImbalancedDigitsDataModule(**kwargs)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMBALANCED_CONFIGS = ["digits_focal_imbalanced.yaml", "digits_cross_entropy_imbalanced.yaml"]


@pytest.mark.parametrize("config", IMBALANCED_CONFIGS)
def test_imbalanced_configs_print(config, capsys):
    from lightning_losses.cli import build_cli

    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_cli(["fit", "--config", str(CONFIGS / config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].endswith("ImbalancedDigitsDataModule")


def test_imbalanced_configs_differ_only_in_the_loss():
    focal, cross_entropy = (yaml.safe_load((CONFIGS / name).read_text()) for name in IMBALANCED_CONFIGS)
    for config in (focal, cross_entropy):
        del config["model"]["loss"], config["trainer"]["logger"]["init_args"]["name"]
    assert focal == cross_entropy


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_imbalanced_focal_config_trains(tmp_path):
    from lightning_losses.cli import build_cli

    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / IMBALANCED_CONFIGS[0]),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_epochs=5",
        ]
    )
    assert cli.trainer.callback_metrics["val/macro_f1"] > 0.6
