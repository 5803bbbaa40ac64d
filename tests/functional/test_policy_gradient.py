import math

import pytest
import torch

from lightning_losses.functional.policy_gradient import clipped_pg_loss, kl_penalty, policy_valid_tokens
from lightning_losses.losses.policy_gradient import ClippedPGLoss
from lightning_losses.protocol import LossType
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester

METRIC_KEYS = {"loss", "probs_ratio", "clip_fraction", "kl_penalty", "approx_entropy", "num_valid_samples"}


def brute_force_kl(logprob, reference, kl_type, input_clamp=None, output_clamp=None):
    log_r = reference - logprob
    if input_clamp is not None:
        log_r = min(max(log_r, -input_clamp), input_clamp)
    kl = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kl_type]
    if output_clamp is not None:
        kl = min(max(kl, -output_clamp), output_clamp)
    return kl


def brute_force_clipped_pg(
    next_token_logits,
    input_ids,
    advantages,
    prev_logprobs,
    reference_logprobs=None,
    token_mask=None,
    sample_mask=None,
    global_valid_toks=None,
    global_valid_seqs=None,
    ratio_clip_min=0.2,
    ratio_clip_max=0.2,
    ratio_clip_c=None,
    disable_ppo_ratio=False,
    aggregation="token",
    kl_beta=0.0,
    kl_type="k3",
    kl_input_clamp=None,
    kl_output_clamp=None,
    shift=True,
):
    """Python loops over sequences, tokens and the vocabulary in float64: (loss, probs_ratio, clip_fraction,
    kl_penalty, approx_entropy)."""
    batch, steps, _ = next_token_logits.shape
    logits = next_token_logits.tolist()
    ids = input_ids.tolist()
    tmask = [[1.0] * steps] * batch if token_mask is None else token_mask.double().tolist()
    smask = [1.0] * batch if sample_mask is None else sample_mask.double().tolist()
    old = prev_logprobs.tolist()
    ref = None if reference_logprobs is None else reference_logprobs.tolist()
    adv = advantages.tolist()
    total, seq_total, token_weight = 0.0, 0.0, 0.0
    ratio_sum = clipped = kl_sum = entropy = 0.0
    for i in range(batch):
        if smask[i] == 0:
            continue
        row_sum = row_weight = 0.0
        for t in range(steps - 1 if shift else steps):
            tt = t + 1 if shift else t
            m = tmask[i][tt]
            if m == 0:
                continue
            row = logits[i][t]
            logp = row[ids[i][tt]] - math.log(sum(math.exp(z) for z in row))
            a = adv[i][tt] if isinstance(adv[i], list) else adv[i]
            r = math.exp(logp - old[i][tt])
            if disable_ppo_ratio:
                ell = -a * logp
            else:
                ell = max(-a * r, -a * min(max(r, 1 - ratio_clip_min), 1 + ratio_clip_max))
                if ratio_clip_c is not None and a < 0:
                    ell = min(ell, -a * ratio_clip_c)
            kl = 0.0
            if kl_beta > 0:
                kl = brute_force_kl(logp, ref[i][tt], kl_type, kl_input_clamp, kl_output_clamp)
                ell += kl_beta * kl
            w = m * smask[i]
            total += w * ell
            token_weight += w
            row_sum += m * ell
            row_weight += m
            ratio_sum += w * r
            clipped += w * (r < 1 - ratio_clip_min or r > 1 + ratio_clip_max)
            kl_sum += w * kl
            entropy += w * (-r * logp)
        if row_weight > 0:
            seq_total += smask[i] * row_sum / row_weight
    tok = token_weight if global_valid_toks is None else float(global_valid_toks)
    seqs = sum(smask) if global_valid_seqs is None else float(global_valid_seqs)

    def div(x, n):
        return 0.0 if n == 0 else x / n

    loss = div(total, tok) if aggregation == "token" else div(seq_total, seqs)
    values = [loss, div(ratio_sum, tok), div(clipped, tok), div(kl_sum, tok), div(entropy, tok)]
    return torch.tensor(values, dtype=torch.float64)


