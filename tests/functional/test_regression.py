import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional import mse
from lightning_losses.losses import MSELoss
from tests.loss_tester import LossTester


class TestMSE(LossTester):
    functional = staticmethod(mse)
    module_class = MSELoss
    grad_inputs = ("preds",)
    mask_input = "mask"
    bf16_rtol = 3e-2

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        return {
            "preds": torch.randn(4, 6, generator=g).to(dtype),
            "target": torch.randn(4, 6, generator=g).to(dtype),
            "mask": torch.rand(4, 6, generator=g),  # float weights
        }

    def reference(self, preds, target, mask):
        total = sum(
            m * (p - t) ** 2
            for p, t, m in zip(
                preds.flatten().tolist(), target.flatten().tolist(), mask.flatten().tolist(), strict=True
            )
        )
        return torch.tensor(total / mask.sum().item(), dtype=torch.float64)


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


def test_masked_entries_get_a_zero_gradient_even_when_nan():
    preds, target = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    preds[1, 0], target[1, 1] = float("nan"), float("inf")
    preds.requires_grad_()
    loss = mse(preds, target, keep)
    torch.testing.assert_close(loss, F.mse_loss(preds[keep], target[keep]))
    (grad,) = torch.autograd.grad(loss, preds)
    assert torch.count_nonzero(grad[1]) == 0 and torch.isfinite(grad).all()
