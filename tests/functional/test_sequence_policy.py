import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_losses import LossModule
from lightning_losses.functional.sequence_policy import sequence_log_probs, sequence_policy_loss
from lightning_losses.losses.sequence_policy import CustomSequenceLoss
from lightning_losses.registry import build_loss
from tests.helpers import TinyLM, quiet_trainer
from tests.loss_tester import LossTester

METRIC_KEYS = {"loss", "custom_loss", "policy_loss", "value_loss", "mean_reward", "mean_advantage"}


def brute_force_sequence_policy(
    next_token_logits,
    input_ids,
    advantages,
    token_mask=None,
    sample_mask=None,
    rewards=None,
    values=None,
    global_valid_seqs=None,
    alpha=1.0,
    beta=0.1,
    shift=True,
):
    """Python loops over sequences, tokens and the vocabulary in float64: (loss, policy, value)."""
    batch, steps, _ = next_token_logits.shape
    logits = next_token_logits.tolist()
    ids = input_ids.tolist()
    tmask = [[1.0] * steps] * batch if token_mask is None else token_mask.double().tolist()
    smask = [1.0] * batch if sample_mask is None else sample_mask.double().tolist()
    count = sum(smask) if global_valid_seqs is None else float(global_valid_seqs)
    policy = value = 0.0
    for i in range(batch):
        if smask[i] == 0:
            continue
        log_prob = 0.0
        for t in range(steps - 1 if shift else steps):
            target_t = t + 1 if shift else t
            if tmask[i][target_t] == 0:
                continue
            row = logits[i][t]
            log_z = math.log(sum(math.exp(z) for z in row))
            log_prob += tmask[i][target_t] * (row[ids[i][target_t]] - log_z)
        policy -= smask[i] * float(advantages[i]) * log_prob
        if values is not None:
            value += smask[i] * (float(values[i]) - float(rewards[i])) ** 2
    if count == 0:
        return torch.zeros(3, dtype=torch.float64)
    policy, value = policy / count, value / count
    return torch.tensor([alpha * policy + beta * value, policy, value], dtype=torch.float64)


class TestCustomSequence(LossTester):
    functional = staticmethod(sequence_policy_loss)
    module_class = CustomSequenceLoss
    # seed i (the index here) picks the inputs: see make_inputs
    option_sets = [{}, {"alpha": 0.5, "beta": 2.0}, {"shift": False}, {"beta": 0.0}]
    grad_inputs = ("next_token_logits", "values")
    mask_input = "sample_mask"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        batch, steps, vocab = 4, 5, 6
        logits = (3 * torch.randn(batch, steps, vocab, generator=g)).to(dtype)
        input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
        token_mask = torch.rand(batch, steps, generator=g) > 0.3
        input_ids[~token_mask] = -100  # padding ids where the mask is off
        sample_mask = torch.tensor([True, True, False, True])
        advantages = torch.randn(batch, generator=g).to(dtype)
        rewards = torch.randn(batch, generator=g).to(dtype)
        advantages[2] = rewards[2] = float("nan")  # a masked-out sequence never reaches the result
        inputs = {
            "next_token_logits": logits,
            "input_ids": input_ids,
            "advantages": advantages,
            "token_mask": token_mask,
            "sample_mask": sample_mask,
            "rewards": rewards,
            "values": torch.randn(batch, generator=g).to(dtype),
        }
        if seed == 1:  # a micro-batch of a larger global batch
            inputs["global_valid_seqs"] = torch.tensor(7)
        if seed == 2:  # no critic, no rewards
            del inputs["values"], inputs["rewards"]
        if seed == 3:  # weights instead of masks
            inputs["token_mask"] = token_mask * torch.rand(batch, steps, generator=g)
            inputs["sample_mask"] = torch.tensor([0.5, 1.0, 0.0, 2.0])
            inputs["global_valid_seqs"] = torch.tensor(3.5)
        return inputs

    def reference(self, **inputs_and_options):
        return brute_force_sequence_policy(**inputs_and_options)[0]


@pytest.mark.usefixtures("fused_token_log_probs")
class TestCustomSequenceFused(TestCustomSequence):
    """The same checks with the log-probabilities through the fused CPU cross-entropy."""