class TestClippedPG(LossTester):
    functional = staticmethod(clipped_pg_loss)
    module_class = ClippedPGLoss
    option_sets = [
        {},
        {"ratio_clip_min": 0.1, "ratio_clip_max": 0.3, "kl_beta": 0.1, "kl_type": "k1"},
        {"ratio_clip_c": 3.0, "kl_beta": 0.2, "kl_type": "k2", "shift": False},
        {"aggregation": "sequence", "kl_beta": 0.05, "kl_input_clamp": 1.0, "kl_output_clamp": 0.5},
        {"disable_ppo_ratio": True, "kl_beta": 0.1},
        {"aggregation": "sequence", "ratio_clip_c": 2.0, "kl_beta": 0.1, "kl_type": "k3"},
    ]
    grad_inputs = ("next_token_logits",)
    mask_input = "sample_mask"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        batch, steps, vocab = 4, 5, 6
        logits = (2 * torch.randn(batch, steps, vocab, generator=g)).to(dtype)
        input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
        token_mask = torch.rand(batch, steps, generator=g) > 0.3
        token_mask[:, 1] = True  # every row has a valid token
        input_ids[~token_mask] = -100
        # the old policy near the current one: ratios on both sides of the clip range
        log_probs = torch.log_softmax(logits.double(), -1)
        safe = input_ids.clamp(min=0).unsqueeze(-1)
        current = torch.zeros(batch, steps, dtype=torch.float64)
        if seed == 2:  # shift=False: logits at t score token t
            current = log_probs.gather(-1, safe).squeeze(-1)
        else:  # logits at t score token t + 1
            current[:, 1:] = log_probs[:, :-1].gather(-1, safe[:, 1:]).squeeze(-1)
        prev = (current + 0.6 * torch.randn(batch, steps, generator=g, dtype=torch.float64)).to(dtype)
        reference = (current + 0.8 * torch.randn(batch, steps, generator=g, dtype=torch.float64)).to(dtype)
        prev[~token_mask] = float("nan")
        sample_mask = torch.tensor([True, True, False, True])
        advantages = torch.randn(batch, generator=g).to(dtype)
        advantages[2] = float("nan")  # a masked-out sequence never reaches the result
        inputs = {
            "next_token_logits": logits,
            "input_ids": input_ids,
            "advantages": advantages,
            "prev_logprobs": prev,
            "reference_logprobs": reference,
            "token_mask": token_mask,
            "sample_mask": sample_mask,
        }
        if seed == 1:  # a micro-batch of a larger global batch; per-token advantages
            inputs["global_valid_toks"] = torch.tensor(25)
            inputs["advantages"] = torch.randn(batch, steps, generator=g).to(dtype)
        if seed == 3:  # weights instead of masks
            inputs["token_mask"] = token_mask * torch.rand(batch, steps, generator=g)
            inputs["sample_mask"] = torch.tensor([0.5, 1.0, 0.0, 2.0])
            inputs["global_valid_seqs"] = torch.tensor(5.5)
        if seed == 5:
            inputs["global_valid_seqs"] = torch.tensor(6)
        return inputs

    def call_functional(self, inputs, options):
        return clipped_pg_loss(**inputs, **options).loss

    def reference(self, **inputs_and_options):
        return brute_force_clipped_pg(**inputs_and_options)[0]


@pytest.mark.usefixtures("fused_token_log_probs")
class TestClippedPGFused(TestClippedPG):
    """The same checks with the log-probabilities through the fused CPU cross-entropy."""


def test_every_metric_matches_the_brute_force_reference():
    tester = TestClippedPG()
    for index, options in enumerate(tester.option_sets):
        inputs = tester.make_inputs(torch.float64, seed=index)
        terms = clipped_pg_loss(**inputs, **options)
        expected = brute_force_clipped_pg(**inputs, **options)
        torch.testing.assert_close(torch.stack(terms[:5]), expected, rtol=1e-12, atol=1e-12, msg=str(options))
        smask = inputs["sample_mask"]
        assert terms.num_valid_samples.item() == pytest.approx(float(smask.double().sum()))
        for term in terms[1:]:
            assert not term.requires_grad and term.ndim == 0


def hand_case(advantage, **options):
    """π = 1/2 for every token (zero logits), ratios 0.5 / 1 / 1.5, shift=False."""
    logits = torch.zeros(1, 3, 2, dtype=torch.float64, requires_grad=True)
    old = torch.log(torch.tensor([[1.0, 0.5, 0.5 / 1.5]], dtype=torch.float64))
    ids = torch.zeros(1, 3, dtype=torch.long)
    terms = clipped_pg_loss(
        logits, ids, torch.tensor([advantage], dtype=torch.float64), old, shift=False, **options
    )
    return terms, logits


