import math

import pytest
import torch

from lightning_losses.functional.preference import dpo_loss
from lightning_losses.losses.preference import DPOLoss
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester, loss_of

METRIC_KEYS = {"loss", "dpo_loss", "sft_loss", "accuracy", "chosen_reward", "rejected_reward", "margin"}


def brute_force_dpo(
    next_token_logits,
    input_ids,
    reference_logprobs,
    token_mask=None,
    sample_mask=None,
    global_valid_seqs=None,
    beta=0.1,
    average_log_probs=False,
    sft_weight=0.0,
    shift=True,
):
    """Loops in float64: (loss, dpo, sft, accuracy, chosen reward, rejected reward, margin)."""
    batch, steps, _ = next_token_logits.shape
    logits, ids, ref = next_token_logits.tolist(), input_ids.tolist(), reference_logprobs.tolist()
    tmask = [[1.0] * steps] * batch if token_mask is None else token_mask.double().tolist()
    smask = [1.0] * batch if sample_mask is None else sample_mask.double().tolist()

    def sequence(i):
        policy = reference = length = 0.0
        for t in range(steps - 1 if shift else steps):
            target_t = t + 1 if shift else t
            weight = tmask[i][target_t]
            if weight == 0:
                continue
            row = logits[i][t]
            log_z = math.log(sum(math.exp(z) for z in row))
            policy += weight * (row[ids[i][target_t]] - log_z)
            reference += weight * ref[i][target_t]
            length += weight
        if average_log_probs:
            policy, reference = (policy / length, reference / length) if length else (0.0, 0.0)
        return policy, reference

    sums = [0.0] * 6
    count = 0.0
    for p in range(batch // 2):
        weight = smask[2 * p]
        if weight == 0:
            continue
        (pc, rc), (pr, rr) = sequence(2 * p), sequence(2 * p + 1)
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        margin = chosen - rejected
        dpo = -math.log(1 / (1 + math.exp(-margin)))
        for k, v in enumerate([dpo, -pc, float(margin > 0), chosen, rejected, margin]):
            sums[k] += weight * v
        count += weight
    if global_valid_seqs is not None:
        count = float(global_valid_seqs) / 2
    if count == 0:
        return torch.zeros(7, dtype=torch.float64)
    dpo, sft, *rest = (s / count for s in sums)
    return torch.tensor([dpo + sft_weight * sft, dpo, sft, *rest], dtype=torch.float64)


class TestDPO(LossTester):
    functional = staticmethod(dpo_loss)
    module_class = DPOLoss
    option_sets = [
        {},
        {"beta": 0.5, "sft_weight": 0.3},
        {"shift": False, "average_log_probs": True},
        {"beta": 1.0, "average_log_probs": True, "sft_weight": 1.0},
    ]
    grad_inputs = ("next_token_logits",)
    mask_input = "sample_mask"

    def call_functional(self, inputs, options):
        inputs = dict(inputs)
        seqs = inputs.pop("global_valid_seqs", None)
        pairs = None if seqs is None else seqs / 2
        return loss_of(dpo_loss(**inputs, global_valid_pairs=pairs, **options))

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        batch, steps, vocab = 6, 5, 6  # three pairs
        logits = (2 * torch.randn(batch, steps, vocab, generator=g)).to(dtype)
        input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
        token_mask = torch.rand(batch, steps, generator=g) > 0.3
        token_mask[:, -1] = True  # every sequence scores at least one token
        input_ids[~token_mask] = -100
        reference = torch.randn(batch, steps, vocab, generator=g).log_softmax(-1)
        reference = reference.gather(-1, input_ids.clamp(min=0)[..., None]).squeeze(-1).to(dtype)
        reference[~token_mask] = float("nan")  # masked reference log-probs never reach the result
        sample_mask = torch.tensor([True, True, False, False, True, True])
        inputs = {
            "next_token_logits": logits,
            "input_ids": input_ids,
            "reference_logprobs": reference,
            "token_mask": token_mask,
            "sample_mask": sample_mask,
        }
        if seed == 1:  # a micro-batch of a larger global batch: 10 sequences, 5 pairs
            inputs["global_valid_seqs"] = torch.tensor(10)
        if seed == 3:  # weights
            inputs["token_mask"] = token_mask * (0.5 + torch.rand(batch, steps, generator=g))
            inputs["sample_mask"] = torch.tensor([0.5, 0.5, 0.0, 0.0, 2.0, 2.0])
            inputs["global_valid_seqs"] = torch.tensor(7.0)
        return inputs

    def reference(self, **inputs_and_options):
        return brute_force_dpo(**inputs_and_options)[0]


@pytest.mark.usefixtures("fused_token_log_probs")
class TestDPOFused(TestDPO):
    """The same checks with the log-probabilities through the fused CPU cross-entropy."""


def test_every_term_matches_the_brute_force_reference():
    tester = TestDPO()
    for index, options in enumerate(tester.option_sets):
        inputs = tester.make_inputs(torch.float64, seed=index)
        seqs = inputs.pop("global_valid_seqs", None)
        terms = dpo_loss(**inputs, global_valid_pairs=None if seqs is None else seqs / 2, **options)
        expected = brute_force_dpo(**inputs, global_valid_seqs=seqs, **options)
        torch.testing.assert_close(torch.stack(list(terms)), expected, rtol=1e-12, atol=1e-12)


def test_hand_computed_two_pair_case():
    """Vocabulary 2, one scored token per sequence (shift=False), β = 0.5, SFT weight 0.2."""
    probs = torch.tensor([[[0.8, 0.2]], [[0.5, 0.5]], [[0.3, 0.7]], [[0.6, 0.4]]], dtype=torch.float64)
    logits = probs.log().requires_grad_()
    ids = torch.tensor([[0], [1], [1], [0]])
    ref = torch.tensor([[0.5], [0.5], [0.7], [0.3]], dtype=torch.float64).log()
    loss, metrics = DPOLoss(beta=0.5, sft_weight=0.2, shift=False)(logits, ids, ref)
    # pair 1: chosen 0.5·log(.8/.5), rejected 0.5·log(.5/.5) = 0; pair 2: 0.5·log(.7/.7) = 0, 0.5·log(.6/.3)
    c1, r1, c2, r2 = 0.5 * math.log(1.6), 0.0, 0.0, 0.5 * math.log(2.0)
    m1, m2 = c1 - r1, c2 - r2

    def nls(x):
        return math.log1p(math.exp(-x))

    dpo = (nls(m1) + nls(m2)) / 2
    sft = -(math.log(0.8) + math.log(0.7)) / 2
    assert math.isclose(metrics["dpo_loss"].item(), dpo, rel_tol=1e-12)
    assert math.isclose(metrics["sft_loss"].item(), sft, rel_tol=1e-12)
    assert math.isclose(loss.item(), dpo + 0.2 * sft, rel_tol=1e-12)
    assert metrics["accuracy"].item() == 0.5  # pair 1 prefers chosen, pair 2 rejected
    assert math.isclose(metrics["chosen_reward"].item(), (c1 + c2) / 2, rel_tol=1e-12)
    assert math.isclose(metrics["rejected_reward"].item(), (r1 + r2) / 2, rel_tol=1e-12)
    assert math.isclose(metrics["margin"].item(), (m1 + m2) / 2, rel_tol=1e-12)
    assert set(metrics) == METRIC_KEYS
    loss.backward()
    # ∂L/∂z of pair 1's chosen row: [−β σ(−m1) − λ] / 2 · (onehot(0) − p)
    coefficient = (-0.5 / (1 + math.exp(m1)) - 0.2) / 2
    expected = coefficient * (torch.tensor([1.0, 0.0], dtype=torch.float64) - probs[0, 0])
    torch.testing.assert_close(logits.grad[0, 0], expected)


def test_more_preference_lowers_the_loss():
    logits = torch.zeros(2, 1, 3, requires_grad=True)
    ids, ref = torch.tensor([[0], [1]]), torch.full((2, 1), -math.log(3))
    dpo_loss(logits, ids, ref, shift=False).loss.backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[1, 0, 1] > 0  # raise chosen, lower rejected


def test_masking_a_pair_equals_dropping_it():
    tester = TestDPO()
    inputs = tester.make_inputs(torch.float64, seed=0)  # pair 2 (rows 2, 3) is masked out
    inputs["next_token_logits"][2:4] = float("nan")
    masked = dpo_loss(**inputs, sft_weight=0.5)
    keep = torch.tensor([0, 1, 4, 5])
    dropped = dpo_loss(
        inputs["next_token_logits"][keep],
        inputs["input_ids"][keep],
        inputs["reference_logprobs"][keep],
        inputs["token_mask"][keep],
        sft_weight=0.5,
    )
    torch.testing.assert_close(torch.stack(list(masked)), torch.stack(list(dropped)))


@pytest.mark.parametrize("average_log_probs", [False, True])
def test_micro_batches_add_up_to_the_full_batch(average_log_probs):
    g = torch.Generator().manual_seed(0)
    batch, steps, vocab = 10, 6, 5
    logits = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, steps), generator=g)
    token_mask = torch.rand(batch, steps, generator=g) > 0.4
    ref = torch.randn(batch, steps, generator=g, dtype=torch.float64) - 2
    sample_mask = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    module = DPOLoss(beta=0.3, average_log_probs=average_log_probs, sft_weight=0.1)
    seqs = sample_mask.sum()
    full = module(logits, ids, ref, token_mask, sample_mask)
    full_grad = torch.autograd.grad(full.loss, logits)[0]
    for split in ([slice(0, 2), slice(2, 6), slice(6, 10)], [slice(0, 8), slice(8, 10)]):
        parts = [module(logits[s], ids[s], ref[s], token_mask[s], sample_mask[s], seqs) for s in split]
        for key in METRIC_KEYS:
            torch.testing.assert_close(sum(p.metrics[key] for p in parts), full.metrics[key])
        torch.testing.assert_close(torch.autograd.grad(sum(p.loss for p in parts), logits)[0], full_grad)
    naive = sum(module(logits[s], ids[s], ref[s], token_mask[s], sample_mask[s]).loss for s in split) / 2
    assert not torch.allclose(naive, full.loss)