def test_every_term_matches_the_brute_force_reference():
    tester = TestCustomSequence()
    for index, options in enumerate(tester.option_sets):
        inputs = tester.make_inputs(torch.float64, seed=index)
        terms = sequence_policy_loss(**inputs, **options)
        expected = brute_force_sequence_policy(**inputs, **options)
        torch.testing.assert_close(torch.stack(terms[:3]), expected, rtol=1e-12, atol=1e-12)


def test_hand_computed_two_sequence_case():
    """Vocabulary of 2, three positions, shifted: logits at t score the token at t + 1."""
    probs = torch.tensor(
        [
            [[0.5, 0.5], [0.25, 0.75], [0.8, 0.2]],
            [[0.9, 0.1], [0.5, 0.5], [0.3, 0.7]],
        ],
        dtype=torch.float64,
    )
    logits = probs.log().requires_grad_()
    input_ids = torch.tensor([[1, 0, 1], [0, 1, 1]])  # the first token is the prompt: never scored
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # sequence 2's last token is padding
    advantages, rewards = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    values = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    loss, metrics = CustomSequenceLoss()(  # alpha = 1, beta = 0.1
        logits, input_ids, advantages, token_mask, None, rewards, values, torch.tensor(2)
    )
    # sequence 1: log π = log 0.5 + log 0.75; sequence 2: log 0.1 (its second token is masked)
    policy = -(2.0 * (math.log(0.5) + math.log(0.75)) - 1.0 * math.log(0.1)) / 2
    value = ((0.5 - 1.0) ** 2 + (0.5 - 0.0) ** 2) / 2
    assert math.isclose(metrics["policy_loss"].item(), policy, rel_tol=1e-12)
    assert math.isclose(metrics["value_loss"].item(), value, rel_tol=1e-12)
    assert math.isclose(loss.item(), policy + 0.1 * value, rel_tol=1e-12)
    assert metrics["custom_loss"].item() == loss.item()
    assert metrics["mean_reward"].item() == 0.5 and metrics["mean_advantage"].item() == 0.5
    loss.backward()
    # ∂/∂z of -(A/N)·log softmax(z)[y] is -(A/N)·(onehot(y) − p): sequence 1, position 0, y = 0, A/N = 1
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-0.5, 0.5], dtype=torch.float64))
    # position 1 of sequence 2 scores a masked token, the last position scores nothing
    assert torch.count_nonzero(logits.grad[1, 1:]) == 0 and torch.count_nonzero(logits.grad[:, 2]) == 0
    # ∂/∂V_i of 0.1·Σ(V − R)²/2 is 0.1·(V_i − R_i)
    torch.testing.assert_close(values.grad, torch.tensor([-0.05, 0.05], dtype=torch.float64))


def test_the_guides_bugs_are_gone():
    """A policy gradient: raising the taken token's logit lowers the loss when A > 0 (the guide's
    vocabulary-mean term cannot tell which token was taken); the value term has a gradient."""
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    values = torch.zeros(1, requires_grad=True)
    loss = sequence_policy_loss(
        logits, torch.tensor([[0, 2]]), torch.tensor([1.0]), rewards=torch.tensor([1.0]), values=values
    ).loss
    loss.backward()
    assert logits.grad[0, 0, 2] < 0 and logits.grad[0, 0, 0] > 0 and logits.grad[0, 0, 1] > 0
    assert values.grad.item() == pytest.approx(-0.2)  # 0.1 · 2 · (0 − 1)


@pytest.mark.parametrize("shift", [True, False])
def test_micro_batches_add_up_to_the_full_batch(shift):
    """Σ over any split of the batch (same global count) of every term and gradient = the full batch's."""
    g = torch.Generator().manual_seed(0)
    batch, steps, vocab = 9, 6, 5
    logits = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(batch, generator=g, dtype=torch.float64, requires_grad=True)
    data = {
        "input_ids": torch.randint(0, vocab, (batch, steps), generator=g),
        "advantages": torch.randn(batch, generator=g, dtype=torch.float64),
        "token_mask": torch.rand(batch, steps, generator=g) > 0.4,
        "sample_mask": torch.rand(batch, generator=g) > 0.25,
        "rewards": torch.randn(batch, generator=g, dtype=torch.float64),
    }
    count = data["sample_mask"].sum()

    def terms_of(index, global_count):
        part = {k: v[index] for k, v in data.items()}
        terms = sequence_policy_loss(logits[index], values=values[index], **part, shift=shift)
        if global_count is not None:
            terms = sequence_policy_loss(
                logits[index], values=values[index], **part, global_valid_seqs=global_count, shift=shift
            )
        return terms

    full = terms_of(slice(None), None)  # a local mean over this (whole) batch's valid sequences
    full_grads = torch.autograd.grad(full.loss, (logits, values))
    order = torch.randperm(batch, generator=g)
    for split in ([slice(0, 1), slice(1, 4), slice(4, 9)], [order[:2], order[2:3], order[3:]]):
        parts = [terms_of(index, count) for index in split]
        for field in full._fields:
            torch.testing.assert_close(sum(getattr(p, field) for p in parts), getattr(full, field))
        grads = torch.autograd.grad(sum(p.loss for p in parts), (logits, values))
        for got, expected in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(got, expected)


