import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_losses import LossModule, set_value_checks
from lightning_losses.examples import MLP
from lightning_losses.functional.focal import focal_elements, focal_loss, focal_loss_with_metrics
from lightning_losses.losses.focal import FocalLoss
from lightning_losses.registry import build_loss
from tests.helpers import TinyLM
from tests.loss_tester import LossTester

INF = float("inf")
# the module (the package re-exports a function of the same name)
cross_entropy_module = importlib.import_module("lightning_losses.functional.cross_entropy")
focal_module = importlib.import_module("lightning_losses.functional.focal")

CLASS_ALPHA = [0.5, 2.0, 1.0, 1.5, 0.25]
LABEL_ALPHA = [0.1, 0.9, 0.5, 0.25, 0.75]


def brute_force_multiclass_focal(logits, target, mask, gamma=2.0, alpha=None, ignore_index=-100, **_):
    """A Python loop over elements and classes in float64: -alpha_t (1 - p_t)^gamma log p_t."""
    num_classes = logits.shape[-1]
    rows, targets, masks = (
        logits.reshape(-1, num_classes).tolist(),
        target.reshape(-1).tolist(),
        mask.reshape(-1).tolist(),
    )
    numerator = denominator = 0.0
    for row, t, m in zip(rows, targets, masks, strict=True):
        if t == ignore_index or m == 0:
            continue
        z = sum(math.exp(x) for x in row)
        p_t = math.exp(row[t]) / z
        alpha_t = 1.0 if alpha is None else alpha if isinstance(alpha, float) else alpha[t]
        numerator += m * -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
        denominator += m
    return torch.tensor(numerator / denominator if denominator else 0.0, dtype=torch.float64)