def test_hand_computed_clipping():
    # A = 1: -min(r, clip(r)) per token: ratios 0.5, 1, 1.5 -> 0.5, 1, 1.2
    terms, logits = hand_case(1.0)
    assert terms.loss.item() == pytest.approx(-(0.5 + 1.0 + 1.2) / 3)
    assert terms.probs_ratio.item() == pytest.approx(1.0)
    assert terms.clip_fraction.item() == pytest.approx(2 / 3)
    # the clipped token (1.5 -> 1.2) gets no gradient, the others -A r ∂log π
    terms.loss.backward()
    grad = logits.grad[0, :, 0]
    assert grad[2].item() == 0.0
    # ∂(-r)/∂z_0 = -r (1 - π_0) = -r / 2, divided by 3 tokens
    assert grad[0].item() == pytest.approx(-0.5 / 2 / 3)
    assert grad[1].item() == pytest.approx(-1.0 / 2 / 3)
    # A = -1: max(r, clip(r)) -> 0.8, 1, 1.5
    terms, _ = hand_case(-1.0)
    assert terms.loss.item() == pytest.approx((0.8 + 1.0 + 1.5) / 3)
    # asymmetric ε: clip to [0.9, 1.3]
    terms, _ = hand_case(1.0, ratio_clip_min=0.1, ratio_clip_max=0.3)
    assert terms.loss.item() == pytest.approx(-(0.5 + 1.0 + 1.3) / 3)
    terms, _ = hand_case(-1.0, ratio_clip_min=0.1, ratio_clip_max=0.3)
    assert terms.loss.item() == pytest.approx((0.9 + 1.0 + 1.5) / 3)


def test_dual_clip_bounds_negative_advantages():
    # A = -1, c = 1.4: min(max(r, clip r), c) -> 0.8, 1, 1.4
    terms, _ = hand_case(-1.0, ratio_clip_c=1.4)
    assert terms.loss.item() == pytest.approx((0.8 + 1.0 + 1.4) / 3)
    # positive advantages are unaffected
    terms, _ = hand_case(1.0, ratio_clip_c=1.4)
    assert terms.loss.item() == pytest.approx(-(0.5 + 1.0 + 1.2) / 3)


def test_disable_ppo_ratio_is_reinforce():
    terms, _ = hand_case(2.0, disable_ppo_ratio=True)
    assert terms.loss.item() == pytest.approx(-2.0 * math.log(0.5))