def test_reference_is_a_constant():
    ref = torch.full((2, 2), -1.0, requires_grad=True)
    loss = dpo_loss(torch.randn(2, 2, 3, requires_grad=True), torch.zeros(2, 2, dtype=torch.long), ref).loss
    loss.backward()
    assert ref.grad is None


def test_bad_inputs_name_the_argument():
    logits, ids, ref = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="even number"):
        dpo_loss(logits[:1], ids[:1], ref[:1])
    with pytest.raises(ValueError, match="reference_logprobs"):
        dpo_loss(logits, ids, ref[:, :2])
    with pytest.raises(TypeError, match="reference_logprobs"):
        dpo_loss(logits, ids, ids)
    with pytest.raises(ValueError, match="sample_mask"):
        dpo_loss(logits, ids, ref, sample_mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="sample_mask"):
        dpo_loss(logits, ids, ref, sample_mask=torch.ones(3))
    with pytest.raises(ValueError, match="input_ids"):
        dpo_loss(logits, ids[:, :2], ref)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="sft_weight"):
        DPOLoss(sft_weight=-1.0)


def test_registry_builds_it():
    loss = build_loss({"name": "dpo", "params": {"beta": 0.2, "average_log_probs": True}})
    assert isinstance(loss, DPOLoss) and loss.beta == 0.2 and loss.loss_type.value == "sequence_level"
    assert set(loss.partial_metrics) == METRIC_KEYS - {"loss"}