def torchvision_sigmoid_focal(logits, target, gamma=2.0, alpha=None):
    """torchvision.ops.sigmoid_focal_loss(reduction="none"), written out (alpha=None is its alpha < 0)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha is not None:
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
        loss = alpha_t * loss
    return loss


def masked_torchvision_mean(logits, target, mask, gamma=2.0, alpha=None, ignore_index=-100, **_):
    valid = (mask != 0) & (target != ignore_index)
    alpha = None if alpha is None else torch.as_tensor(alpha, dtype=logits.dtype)
    loss = torchvision_sigmoid_focal(logits, torch.where(valid, target, 0.0), gamma, alpha)
    return loss[valid].sum() / valid.sum()


def tensor_alpha(options):
    if isinstance(options.get("alpha"), list):
        return options | {"alpha": torch.tensor(options["alpha"], dtype=torch.float64)}
    return options


class TestMulticlassFocal(LossTester):
    functional = staticmethod(focal_loss)
    module_class = FocalLoss
    option_sets = [
        {},
        {"gamma": 0.0},
        {"gamma": 0.5, "alpha": 0.25},
        {"gamma": 2.0, "alpha": CLASS_ALPHA},
        {"gamma": 3.5, "alpha": 2.0},
    ]
    grad_inputs = ("logits",)
    mask_input = "mask"
    config = "digits_focal.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(3, 4, 5, generator=g)).to(dtype)
        target = torch.randint(0, 5, (3, 4), generator=g)
        target[0, 1] = -100
        mask = torch.rand(3, 4, generator=g) > 0.3
        return {"logits": logits, "target": target, "mask": mask}

    def functional_options(self, options):
        return tensor_alpha(options)

    def reference(self, logits, target, mask, **options):
        return brute_force_multiclass_focal(logits, target, mask, **options)


class TestSigmoidFocal(LossTester):
    functional = staticmethod(focal_loss)
    module_class = FocalLoss
    option_sets = [
        {"mode": "multilabel"},
        {"mode": "multilabel", "gamma": 2.0, "alpha": 0.25},
        {"mode": "binary", "gamma": 0.5, "alpha": 0.75},
        {"mode": "multilabel", "gamma": 1.5, "alpha": LABEL_ALPHA},
        {"mode": "binary", "gamma": 0.0},
    ]
    grad_inputs = ("logits",)
    mask_input = "mask"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(2, 3, 5, generator=g)).to(dtype)
        target = (torch.rand(2, 3, 5, generator=g) > 0.6).to(dtype)
        target[0, 1, 2] = -100
        mask = torch.rand(2, 3, 5, generator=g) > 0.3
        return {"logits": logits, "target": target, "mask": mask}

    def functional_options(self, options):
        return tensor_alpha(options)

    def reference(self, logits, target, mask, mode, **options):
        return masked_torchvision_mean(logits, target, mask, **options)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("shape", [(17,), (6, 7)])
def test_sigmoid_equals_torchvision_formula_in_value_and_gradient(gamma, alpha, shape):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    target = (torch.rand(shape, generator=g) > 0.5).double()
    mode = "binary" if len(shape) == 1 else "multilabel"
    ours = focal_loss(logits, target, mode=mode, gamma=gamma, alpha=alpha)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    expected = torchvision_sigmoid_focal(logits, target, gamma, alpha).mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grad, expected_grad)


def test_soft_sigmoid_targets_follow_the_same_formula():
    logits = torch.randn(20, dtype=torch.float64, requires_grad=True)
    target = torch.rand(20, dtype=torch.float64)
    ours = focal_loss(logits, target, mode="binary", gamma=1.5, alpha=0.3)
    expected = torchvision_sigmoid_focal(logits, target, 1.5, 0.3).mean()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("shape", [(9, 6), (3, 4, 6)])
def test_gamma_zero_multiclass_equals_torch_cross_entropy(shape):
    logits = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, shape[:-1])
    target.view(-1)[2] = -100
    ours = focal_loss(logits, target, gamma=0.0)
    expected = F.cross_entropy(logits.reshape(-1, 6), target.reshape(-1))
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_over_cross_entropy_is_the_modulating_factor_times_alpha(gamma):
    logits = 2 * torch.randn(40, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (40,))
    alpha = torch.tensor(CLASS_ALPHA, dtype=torch.float64)
    focal = focal_elements(logits, target, gamma=gamma, alpha=alpha).loss
    ce = F.cross_entropy(logits, target, reduction="none")
    p_t = logits.softmax(-1)[torch.arange(40), target]
    torch.testing.assert_close(focal / ce, (1 - p_t) ** gamma * alpha[target])

    binary_logits, binary_target = (
        2 * torch.randn(40, dtype=torch.float64),
        (torch.arange(40) % 3 == 0).double(),
    )
    focal = focal_elements(binary_logits, binary_target, mode="binary", gamma=gamma, alpha=0.25).loss
    ce = F.binary_cross_entropy_with_logits(binary_logits, binary_target, reduction="none")
    p = torch.sigmoid(binary_logits)
    p_t = torch.where(binary_target == 1, p, 1 - p)
    alpha_t = torch.where(binary_target == 1, 0.25, 0.75).double()
    torch.testing.assert_close(focal / ce, (1 - p_t) ** gamma * alpha_t)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_confident_logits_give_finite_values_and_gradients(gamma):
    # right (p_t = 1 - e^-100), wrong (p_t = e^-100), and p_t = 1 - e^-60, which rounds to exactly 1 in fp32
    logits = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [60.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0, 0])
    assert torch.softmax(logits[2], -1)[0].item() == 1.0  # a naive (1 - p_t) ** gamma is 0 here
    loss = focal_loss(logits, target, gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # only the wrong element counts: (1 - p_t)^gamma = 1, -log p_t = 100; its gradient is softmax - onehot
    torch.testing.assert_close(loss, torch.tensor(100 / 3))
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]) / 3)

    huge = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    loss = focal_loss(huge, torch.tensor([0, 0]), gamma=gamma)
    loss.backward()
    assert torch.isfinite(huge.grad).all()
    torch.testing.assert_close(loss, torch.tensor(1e4))

    x = torch.tensor([1e4, -1e4, 1e4, 60.0, -60.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    loss = focal_loss(x, t, mode="binary", gamma=gamma, alpha=0.25)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, torch.tensor(0.75 * 1e4 / 5))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 0.75, 0.0, 0.0]) / 5)


def test_gamma_below_one_has_finite_gradient_where_p_t_rounds_to_one():
    """d/dp (1-p)^gamma is infinite at p = 1 for gamma < 1: the naive formula gives NaN, ours not."""
    logits = torch.tensor([[30.0, 0.0, -2.0]], requires_grad=True)
    naive_p_t = logits.softmax(-1)[0, 0]
    naive = -((1 - naive_p_t) ** 0.5) * torch.log(naive_p_t)
    assert naive_p_t.item() == 1.0 and torch.isnan(torch.autograd.grad(naive, logits)[0]).any()
    loss = focal_loss(logits, torch.tensor([0]), gamma=0.5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the true value and gradient are ~ (e^-30)^1.5 ~ 1e-20
    torch.testing.assert_close(loss, torch.tensor(0.0), rtol=0, atol=1e-18)
    torch.testing.assert_close(logits.grad, torch.zeros(1, 3), rtol=0, atol=1e-18)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_confident_fp32_keeps_relative_precision(gamma):
    """p_t = 1 - 6e-6: fp32 `1 - softmax` keeps ~2 digits; log space keeps them all."""
    logits = torch.tensor([[12.0, 0.0, -1.0]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([0]), gamma=gamma)
    loss.backward()
    x64 = logits.detach().double().requires_grad_()
    p_t = x64.softmax(-1)[0, 0]  # 1 - p_t holds ~11 correct digits in float64
    expected = -((1 - p_t) ** gamma) * torch.log(p_t)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=0)


def test_custom_ignore_index_matches_the_brute_force_reference():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target, mask = torch.tensor([0, 2, 1, 2, 1, 0]), torch.tensor([1, 1, 1, 1, 0, 1])
    for options in ({"gamma": 2.0}, {"gamma": 0.5, "alpha": [0.5, 2.0, 1.0]}):
        expected = brute_force_multiclass_focal(logits, target, mask, ignore_index=2, **options)
        actual = focal_loss(logits, target, mask, ignore_index=2, **tensor_alpha(options))
        torch.testing.assert_close(actual, expected)
    # None skips nothing: 2 is a class like the others (and -100 would be out of range)
    expected = brute_force_multiclass_focal(logits, target, mask, ignore_index=None)
    torch.testing.assert_close(focal_loss(logits, target, mask, ignore_index=None), expected)


def test_global_count_makes_micro_batches_add_up():
    logits, target = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 4, (6, 3))
    mask = torch.rand(6, 3) > 0.5
    full = focal_loss(logits, target, mask, gamma=1.5)
    count = mask.sum()
    parts = sum(
        focal_loss(logits[s], target[s], mask[s], count, gamma=1.5)
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(parts, full)


def test_float_mask_weighs_elements():
    logits, target = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    weights = torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    expected = brute_force_multiclass_focal(logits, target, weights, gamma=2.0)
    torch.testing.assert_close(focal_loss(logits, target, weights, gamma=2.0), expected)


def test_ignored_and_masked_targets_may_be_out_of_range():
    logits, target = torch.randn(3, 4, dtype=torch.float64), torch.tensor([1, 99, -100])
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(
        focal_loss(logits, target, mask), brute_force_multiclass_focal(logits, target, mask)
    )
    binary_logits = torch.randn(3, dtype=torch.float64)
    binary_target, binary_mask = (
        torch.tensor([1.0, 7.0, -100.0], dtype=torch.float64),
        torch.tensor([1, 0, 1]),
    )
    torch.testing.assert_close(
        focal_loss(binary_logits, binary_target, binary_mask, mode="binary"),
        masked_torchvision_mean(binary_logits, binary_target, binary_mask),
    )


def test_integer_and_bool_binary_targets_follow_the_torchvision_formula():
    logits = torch.randn(8, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    expected = torchvision_sigmoid_focal(logits, target.double(), 2.0, 0.25).mean()
    for hard in (target, target.bool(), target.double()):
        torch.testing.assert_close(focal_loss(logits, hard, mode="binary", alpha=0.25), expected)


def reference_with_infinite_logits(logits, target, mask, gamma):
    """(loss, gradient) in float64, one valid row at a time: a -inf class has probability 0, so it is
    dropped (its gradient is 0); a row with one class left has p_t = 1, loss and gradient 0 by hand."""
    x = logits.detach().double()
    total, grad, count = 0.0, torch.zeros_like(x), 0
    for i in range(x.shape[0]):
        if not mask[i] or target[i] == -100:
            continue
        count += 1
        kept = [c for c in range(x.shape[1]) if x[i, c] > -INF]
        if len(kept) == 1:
            continue
        row = x[i, kept].clone().requires_grad_()
        p_t = row.softmax(-1)[kept.index(int(target[i]))]
        loss = -((1 - p_t) ** gamma) * torch.log(p_t)
        total += loss.item()
        grad[i, kept] = torch.autograd.grad(loss, row)[0]
    return torch.tensor(total / count, dtype=torch.float64), grad / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_minus_inf_logits_give_finite_gradients_also_in_masked_rows(gamma, dtype):
    """Masked vocabulary entries (-inf): logsumexp over no class at all has a NaN gradient, which a
    `where` choosing another value hides from the loss but not from the gradient."""
    logits = torch.tensor(
        [
            [2.0, -INF, -INF, -INF],  # valid, every other class -inf: p_t = 1, loss 0
            [1.0, -INF, 0.5, -INF],  # valid, two classes left
            [2.0, -INF, -INF, -INF],  # masked out, every other class -inf
            [-INF, 3.0, 1.0, -INF],  # ignore_index: class 0 (its stand-in target) is -inf
            [-INF, -INF, -INF, -INF],  # a masked padding row
            [0.3, -1.0, 2.0, 0.5],
        ],
        dtype=dtype,
        requires_grad=True,
    )
    target = torch.tensor([0, 2, 0, -100, 1, 3])
    mask = torch.tensor([True, True, False, True, False, True])
    loss = focal_loss(logits, target, mask, gamma=gamma)
    (grad,) = torch.autograd.grad(loss, logits)
    expected_loss, expected_grad = reference_with_infinite_logits(logits, target, mask, gamma)
    assert torch.isfinite(grad).all()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)
    # the review's repro: F.cross_entropy has a finite gradient there, and so has focal with gamma=0
    x = torch.tensor([[2.0, -INF], [1.0, 0.0]], requires_grad=True)
    for ignored in ({"mask": torch.tensor([False, True])}, {"target": torch.tensor([-100, 1])}):
        arguments = {"logits": x, "target": torch.tensor([0, 1])} | ignored
        (focal_grad,) = torch.autograd.grad(focal_loss(**arguments, gamma=0.0), x)
        keep = arguments.get("mask", torch.tensor([True, True]))
        (ce_grad,) = torch.autograd.grad(F.cross_entropy(x[keep], arguments["target"][keep]), x)
        torch.testing.assert_close(focal_grad, ce_grad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_infinite_sigmoid_logits_give_finite_gradients_where_the_loss_is_finite(gamma, alpha):
    """±inf logits on the right side have loss 0 and gradient 0 (0 · log 0 is 0, not NaN); on the wrong
    side the loss is inf, which must not reach the gradient of a masked or ignored element."""
    logits = torch.tensor(
        [INF, -INF, INF, -INF, 3.0, -2.0, -INF, INF], dtype=torch.float64, requires_grad=True
    )
    target = torch.tensor([1.0, 0.0, 0.0, -100.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True, True, False, False])
    loss = focal_loss(logits, target, mask, mode="binary", gamma=gamma, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, logits)
    finite = torch.tensor([4, 5])  # the valid elements with finite logits; 4 valid elements in all
    x = logits.detach()[finite].requires_grad_()
    reference = torchvision_sigmoid_focal(x, target[finite], gamma, alpha).sum() / 4
    expected_grad = torch.zeros_like(grad)
    expected_grad[finite] = torch.autograd.grad(reference, x)[0]
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad, expected_grad)
    # a confidently wrong valid element: the loss is inf, as it should be
    assert focal_loss(torch.tensor([-INF]), torch.tensor([1.0]), mode="binary", gamma=gamma) == INF


class _FullSizeTensors(TorchDispatchMode):
    """Records the (op, dtype, storage) of every op output with at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.outputs = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.numel:
                self.outputs.append((str(func), tensor.dtype, tensor.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multiclass_forward_makes_only_the_gradient_of_the_logits_size(dtype, monkeypatch):
    """[B, T, V] logits, blocks of 2 rows: the forward makes one tensor of the logits' size, the gradient
    in the logits' dtype (no one-hot, no copy, not even the fp32 upcast of bf16), and none without
    grad mode; autograd saves nothing of that size but the logits, and the result equals the unfused
    terms of `focal_elements` (a single block)."""
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", 128)
    logits = torch.randn(2, 8, 64).to(dtype).requires_grad_()
    target = torch.randint(0, 64, (2, 8))
    target[0, 0] = -100
    saved = set()

    def pack(tensor):
        if tensor.numel() >= logits.numel():
            saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    recorder = _FullSizeTensors(logits.numel())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), recorder:
        loss = focal_loss(logits, target, gamma=2.0)
    own = logits.untyped_storage().data_ptr()
    made = [output[:2] for output in recorder.outputs if output[2] != own]
    assert made == [("aten.empty_like.default", dtype)]
    assert saved == {own}
    recorder = _FullSizeTensors(logits.numel())
    with torch.no_grad(), recorder:
        focal_loss(logits, target, gamma=2.0)
    assert [output for output in recorder.outputs if output[2] != own] == []
    terms = focal_elements(logits, target, gamma=2.0)
    expected = terms.loss.sum() / terms.valid.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0], rtol=1e-2, atol=1e-5
    )


