import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_losses.cli import build_cli
from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.examples.verifiable_task import (
    AdditionSFTDataModule,
    AdditionTask,
    GreedyAccuracy,
    WarmStartLM,
    check_addition,
    encode_examples,
    frozen_copy,
    greedy_accuracy,
    load_model_weights,
    token_logprobs,
    truncate_at_end,
)
from lightning_losses.losses import NLLLoss
from lightning_losses.module import LossModule

torch.set_num_threads(1)


def tiny_lm(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=14, d_model=16, num_layers=1, num_heads=2, max_len=10)


@pytest.mark.parametrize(
    ("prompt", "completion", "reward"),
    [
        ("07+45=", "52.", 1.0),
        ("99+99=", "198.", 1.0),
        ("00+00=", "0.", 1.0),
        ("50+50=", "100.", 1.0),
        ("07+45=", "52", 0.0),  # no end marker
        ("07+45=", "052.", 0.0),  # leading zero
        ("07+45=", "53.", 0.0),
        ("07+45=", "52..", 0.0),  # text after the end marker
        ("07+45=", "", 0.0),
        ("7+5=", "12.", 1.0),  # operands need not be padded
        ("123+877=", "1000.", 1.0),
    ],
)
def test_checker_by_hand(prompt, completion, reward):
    assert check_addition(prompt, completion) == reward


@pytest.mark.parametrize("prompt", ["07+45", "7-5=", "a+b=", " 7+5=", "7+5=1"])
def test_checker_rejects_malformed_prompts(prompt):
    with pytest.raises(ValueError, match="prompt"):
        check_addition(prompt, "12.")


def test_task_split_is_a_seeded_partition():
    task = AdditionTask(digits=2, val_size=500, seed=0)
    train, val = set(task.pairs["train"]), set(task.pairs["val"])
    assert len(train) == 9500 and len(val) == 500 and not train & val
    assert train | val == {(a, b) for a in range(100) for b in range(100)}
    assert AdditionTask(digits=2, val_size=500, seed=0).pairs == task.pairs
    assert AdditionTask(digits=2, val_size=500, seed=1).pairs["val"] != task.pairs["val"]
    prompts = task.prompts("val")
    assert all(len(p) == task.prompt_length == 6 for p in prompts)
    assert task.vocab.decode(task.prompt_ids(prompts[:3]).flatten()) == "".join(prompts[:3])
    # the rewards of the right answers are all 1
    answers = [task.answer(a, b) for a, b in task.pairs["val"]]
    assert task.rewards(prompts, answers).sum() == 500


def test_encode_examples_masks_the_completion():
    task = AdditionTask(digits=2, val_size=10)
    batch = encode_examples(task, ["07+45=", "99+99=", "00+00="], ["52.", "198.", "0."])
    assert batch["input_ids"].shape == batch["token_mask"].shape == (3, 10)
    for row, text in enumerate(["52.", "198.", "0."]):
        mask = batch["token_mask"][row]
        assert task.vocab.decode(batch["input_ids"][row][mask]) == text
        assert not mask[:6].any() and int(mask.sum()) == len(text)
        assert (batch["input_ids"][row][6 + len(text) :] == 0).all()  # padded after the completion
    with pytest.raises(ValueError, match="completions"):
        encode_examples(task, ["07+45="], ["52.", "1."])
    with pytest.raises(ValueError, match="completions"):
        encode_examples(task, ["07+45="], ["12345"])


def test_truncate_at_end_by_hand():
    end = 9
    ids = torch.tensor(
        [
            [1, 2, 9, 4, 9],  # end at the first generated token
            [1, 2, 3, 4, 9],  # end at the last
            [1, 2, 3, 4, 5],  # no end: every generated token counts
            [1, 9, 3, 9, 9],  # an end marker inside the prompt is not the completion's
        ]
    )
    out, mask = truncate_at_end(ids, prompt_length=2, end_id=end)
    assert out.tolist() == [[1, 2, 9, 0, 0], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5], [1, 9, 3, 9, 0]]
    assert mask.int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert torch.equal(ids[:, 0], out[:, 0])  # the input is not modified
    with pytest.raises(ValueError, match="prompt_length"):
        truncate_at_end(ids, prompt_length=6, end_id=end)


def test_token_logprobs_match_a_prefix_loop():
    """Each token's log-prob from a separate forward pass over its prefix (what `generate` computes)."""
    lm = tiny_lm()
    ids = torch.randint(1, 14, (3, 8), generator=torch.Generator().manual_seed(0))
    got = token_logprobs(lm, ids)
    assert got.shape == (3, 8) and not got.requires_grad
    assert (got[:, 0] == 0).all()
    for t in range(1, 8):
        with torch.no_grad():
            logits = lm.lm_head(lm.hidden_states(ids[:, :t])[:, -1])
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, t : t + 1]).squeeze(-1)
        torch.testing.assert_close(got[:, t], expected, atol=1e-5, rtol=1e-5)


class ScriptedLM(nn.Module):
    """A stand-in with `generate`: answers right for the prompts whose first operand is even."""

    def __init__(self, task: AdditionTask) -> None:
        super().__init__()
        self.task = task
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, prompt_ids, max_new_tokens, greedy=False, **kwargs):
        rows = []
        for prompt in [self.task.vocab.decode(row) for row in prompt_ids]:
            a, b = (int(x) for x in prompt[:-1].split("+"))
            text = self.task.answer(a, b) if a % 2 == 0 else "1234"
            rows.append(
                prompt_ids.new_tensor(self.task.vocab.encode(prompt + text.ljust(max_new_tokens, ".")))
            )
        return torch.stack(rows)