def test_under_loss_module_the_count_is_the_pairs():
    from lightning_losses import LossModule
    from tests.helpers import TinyLM

    module = LossModule(TinyLM(), DPOLoss())
    batch = {
        "input_ids": torch.randint(0, 7, (6, 4)),
        "reference_logprobs": -torch.rand(6, 4),
        "token_mask": torch.ones(6, 4, dtype=torch.bool),
        "sample_mask": torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool),
    }
    args, kwargs, _ = module._loss_inputs(batch, module(batch))
    assert kwargs["global_valid_seqs"].item() == 4  # sequences: the loss divides by 4 / 2 = 2 pairs
    loss, _ = DPOLoss()(*args, **kwargs)
    logits = module(batch)["next_token_logits"]
    local = dpo_loss(
        logits, batch["input_ids"], batch["reference_logprobs"], batch["token_mask"], batch["sample_mask"]
    ).loss
    torch.testing.assert_close(loss, local)


def test_sample_mask_without_token_mask():
    """``sample_mask`` alone (no ``token_mask``) counts every token of the kept pairs."""
    inputs = TestDPO().make_inputs(torch.float64, seed=1)
    inputs.pop("token_mask")  # then every token counts: no padding ids, no NaN reference
    inputs.pop("global_valid_seqs", None)
    inputs["input_ids"] = inputs["input_ids"].clamp(min=0)
    inputs["reference_logprobs"] = inputs["reference_logprobs"].nan_to_num(-1.0)
    ones = torch.ones(inputs["input_ids"].shape)
    alone = dpo_loss(**inputs, sft_weight=0.5)
    explicit = dpo_loss(**inputs, token_mask=ones, sft_weight=0.5)
    torch.testing.assert_close(torch.stack(list(alone)), torch.stack(list(explicit)))
    nothing = dpo_loss(**(inputs | {"sample_mask": torch.zeros_like(inputs["sample_mask"])}))
    assert nothing.loss.item() == 0.0
