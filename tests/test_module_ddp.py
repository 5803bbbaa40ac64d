"""LossModule under 2-process CPU DDP (ddp_spawn, gloo): global counts, exact gradients, metrics, faults."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_losses import LossModule
from tests.helpers import (
    DestroyProcessGroup,
    PoisonableTokenLoss,
    RankShardData,
    RecordGradients,
    TokenRegressor,
    TokenSquaredError,
    concat_shards,
    quiet_trainer,
    token_shards,
)

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.timeout(300)]

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def initial_model() -> TokenRegressor:
    torch.manual_seed(0)
    return TokenRegressor().double()


def fit(
    directory: Path,
    per_rank: list[list[dict]],
    loss,
    devices: int,
    callbacks: list[pl.Callback] = (),
    **module_kwargs,
):
    directory.mkdir()
    module = LossModule(initial_model(), loss, optimizer=SGD, **module_kwargs)
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true",
        max_epochs=1,
        use_distributed_sampler=False,
        callbacks=[RecordGradients(directory), DestroyProcessGroup(), *callbacks],
    )
    trainer.fit(module, datamodule=RankShardData(per_rank))
    return trainer


class CountBarriers(pl.Callback):
    """Count the ``torch.distributed.barrier`` calls of each training batch (in each spawned rank) and
    save them: on NCCL a barrier blocks the host until the device has run all queued work."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls = 0
        self.original = torch.distributed.barrier

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        torch.distributed.barrier = counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.distributed.barrier = self.original
        path = self.directory / f"barriers_rank{trainer.global_rank}_batch{batch_idx}.txt"
        path.write_text(str(self.calls))


def test_ddp_steps_all_reduce_counts_and_the_check_without_a_barrier(tmp_path):
    steps = [token_shards(seed=seed) for seed in (0, 1)]
    directory = tmp_path / "ddp"
    per_rank = [[s[0] for s in steps], [s[1] for s in steps]]
    fit(directory, per_rank, TokenSquaredError(), devices=2, callbacks=[CountBarriers(directory)])
    counts = {path.name: path.read_text() for path in directory.glob("barriers_*.txt")}
    assert counts == {f"barriers_rank{r}_batch{b}.txt": "0" for r in range(2) for b in range(2)}


def test_ddp_gradients_counts_and_metrics_equal_one_process_on_the_global_batch(tmp_path):
    steps = [
        token_shards(seed=seed) for seed in (0, 1)
    ]  # 2 steps; per step rank 0 has 10, rank 1 has 5 tokens
    ddp = fit(
        tmp_path / "ddp", [[s[0] for s in steps], [s[1] for s in steps]], TokenSquaredError(), devices=2
    )
    single = fit(tmp_path / "single", [[concat_shards(s) for s in steps]], TokenSquaredError(), devices=1)

    for step in range(2):
        reference = torch.load(tmp_path / "single" / f"grads_rank0_step{step}.pt")
        for rank in range(2):
            grads = torch.load(tmp_path / "ddp" / f"grads_rank{rank}_step{step}.pt")
            assert grads.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(grads[name], reference[name], rtol=1e-12, atol=1e-12)
        for rank in range(2):
            state = torch.load(tmp_path / "ddp" / f"state_rank{rank}_batch{step}.pt")
            assert state["metrics"]["train/global_valid_toks"].item() == 15  # 10 + 5, on every rank

    for key in ("train/loss_epoch", "train/squared_error_epoch", "train/global_valid_toks_epoch"):
        torch.testing.assert_close(
            ddp.callback_metrics[key].double(), single.callback_metrics[key].double(), rtol=1e-6, atol=0
        )

    # The test can fail: averaging per-rank means (DDP without global counts) gives another gradient.
    model = initial_model()
    naive = []
    for shard in steps[0]:
        model.zero_grad()
        preds = model(shard["features"])["preds"]
        ((preds - shard["target"]) ** 2)[shard["token_mask"]].mean().backward()
        naive.append(model.linear.weight.grad.clone())
    naive_grad = (naive[0] + naive[1]) / 2
    exact = torch.load(tmp_path / "single" / "grads_rank0_step0.pt")["model.linear.weight"]
    assert (naive_grad - exact).abs().max() > 1e-3


def test_ddp_nan_skip_on_one_rank_keeps_ranks_identical(tmp_path):
    shards = [token_shards(seed=seed) for seed in (0, 1, 2)]
    flag = {"poison": torch.tensor(False)}
    rank0 = [s[0] | flag for s in shards]
    rank1 = [s[1] | flag for s in shards]
    rank1[1] = rank1[1] | {"poison": torch.tensor(True)}  # a non-finite loss on rank 1 only, at step 1
    fit(tmp_path / "ddp", [rank0, rank1], PoisonableTokenLoss(), devices=2, nan_policy="skip")

    states = [
        [torch.load(tmp_path / "ddp" / f"state_rank{r}_batch{b}.pt") for b in range(3)] for r in range(2)
    ]
    for batch in range(3):
        for name, weight in states[0][batch]["weights"].items():
            assert torch.equal(weight, states[1][batch]["weights"][name]), (batch, name)
    assert all(states[r][2]["skipped_steps"].item() == 1 for r in range(2))
    weights = [states[0][b]["weights"]["model.linear.weight"] for b in range(3)]
    assert torch.equal(weights[0], weights[1])  # both ranks skipped step 1
    assert not torch.equal(weights[1], weights[2])  # and trained on at step 2
    assert torch.isfinite(weights[2]).all()


def test_ddp_nan_raise_stops_all_ranks_without_hanging(tmp_path):
    flag = {"poison": torch.tensor(False)}
    shard0, shard1 = token_shards()
    per_rank = [[shard0 | flag], [shard1 | {"poison": torch.tensor(True)}]]
    with pytest.raises(Exception, match="non-finite training loss"):
        fit(tmp_path / "ddp", per_rank, PoisonableTokenLoss(), devices=2, nan_policy="raise")
