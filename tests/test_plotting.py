"""``lightning-losses plot``: a real run's CSV log rendered into a PNG."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import LossModule
from lightning_losses.cli import main
from lightning_losses.losses import FocalLoss
from lightning_losses.plotting import find_metrics_file, metric_panels, plot_metrics, read_metrics
from tests.helpers import quiet_trainer

image = pytest.importorskip("matplotlib.image")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short real fit with train/val metrics from FocalLoss (loss, p_t, accuracy) in a CSVLogger."""
    root = tmp_path_factory.mktemp("runs")
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(96, 4, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    )
    torch.manual_seed(0)
    module = LossModule(torch.nn.Linear(4, 3), FocalLoss(gamma=2.0))
    trainer = quiet_trainer(max_epochs=3, logger=CSVLogger(root, name="focal"), log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    return root / "focal"


def test_the_csv_is_found_and_read_with_every_logged_metric(run_dir):
    csv_path = find_metrics_file(run_dir)  # the folder of versions: the newest is used
    assert csv_path == run_dir / "version_0" / "metrics.csv"
    series = read_metrics(csv_path)
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/p_t", "val/accuracy"} <= set(series)
    assert len(series["train/loss"]) == 3 * 6  # every step of 3 epochs of 6 batches
    assert len(series["val/loss"]) == 3
    assert set(metric_panels(list(series))) == {"loss", "p_t", "accuracy"}
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        find_metrics_file(run_dir / "missing")


def test_plot_subcommand_writes_a_non_trivial_png(run_dir, tmp_path, capsys):
    output = tmp_path / "plot.png"
    main(["plot", str(run_dir), "--output", str(output), "--columns", "2"])
    assert capsys.readouterr().out.strip() == str(output)
    pixels = image.imread(output)
    height, width = pixels.shape[:2]
    assert (height, width) == (600, 840)  # 2 rows x 2 columns of panels at 100 dpi (3 panels)
    colours = torch.from_numpy(pixels[..., :3].reshape(-1, 3).copy())
    assert len(torch.unique(colours, dim=0)) > 50  # lines, text and markers, not a blank canvas
    non_white = (colours < 0.95).any(dim=1).float().mean()
    assert 0.02 < non_white < 0.6


def test_keys_select_panels_and_unknown_keys_are_named(run_dir, tmp_path):
    written = plot_metrics(run_dir, tmp_path / "loss.png", keys=["loss"])
    assert image.imread(written).shape[:2] == (300, 420)  # one panel
    with pytest.raises(ValueError, match=r"\['nope'\], which were not logged"):
        plot_metrics(run_dir, tmp_path / "x.png", keys=["nope"])
