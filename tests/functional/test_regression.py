import importlib

import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional import mse
from lightning_losses.losses import MSELoss
from tests.loss_tester import LossTester


@pytest.fixture
def fused_mse(monkeypatch):
    """The fused sum of squares at every size, not just from its thresholds up."""
    regression = importlib.import_module("lightning_losses.functional.regression")
    monkeypatch.setattr(regression, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(regression, "MASKED_FUSED_MIN_ELEMENTS", 0)


class TestMSE(LossTester):
    functional = staticmethod(mse)
    module_class = MSELoss
    option_sets = [{}, {}, {}]  # no options: one entry per kind of mask (make_inputs' seed)
    grad_inputs = ("preds", "target")
    mask_input = "mask"
    bf16_rtol = 3e-2

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        inputs = {
            "preds": torch.randn(4, 6, generator=g).to(dtype),
            "target": torch.randn(4, 6, generator=g).to(dtype),
        }
        if seed == 0:  # float weights per element
            inputs["mask"] = torch.rand(4, 6, generator=g)
        elif seed == 1:  # a bool mask per sample, with a global count (two such batches)
            inputs["mask"] = torch.tensor([True, False, True, True])
            inputs["global_valid_toks"] = torch.tensor(6)
        else:  # integer weights per sample
            inputs["mask"] = torch.tensor([2, 0, 1, 1])
        return inputs

    def reference(self, preds, target, mask, global_valid_toks=None):
        total = count = 0.0
        for i in range(preds.shape[0]):
            for j in range(preds.shape[1]):
                m = float(mask[i, j] if mask.ndim == 2 else mask[i])
                total += m * (preds[i, j].item() - target[i, j].item()) ** 2
                count += m
        if global_valid_toks is not None:
            count = global_valid_toks.item() * (preds.shape[1] if mask.ndim == 1 else 1)
        return torch.tensor(total / count, dtype=torch.float64)


@pytest.mark.usefixtures("fused_mse")
class TestMSEFused(TestMSE):
    """The same checks through the fused sum of squares."""


def test_equals_torch_mse_without_mask():
    preds, target = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(mse(preds, target), F.mse_loss(preds, target))


def test_per_sample_mask_broadcasts_over_outputs():
    preds, target = torch.randn(4, 3), torch.randn(4, 3)
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(mse(preds, target, keep), F.mse_loss(preds[keep], target[keep]))


def test_global_count_and_bad_inputs():
    preds, target = torch.randn(6), torch.randn(6)
    halves = mse(preds[:2], target[:2], global_valid_toks=torch.tensor(6)) + mse(
        preds[2:], target[2:], global_valid_toks=torch.tensor(6)
    )
    torch.testing.assert_close(halves, F.mse_loss(preds, target))
    with pytest.raises(
        ValueError, match=r"`preds` and `target` must have the same shape, got \(6,\) and \(5,\)"
    ):
        mse(preds, target[:5])
    with pytest.raises(ValueError, match="`mask` must have the shape of the predictions"):
        mse(preds, target, torch.ones(3))
    with pytest.raises(TypeError, match="`preds` must be a floating"):
        mse(torch.ones(6, dtype=torch.long), target)


def test_per_sample_mask_with_global_count_counts_elements():
    preds, target = torch.randn(6, 3), torch.randn(6, 3)
    keep = torch.tensor([1, 1, 0, 1, 0, 1])
    count = keep.sum()  # what LossModule counts: mask entries, not elements
    parts = mse(preds[:2], target[:2], keep[:2], count) + mse(preds[2:], target[2:], keep[2:], count)
    torch.testing.assert_close(parts, F.mse_loss(preds[keep.bool()], target[keep.bool()]))


def test_mask_type_errors_name_the_argument_and_dtype():
    preds, target = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(
        TypeError, match=r"`mask` must be a bool, integer or floating mask, got shape \(4,\) and "
    ):
        mse(preds, target, torch.ones(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="`mask` must be a torch.Tensor, got list"):
        mse(preds, target, [1, 1, 0, 1])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_masked_entries_get_a_zero_gradient_even_when_nan(request, fused):
    if fused:
        request.getfixturevalue("fused_mse")
    preds, target = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    preds[1, 0], target[1, 1] = float("nan"), float("inf")
    preds.requires_grad_()
    loss = mse(preds, target, keep)
    torch.testing.assert_close(loss, F.mse_loss(preds[keep], target[keep]))
    (grad,) = torch.autograd.grad(loss, preds)
    assert torch.count_nonzero(grad[1]) == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("masked", [False, True])
def test_fused_gradients_of_each_input_alone_and_again(fused_mse, masked):
    g = torch.Generator().manual_seed(3)
    preds, target = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 5, dtype=torch.float64),
    )
    mask = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0], dtype=torch.float64) if masked else None
    weights = torch.ones(6, 1, dtype=torch.float64) if mask is None else mask[:, None]
    expected = 2 * weights * (preds - target) / (weights.sum() * 5)  # d/dpreds; -expected for target
    for grad_preds, grad_target in [(True, False), (False, True), (True, True)]:
        p, t = preds.clone().requires_grad_(grad_preds), target.clone().requires_grad_(grad_target)
        loss = mse(p, t, mask)
        wanted = [x for x in (p, t) if x.requires_grad]
        first = torch.autograd.grad(loss, wanted, retain_graph=True)
        again = torch.autograd.grad(loss, wanted)  # the first handed its buffer out: recomputed
        signs = [1.0] * grad_preds + [-1.0] * grad_target
        for a, b, sign in zip(first, again, signs, strict=True):
            torch.testing.assert_close(a, sign * expected)
            torch.testing.assert_close(b, sign * expected)


def test_fused_keeps_each_inputs_dtype_and_takes_strided_inputs(fused_mse):
    preds = torch.randn(5, 4).T.contiguous().T.to(torch.bfloat16).requires_grad_()  # transposed strides
    target = torch.randn(5, 4, dtype=torch.float64).requires_grad_()
    loss = mse(preds, target, torch.tensor([True, True, False, True, False]))
    loss.backward()
    assert loss.dtype == torch.float64 and preds.grad.dtype == torch.bfloat16
    assert target.grad.dtype == torch.float64
    keep = torch.tensor([True, True, False, True, False])
    torch.testing.assert_close(loss, F.mse_loss(preds.double()[keep], target[keep]))
