import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from lightning_losses.examples.digits_bandit import (
    BanditDataset,
    DigitsBanditDataModule,
    PolicyMLP,
    bandit_batch,
)
from lightning_losses.losses import CustomSequenceLoss
from lightning_losses.module import LossModule


def one_hot_policy(actions: list[int], num_actions: int = 10) -> torch.Tensor:
    """Logits that put all but ~e^-100 of the mass on ``actions``: sampling is deterministic."""
    return 100.0 * torch.nn.functional.one_hot(torch.tensor(actions), num_actions).float()


def test_rewards_and_advantages_by_hand():
    target = torch.tensor([3, 1, 4, 1])
    logits = one_hot_policy([3, 2, 4, 0])  # right, wrong, right, wrong
    inputs = torch.randn(4, 64)
    batch = bandit_batch(inputs, target, logits, generator=torch.Generator().manual_seed(0))
    assert set(batch) == {"inputs", "target", "input_ids", "token_mask", "rewards", "advantages"}
    assert batch["input_ids"].tolist() == [[3], [2], [4], [0]]
    assert batch["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch["advantages"].tolist() == [0.5, -0.5, 0.5, -0.5]  # minus the mean reward 1/2
    assert batch["token_mask"].shape == (4, 1) and batch["token_mask"].all()
    assert torch.equal(batch["inputs"], inputs) and torch.equal(batch["target"], target)
    # without the baseline the advantages are the rewards; greedy takes the argmax
    plain = bandit_batch(inputs, target, torch.tensor([[0.0, 2.0, 1.0]] * 4), greedy=True, baseline=False)
    assert plain["input_ids"].tolist() == [[1]] * 4
    assert plain["rewards"].tolist() == plain["advantages"].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_loss_on_a_bandit_batch_is_reinforce():
    """-mean_i A_i log π(a_i | x_i) under CustomSequenceLoss(shift=False), by hand."""
    torch.manual_seed(0)
    model = PolicyMLP(64, 10, hidden=(16,))
    inputs, target = torch.rand(6, 64), torch.tensor([0, 1, 2, 3, 4, 5])
    out = model(inputs)
    batch = bandit_batch(inputs, target, out["logits"], generator=torch.Generator().manual_seed(1))
    loss, metrics = CustomSequenceLoss(alpha=1.0, beta=0.0, shift=False)(
        out["next_token_logits"], batch["input_ids"], batch["advantages"], batch["token_mask"],
        rewards=batch["rewards"],
    )  # fmt: skip
    log_pi = torch.log_softmax(out["logits"], -1).gather(-1, batch["input_ids"]).squeeze(-1)
    torch.testing.assert_close(loss, -(batch["advantages"] * log_pi).mean())
    torch.testing.assert_close(metrics["mean_reward"], batch["rewards"].mean())
    assert math.isclose(float(metrics["mean_advantage"]), 0.0, abs_tol=1e-6)


def uniform(inputs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(inputs), 10)


def train_batches(seed: int) -> list[dict[str, torch.Tensor]]:
    dm = DigitsBanditDataModule(batch_size=50, seed=seed, torch_threads=None)
    dm.setup("fit")
    return list(dm.loader("train", policy=uniform))


def test_on_policy_sampling_is_seeded():
    first, again, other = train_batches(0), train_batches(0), train_batches(1)
    assert len(first) == math.ceil(1257 / 50) and sum(len(b["target"]) for b in first) == 1257
    for a, b in zip(first, again, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    actions = torch.cat([b["input_ids"] for b in first]).squeeze(-1)
    assert set(actions.tolist()) == set(range(10))  # a uniform policy explores every action
    # a second pass (epoch) reshuffles and resamples
    dm = DigitsBanditDataModule(batch_size=50, torch_threads=None)
    dm.setup("fit")
    loader = dm.loader("train", policy=uniform)
    one, two = next(iter(loader)), next(iter(loader))
    assert not torch.equal(one["target"], two["target"])


def test_samples_follow_the_policy():
    """Every batch calls the policy anew: with a policy that always answers 7, the reward is (target == 7)."""
    dm = DigitsBanditDataModule(batch_size=64, torch_threads=None)
    dm.setup("fit")
    for batch in dm.loader("train", policy=lambda x: one_hot_policy([7] * len(x))):
        assert (batch["input_ids"] == 7).all()
        torch.testing.assert_close(batch["rewards"], (batch["target"] == 7).float())


def test_evaluation_batches_are_greedy_and_in_order():
    dm = DigitsBanditDataModule(batch_size=100, torch_threads=None)
    dm.setup("fit")
    scores = torch.arange(10.0)  # argmax is always 9
    batches = list(dm.loader("val", policy=lambda x: scores.expand(len(x), 10)))
    assert torch.equal(torch.cat([b["target"] for b in batches]), dm.val_set.tensors["target"])
    assert all((b["input_ids"] == 9).all() for b in batches)


def test_policy_mlp_outputs():
    out = PolicyMLP(64, 10, hidden=(8,))(torch.zeros(3, 64))
    assert out["next_token_logits"].shape == (3, 1, 10)
    assert torch.equal(out["next_token_logits"][:, 0], out["logits"])
    assert out["logits"].abs().max() < 0.5  # near-uniform initial policy


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (
            lambda: bandit_batch(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3, 10)),
            "inputs",
        ),
        (
            lambda: bandit_batch(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2, 10)),
            "logits",
        ),
        (
            lambda: BanditDataset(torch.zeros(2, 4), torch.zeros(2), lambda: uniform, batch_size=0),
            "batch_size",
        ),
        (lambda: DigitsBanditDataModule(torch_threads=0), "torch_threads"),
        (lambda: DigitsBanditDataModule(batch_size=0), "batch_size"),
        (lambda: DigitsBanditDataModule(torch_threads=None).loader("valid"), "split"),
        (lambda: PolicyMLP(0, 10), "in_features"),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_training_from_rewards_learns_the_digits(tmp_path):
    """A short run of the config's setup: the greedy policy's val accuracy rises far above chance (0.1)."""
    pl.seed_everything(0)
    module = LossModule(
        PolicyMLP(64, 10, hidden=(128,)),
        CustomSequenceLoss(alpha=1.0, beta=0.0, shift=False),
        optimizer=functools.partial(torch.optim.AdamW, lr=0.003, weight_decay=1e-4),
        metrics={"accuracy": MulticlassAccuracy(num_classes=10, average="micro")},
    )
    dm = DigitsBanditDataModule(batch_size=64, torch_threads=None)
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, dm)
    accuracy = float(trainer.callback_metrics["val/accuracy"])
    assert accuracy > 0.5, accuracy
    assert float(trainer.callback_metrics["train/mean_reward_epoch"]) > 0.3
    # the evaluation loss ran on the greedy batches too
    assert "val/policy_loss" in trainer.callback_metrics
