"""``LossLogger`` in a LightningModule written the way users write theirs (no ``LossModule``)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import LossLogger
from lightning_losses.functional import focal_loss
from lightning_losses.losses import FocalLoss
from tests.helpers import DestroyProcessGroup, quiet_trainer


class UserClassifier(pl.LightningModule):
    """A user's own module: its own steps, a library loss, three lines for logging."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.loss_fn = FocalLoss(gamma=gamma)
        self.loss_logger = LossLogger()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_logger(self, "train", self.loss_fn(self(x), y), batch_size=len(x))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.loss_logger(self, "val", self.loss_fn(self(x), y), batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    )


class ShardedData(pl.LightningDataModule):
    """Rank r validates on its own contiguous, unevenly sized shard (no padding by a sampler)."""

    def __init__(self, train: TensorDataset, val: TensorDataset, val_cuts: tuple[int, ...]) -> None:
        super().__init__()
        self.train, self.val, self.val_cuts = train, val, val_cuts

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        start, stop = self.val_cuts[rank], self.val_cuts[rank + 1]
        return DataLoader(torch.utils.data.Subset(self.val, range(start, stop)), batch_size=8)


def full_set_metrics(module: UserClassifier, data: TensorDataset) -> dict[str, Tensor]:
    """The focal loss and accuracy of the whole set in one call: what the epoch means must equal."""
    x, y = data.tensors
    with torch.no_grad():
        logits = module(x)
    return {
        "val/loss": focal_loss(logits, y, gamma=2.0),
        "val/accuracy": (logits.argmax(-1) == y).float().mean(),
    }


def test_epoch_means_over_uneven_batches_equal_the_whole_set():
    torch.manual_seed(0)
    module = UserClassifier()
    val = dataset(30, 1)  # batches of 8, 8, 8 and 6
    trainer = quiet_trainer(max_epochs=1)
    trainer.validate(module, ShardedData(dataset(16, 0), val, (0, 30)), verbose=False)
    expected = full_set_metrics(module, val)
    for key, value in expected.items():
        torch.testing.assert_close(trainer.callback_metrics[key], value, rtol=1e-5, atol=1e-6)


class SkipsNonFiniteSteps(UserClassifier):
    """Logs with ``keep=torch.isfinite(loss)`` and poisons the loss of batch 1 with NaN (then skips it)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, metrics = self.loss_fn(self(x), y)
        if batch_idx == 1:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": loss.detach()}
        else:
            self.losses.append(loss.item())
        self.loss_logger(self, "train", (loss, metrics), batch_size=len(x), keep=torch.isfinite(loss))
        self.logged.append(self.trainer.callback_metrics["train/loss"].item())
        return loss if batch_idx != 1 else None  # Lightning skips a step whose training_step returns None


def test_keep_logs_a_skipped_step_as_0_and_leaves_it_out_of_the_epoch_mean():
    torch.manual_seed(0)
    module = SkipsNonFiniteSteps()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, DataLoader(dataset(24, 0), batch_size=8))
    assert module.logged[1] == 0.0 and module.logged[0] == module.losses[0]
    expected = torch.tensor(module.losses).mean()  # equal batches of 8: the plain mean of the kept steps
    torch.testing.assert_close(trainer.callback_metrics["train/loss_epoch"], expected)


def test_checkpoint_round_trip_and_resume(tmp_path):
    torch.manual_seed(0)
    data = ShardedData(dataset(32, 0), dataset(20, 1), (0, 20))
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path, enable_checkpointing=True)
    module = UserClassifier()
    trainer.fit(module, data)
    path = trainer.checkpoint_callback.best_model_path
    restored = UserClassifier.load_from_checkpoint(path)
    for (name, value), other in zip(module.state_dict().items(), restored.state_dict().values(), strict=True):
        torch.testing.assert_close(other, value, msg=name)
    resumed = quiet_trainer(max_epochs=3, default_root_dir=tmp_path, enable_checkpointing=True)
    resumed.fit(restored, data, ckpt_path=path)  # resuming restores and logs the metrics again
    assert resumed.current_epoch == 3
    torch.testing.assert_close(
        resumed.callback_metrics["val/loss"],
        full_set_metrics(restored, data.val)["val/loss"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_logger_that_is_not_an_attribute_is_a_clear_error():
    module = UserClassifier()
    stray = LossLogger()
    with pytest.raises(ValueError, match="not an attribute"):
        stray(module, "train", (torch.tensor(1.0), {"loss": torch.tensor(1.0)}))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_metrics_are_synced_over_two_ddp_processes():
    """Ranks validate on 18 and 12 samples; the synced epoch means equal the whole 30 in one process."""
    torch.manual_seed(0)
    module = UserClassifier()
    val = dataset(30, 1)
    trainer = quiet_trainer(
        devices=2, strategy="ddp_spawn", max_epochs=1, use_distributed_sampler=False,
        callbacks=[DestroyProcessGroup()],
    )  # fmt: skip
    trainer.validate(module, ShardedData(dataset(16, 0), val, (0, 18, 30)), verbose=False)
    expected = full_set_metrics(module, val)
    for key, value in expected.items():
        torch.testing.assert_close(trainer.callback_metrics[key].float(), value, rtol=1e-5, atol=1e-6)


def test_train_epoch_means_over_several_epochs_and_fits(tmp_path):
    """The epoch Metric is logged once per epoch; every epoch's mean still covers all its steps."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    data = dataset(40, 0)  # batches of 16, 16 and 8
    module = UserClassifier()
    for fit in range(2):  # a second fit of the same module with a new trainer logs again
        logger = CSVLogger(tmp_path, name=f"fit{fit}")
        trainer = quiet_trainer(max_epochs=2, logger=logger, log_every_n_steps=1)
        trainer.fit(module, DataLoader(data, batch_size=16))
        rows = list(
            csv.DictReader((tmp_path / f"fit{fit}" / "version_0" / "metrics.csv").read_text().splitlines())
        )
        for epoch in range(2):
            steps = [float(r["train/loss"]) for r in rows if r["train/loss"] and int(r["epoch"]) == epoch]
            assert len(steps) == 3
            expected = (16 * steps[0] + 16 * steps[1] + 8 * steps[2]) / 40
            logged = [
                float(r["train/loss_epoch"])
                for r in rows
                if r["train/loss_epoch"] and int(r["epoch"]) == epoch
            ]
            assert logged == [pytest.approx(expected, rel=1e-5)]