@pytest.mark.parametrize("blocks", [1, 4])
def test_sigmoid_gradient_from_the_forward_survives_a_second_backward(blocks, monkeypatch):
    """The sigmoid path writes its gradient in the forward pass and scales it in backward: a second
    backward through the same graph (``retain_graph``) recomputes it, so the gradients add up, and a
    forward under ``no_grad`` keeps no gradient."""
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", 10_000 if blocks == 1 else 40)
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(16, 10, generator=g)).requires_grad_()
    target = (torch.rand(16, 10, generator=g) < 0.3).float()
    options = {"mode": "multilabel", "gamma": 2.0, "alpha": 0.25}
    loss = focal_loss(logits, target, **options)
    (once,) = torch.autograd.grad(3 * loss, logits, retain_graph=True)
    (twice,) = torch.autograd.grad(3 * loss, logits)
    torch.testing.assert_close(once, twice, rtol=0, atol=0)
    terms = focal_elements(logits, target, **options)
    (expected,) = torch.autograd.grad(3 * terms.loss.sum() / terms.valid.sum(), logits)
    torch.testing.assert_close(once, expected)
    with torch.no_grad():
        torch.testing.assert_close(focal_loss(logits, target, **options), loss.detach())


@pytest.mark.parametrize("zeroed", ["in the logits", "in the gradient"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_multiclass_blocks_agree_with_the_reference_also_for_a_second_backward(gamma, zeroed, monkeypatch):
    """Blocks of 3 rows, an ignored row holding NaN and inf logits, tied top logits: loss, metrics
    (accuracy as ``argmax``, first index on ties) and gradient equal the brute-force reference; the
    gradient the forward made is scaled once, and a second backward (``retain_graph``) recomputes it.
    The rows that do not count are zeroed in the logits on a CPU and in the gradient elsewhere: both
    ways run here."""
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", 15)  # 3 rows of 5 per block
    if zeroed == "in the gradient":
        monkeypatch.setattr(focal_module, "_dropped_rows", lambda keep: None)
    g = torch.Generator().manual_seed(9)
    logits = 2 * torch.randn(10, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (10,), generator=g)
    target[4] = -100
    logits[4, 1], logits[4, 3] = math.nan, math.inf
    logits[6, 2] = logits[6, 4] = logits[6].max() + 1.0  # tied: argmax picks class 2
    target[6], target[7] = 4, 2
    logits[7, 2] = logits[7, 0] = logits[7].max() + 1.0  # tied: argmax picks class 0, not the target
    x = logits.clone().requires_grad_()
    result = FocalLoss(gamma=gamma)(x, target)
    (once,) = torch.autograd.grad(3 * result.loss, x, retain_graph=True)
    (twice,) = torch.autograd.grad(3 * result.loss, x)
    torch.testing.assert_close(once, twice, rtol=0, atol=0)

    valid = target != -100
    expected = brute_force_multiclass_focal(logits, target, torch.ones(10), gamma=gamma)
    torch.testing.assert_close(result.loss, expected)
    y = logits[valid].clone().requires_grad_()
    reference = -((1 - F.softmax(y, -1)[torch.arange(9), target[valid]]) ** gamma)
    reference = (reference * F.log_softmax(y, -1)[torch.arange(9), target[valid]]).mean()
    expected_grad = torch.zeros_like(logits)
    expected_grad[valid] = torch.autograd.grad(3 * reference, y)[0]
    torch.testing.assert_close(once, expected_grad)
    correct = logits[valid].argmax(-1) == target[valid]
    torch.testing.assert_close(result.metrics["accuracy"], correct.double().mean())
    p_t = F.softmax(logits[valid], -1)[torch.arange(9), target[valid]]
    torch.testing.assert_close(result.metrics["p_t"], p_t.mean())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_blocks_with_and_without_ignored_targets_agree_with_the_reference(gamma, monkeypatch):
    """A CPU block whose targets all lie in [0, 1] skips the ignore_index weights: blocks with and
    without ignored elements (NaN and inf logits there) must give the reference's loss, gradient and
    metrics."""
    monkeypatch.setattr(cross_entropy_module, "BLOCK_ELEMENTS", 40)  # 4 rows of 10 per block
    g = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    target = (torch.rand(16, 10, generator=g) < 0.3).double()
    target[5, 2] = target[6, 7] = -100.0  # only the second block has ignored elements
    logits[5, 2], logits[6, 7] = float("nan"), float("inf")
    logits.requires_grad_()
    metrics_module = FocalLoss(mode="multilabel", gamma=gamma, alpha=0.25)
    result = metrics_module(logits, target)
    (grad,) = torch.autograd.grad(result.loss, logits)

    valid = target != -100
    x = torch.where(valid, logits.detach(), 0.0).requires_grad_()
    terms = torchvision_sigmoid_focal(x, torch.where(valid, target, 0.0), gamma, 0.25)
    expected = terms[valid].sum() / valid.sum()
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(result.loss, expected.detach())
    torch.testing.assert_close(grad, expected_grad)
    p = torch.sigmoid(logits.detach()[valid])
    t = target[valid]
    torch.testing.assert_close(result.metrics["p_t"], (p * t + (1 - p) * (1 - t)).mean())
    correct = (logits.detach()[valid] > 0) == (t > 0.5)
    torch.testing.assert_close(result.metrics["accuracy"], correct.double().mean())


def test_sigmoid_fp32_keeps_relative_precision_at_confident_logits():
    """Each element's loss and gradient in fp32 against float64, to 1e-4 relative, from p_t = 1 - 6e-6
    down to r = 1 - p_t = e^-80 (a normal float): no term is a difference of rounded probabilities. The
    reference is the formula with r = p(1-t) + (1-p)t taken from sigmoid(±x), never as 1 - p_t (which
    float64 itself rounds away by x = 30), differentiated by autograd."""
    x = torch.tensor([12.0, -12.0, 30.0, -30.0, 80.0, -80.0, 3.0, -3.0])
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.7, 0.2])
    tiny = torch.finfo(torch.float32).tiny
    for gamma in (0.5, 2.0):
        for i in range(len(x)):
            xi = x[i : i + 1].clone().requires_grad_()
            loss = focal_loss(xi, t[i : i + 1], mode="binary", gamma=gamma)
            (grad,) = torch.autograd.grad(loss, xi)
            x64, t64 = xi.detach().double().requires_grad_(), t[i : i + 1].double()
            r = torch.sigmoid(x64) * (1 - t64) + torch.sigmoid(-x64) * t64
            bce = (1 - t64) * F.softplus(x64) + t64 * F.softplus(-x64)
            expected = (r**gamma * bce).sum()
            (expected_grad,) = torch.autograd.grad(expected, x64)
            for ours, reference in ((loss, expected.detach()), (grad, expected_grad)):
                if reference.abs().item() >= tiny:  # below, no fp32 holds the value
                    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=0)
                else:
                    assert ours.abs().item() < tiny


