from pathlib import Path

import pytest
import torch

from lightning_losses.cli import build_cli
from lightning_losses.examples.digits import DigitsDataModule, load_digits_arrays
from lightning_losses.examples.multitask import DigitsMultiTaskDataModule, TwoHeadMLP, image_statistic

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_multitask.yaml"


def loop_statistic(image, statistic):
    """The statistic of one flat 64-pixel image by Python loops over rows and columns."""
    pixels = [[image[8 * r + c] for c in range(8)] for r in range(8)]
    total = sum(sum(row) for row in pixels)
    if statistic == "ink":
        return total / 64
    if total == 0:
        return 3.5
    if statistic == "vertical_center":
        return sum(r * pixels[r][c] for r in range(8) for c in range(8)) / total
    return sum(c * pixels[r][c] for r in range(8) for c in range(8)) / total


@pytest.mark.parametrize("statistic", ["ink", "vertical_center", "horizontal_center"])
def test_image_statistic_against_loops_on_real_digits(statistic):
    images, _ = load_digits_arrays()
    chosen = torch.from_numpy(images[::97])
    chosen = torch.cat([chosen, torch.zeros(1, 64)])  # and an empty image
    expected = torch.tensor([loop_statistic(image.tolist(), statistic) for image in chosen])
    torch.testing.assert_close(image_statistic(chosen, statistic), expected)
    torch.testing.assert_close(image_statistic(chosen.reshape(-1, 1, 8, 8), statistic), expected)


def test_data_module_adds_a_standardized_target_on_the_same_split():
    dm = DigitsMultiTaskDataModule(statistic="vertical_center", batch_size=32)
    dm.setup("fit")
    plain = DigitsDataModule(batch_size=32)
    plain.setup("fit")
    for name in ("train_set", "val_set", "test_set"):
        ours, theirs = getattr(dm, name).tensors, getattr(plain, name).tensors
        assert torch.equal(ours["inputs"], theirs["inputs"]) and torch.equal(ours["target"], theirs["target"])
        raw = image_statistic(ours["inputs"], "vertical_center")
        torch.testing.assert_close(ours["vertical_center"], (raw - dm.target_mean) / dm.target_std)
    train = dm.train_set.tensors["vertical_center"]
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-5
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["inputs", "target", "vertical_center"]
    assert batch["vertical_center"].dtype == torch.float32 and batch["vertical_center"].shape == (32,)

    raw = DigitsMultiTaskDataModule(statistic="ink", standardize=False)
    raw.setup("fit")
    torch.testing.assert_close(raw.val_set.tensors["ink"], raw.val_set.tensors["inputs"].mean(1))


def test_two_head_model_and_bad_arguments():
    outputs = TwoHeadMLP(64, 10, hidden=(16, 8), class_key="a", regression_key="b")(torch.zeros(3, 1, 8, 8))
    assert outputs["a"].shape == (3, 10) and outputs["b"].shape == (3,)
    with pytest.raises(ValueError, match="`class_key` and `regression_key` must differ"):
        TwoHeadMLP(class_key="x", regression_key="x")
    with pytest.raises(ValueError, match="`statistic` must be"):
        DigitsMultiTaskDataModule(statistic="weight")
    with pytest.raises(ValueError, match="`statistic` must be"):
        image_statistic(torch.zeros(1, 64), "weight")


@pytest.mark.slow
def test_config_learns_both_tasks_and_a_sigma_per_task(tmp_path):
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/accuracy"] >= 0.94, metrics
    assert metrics["val/center_loss"] <= 0.05, metrics  # standardized units: the variance is 1
    log_variances = cli.model.loss.log_variances.detach()
    assert (log_variances < -0.3).all(), log_variances  # both σ learned down from 1
    torch.testing.assert_close(metrics["val/digit_sigma"], (0.5 * log_variances[0]).exp())
