import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.examples.grpo import (
    AdditionGRPODataModule,
    RewardLogger,
    RolloutDataset,
    group_advantages,
    rollout_batch,
)
from lightning_losses.examples.verifiable_task import AdditionTask, GreedyAccuracy, check_addition
from lightning_losses.functional.policy_gradient import policy_valid_tokens
from lightning_losses.losses import ClippedPGLoss
from lightning_losses.module import LossModule

torch.set_num_threads(1)


def tiny_lm(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)


def constant_lm(token: str, task: AdditionTask) -> TinyCausalLM:
    """An LM that puts all but ~e^-50 of its mass on ``token`` at every position (deterministic samples)."""
    lm = tiny_lm()
    lm.lm_head = nn.Linear(16, 14, bias=True)
    with torch.no_grad():
        lm.lm_head.weight.zero_()
        lm.lm_head.bias.fill_(-50.0)
        lm.lm_head.bias[task.vocab.index[token]] = 0.0
    return lm


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    got = group_advantages(rewards, group_size=4, eps=1e-6)
    # group 1: mean 1/2, sample std sqrt(4 * (1/2)^2 / 3) = 1/sqrt(3); group 2 all equal; group 3: mean 1/4,
    # std sqrt((3 * (1/4)^2 + (3/4)^2) / 3) = 1/2
    s1, s3 = 1 / math.sqrt(3), 0.5
    expected = [v / (s1 + 1e-6) for v in (0.5, -0.5, -0.5, 0.5)] + [0.0] * 4
    expected += [v / (s3 + 1e-6) for v in (-0.25, 0.75, -0.25, -0.25)]
    torch.testing.assert_close(got, torch.tensor(expected))
    # per group: zero mean, and unit sample std unless all equal
    groups = got.reshape(3, 4)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(groups[[0, 2]].std(-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_all_equal_groups_give_zero_advantages_not_nan(eps):
    for rewards in (torch.zeros(8), torch.ones(8), torch.full((8,), 0.3)):
        got = group_advantages(rewards, group_size=4, eps=eps)
        assert torch.equal(got, torch.zeros(8)), got
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), group_size=1), torch.zeros(2))


def test_group_advantages_bad_shapes():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 4), group_size=4)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), group_size=4, eps=-1.0)