def test_greedy_accuracy_counts_checked_answers():
    task = AdditionTask(digits=2, val_size=10)
    prompts = ["02+03=", "01+03=", "10+90=", "11+11="]
    assert greedy_accuracy(ScriptedLM(task), task, prompts, batch_size=3) == 0.5
    with pytest.raises(ValueError, match="prompts"):
        greedy_accuracy(ScriptedLM(task), task, [])


def sft_checkpoint(tmp_path, epochs: int = 1) -> tuple[str, LossModule]:
    pl.seed_everything(0)
    module = LossModule(
        WarmStartLM(d_model=16, num_layers=1, num_heads=2, max_len=10),
        NLLLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
    )
    dm = AdditionSFTDataModule(train_size=128, val_size=50, batch_size=32, torch_threads=None)
    accuracy = GreedyAccuracy()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[accuracy], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    assert "val/accuracy" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    assert [step for step, _ in accuracy.history] == [4 * (e + 1) for e in range(epochs)]
    path = str(tmp_path / "sft.ckpt")
    trainer.save_checkpoint(path)
    return path, module


def test_sft_checkpoint_warm_starts_the_model(tmp_path):
    path, module = sft_checkpoint(tmp_path)
    warm = WarmStartLM(d_model=16, num_layers=1, num_heads=2, max_len=10, init_checkpoint=path)
    trained = module.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in warm.state_dict().items())
    fresh = WarmStartLM(d_model=16, num_layers=1, num_heads=2, max_len=10)
    assert not all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="checkpoint"):  # another architecture
        WarmStartLM(d_model=32, num_layers=1, num_heads=2, max_len=10, init_checkpoint=path)
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"loss.weight": torch.zeros(1)}}, empty)
    with pytest.raises(ValueError, match="model."):
        load_model_weights(fresh, str(empty))


def test_sft_batches_and_determinism():
    dm = AdditionSFTDataModule(train_size=100, val_size=20, batch_size=16, torch_threads=None)
    dm.setup("fit")
    first = list(dm.train_dataloader())
    again = list(
        AdditionSFTDataModule(
            train_size=100, val_size=20, batch_size=16, torch_threads=None
        ).train_dataloader()
    )
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert sum(len(b["input_ids"]) for b in first) == 100
    task = dm.task
    for batch in first:
        for ids, mask in zip(batch["input_ids"], batch["token_mask"], strict=True):
            text = task.vocab.decode(ids)
            prompt, completion = text[: task.prompt_length], task.vocab.decode(ids[mask])
            assert check_addition(prompt, completion) == 1.0
    val = next(iter(dm.val_dataloader()))
    assert task.vocab.decode(val["input_ids"][0])[:6] == task.prompts("val")[0]


def test_frozen_copy_is_detached_from_the_policy():
    lm = tiny_lm()
    reference = frozen_copy(lm)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        lm.lm_head.weight.add_(1.0)
    assert not torch.equal(reference.lm_head.weight, lm.lm_head.weight)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: AdditionTask(digits=0), "digits"),
        (lambda: AdditionTask(digits=1, val_size=100), "val_size"),
        (lambda: AdditionSFTDataModule(train_size=0), "train_size"),
        (lambda: AdditionSFTDataModule(batch_size=0), "batch_size"),
        (lambda: AdditionSFTDataModule(torch_threads=0), "torch_threads"),
        (lambda: AdditionTask().prompts("test"), "split"),
        (lambda: AdditionTask().prompt_ids(["1+1="]), "prompts"),
        (lambda: GreedyAccuracy(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def epoch_values(csv_path: Path, key: str) -> list[float]:
    with open(csv_path) as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.slow
def test_configs_sft_then_grpo_then_dpo(tmp_path, monkeypatch):
    """The three configs in their documented order (GRPO cut to 10 epochs), in a scratch directory: the
    SFT model is partly right, GRPO raises the reward and the greedy accuracy, DPO's held-out preference
    accuracy reaches 0.9."""
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ paths land here
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    build_cli(["fit", "--config", str(CONFIGS / "lm_task_sft.yaml"), *quiet])
    assert (tmp_path / "runs/lm_task_sft/warm_start/sft.ckpt").exists()
    sft_accuracy = epoch_values(tmp_path / "runs/lm_task_sft/version_0/metrics.csv", "val/accuracy")[-1]
    assert 0.2 <= sft_accuracy <= 0.6, sft_accuracy

    build_cli(["fit", "--config", str(CONFIGS / "lm_grpo.yaml"), "--trainer.max_epochs=10", *quiet])
    grpo = tmp_path / "runs/lm_grpo/version_0/metrics.csv"
    rewards = epoch_values(grpo, "train/reward")
    assert len(rewards) == 250
    first, last = sum(rewards[:50]) / 50, sum(rewards[-50:]) / 50
    assert last > first + 0.1, (first, last)
    assert epoch_values(grpo, "val/accuracy")[-1] > sft_accuracy + 0.2

    build_cli(["fit", "--config", str(CONFIGS / "lm_dpo.yaml"), *quiet])
    dpo_accuracy = epoch_values(tmp_path / "runs/lm_dpo/version_0/metrics.csv", "val/accuracy")
    assert dpo_accuracy[-1] >= 0.9, dpo_accuracy
