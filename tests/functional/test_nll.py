import math

import pytest
import torch

from lightning_losses.functional.nll import nll_loss, token_log_probs
from lightning_losses.functional.sequence_policy import taken_log_probs
from lightning_losses.losses.nll import NLLLoss
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester


def brute_force_nll(next_token_logits, input_ids, token_mask=None, global_valid_toks=None, shift=True):
    """Python loops over sequences, tokens and the vocabulary in float64."""
    batch, steps, _ = next_token_logits.shape
    logits, ids = next_token_logits.tolist(), input_ids.tolist()
    mask = [[1.0] * steps] * batch if token_mask is None else token_mask.double().tolist()
    total = count = 0.0
    for i in range(batch):
        for t in range(steps - 1 if shift else steps):
            target_t = t + 1 if shift else t
            weight = mask[i][target_t]
            if weight == 0:
                continue
            row = logits[i][t]
            log_z = math.log(sum(math.exp(z) for z in row))
            total -= weight * (row[ids[i][target_t]] - log_z)
            count += weight
    if global_valid_toks is not None:
        count = float(global_valid_toks)
    return torch.tensor(0.0 if count == 0 else total / count, dtype=torch.float64)


class TestNLL(LossTester):
    functional = staticmethod(nll_loss)
    module_class = NLLLoss
    option_sets = [{}, {"shift": False}, {}, {"shift": False}]
    grad_inputs = ("next_token_logits",)
    mask_input = "token_mask"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        batch, steps, vocab = 3, 6, 7
        logits = (3 * torch.randn(batch, steps, vocab, generator=g)).to(dtype)
        input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
        token_mask = torch.rand(batch, steps, generator=g) > 0.3
        input_ids[~token_mask] = -100  # padding ids where the mask is off
        inputs = {"next_token_logits": logits, "input_ids": input_ids, "token_mask": token_mask}
        if seed == 1:  # a micro-batch of a larger global batch
            inputs["global_valid_toks"] = torch.tensor(40)
        if seed == 2:  # float weights
            inputs["token_mask"] = token_mask * torch.rand(batch, steps, generator=g)
            inputs["global_valid_toks"] = torch.tensor(6.5)
        return inputs

    def reference(self, **inputs_and_options):
        return brute_force_nll(**inputs_and_options)


@pytest.mark.usefixtures("fused_token_log_probs")
class TestNLLFused(TestNLL):
    """The same checks with the log-probabilities through the fused CPU cross-entropy."""


def test_hand_computed_case():
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.8, 0.2]]], dtype=torch.float64)
    logits = probs.log().requires_grad_()
    ids, mask = torch.tensor([[1, 0, 1]]), torch.tensor([[1, 1, 1]])
    loss, metrics = NLLLoss()(logits, ids, mask)  # shifted: log .5 (token 0 at t=1) + log .75 (token 1)
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert metrics["loss"].item() == loss.item() and not metrics["loss"].requires_grad
    loss.backward()
    # ∂/∂z of -log softmax(z)[y] / 2 is (p − onehot(y)) / 2; the last position scores nothing
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([0.125, -0.125], dtype=torch.float64))
    assert torch.count_nonzero(logits.grad[0, 2]) == 0


def test_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(4, 5, 9, generator=g), torch.randint(0, 9, (4, 5), generator=g)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(nll_loss(logits, ids), expected)


@pytest.mark.parametrize("shift", [True, False])
def test_micro_batches_add_up_to_the_full_batch(shift):
    g = torch.Generator().manual_seed(0)
    batch, steps, vocab = 7, 6, 5
    logits = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, steps), generator=g)
    mask = torch.rand(batch, steps, generator=g) > 0.4
    module = NLLLoss(shift=shift)
    count = module.valid_tokens({"input_ids": ids, "token_mask": mask}).sum()
    full = nll_loss(logits, ids, mask, shift=shift)
    full_grad = torch.autograd.grad(full, logits)[0]
    for split in ([slice(0, 1), slice(1, 3), slice(3, 7)], [slice(0, 6), slice(6, 7)]):
        parts = [module(logits[s], ids[s], mask[s], count).loss for s in split]
        torch.testing.assert_close(sum(parts), full)
        torch.testing.assert_close(torch.autograd.grad(sum(parts), logits)[0], full_grad)
    # naive per-micro-batch means differ (so the test above can fail)
    naive = sum(nll_loss(logits[s], ids[s], mask[s], shift=shift) for s in [slice(0, 1), slice(1, 7)]) / 2
    assert not torch.allclose(naive, full)