def test_rollout_masks_the_completion_and_scores_it():
    task = AdditionTask(digits=2, val_size=10)
    lm, ref = tiny_lm(0), tiny_lm(1)
    prompts = ["07+45=", "99+99=", "00+00="]
    batch = rollout_batch(
        lm, task, prompts, group_size=5, reference=ref, generator=torch.Generator().manual_seed(0)
    )
    ids, mask = batch["input_ids"], batch["token_mask"]
    assert (
        ids.shape
        == mask.shape
        == batch["prev_logprobs"].shape
        == batch["reference_logprobs"].shape
        == (15, 10)
    )
    assert batch["advantages"].shape == batch["rewards"].shape == (15,)
    for row in range(15):
        prompt = task.vocab.decode(ids[row, :6])
        assert prompt == prompts[row // 5]  # the G samples of a prompt are contiguous
        assert not mask[row, :6].any()  # never the prompt
        completion = ids[row, 6:][mask[row, 6:]]
        n = len(completion)
        assert (
            n >= 1 and mask[row, 6 : 6 + n].all() and not mask[row, 6 + n :].any()
        )  # one run from the prompt
        assert (ids[row, 6 + n :] == 0).all()  # padded after
        ends = (completion == task.end_id).nonzero().flatten().tolist()
        assert ends in ([], [n - 1]) and (ends or n == task.max_new_tokens)  # stops at the first end marker
        assert batch["rewards"][row] == check_addition(prompt, task.vocab.decode(completion))
    # with shift=True, the loss scores logits at t - 1 for token t: the valid logit rows are the completion's
    valid = policy_valid_tokens(mask)
    assert torch.equal(valid, mask[:, 1:])
    assert not valid[:, :5].any() and valid[:, 5].all()  # the last prompt position predicts the first token
    torch.testing.assert_close(batch["advantages"], group_advantages(batch["rewards"], 5))


def test_rollout_stops_at_the_end_marker_and_without_it():
    task = AdditionTask(digits=2, val_size=10)
    stops = rollout_batch(constant_lm(".", task), task, ["01+02="], group_size=2)
    assert stops["token_mask"].int().tolist() == [[0] * 6 + [1, 0, 0, 0]] * 2
    assert task.completions(stops["input_ids"]) == [".", "."] and stops["rewards"].tolist() == [0.0, 0.0]
    rambles = rollout_batch(constant_lm("1", task), task, ["00+01="], group_size=2)
    assert rambles["token_mask"].int().tolist() == [[0] * 6 + [1] * 4] * 2  # no end: all 4 tokens, reward 0
    assert task.completions(rambles["input_ids"]) == ["1111"] * 2 and rambles["rewards"].sum() == 0
    assert torch.equal(rambles["advantages"], torch.zeros(2))


def test_prev_and_reference_logprobs_are_those_at_sampling_time():
    """Replay `generate`: the distribution each token was drawn from, from its prefix alone."""
    task = AdditionTask(digits=2, val_size=10)
    lm, ref = tiny_lm(0), tiny_lm(1)
    batch = rollout_batch(
        lm,
        task,
        ["12+34=", "56+78="],
        group_size=3,
        reference=ref,
        generator=torch.Generator().manual_seed(3),
    )
    ids, mask = batch["input_ids"], batch["token_mask"]
    for model, key in ((lm, "prev_logprobs"), (ref, "reference_logprobs")):
        for t in range(6, 10):
            with torch.no_grad():
                logits = model.lm_head(model.hidden_states(ids[:, :t])[:, -1])
            expected = torch.log_softmax(logits, -1).gather(-1, ids[:, t : t + 1]).squeeze(-1)
            rows = mask[:, t]
            torch.testing.assert_close(batch[key][rows, t], expected[rows], atol=1e-5, rtol=1e-5)
        assert not batch[key].requires_grad
    assert not torch.allclose(batch["prev_logprobs"][mask], batch["reference_logprobs"][mask])


def test_first_update_is_on_policy():
    """At the sampling weights, ClippedPGLoss sees ratio 1 and clips nothing; the KL to itself is 0."""
    task = AdditionTask(digits=2, val_size=10)
    lm = tiny_lm(0)
    batch = rollout_batch(
        lm,
        task,
        task.prompts("train")[:4],
        group_size=4,
        reference=lm,
        generator=torch.Generator().manual_seed(0),
    )
    logits = lm(batch["input_ids"])["next_token_logits"]
    _, metrics = ClippedPGLoss(kl_beta=0.1)(
        logits,
        batch["input_ids"],
        batch["advantages"],
        batch["prev_logprobs"],
        batch["reference_logprobs"],
        batch["token_mask"],
    )
    torch.testing.assert_close(metrics["probs_ratio"], torch.tensor(1.0), atol=1e-5, rtol=0)
    assert metrics["clip_fraction"] == 0
    torch.testing.assert_close(metrics["kl_penalty"], torch.tensor(0.0), atol=1e-6, rtol=0)


def rollouts(seed: int, policy: TinyCausalLM) -> list[dict[str, torch.Tensor]]:
    dm = AdditionGRPODataModule(
        batch_size=4, group_size=3, batches_per_epoch=3, val_size=20, seed=seed, torch_threads=None
    )
    dm.setup("fit")
    return list(dm.loader("train", policy=policy, reference=policy))


def test_datamodule_is_seeded():
    lm = tiny_lm(0)
    first, again, other = rollouts(0, lm), rollouts(0, lm), rollouts(1, lm)
    assert len(first) == 3
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # a new draw each batch
    # the sampling seed leaves the train/held-out split alone; split_seed moves it
    assert AdditionGRPODataModule(seed=1).task.pairs == AdditionGRPODataModule(seed=0).task.pairs
    assert (
        AdditionGRPODataModule(split_seed=1).task.pairs["val"] != AdditionGRPODataModule().task.pairs["val"]
    )


def test_validation_covers_every_held_out_prompt_once():
    dm = AdditionGRPODataModule(batch_size=8, group_size=3, val_group_size=2, val_size=20, torch_threads=None)
    lm = tiny_lm(0)
    batches = list(dm.loader("val", policy=lm, reference=lm))
    assert [len(b["rewards"]) for b in batches] == [16, 16, 8]
    prompts = [dm.task.vocab.decode(row[:6]) for b in batches for row in b["input_ids"]]
    assert prompts == [p for p in dm.task.prompts("val") for _ in range(2)]


def test_grpo_steps_through_loss_module(tmp_path):
    """A few on-policy steps of the config's setup on a tiny model: everything is logged, the reference
    stays at the initial weights while the policy moves."""
    pl.seed_everything(0)
    model = TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    module = LossModule(
        model, ClippedPGLoss(kl_beta=0.04), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    dm = AdditionGRPODataModule(
        batch_size=4, group_size=4, batches_per_epoch=3, val_size=8, torch_threads=None
    )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[RewardLogger(), GreedyAccuracy(batch_size=4)], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in (
        "train/reward",
        "train/reward_epoch",
        "val/reward",
        "val/accuracy",
        "train/kl_penalty",
        "val/loss",
    ):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert trainer.global_step == 6
    reference = dm.reference.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in initial.items())
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in initial.items())
    assert float(metrics["train/kl_penalty"]) > 0  # the policy has moved away from the reference


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: AdditionGRPODataModule(group_size=0), "group_size"),
        (lambda: AdditionGRPODataModule(batches_per_epoch=0), "batches_per_epoch"),
        (lambda: AdditionGRPODataModule(val_group_size=0), "val_group_size"),
        (lambda: AdditionGRPODataModule(torch_threads=None).loader("test"), "split"),
        (lambda: rollout_batch(tiny_lm(), AdditionTask(), ["01+02="], group_size=0), "group_size"),
        (lambda: rollout_batch(tiny_lm(), AdditionTask(), [], group_size=2), "prompts"),
        (
            lambda: RolloutDataset(AdditionTask(), ["01+02="], lambda: None, 2, 2, batches=1),
            "prompts_per_batch",
        ),
        (lambda: RolloutDataset(AdditionTask(), ["01+02="], lambda: None, 1, 2, batches=0), "batches"),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_without_a_trainer_the_policy_must_be_given():
    dm = AdditionGRPODataModule(torch_threads=None)
    with pytest.raises(RuntimeError, match="policy"):
        next(iter(dm.loader("train")))
