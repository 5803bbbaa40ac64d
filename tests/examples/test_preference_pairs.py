import functools
import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.examples.preference_pairs import (
    AdditionPreferenceDataModule,
    PairDataset,
    collate_pairs,
    perturb_answer,
    preference_pairs,
)
from lightning_losses.examples.verifiable_task import AdditionTask, GreedyAccuracy, check_addition
from lightning_losses.losses import DPOLoss
from lightning_losses.module import LossModule

torch.set_num_threads(1)


def tiny_lm(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)


@pytest.mark.parametrize("answer", ["0.", "9.", "52.", "100.", "198."])
def test_perturbed_answers_are_wrong_and_well_formed(answer):
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        wrong = perturb_answer(answer, generator)
        assert wrong != answer and len(wrong) == len(answer) and wrong.endswith(".")
        assert wrong[:-1].isdigit() and (len(wrong) == 2 or wrong[0] != "0")
        assert sum(a != b for a, b in zip(wrong, answer, strict=True)) == 1
        seen.add(wrong)
    assert len(seen) > 3  # random, not a fixed edit
    with pytest.raises(ValueError, match="answer"):
        perturb_answer("5x.", generator)


def test_pairs_are_correct_vs_incorrect_and_interleaved():
    task = AdditionTask(digits=2, val_size=10)
    pairs = task.pairs["train"][:12]
    ref = tiny_lm(0)
    data = preference_pairs(
        ref, task, pairs, samples_per_prompt=4, generator=torch.Generator().manual_seed(0)
    )
    ids, mask = data["input_ids"], data["token_mask"]
    assert ids.shape == mask.shape == data["reference_logprobs"].shape == (24, 10)
    assert data["sampled_rejected"].shape == (12,) and data["sampled_rejected"].all()  # a random LM is wrong
    for i, (a, b) in enumerate(pairs):
        for row, reward in ((2 * i, 1.0), (2 * i + 1, 0.0)):
            prompt = task.vocab.decode(ids[row, :6])
            assert prompt == task.prompt(a, b) and not mask[row, :6].any()
            assert check_addition(prompt, task.vocab.decode(ids[row][mask[row]])) == reward
    # perturbed rejections when no sample is searched
    perturbed = preference_pairs(ref, task, pairs, samples_per_prompt=0)
    assert not perturbed["sampled_rejected"].any()
    assert torch.equal(perturbed["input_ids"][0::2], ids[0::2])  # the same chosen rows


def test_reference_logprobs_match_a_prefix_loop():
    task = AdditionTask(digits=2, val_size=10)
    ref = tiny_lm(1)
    data = preference_pairs(ref, task, task.pairs["val"][:5], generator=torch.Generator().manual_seed(0))
    ids, mask = data["input_ids"], data["token_mask"]
    for t in range(6, 10):
        with torch.no_grad():
            logits = ref.lm_head(ref.hidden_states(ids[:, :t])[:, -1])
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, t : t + 1]).squeeze(-1)
        torch.testing.assert_close(
            data["reference_logprobs"][mask[:, t], t], expected[mask[:, t]], atol=1e-5, rtol=1e-5
        )


def test_loader_keeps_pairs_together():
    tensors = {"x": torch.arange(20).reshape(10, 2), "y": torch.arange(10)}
    dataset = PairDataset(**tensors)
    assert len(dataset) == 5 and dataset[2]["y"].tolist() == [4, 5]
    loader = torch.utils.data.DataLoader(
        dataset, 2, shuffle=True, collate_fn=collate_pairs, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for batch in loader:
        assert (batch["y"][1::2] == batch["y"][0::2] + 1).all() and (batch["y"][0::2] % 2 == 0).all()
        assert torch.equal(batch["x"], tensors["x"][batch["y"]])
        seen += batch["y"].tolist()
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="tensors"):
        PairDataset(x=torch.zeros(3, 2))


def test_datamodule_is_seeded_and_splits_are_independent():
    ref = tiny_lm(0)
    first = AdditionPreferenceDataModule(train_size=16, val_size=8, batch_size=4, torch_threads=None)
    first.build(ref)
    again = AdditionPreferenceDataModule(train_size=16, val_size=8, batch_size=4, torch_threads=None)
    again.build(ref)
    for split in ("train", "val"):
        for key, value in first.datasets[split].tensors.items():
            assert torch.equal(value, again.datasets[split].tensors[key]), (split, key)
    bigger = AdditionPreferenceDataModule(train_size=32, val_size=8, batch_size=4, torch_threads=None)
    bigger.build(ref)  # the held-out pairs do not depend on the training set's size
    assert torch.equal(
        bigger.datasets["val"].tensors["input_ids"], first.datasets["val"].tensors["input_ids"]
    )
    assert first.sampled_fraction == {"val": 1.0, "train": 1.0}
    a, b = next(iter(first.train_dataloader())), next(iter(again.train_dataloader()))
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (8, 10)


def dpo_module(model: TinyCausalLM) -> LossModule:
    return LossModule(model, DPOLoss(beta=0.1), optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))


def test_dpo_steps_through_loss_module(tmp_path):
    """Before training the policy is the reference: zero margins (loss log 2) on the held-out
    pairs; a few DPO steps make the held-out margins positive on average."""
    pl.seed_everything(0)
    model = tiny_lm(0)
    module = dpo_module(model)
    dm = AdditionPreferenceDataModule(train_size=64, val_size=32, batch_size=16, torch_threads=None)
    kwargs = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
    }  # fmt: skip
    # a separate LossModule for this validation: metrics first created under inference mode cannot be
    # updated by a later fit of the same module (its sanity check runs outside inference mode)
    before = pl.Trainer(**kwargs).validate(dpo_module(model), dm, verbose=False)[0]
    # (the margins are float noise of ~1e-7 here, so `accuracy`, the share of margins > 0, is not 0)
    assert abs(before["val/margin"]) < 1e-6 and math.isclose(before["val/loss"], math.log(2), rel_tol=1e-5)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[GreedyAccuracy("val/greedy_accuracy", batch_size=16)], **kwargs
    )
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 12 and "val/greedy_accuracy" in metrics
    assert float(metrics["val/margin"]) > 0 and float(metrics["val/loss"]) < math.log(2)
    assert float(metrics["val/accuracy"]) > 0.5


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: AdditionPreferenceDataModule(train_size=0), "train_size"),
        (lambda: AdditionPreferenceDataModule(samples_per_prompt=-1), "samples_per_prompt"),
        (lambda: preference_pairs(tiny_lm(), AdditionTask(), []), "pairs"),
        (
            lambda: preference_pairs(tiny_lm(), AdditionTask(), [(1, 2)], samples_per_prompt=-1),
            "samples_per_prompt",
        ),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_loaders_need_pairs_first():
    with pytest.raises(RuntimeError, match="pairs"):
        AdditionPreferenceDataModule(torch_threads=None).train_dataloader()