def test_sequence_log_probs_shift_conventions():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 4, 3, generator=g), torch.randint(0, 3, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    log_p = logits.log_softmax(-1)
    shifted = (log_p[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
    same = (log_p.gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(sequence_log_probs(logits, ids, mask), shifted)
    torch.testing.assert_close(sequence_log_probs(logits, ids, mask, shift=False), same)


def test_token_mask_alone_all_off_keeps_the_value_term():
    inputs = TestCustomSequence().make_inputs(torch.float64, seed=0)
    inputs["token_mask"] = torch.zeros_like(inputs["token_mask"])
    terms = sequence_policy_loss(**inputs)
    assert terms.policy_loss.item() == 0.0 and terms.value_loss.item() > 0
    assert terms.mean_advantage.item() != 0.0  # sequences still count: they just score no token


def test_confident_logits_stay_finite():
    logits = torch.tensor([[[1e4, -1e4], [-1e4, 1e4]]], requires_grad=True)
    loss = sequence_policy_loss(logits, torch.tensor([[0, 1]]), torch.tensor([1.0])).loss  # log π = -2e4
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor(2e4))


def test_float64_inputs_compute_in_float64_and_bf16_in_float32():
    inputs = TestCustomSequence().make_inputs(torch.bfloat16, seed=0)
    assert sequence_policy_loss(**inputs).loss.dtype == torch.float32
    inputs = TestCustomSequence().make_inputs(torch.float32, seed=0)
    inputs["values"] = inputs["values"].double()
    assert sequence_policy_loss(**inputs).loss.dtype == torch.float64


GOOD = {
    "next_token_logits": torch.zeros(2, 3, 4),
    "input_ids": torch.zeros(2, 3, dtype=torch.long),
    "advantages": torch.zeros(2),
}


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"next_token_logits": torch.zeros(2, 3)}, ValueError, "`next_token_logits` must have 3 dimensions"),
        ({"next_token_logits": torch.zeros(2, 3, 4, dtype=torch.long)}, TypeError, "`next_token_logits`"),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long)},
            ValueError,
            r"`input_ids` must have shape \(2, 3\)",
        ),
        ({"input_ids": torch.zeros(2, 3)}, TypeError, "`input_ids` must hold integer"),
        ({"input_ids": torch.full((2, 3), 4)}, ValueError, r"`input_ids` must lie in \[0, 4\)"),
        ({"advantages": torch.zeros(2, 1)}, ValueError, r"`advantages` must have shape \(2,\)"),
        ({"advantages": torch.zeros(2, dtype=torch.long)}, TypeError, "`advantages` must be a floating"),
        ({"token_mask": torch.ones(2, 4)}, ValueError, "`token_mask` must have shape"),
        ({"sample_mask": torch.ones(3)}, ValueError, "`sample_mask` must have shape"),
        ({"rewards": torch.zeros(2), "values": torch.zeros(2, 1)}, ValueError, "`values` must have shape"),
        ({"values": torch.zeros(2)}, ValueError, "`values` .* without `rewards`"),
        ({"beta": -0.1}, ValueError, "`beta` must be non-negative"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, pattern):
    with pytest.raises(error, match=pattern):
        sequence_policy_loss(**(GOOD | change))


def test_module_metrics_registry_and_options():
    assert isinstance(build_loss("custom_sequence"), CustomSequenceLoss)
    built = build_loss({"name": "custom_sequence", "params": {"alpha": 2.0, "beta": 0.5}})
    assert (built.alpha, built.beta, built.shift) == (2.0, 0.5, True)
    assert CustomSequenceLoss.loss_type == "sequence_level"
    assert set(CustomSequenceLoss.partial_metrics) == METRIC_KEYS - {"loss"}
    _, metrics = CustomSequenceLoss()(**GOOD)
    assert set(metrics) == METRIC_KEYS
    with pytest.raises(ValueError, match="`alpha` must be non-negative"):
        CustomSequenceLoss(alpha=-1.0)