def test_kl_estimators_exact_formulas():
    logp = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -0.5, -0.2], dtype=torch.float64)
    log_r = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * log_r**2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), log_r.exp() - 1 - log_r)
    # clamps: log r' to [-1, 1] first, the estimate to [-0.2, 0.2] after
    torch.testing.assert_close(kl_penalty(logp, ref, "k2", input_clamp=1.0), 0.5 * log_r.clamp(-1, 1) ** 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", output_clamp=0.2), (logp - ref).clamp(-0.2, 0.2))
    # k1 and k3 average to KL(π || π_ref) over samples of π
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        torch.testing.assert_close((p * kl_penalty(p.log(), q.log(), kind)).sum(), exact)
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty(logp, ref, "k4")


def test_kl_penalty_is_added_per_token():
    logits = torch.zeros(1, 3, 2, dtype=torch.float64)
    ids = torch.zeros(1, 3, dtype=torch.long)
    old = torch.full((1, 3), math.log(0.5), dtype=torch.float64)  # ratio 1 everywhere
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.75]], dtype=torch.float64))
    terms = clipped_pg_loss(
        logits,
        ids,
        torch.tensor([0.0], dtype=torch.float64),
        old,
        ref,
        shift=False,
        kl_beta=0.5,
        kl_type="k3",
    )
    log_r = torch.log(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    expected_kl = (log_r.exp() - 1 - log_r).mean()
    torch.testing.assert_close(terms.kl_penalty, expected_kl)
    torch.testing.assert_close(terms.loss, 0.5 * expected_kl)
    # approximate entropy with ratio 1: -mean log π = log 2
    assert terms.approx_entropy.item() == pytest.approx(math.log(2))


def test_all_zero_token_mask_is_exactly_zero():
    inputs = TestClippedPG().make_inputs(torch.float32, seed=0)
    inputs["token_mask"] = torch.zeros_like(inputs["token_mask"])
    logits = inputs.pop("next_token_logits").requires_grad_()
    for aggregation in ("token", "sequence"):
        terms = clipped_pg_loss(logits, **inputs, aggregation=aggregation, kl_beta=0.1)
        assert terms.loss.item() == 0.0
        for term in terms[1:5]:
            assert term.item() == 0.0
        (grad,) = torch.autograd.grad(terms.loss, logits)
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_masking_a_sample_equals_dropping_it(aggregation):
    inputs = TestClippedPG().make_inputs(torch.float64, seed=0)
    options = {"aggregation": aggregation, "kl_beta": 0.1}
    masked = clipped_pg_loss(**inputs, **options)
    keep = torch.tensor([0, 1, 3])
    dropped = {k: v[keep] for k, v in inputs.items()}
    dropped["sample_mask"] = None
    expected = clipped_pg_loss(**dropped, **options)
    torch.testing.assert_close(torch.stack(masked), torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_add_up_to_the_full_batch(aggregation):
    tester = TestClippedPG()
    inputs = tester.make_inputs(torch.float64, seed=1)
    inputs.pop("global_valid_toks")
    options = {"aggregation": aggregation, "kl_beta": 0.1, "ratio_clip_c": 3.0}
    full = clipped_pg_loss(**inputs, **options)
    global_toks = policy_valid_tokens(inputs["token_mask"], inputs["sample_mask"]).sum()
    global_seqs = inputs["sample_mask"].sum()
    parts = []
    for rows in (torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([3])):
        part = {k: v[rows] for k, v in inputs.items()}
        parts.append(
            clipped_pg_loss(**part, **options, global_valid_toks=global_toks, global_valid_seqs=global_seqs)
        )
    for index in range(6):
        total = sum(part[index] for part in parts)
        torch.testing.assert_close(total, full[index], rtol=1e-12, atol=1e-12, msg=str(index))


def test_bad_inputs_name_the_argument():
    inputs = TestClippedPG().make_inputs(torch.float32, seed=0)
    cases = {
        "advantages": torch.zeros(3),
        "prev_logprobs": torch.zeros(4, 4),
        "reference_logprobs": torch.zeros(4, 6),
        "token_mask": torch.ones(4, 4),
        "sample_mask": torch.ones(5),
        "input_ids": torch.zeros(4, 4, dtype=torch.long),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=name):
            clipped_pg_loss(**(inputs | {name: bad}), kl_beta=0.1)
    with pytest.raises(ValueError, match="reference_logprobs"):
        clipped_pg_loss(**(inputs | {"reference_logprobs": None}), kl_beta=0.1)
    too_big = inputs["input_ids"].clone()
    too_big[0, 1] = 99
    with pytest.raises(ValueError, match="input_ids"):
        clipped_pg_loss(**(inputs | {"input_ids": too_big}))
    for option, value in [
        ("ratio_clip_min", 1.0),
        ("ratio_clip_min", -0.1),
        ("ratio_clip_max", -0.1),
        ("ratio_clip_c", 1.0),
        ("kl_beta", -1.0),
        ("kl_type", "k5"),
        ("aggregation", "batch"),
    ]:
        with pytest.raises(ValueError, match=option):
            clipped_pg_loss(**inputs, **{option: value})
        with pytest.raises(ValueError, match=option):
            ClippedPGLoss(**{option: value})


def test_module_metrics_loss_type_and_registry():
    inputs = TestClippedPG().make_inputs(torch.float32, seed=0)
    loss_fn = build_loss({"name": "clipped_pg", "params": {"kl_beta": 0.1}})
    assert isinstance(loss_fn, ClippedPGLoss) and loss_fn.loss_type == LossType.TOKEN_LEVEL
    assert ClippedPGLoss(aggregation="sequence").loss_type == LossType.SEQUENCE_LEVEL
    loss, metrics = loss_fn(**inputs)
    assert set(metrics) == METRIC_KEYS
    assert set(loss_fn.partial_metrics) == METRIC_KEYS - {"loss"}
    weights = loss_fn.valid_tokens(inputs)
    torch.testing.assert_close(weights, policy_valid_tokens(inputs["token_mask"], inputs["sample_mask"]))
    assert loss_fn.valid_tokens({"input_ids": inputs["input_ids"]}).shape == (4, 4)
    # dividing by the valid_tokens count equals the local mean
    torch.testing.assert_close(loss_fn(**inputs, global_valid_toks=weights.sum())[0], loss)
