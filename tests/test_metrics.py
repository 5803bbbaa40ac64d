import pytest
import torch

from lightning_losses.metrics import CounterValue, MetricAggregator, WeightedMean

VALUES = [(1.0, 3), (5.0, 1), (-2.5, 4)]


def _brute_force_mean(pairs: list[tuple[float, float]]) -> float:
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


@pytest.mark.parametrize("method", ["update", "accumulate"])
@pytest.mark.parametrize("tensor_weight", [False, True])
def test_weighted_mean_equals_the_brute_force_mean(method, tensor_weight):
    mean = WeightedMean()
    for value, weight in VALUES:
        getattr(mean, method)(torch.tensor(value), torch.tensor(float(weight)) if tensor_weight else weight)
    assert mean.compute().item() == pytest.approx(_brute_force_mean(VALUES))


@pytest.mark.parametrize("tensor_weight", [False, True])
def test_keep_false_leaves_a_nan_value_out_of_the_mean(tensor_weight):
    mean = WeightedMean()
    for (value, weight), kept in zip([*VALUES, (float("nan"), 7)], [True, True, True, False], strict=True):
        weight = torch.tensor(float(weight)) if tensor_weight else weight
        mean.update(torch.tensor(value), weight, keep=torch.tensor(kept))
    assert mean.compute().item() == pytest.approx(_brute_force_mean(VALUES))
    assert mean.weight.item() == sum(w for _, w in VALUES)


def test_accumulate_leaves_the_metric_as_update_does():
    """`accumulate` skips torchmetrics' update wrapper: the count and the cached value must still follow."""
    by_update, by_accumulate = WeightedMean(), WeightedMean()
    for value, weight in VALUES[:2]:
        by_update.update(torch.tensor(value), weight)
        by_accumulate.accumulate(torch.tensor(value), weight)
    assert by_accumulate.update_count == by_update.update_count == 2
    first = by_accumulate.compute()
    by_accumulate.accumulate(torch.tensor(VALUES[2][0]), VALUES[2][1])  # must drop the cached value
    assert by_accumulate.compute().item() != first.item()
    assert by_accumulate.compute().item() == pytest.approx(_brute_force_mean(VALUES))
    by_accumulate.reset()
    assert by_accumulate.update_count == 0


def test_accumulate_records_no_graph():
    leaf = torch.tensor(2.0, requires_grad=True)
    mean = WeightedMean()
    mean.accumulate(leaf * 3, torch.tensor(2.0, requires_grad=True) * 1)
    assert not mean.total.requires_grad and not mean.weight.requires_grad


def test_aggregator_keys_survive_a_copy_and_a_device_move():
    import copy

    aggregator = MetricAggregator()
    aggregator.update({"loss": torch.tensor(1.0), "a/b": torch.tensor(4.0)}, {"loss": 1, "a/b": 2})
    clone = copy.deepcopy(aggregator).to(torch.float64)
    clone.update({"loss": torch.tensor(3.0)}, 1)
    assert clone["loss"] is getattr(clone, clone.attribute("loss"))  # the registered submodule
    assert clone["loss"].compute().item() == pytest.approx(2.0)
    assert aggregator["loss"].compute().item() == pytest.approx(1.0)  # the original is untouched
    assert sorted(clone.keys()) == ["a/b", "loss"]


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric CounterValue was called before")
def test_counter_value_reads_the_counter_when_computed():
    counter = torch.zeros((), dtype=torch.long)
    value = CounterValue()
    with pytest.raises(ValueError, match="before `update`"):
        value.compute()
    value.update(counter)
    counter.add_(3)  # after the update: the value is read at compute time
    assert value.compute().item() == 3.0 and value.compute().dtype == torch.float32