def test_module_scalar_alpha_is_a_constant_factor_in_multiclass():
    logits, target = torch.randn(5, 4), torch.randint(0, 4, (5,))
    plain = FocalLoss(gamma=2.0)(logits, target).loss
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=0.5)(logits, target).loss, 0.5 * plain)
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=1.0)(logits, target).loss, plain)


def test_module_metrics_are_hand_computable():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    target = torch.tensor([0, 0, 1])
    _, metrics = FocalLoss()(logits, target, mask=torch.tensor([1, 1, 0]))
    p0, p1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(metrics["p_t"], torch.tensor((p0 + p1) / 2))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(0.5))
    _, binary = FocalLoss(mode="binary")(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.0]))
    p_t = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(0.5))]
    torch.testing.assert_close(binary["p_t"], torch.tensor(sum(p_t) / 3))
    torch.testing.assert_close(binary["accuracy"], torch.tensor(1 / 3))
    assert set(metrics) == {"loss", "p_t", "accuracy"}


def test_guide_spec_builds_by_registry_name():
    loss = build_loss({"name": "focal", "params": {"alpha": 1.0, "gamma": 2.0}})
    assert isinstance(loss, FocalLoss) and loss.alpha == 1.0 and loss.gamma == 2.0
    assert loss.class_alpha is None
    per_class = build_loss("focal", alpha=CLASS_ALPHA)
    torch.testing.assert_close(per_class.class_alpha, torch.tensor(CLASS_ALPHA))


