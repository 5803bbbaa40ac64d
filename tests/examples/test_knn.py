"""KNNAccuracy against a brute-force leave-one-out k-NN loop."""

import math
from collections import Counter

import pytest
import torch
from torchmetrics import MetricCollection

from lightning_losses import LossModule
from lightning_losses.examples import MLP, DigitsDataModule
from lightning_losses.examples.knn import KNNAccuracy
from lightning_losses.losses.contrastive import SupConLoss
from tests.helpers import quiet_trainer


def brute_force_knn_accuracy(embeddings, labels, k, distance):
    """For each row: sort the other rows by distance, vote among the k nearest; a tie goes to the tied
    class met first from the nearest neighbour outwards."""
    rows, labels = embeddings.double().tolist(), labels.tolist()

    def dist(a, b):
        if distance == "euclidean":
            return math.dist(a, b)
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return 1 - dot / (math.hypot(*a) * math.hypot(*b))

    correct = 0
    for i, row in enumerate(rows):
        others = sorted((dist(row, other), j) for j, other in enumerate(rows) if j != i)
        nearest = [labels[j] for _, j in others[:k]]
        votes = Counter(nearest)
        most = max(votes.values())
        predicted = next(label for label in nearest if votes[label] == most)
        correct += predicted == labels[i]
    return correct / len(rows)


def clusters(seed, n=60, dim=5, spread=1.5):
    """Overlapping Gaussian clusters with odd label values, so that k-NN makes some mistakes."""
    g = torch.Generator().manual_seed(seed)
    label_values = torch.tensor([-1, 7, 42, 3])
    which = torch.randint(0, 4, (n,), generator=g)
    centres = torch.randn(4, dim, generator=g) * 2
    embeddings = centres[which] + spread * torch.randn(n, dim, generator=g)
    return embeddings, label_values[which]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_matches_brute_force(k, distance):
    embeddings, labels = clusters(seed=k)
    metric = KNNAccuracy(k=k, distance=distance)
    for part in range(0, 60, 25):  # several updates accumulate
        metric.update(embeddings[part : part + 25], labels[part : part + 25])
    expected = brute_force_knn_accuracy(embeddings, labels, k, distance)
    assert 0.2 < expected < 1.0  # neither trivial nor perfect
    torch.testing.assert_close(metric.compute(), torch.tensor(expected, dtype=torch.float32))


def test_query_chunks_do_not_change_the_result():
    embeddings, labels = clusters(seed=0, n=50)
    results = []
    for chunk in (1, 7, 50, 1000):
        metric = KNNAccuracy(k=3, query_chunk_size=chunk)
        metric.update(embeddings, labels)
        results.append(metric.compute())
    assert all(torch.equal(r, results[0]) for r in results)


def test_tie_goes_to_the_nearest_neighbours_class():
    # row 0's two nearest: row 1 (class 5, distance 1) and row 2 (class 9, distance 2): a 1-1 tie
    embeddings = torch.tensor([[0.0], [1.0], [-2.0], [10.0], [13.0]])
    metric = KNNAccuracy(k=2)
    metric.update(embeddings, torch.tensor([5, 5, 9, 9, 9]))
    # rows: 0 → 5 ✓ (tie, nearest is 5), 1 → {0: 5, 2: 9} tie, nearest 5 ✓,
    # 2 → {0: 5, 1: 5} → 5 ✗, 3 → {4: 9, 1: 5} tie, nearest 9 ✓, 4 → {3: 9, 1: 5} tie → 9 ✓
    assert metric.compute().item() == pytest.approx(4 / 5)


def test_a_duplicate_of_a_row_votes_but_the_row_itself_does_not():
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.5, 5.0]])
    metric = KNNAccuracy(k=1)
    metric.update(embeddings, torch.tensor([1, 2, 2, 2]))
    # row 0's nearest other row is its duplicate (label 2): wrong; row 1 → row 0 (label 1): wrong;
    # rows 2 and 3 → each other: right. (Skipping every row at distance 0 would give 0.75.)
    assert metric.compute().item() == 0.5


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric KNNAccuracy was called before")
def test_separated_clusters_score_one_and_small_inputs():
    metric = KNNAccuracy(k=10)
    metric.update(torch.tensor([[0.0], [0.1], [0.2], [9.0], [9.1], [9.2]]), torch.tensor([0, 0, 0, 1, 1, 1]))
    # k is capped at the 5 other rows: 3 of the other class outvote 2 of the own class everywhere
    assert metric.compute().item() == 0.0
    metric = KNNAccuracy(k=2)
    metric.update(torch.tensor([[0.0], [0.1], [0.2], [9.0], [9.1], [9.2]]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert metric.compute().item() == 1.0
    metric.reset()
    assert metric.compute().item() == 0.0  # nothing accumulated
    metric.update(torch.tensor([[1.0]]), torch.tensor([0]))
    assert metric.compute().item() == 0.0  # a single row has no neighbour


def test_merged_states_equal_one_metric_over_everything():
    """What DDP's `cat` reduction does: the union of the ranks' rows."""
    embeddings, labels = clusters(seed=3)
    whole, rank0, rank1 = KNNAccuracy(k=3), KNNAccuracy(k=3), KNNAccuracy(k=3)
    whole.update(embeddings, labels)
    rank0.update(embeddings[:25], labels[:25])
    rank1.update(embeddings[25:], labels[25:])
    rank0.merge_state(rank1)
    assert torch.equal(rank0.compute(), whole.compute())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"k": 0}, "`k`"), ({"distance": "manhattan"}, "`distance`"), ({"query_chunk_size": 0}, "query_chunk")],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        KNNAccuracy(**kwargs)


@pytest.mark.parametrize(
    ("preds", "target", "pattern"),
    [
        (torch.ones(4), torch.zeros(4, dtype=torch.long), "`preds`"),
        (torch.ones(4, 2).long(), torch.zeros(4, dtype=torch.long), "`preds`"),
        (torch.ones(4, 2), torch.zeros(3, dtype=torch.long), "`target`"),
        (torch.ones(4, 2), torch.zeros(4), "`target`"),
    ],
)
def test_bad_updates(preds, target, pattern):
    with pytest.raises(ValueError, match=pattern):
        KNNAccuracy().update(preds, target)


def test_plugs_into_loss_module_metrics():
    dm = DigitsDataModule(batch_size=90)
    module = LossModule(
        MLP(64, 16, hidden=(32,)),
        SupConLoss(),
        metrics=MetricCollection({"knn_accuracy": KNNAccuracy(k=5)}),
        output_key="embeddings",
        preds_key="embeddings",
    )
    (results,) = quiet_trainer().validate(module, datamodule=dm, verbose=False)
    assert {"val/knn_accuracy", "val/loss", "val/anchors_with_positives"} <= set(results)
    dm.setup("validate")
    expected = KNNAccuracy(k=5)
    with torch.no_grad():
        expected.update(module.model(dm.val_set.tensors["inputs"]), dm.val_set.tensors["target"])
    assert results["val/knn_accuracy"] == pytest.approx(expected.compute().item())
