import torch

from lightning_losses.reduction import count_valid, divide_by_count, masked_mean, masked_sum


def test_masked_mean_matches_a_loop():
    values = torch.randn(5, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) > 0.4
    expected = sum(values[i, j] for i in range(5) for j in range(7) if mask[i, j]) / mask.sum()
    torch.testing.assert_close(masked_mean(values, mask), expected)
    torch.testing.assert_close(masked_mean(values), values.mean())


def test_masked_entries_do_not_leak_nan_into_value_or_gradient():
    values = torch.tensor([1.0, float("nan"), 2.0], requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0])
    out = masked_sum(values, mask)
    out.backward()
    assert out == 3.0
    assert torch.equal(values.grad, torch.tensor([1.0, 0.0, 1.0]))


def test_all_masked_is_exactly_zero_with_zero_gradient():
    values = torch.randn(4, requires_grad=True)
    out = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(values.grad, torch.zeros(4))
    assert divide_by_count(torch.tensor(0.0), 0).item() == 0.0


def test_global_count_partials_add_up_to_the_full_mean():
    values = torch.randn(10, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1])
    full = masked_mean(values, mask)
    count = count_valid(mask, values)
    parts = [masked_mean(values[s], mask[s], global_count=count) for s in (slice(0, 3), slice(3, 10))]
    torch.testing.assert_close(sum(parts), full)


def test_fractional_weights_are_not_clamped():
    assert divide_by_count(torch.tensor(1.0), torch.tensor(0.5)).item() == 2.0