def test_loss_module_binds_logits_and_target_from_a_digits_batch():
    module = LossModule(MLP(64, 10, hidden=(16,)), FocalLoss(gamma=2.0))
    batch = {"inputs": torch.rand(8, 64), "target": torch.randint(0, 10, (8,))}
    loss, metrics, outputs, *_ = module._step(batch)
    torch.testing.assert_close(loss, focal_loss(outputs["logits"], batch["target"], gamma=2.0))
    assert set(metrics) == {"loss", "p_t", "accuracy"}


def test_loss_module_counts_the_focal_denominator():
    """global_valid_toks is what the loss divides by: ignore_index targets under a set mask do not count."""
    torch.manual_seed(0)
    module = LossModule(
        TinyLM(),
        FocalLoss(gamma=2.0),
        input_map={"logits": "next_token_logits", "target": "labels", "mask": "token_mask"},
    )
    batch = {
        "input_ids": torch.randint(0, 7, (2, 5)),
        "labels": torch.randint(0, 7, (2, 5)),
        "token_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
    }
    batch["labels"][0, 0] = -100  # ignored under the mask
    batch["labels"][0, 4] = -100  # ignored and masked
    args, kwargs, global_count = module._loss_inputs(batch, module(batch))
    logits = module(batch)["next_token_logits"]
    local_count = focal_elements(logits, batch["labels"], batch["token_mask"]).valid.sum()
    assert global_count is not None and kwargs["global_valid_toks"].item() == local_count.item() == 3
    loss = module.loss(*args, **kwargs).loss
    expected = brute_force_multiclass_focal(logits.detach().double(), batch["labels"], batch["token_mask"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # fp32 against fp64

    # multilabel: one weight per logit, the shape of `logits`
    multilabel = LossModule(torch.nn.Linear(3, 4), FocalLoss(mode="multilabel"))
    target = torch.tensor([[1.0, 0.0, -100.0, 1.0], [0.0, 0.0, 1.0, -100.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    outputs = {"logits": torch.randn(3, 4)}
    assert multilabel.loss.valid_tokens({"target": target, "mask": mask}).shape == (3, 4)
    _, kwargs, _ = multilabel._loss_inputs(
        {"inputs": torch.ones(3, 3), "target": target, "mask": mask}, outputs
    )
    assert kwargs["global_valid_toks"].item() == 6
    torch.testing.assert_close(
        multilabel.loss(**kwargs).loss.double(),
        masked_torchvision_mean(outputs["logits"].double(), target.double(), mask),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"logits": torch.ones(3, dtype=torch.long), "target": torch.zeros(3)}, TypeError, "`logits`"),
        ({"logits": torch.ones(4), "target": torch.zeros(4)}, ValueError, "`logits` must have 2 or 3"),
        ({"logits": torch.ones(4, 1), "target": torch.zeros(4, dtype=torch.long)}, ValueError, "2 classes"),
        (
            {"logits": torch.ones(4, 3), "target": torch.zeros(5, dtype=torch.long)},
            ValueError,
            r"dimension\(s\) of `logits` and `target` must match, got shapes \(4, 3\) and \(5,\)",
        ),
        ({"logits": torch.ones(4, 3), "target": torch.zeros(4)}, TypeError, "`target` must hold integer"),
        ({"logits": torch.ones(2, 3), "target": torch.tensor([0, 3])}, ValueError, r"`target` must lie in"),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "mask": torch.ones(3)},
            ValueError,
            "`mask` must have shape",
        ),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "alpha": torch.ones(2)},
            ValueError,
            r"`alpha` must be a number or have shape \(3,\)",
        ),
        ({"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "gamma": -1.0}, ValueError, "`gamma`"),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "mode": "softmax"},
            ValueError,
            "`mode`",
        ),
        (
            {"logits": torch.ones(4, 3), "target": torch.zeros(4), "mode": "multilabel"},
            ValueError,
            "`logits` and `target` must have the same shape",
        ),
        ({"logits": torch.ones(4), "target": torch.zeros(4), "mode": "multilabel"}, ValueError, "`logits`"),
        (
            {"logits": torch.ones(3), "target": torch.tensor([0.0, 1.0, 2.0]), "mode": "binary"},
            ValueError,
            r"`target` must lie in \[0, 1\]",
        ),
        (
            {"logits": torch.ones(3), "target": torch.zeros(3), "mode": "binary", "alpha": torch.ones(3)},
            ValueError,
            "`alpha` must be a number in binary mode",
        ),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        focal_loss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mode": "sigmoid"}, "`mode`"),
        ({"gamma": -0.5}, "`gamma`"),
        ({"gamma": float("nan")}, "`gamma`"),
        ({"mode": "binary", "alpha": [0.5, 0.5]}, "`alpha` must be a number or None in binary"),
        ({"mode": "multilabel", "alpha": 1.5}, r"`alpha` must lie in \[0, 1\]"),
        ({"alpha": -1.0}, "`alpha` must be finite and >= 0"),
        ({"alpha": []}, "`alpha` must hold one value per class"),
    ],
)
def test_bad_module_options_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FocalLoss(**kwargs)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_focal_config_trains_on_digits(tmp_path):
    from lightning_losses.cli import build_cli

    config = Path(__file__).resolve().parents[2] / "configs" / "digits_focal.yaml"
    cli = build_cli(
        [
            "fit",
            "--config",
            str(config),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_epochs=3",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/accuracy"] > 0.8 and metrics["val/macro_f1"] > 0.8
    assert 0 < metrics["val/p_t"] < 1


@pytest.mark.parametrize("host_reads", [True, False])
def test_log_p_t_is_exact_near_one_and_where_p_t_underflows(host_reads):
    """Both ways of finding log p_t (the CPU's, which recomputes the underflowing rows alone, and the
    host-read-free one a GPU takes) equal the fp64 log-softmax: p_t near 1, in between, underflowing."""
    from lightning_losses.functional.focal import _log_p_t

    x = torch.tensor([[30.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.0, 150.0, 3.0], [-120.0, 0.0, 60.0]])
    target = torch.tensor([0, 0, 0, 0])
    p = torch.softmax(x, -1)
    p_t = p.gather(-1, target[:, None]).squeeze(-1)
    others = p.scatter(-1, target[:, None], 0.0)
    assert (p_t[2:] == 0).all()  # e^-150 and e^-180 underflow in fp32
    log_p_t = _log_p_t(x, target, p_t, others.sum(-1), others.amax(-1), host_reads)
    expected = torch.log_softmax(x.double(), -1)[:, 0]
    # relative, also near 0 (log(p_t) there would be 0); fp32 softmax tails hold ~3 digits at e^-30
    torch.testing.assert_close(log_p_t.double(), expected, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_multiclass_takes_any_integer_target_dtype(dtype):
    """gather takes int64/int32 indices only: other integer targets are cast, not refused."""
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    target = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    expected = focal_loss(logits, target, gamma=2.0)
    actual = focal_loss(logits, target.to(dtype), gamma=2.0)
    torch.testing.assert_close(actual, expected)
    reference = brute_force_multiclass_focal(logits.detach(), target, torch.ones(7), gamma=2.0)
    torch.testing.assert_close(expected.double(), torch.as_tensor(reference, dtype=torch.float64))


@pytest.mark.parametrize(
    "options",
    [{}, {"alpha": CLASS_ALPHA}, {"ignore_index": 2}],
    ids=["plain", "class_alpha", "ignore_index_a_class"],
)
def test_multiclass_targets_known_in_range_take_the_same_values_as_unchecked_ones(options):
    """Where the CPU range check saw every target in [0, C) and `ignore_index` is no class, the fused
    multiclass path makes no keep mask or counts: loss, gradient and metrics must equal those of the path
    that never looks (value checks off, as on a GPU) and the brute-force reference."""

    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(9, 5, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4, 2, 1, 0, 3])
    kwargs = dict(options)
    if "alpha" in kwargs:
        kwargs["alpha"] = torch.tensor(kwargs["alpha"], dtype=torch.float64)
    results = []
    for mode in ("auto", "never"):
        try:
            set_value_checks(mode)
            loss, metrics = focal_loss_with_metrics(logits, target, gamma=2.0, **kwargs)
        finally:
            set_value_checks("auto")
        (grad,) = torch.autograd.grad(loss, logits)
        results.append((loss, grad, metrics["accuracy"], metrics["p_t"]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    expected = brute_force_multiclass_focal(logits.detach(), target, torch.ones(9), gamma=2.0, **options)
    torch.testing.assert_close(results[0][0], expected)