# ------------------------------------------------------------------------------------------------------
# Under LossModule
# ------------------------------------------------------------------------------------------------------


class TinyActorCritic(TinyLM):
    """TinyLM (the actor) and a separate critic: ``input_ids`` → ``{"next_token_logits", "values"}``.

    The critic averages a learned score of each transition (token, next token) of the sequence.
    """

    def __init__(self, vocab_size: int = 5, dim: int = 8) -> None:
        super().__init__(vocab_size, dim)
        self.vocab_size = vocab_size
        self.transition_value = nn.Embedding(vocab_size * vocab_size, 1)

    def forward(self, input_ids):
        outputs = super().forward(input_ids)
        transitions = input_ids[:, :-1] * self.vocab_size + input_ids[:, 1:]
        outputs["values"] = self.transition_value(transitions).squeeze(-1).mean(1)
        return outputs


def rl_batch(batch, steps=6, vocab=5, seed=0):
    """Uniformly random sequences; reward = the fraction of steps t → t + 1 that go to (token + 1) mod V."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
    rewards = (input_ids[:, 1:] == (input_ids[:, :-1] + 1) % vocab).float().mean(1)
    token_mask = torch.ones(batch, steps, dtype=torch.long)
    token_mask[:, 0] = 0  # the prompt
    return {
        "input_ids": input_ids,
        "token_mask": token_mask,
        "sample_mask": torch.rand(batch, generator=g) > 0.1,
        "rewards": rewards,
        "advantages": rewards - rewards.mean(),
    }


def test_loss_module_passes_the_global_sequence_count():
    module = LossModule(TinyActorCritic(), CustomSequenceLoss())
    batch = rl_batch(8)
    outputs = module(batch)
    args, kwargs, global_count = module._loss_inputs(batch, outputs)
    assert "global_valid_toks" not in kwargs
    assert global_count is kwargs["global_valid_seqs"] and global_count.item() == batch["sample_mask"].sum()
    assert kwargs["values"] is outputs["values"]  # the model's output, found by name
    expected = sequence_policy_loss(
        outputs["next_token_logits"], values=outputs["values"], **batch, global_valid_seqs=global_count
    ).loss
    torch.testing.assert_close(module.loss(*args, **kwargs).loss, expected)


def test_loss_module_ddp_scaling_gives_the_full_batch_gradient(monkeypatch):
    """Two ranks, simulated: each gets the global count (all-reduced), its loss is scaled by the world
    size, and DDP's average of the rank gradients is the gradient of the full batch's loss."""
    torch.manual_seed(0)
    module = LossModule(TinyActorCritic().double(), CustomSequenceLoss())
    full = {k: v.double() if v.is_floating_point() else v for k, v in rl_batch(10).items()}
    shards = [{k: v[:3] for k, v in full.items()}, {k: v[3:] for k, v in full.items()}]
    local_counts = [torch.stack([s["token_mask"].sum(), s["sample_mask"].sum()]).double() for s in shards]
    monkeypatch.setattr(module, "_world_size", lambda: 2)
    params = list(module.model.parameters())

    rank_grads, rank_losses = [], []
    for shard in shards:
        # the all-reduce sums both ranks' counts
        monkeypatch.setattr(module, "_all_reduce_sum", lambda t: sum(local_counts).to(t.dtype))
        loss, metrics, *_ = module._step(shard)
        rank_losses.append(loss)
        rank_grads.append(torch.autograd.grad(loss, params))
        assert metrics["loss"] == loss.detach()  # logged values are scaled alike
    ddp_grads = [(a + b) / 2 for a, b in zip(*rank_grads, strict=True)]

    monkeypatch.setattr(module, "_world_size", lambda: 1)
    monkeypatch.setattr(module, "_all_reduce_sum", lambda t: t)
    single, *_ = module._step(full)
    torch.testing.assert_close((rank_losses[0] + rank_losses[1]) / 2, single)
    for got, expected in zip(ddp_grads, torch.autograd.grad(single, params), strict=True):
        torch.testing.assert_close(got, expected)
    # without the global count (each rank's own mean) the average is another gradient: the test can fail
    naive = []
    for shard in shards:
        outputs = module(shard)
        loss = sequence_policy_loss(outputs["next_token_logits"], values=outputs["values"], **shard).loss
        naive.append(torch.autograd.grad(loss, params))
    assert not torch.allclose(naive[0][0] + naive[1][0], 2 * ddp_grads[0])


@pytest.mark.slow
def test_trains_through_loss_module_on_a_tiny_language_model_task():
    """Offline policy gradient on random sequences whose reward is the share of steps t → t + 1:
    the bigram policy learns p(a + 1 | a) ≫ 1/V, and the value head fits the rewards."""
    torch.manual_seed(0)
    vocab = 5
    data = rl_batch(512, vocab=vocab, seed=1)
    samples = [{k: v[i] for k, v in data.items()} for i in range(512)]
    model = TinyActorCritic(vocab)
    loss_fn = CustomSequenceLoss(beta=1.0)

    def evaluate():
        with torch.no_grad():
            outputs = model(data["input_ids"])
            probs = model.head(model.embed(torch.arange(vocab))).softmax(-1)  # p(b | a), a bigram model
            _, metrics = loss_fn(outputs["next_token_logits"], values=outputs["values"], **data)
        return probs[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab].mean(), metrics["value_loss"]

    p_before, value_before = evaluate()
    module = LossModule(model, loss_fn, optimizer=functools.partial(torch.optim.AdamW, lr=0.05))
    trainer = quiet_trainer(max_epochs=5)
    trainer.fit(module, DataLoader(samples, batch_size=64, shuffle=True))
    p_after, value_after = evaluate()
    assert p_before < 0.3 and p_after > 0.8, (p_before, p_after)
    assert value_after < 0.1 * value_before, (value_before, value_after)
    assert {f"train/{k}_epoch" for k in METRIC_KEYS} <= set(trainer.callback_metrics)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_gradients_equal_one_process_on_the_global_batch(tmp_path):
    """2-process CPU DDP (ddp_spawn, gloo) with 3 and 7 sequences per rank: every rank's DDP-reduced
    gradient equals one process's on the concatenated batch."""
    from tests.helpers import DestroyProcessGroup, RankShardData, RecordGradients

    def double(batch):
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}

    steps = [double(rl_batch(10, seed=seed)) for seed in (0, 1)]
    shards = [
        [{k: v[:3] for k, v in s.items()} for s in steps],
        [{k: v[3:] for k, v in s.items()} for s in steps],
    ]

    def fit(directory, per_rank, devices):
        directory.mkdir()
        torch.manual_seed(0)
        module = LossModule(
            TinyActorCritic().double(),
            CustomSequenceLoss(beta=0.5),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        trainer = quiet_trainer(
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            precision="64-true",
            max_epochs=1,
            use_distributed_sampler=False,
            callbacks=[RecordGradients(directory), DestroyProcessGroup()],
        )
        trainer.fit(module, datamodule=RankShardData(per_rank))
        return trainer

    ddp = fit(tmp_path / "ddp", shards, devices=2)
    single = fit(tmp_path / "single", [steps], devices=1)
    for step in range(2):
        reference = torch.load(tmp_path / "single" / f"grads_rank0_step{step}.pt")
        for rank in range(2):
            grads = torch.load(tmp_path / "ddp" / f"grads_rank{rank}_step{step}.pt")
            assert grads.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(grads[name], reference[name], rtol=1e-12, atol=1e-12)
    for key in METRIC_KEYS:
        torch.testing.assert_close(
            ddp.callback_metrics[f"train/{key}_epoch"].double(),
            single.callback_metrics[f"train/{key}_epoch"].double(),
            rtol=1e-6,
            atol=1e-9,
        )


@pytest.mark.parametrize("shift", [True, False])
def test_sample_mask_without_token_mask(shift):
    """``sample_mask`` alone (no ``token_mask``) counts every token of the kept sequences."""
    g = torch.Generator().manual_seed(4)
    logits, ids = torch.randn(3, 4, 5, generator=g), torch.randint(0, 5, (3, 4), generator=g)
    args = {"advantages": torch.randn(3, generator=g), "sample_mask": torch.tensor([1.0, 0.0, 2.0])}
    alone = sequence_policy_loss(logits, ids, **args, shift=shift)
    explicit = sequence_policy_loss(logits, ids, token_mask=torch.ones(3, 4), **args, shift=shift)
    torch.testing.assert_close(torch.stack(list(alone)), torch.stack(list(explicit)))