def test_valid_tokens_is_the_denominator():
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    assert NLLLoss().valid_tokens({"input_ids": ids, "token_mask": mask}).sum() == 4
    assert NLLLoss(shift=False).valid_tokens({"input_ids": ids, "token_mask": mask}).sum() == 5
    assert NLLLoss().valid_tokens({"input_ids": ids}).sum() == 6


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_masked_nan_logits_do_not_leak(request, path):
    if path == "fused":
        request.getfixturevalue("fused_token_log_probs")
    logits = torch.randn(2, 3, 4)
    logits[1] = float("nan")  # rows of a fully masked sequence
    ids = torch.tensor([[0, 1, 2], [-100, -100, -100]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    loss = nll_loss(logits, ids, mask, shift=False)
    # logsumexp of a NaN row is NaN, but the masked token never reaches the sum
    assert torch.isfinite(loss)


def test_token_log_probs_shapes():
    log_probs, weights = token_log_probs(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long))
    assert log_probs.shape == weights.shape == (2, 4)
    torch.testing.assert_close(log_probs, torch.full((2, 4), -math.log(3)))


def test_bad_inputs_name_the_argument():
    logits, ids = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"):
        nll_loss(logits, ids[:, :2])
    with pytest.raises(ValueError, match="next_token_logits"):
        nll_loss(logits[0], ids)
    with pytest.raises(ValueError, match="token_mask"):
        nll_loss(logits, ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="input_ids"):
        nll_loss(logits, ids + 4)
    with pytest.raises(TypeError, match="next_token_logits"):
        nll_loss(ids, ids)


def test_registry_builds_it():
    loss = build_loss({"name": "nll", "params": {"shift": False}})
    assert isinstance(loss, NLLLoss) and loss.shift is False and loss.loss_type.value == "token_level"


def test_under_loss_module_the_count_is_the_scored_tokens():
    from lightning_losses import LossModule
    from tests.helpers import TinyLM

    module = LossModule(TinyLM(), NLLLoss())
    batch = {
        "input_ids": torch.randint(0, 7, (2, 5)),
        "token_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
    }
    args, kwargs, _ = module._loss_inputs(batch, module(batch))
    assert kwargs["global_valid_toks"].item() == 3  # token_mask[:, 1:]: the prompt token is never scored
    loss, _ = NLLLoss()(*args, **kwargs)
    logits = module(batch)["next_token_logits"]
    torch.testing.assert_close(loss, nll_loss(logits, batch["input_ids"], batch["token_mask"]))


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_token_log_probs_equal_gather_minus_logsumexp(request, shift, dtype):
    """Both paths of ``taken_log_probs`` against ``z_y - logsumexp(z)`` on the scored positions, values and
    gradients (for an upstream gradient that differs per token); with ``shift`` the last position, which
    scores nothing, gets exactly zero gradient."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 5, 7, generator=g)).to(dtype)
    tokens = torch.randint(0, 7, (3, 4 if shift else 5), generator=g)
    upstream = torch.randn(tokens.shape, generator=g, dtype=torch.float64)
    scored = (logits[:, :-1] if shift else logits).double()
    expected = scored.gather(-1, tokens[..., None]).squeeze(-1) - scored.logsumexp(-1)
    reference = logits.double().requires_grad_()
    ref_scored = reference[:, :-1] if shift else reference
    ref_value = ref_scored.gather(-1, tokens[..., None]).squeeze(-1) - ref_scored.logsumexp(-1)
    (expected_grad,) = torch.autograd.grad((ref_value * upstream).sum(), reference)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for path in ("plain", "fused"):
        if path == "fused":
            request.getfixturevalue("fused_token_log_probs")
        leaf = logits.clone().requires_grad_()
        value = taken_log_probs(leaf, tokens, shift, compute)
        assert value.dtype == compute and value.shape == tokens.shape
        (grad,) = torch.autograd.grad((value * upstream.to(compute)).sum(), leaf)
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=path)
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(grad.double(), expected_grad, msg=path, **tolerance)
        if shift:
            assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))
