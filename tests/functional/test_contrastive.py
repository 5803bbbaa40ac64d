"""Contrastive family: ContrastiveLoss, InfoNCELoss, SupConLoss against brute-force float64 loops."""

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_losses.functional.contrastive import (
    contrastive_loss,
    contrastive_loss_with_metrics,
    info_nce_loss,
    info_nce_loss_with_metrics,
    pairwise_squared_distances,
    supervised_contrastive_loss,
    supervised_contrastive_loss_with_metrics,
)
from lightning_losses.losses.contrastive import ContrastiveLoss, InfoNCELoss, SupConLoss
from lightning_losses.registry import build_loss
from tests.loss_tester import LossTester

CONTRASTIVE_MODULE = importlib.import_module("lightning_losses.functional.contrastive")
CROSS_ENTROPY_MODULE = importlib.import_module("lightning_losses.functional.cross_entropy")

# ----------------------------------------------------------------------------------------------------
# brute-force references: Python loops over anchors and pairs in float64
# ----------------------------------------------------------------------------------------------------


def rows_of(tensor):
    return [[float(v) for v in row] for row in tensor.reshape(-1, tensor.shape[-1]).tolist()]


def brute_force_contrastive(embeddings, target, margin=1.0, negative_weight=1.0):
    """``(loss, metrics, gradient)``: every ordered pair i≠j, exact distances, hand-derived gradient."""
    x, labels = rows_of(embeddings), target.tolist()
    n, dim = len(x), len(x[0]) if x else 0
    positive, negative = [], []
    for i in range(n):
        for j in range(n):
            if i != j:
                (positive if labels[i] == labels[j] else negative).append((i, j, math.dist(x[i], x[j])))
    grad = [[0.0] * dim for _ in range(n)]
    positive_loss = sum(d * d for _, _, d in positive) / len(positive) if positive else 0.0
    negative_loss = (
        sum(max(0.0, margin - d) ** 2 for _, _, d in negative) / len(negative) if negative else 0.0
    )
    for i, j, _ in positive:  # d(d²)/dx_i = 2 (x_i − x_j)
        for k in range(dim):
            grad[i][k] += 2 * (x[i][k] - x[j][k]) / len(positive)
            grad[j][k] -= 2 * (x[i][k] - x[j][k]) / len(positive)
    for i, j, d in negative:  # d/dx_i max(0, m − d)² = −2 max(0, m − d) (x_i − x_j) / d; 0 at d = 0
        if d > 0:
            scale = -2 * max(0.0, margin - d) / d * negative_weight / len(negative)
            for k in range(dim):
                grad[i][k] += scale * (x[i][k] - x[j][k])
                grad[j][k] -= scale * (x[i][k] - x[j][k])
    loss = positive_loss + negative_weight * negative_loss
    metrics = {
        "contrastive_loss": loss,
        "positive_loss": positive_loss,
        "negative_loss": negative_loss,
        "mean_positive_distance": sum(d for *_, d in positive) / len(positive) if positive else 0.0,
        "mean_negative_distance": sum(d for *_, d in negative) / len(negative) if negative else 0.0,
    }
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_tensor(loss), {k: as_tensor(v) for k, v in metrics.items()}, as_tensor(grad)


def similarity_rows(rows, temperature, normalize):
    if normalize:
        rows = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    return [[sum(a * b for a, b in zip(r, s, strict=True)) / temperature for s in rows] for r in rows]


def log_softmax_excluding_self(sim, i, j):
    others = [sim[i][k] for k in range(len(sim)) if k != i]
    top = max(others)
    return sim[i][j] - (top + math.log(sum(math.exp(v - top) for v in others)))


def brute_force_info_nce(embeddings, positive_embeddings, temperature=0.1, normalize=True):
    rows = rows_of(embeddings) + rows_of(positive_embeddings)
    n = len(rows) // 2
    sim = similarity_rows(rows, temperature, normalize)
    total = sum(-log_softmax_excluding_self(sim, i, (i + n) % (2 * n)) for i in range(2 * n))
    return torch.tensor(total / (2 * n), dtype=torch.float64)


def brute_force_supcon(embeddings, target, temperature=0.1, normalize=True):
    """L_out: for every row (view) with at least one other row of its label, the mean over those of
    −log softmax; averaged over such rows; 0 when there are none."""
    views = embeddings.shape[1] if embeddings.ndim == 3 else 1
    rows = rows_of(embeddings)
    labels = [label for label in target.tolist() for _ in range(views)]
    sim = similarity_rows(rows, temperature, normalize)
    per_anchor = []
    for i in range(len(rows)):
        positives = [p for p in range(len(rows)) if p != i and labels[p] == labels[i]]
        if positives:
            per_anchor.append(-sum(log_softmax_excluding_self(sim, i, p) for p in positives) / len(positives))
    return torch.tensor(sum(per_anchor) / len(per_anchor) if per_anchor else 0.0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# the shared checks
# ----------------------------------------------------------------------------------------------------


class TestContrastive(LossTester):
    functional = staticmethod(contrastive_loss)
    module_class = ContrastiveLoss
    option_sets = [{}, {"margin": 2.0, "negative_weight": 0.5}, {"margin": 0.7, "negative_weight": 3.0}]
    grad_inputs = ("embeddings",)
    config = "digits_contrastive.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        embeddings = (0.6 * torch.randn(10, 4, generator=g) + 2.0).to(dtype)  # offset from the origin
        return {"embeddings": embeddings, "target": torch.randint(0, 3, (10,), generator=g)}

    def reference(self, embeddings, target, **options):
        return brute_force_contrastive(embeddings, target, **options)[0]


@pytest.fixture
def plain_ops(monkeypatch):
    """Margin contrastive and InfoNCE through their plain whole-matrix ops (what ``torch.compile``
    traces; for InfoNCE also the path of CPU batches above ``FUSED_MIN_BYTES`` and of GPUs)."""
    monkeypatch.setattr(CONTRASTIVE_MODULE, "fused_path", lambda: False)


@pytest.fixture(params=["fused", "plain"])
def contrastive_path(request):
    """A test run twice: through the fused function (eager's path) and through the plain ops."""
    if request.param == "plain":
        request.getfixturevalue("plain_ops")
    return request.param


@pytest.mark.usefixtures("plain_ops")
class TestContrastivePlainOps(TestContrastive):
    """The plain whole-matrix path against the same brute-force reference."""


class TestInfoNCE(LossTester):
    functional = staticmethod(info_nce_loss)
    module_class = InfoNCELoss
    option_sets = [{}, {"temperature": 0.5}, {"temperature": 0.3, "normalize": False}]
    grad_inputs = ("embeddings", "positive_embeddings")

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(6, 5, generator=g)
        positive = embeddings + 0.7 * torch.randn(6, 5, generator=g)
        return {"embeddings": embeddings.to(dtype), "positive_embeddings": positive.to(dtype)}

    def reference(self, embeddings, positive_embeddings, **options):
        return brute_force_info_nce(embeddings, positive_embeddings, **options)


@pytest.mark.usefixtures("plain_ops")
class TestInfoNCEPlainOps(TestInfoNCE):
    """The plain whole-matrix path against the same brute-force reference."""


class TestSupCon(LossTester):
    functional = staticmethod(supervised_contrastive_loss)
    module_class = SupConLoss
    # option set i uses the inputs of seed i: [N, D] with anchors lacking positives, [N, 2, D], [N, 3, D]
    option_sets = [{}, {"temperature": 0.5}, {"temperature": 0.2, "normalize": False}]
    grad_inputs = ("embeddings",)
    config = "digits_supcon.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        shape = [(8, 5), (6, 2, 5), (5, 3, 5)][seed % 3]
        target = torch.tensor([0, 1, 1, 2, 0, 3, 2, 9])[: shape[0]]  # 3 and 9 are alone in [N, D]
        return {"embeddings": torch.randn(*shape, generator=g).to(dtype), "target": target}

    def reference(self, embeddings, target, **options):
        return brute_force_supcon(embeddings, target, **options)


class TestInfoNCEChunked(TestInfoNCE):
    """The chunked path (a custom autograd function) against the same brute-force reference."""

    option_sets = [
        {"chunk_size": 1},
        {"temperature": 0.5, "chunk_size": 5},
        {"normalize": False, "chunk_size": 64},
    ]

    def reference(self, embeddings, positive_embeddings, chunk_size, **options):
        return brute_force_info_nce(embeddings, positive_embeddings, **options)


class TestContrastiveChunked(TestContrastive):
    """The fused function in chunks of ``chunk_size`` rows against the same brute-force reference (chunks
    of 1 row, uneven, one whole)."""

    option_sets = [
        {"chunk_size": 1},
        {"margin": 2.0, "negative_weight": 0.5, "chunk_size": 3},
        {"margin": 0.7, "negative_weight": 3.0, "chunk_size": 100},
    ]

    def reference(self, embeddings, target, chunk_size, **options):
        return brute_force_contrastive(embeddings, target, **options)[0]


class TestSupConChunked(TestSupCon):
    """The chunked path against the same brute-force reference (chunks of 1 row, uneven, one whole)."""

    option_sets = [
        {"chunk_size": 3},
        {"temperature": 0.5, "chunk_size": 1},
        {"temperature": 0.2, "normalize": False, "chunk_size": 100},
    ]

    def reference(self, embeddings, target, chunk_size, **options):
        return brute_force_supcon(embeddings, target, **options)


# ----------------------------------------------------------------------------------------------------
# ContrastiveLoss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("contrastive_path")
def test_contrastive_metrics_match_brute_force():
    g = torch.Generator().manual_seed(3)
    embeddings = torch.randn(12, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (12,), generator=g)
    loss, metrics = ContrastiveLoss(margin=2.5, negative_weight=0.7)(embeddings, target)
    expected_loss, expected, _ = brute_force_contrastive(embeddings, target, margin=2.5, negative_weight=0.7)
    torch.testing.assert_close(loss, expected_loss)
    assert sorted(metrics) == sorted(["loss", *expected])
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value, msg=key)


@pytest.mark.usefixtures("contrastive_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_coinciding_embeddings_have_finite_correct_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(9, 4, generator=g, dtype=torch.float64)
    embeddings[3] = embeddings[0]  # same label: a positive pair at d = 0 (gradient of d² is 0)
    embeddings[5] = embeddings[1]  # different labels: a negative pair at d = 0 (hinge: subgradient 0)
    embeddings[8] = embeddings[1]  # a third copy, of a third label
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3])
    expected_loss, _, expected_grad = brute_force_contrastive(embeddings, target, margin=3.0)
    x = embeddings.to(dtype).requires_grad_()
    loss = contrastive_loss(x, target, margin=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # fp32: distances near 0 are resolved to ~sqrt(eps)·|x| by the Gram formula (see its docstring)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(loss.double(), expected_loss, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.usefixtures("contrastive_path")
def test_contrastive_gradient_matches_hand_derived_one():
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0, 1, 1, 2, 0, 1])
    contrastive_loss(embeddings, target, margin=2.0, negative_weight=0.5).backward()
    _, _, expected = brute_force_contrastive(embeddings.detach(), target, margin=2.0, negative_weight=0.5)
    torch.testing.assert_close(embeddings.grad, expected)


@pytest.mark.usefixtures("contrastive_path")
def test_contrastive_collapsed_batch():
    """Every embedding equal: all distances 0, so the loss is w·m² and no gradient is NaN."""
    x = torch.ones(6, 3, requires_grad=True)
    loss = contrastive_loss(x, torch.tensor([0, 0, 1, 1, 2, 2]), margin=1.5, negative_weight=2.0)
    loss.backward()
    assert loss.item() == 2.0 * 1.5**2
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.usefixtures("contrastive_path")
@pytest.mark.parametrize(
    ("target", "empty_term"), [([0, 1, 2, 3], "positive_loss"), ([4, 4, 4, 4], "negative_loss")]
)
def test_contrastive_batch_without_positive_or_negative_pairs(target, empty_term):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss, metrics = ContrastiveLoss(margin=10.0)(x, torch.tensor(target))
    loss.backward()
    assert metrics[empty_term].item() == 0.0 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, brute_force_contrastive(x.detach(), torch.tensor(target), 10.0)[0])
    assert loss.item() > 0  # the other term is still there


@pytest.mark.usefixtures("contrastive_path")
def test_contrastive_single_embedding_is_zero_with_zero_gradient():
    x = torch.randn(1, 3, requires_grad=True)
    loss = contrastive_loss(x, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_pairwise_squared_distances_are_accurate_far_from_the_origin():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(50, 16, generator=g) + 300.0).float()  # ‖x‖² ≈ 1.4e6, d² ≈ 32
    wide = x.double()
    expected = ((wide[:, None] - wide[None]) ** 2).sum(-1)  # [N, N, D]: fine for a test
    actual = pairwise_squared_distances(x)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(actual.diagonal(), torch.zeros(50))


def test_contrastive_has_no_temperature():
    """The guide's config read a `temperature` that did nothing; this loss takes no such parameter."""
    with pytest.raises(ValueError, match="temperature"):
        build_loss({"name": "contrastive", "params": {"temperature": 0.1}})


# ----------------------------------------------------------------------------------------------------
# InfoNCE
# ----------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("contrastive_path")
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_equals_simclr_cross_entropy_form(normalize):
    """SimCLR's formulation: cross-entropy over [2N, 2N] similarities, the diagonal masked out."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
    z = torch.cat([a, b])
    z = F.normalize(z, dim=1) if normalize else z
    logits = z @ z.T / 0.2 - torch.eye(32, dtype=torch.float64) * 1e9
    labels = torch.cat([torch.arange(16, 32), torch.arange(16)])
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(info_nce_loss(a, b, temperature=0.2, normalize=normalize), expected)


@pytest.mark.usefixtures("contrastive_path")
def test_info_nce_metrics():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.1], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    loss, metrics = InfoNCELoss(temperature=0.5)(a, b)
    rows = F.normalize(torch.cat([a, b]), dim=1).tolist()
    cosine = [[sum(u * v for u, v in zip(r, s, strict=True)) for s in rows] for r in rows]
    partner = [3, 4, 5, 0, 1, 2]
    hits = [max((k for k in range(6) if k != i), key=lambda k: cosine[i][k]) == partner[i] for i in range(6)]
    negatives = [cosine[i][k] for i in range(6) for k in range(6) if k not in (i, partner[i])]
    torch.testing.assert_close(metrics["accuracy"].double(), torch.tensor(sum(hits) / 6, dtype=torch.float64))
    positives = [cosine[i][partner[i]] for i in range(6)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(metrics["mean_positive_similarity"], as_tensor(sum(positives) / 6))
    torch.testing.assert_close(metrics["mean_negative_similarity"], as_tensor(sum(negatives) / 24))
    torch.testing.assert_close(loss, brute_force_info_nce(a, b, temperature=0.5))


@pytest.mark.usefixtures("contrastive_path")
def test_info_nce_large_logits_stay_finite():
    a = torch.randn(8, 4) * 1e3
    b = (a + torch.randn(8, 4)).requires_grad_()
    loss = info_nce_loss(a, b, temperature=0.01, normalize=False)  # logits ~ 1e8: exp would overflow
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(b.grad).all()


@pytest.mark.usefixtures("contrastive_path")
def test_info_nce_accuracy_breaks_ties_as_argmax_does():
    """Ties go to the first most similar row on every path. A collapsed batch ties everything: only row
    N, whose positive is row 0, hits. Below, rows 0 and 1 coincide, and so several similarities tie."""
    same = torch.ones(4, 3)
    assert InfoNCELoss()(same, same).metrics["accuracy"] == 1 / 8
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    # raw dot products; the rows are a0 a1 a2 b0 b1 b2, positives 0↔3, 1↔4, 2↔5:
    # a0 ties a1 and b0 (first: a1, a miss), a1's positive is not on top, a2 → b2 alone,
    # b0 ties a0 and a1 (first: a0, its positive), b1 ties a0, a1 and b0 (first: a0, a miss), b2 → a2
    hits = [False, False, True, True, False, True]
    assert InfoNCELoss(normalize=False)(a, b).metrics["accuracy"] == sum(hits) / 6


@pytest.mark.parametrize("one_product", [True, False], ids=["(G+G^T)y", "Gy+G^Ty"])
def test_info_nce_whole_matrix_function_equals_plain_ops(monkeypatch, one_product):
    """The fused function (eager CPU batches below ``FUSED_MIN_BYTES``) against the plain ops in
    float64: loss, metrics and gradients of both views, for normalized and raw rows; its own gradient
    through the normalization also where ``F.normalize`` clamps the norm (a zero row, a row of norm
    below 1e-12) and for a long row. Plus fp64 gradcheck of the fused function. Both forms of its
    gradient's product (the second is what large batches take)."""
    if not one_product:
        monkeypatch.setattr(CONTRASTIVE_MODULE, "_TRANSPOSED_ADD_MAX_BYTES", 0)
    g = torch.Generator().manual_seed(11)
    a = torch.randn(9, 5, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(9, 5, generator=g, dtype=torch.float64)
    a[3], a[5], b[7] = 0.0, 1e-13 * a[5], 1e3 * b[7]
    smooth = a[:3].clone().requires_grad_(), b[:3].clone().requires_grad_()  # no clamped norm: no kink
    assert torch.autograd.gradcheck(lambda x, y: info_nce_loss(x, y, temperature=0.3), smooth)

    def run(normalize):
        leaves = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss, metrics = info_nce_loss_with_metrics(*leaves, temperature=0.3, normalize=normalize)
        return loss.detach(), torch.autograd.grad(loss, leaves), metrics

    fused = [run(normalize) for normalize in (True, False)]
    monkeypatch.setattr(CONTRASTIVE_MODULE, "fused_path", lambda: False)
    for (loss, grads, metrics), (plain_loss, plain_grads, plain_metrics) in zip(
        fused, [run(normalize) for normalize in (True, False)], strict=True
    ):
        torch.testing.assert_close(loss, plain_loss)
        for grad, plain_grad in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(grad, plain_grad)
        assert metrics.keys() == plain_metrics.keys()
        for key, value in plain_metrics.items():
            torch.testing.assert_close(metrics[key], value, msg=key)


@pytest.mark.parametrize("num_pairs", [1, 6])
@pytest.mark.parametrize(
    ("dtypes", "needs_grad"),
    [
        ((torch.float32, torch.float32), (True, False)),
        ((torch.float32, torch.float32), (False, True)),
        ((torch.bfloat16, torch.float32), (True, True)),
        ((torch.float64, torch.bfloat16), (True, True)),
    ],
)
def test_info_nce_whole_matrix_function_gives_each_view_its_gradient(
    monkeypatch, num_pairs, dtypes, needs_grad
):
    """The fused function stacks the views itself: each view that asks for a gradient gets the plain
    ops' gradient in its own dtype, the other none; one pair included (its positives a [2, 1] view)."""
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(num_pairs, 4, generator=g).to(dtype) for dtype in dtypes]

    def run():
        leaves = [view.clone().requires_grad_(needs) for view, needs in zip(views, needs_grad, strict=True)]
        loss, metrics = info_nce_loss_with_metrics(*leaves, temperature=0.5)
        loss.backward()
        return loss, [leaf.grad for leaf in leaves], metrics

    fused = run()
    monkeypatch.setattr(CONTRASTIVE_MODULE, "fused_path", lambda: False)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0])
    for view, needs, grad, plain_grad in zip(views, needs_grad, fused[1], plain[1], strict=True):
        if not needs:
            assert grad is None
            continue
        assert grad.dtype == view.dtype
        torch.testing.assert_close(grad, plain_grad)
    for key, value in plain[2].items():
        torch.testing.assert_close(fused[2][key], value, msg=key)


def test_info_nce_whole_matrix_function_without_grad_computes_no_gradient():
    a, b = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = info_nce_loss(a.requires_grad_(), b.requires_grad_())
    assert not loss.requires_grad
    torch.testing.assert_close(
        loss.double(), brute_force_info_nce(a.detach(), b.detach()), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------------
# SupCon
# ----------------------------------------------------------------------------------------------------


def test_supcon_with_two_views_and_distinct_labels_is_info_nce():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 10, 6, generator=g, dtype=torch.float64)
    supcon = supervised_contrastive_loss(torch.stack([a, b], dim=1), torch.arange(10), temperature=0.3)
    torch.testing.assert_close(supcon, info_nce_loss(a, b, temperature=0.3))


@pytest.mark.parametrize("shape", [(5, 4), (1, 4), (1, 1, 4)])
def test_supcon_without_positive_pairs_is_exactly_zero_with_zero_gradient(shape):
    x = torch.randn(*shape, requires_grad=True)
    loss, metrics = SupConLoss()(x, torch.arange(shape[0]))
    loss.backward()
    assert loss.item() == 0.0 and metrics["anchors_with_positives"].item() == 0.0
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_supcon_anchors_without_positives_do_not_count():
    """Hand-computed: rows 0 and 1 (label 0) are each other's positive, row 2 (label 1) has none."""
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    loss = supervised_contrastive_loss(x, torch.tensor([0, 0, 1]), temperature=1.0)
    # anchor 0: s01 = 0.6, s02 = 0;  anchor 1: s10 = 0.6, s12 = 0.8
    anchor0 = -(0.6 - math.log(math.exp(0.6) + 1.0))
    anchor1 = -(0.6 - math.log(math.exp(0.6) + math.exp(0.8)))
    torch.testing.assert_close(loss, torch.tensor((anchor0 + anchor1) / 2, dtype=torch.float64))


def test_supcon_labels_are_compared_not_ranged():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 2, 3, generator=g)
    loss = supervised_contrastive_loss(x, torch.tensor([-5, 1000, -5, 7, 1000, 7]))
    torch.testing.assert_close(loss, supervised_contrastive_loss(x, torch.tensor([0, 1, 0, 2, 1, 2])))


def test_supcon_metrics():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    _, metrics = SupConLoss()(x, torch.tensor([0, 0, 1, 2]))
    # cosines: (0,1) 0.6 positive; negatives (0,2) 0, (0,3) 0, (1,2) 0.8, (1,3) -0.8, (2,3) -1
    torch.testing.assert_close(metrics["mean_positive_similarity"], torch.tensor(0.6, dtype=torch.float64))
    torch.testing.assert_close(
        metrics["mean_negative_similarity"], torch.tensor(-1.0 / 5, dtype=torch.float64)
    )
    assert metrics["anchors_with_positives"].item() == 0.5


def test_supcon_metrics_equal_a_pairwise_loop_with_several_views():
    """The similarity means come from [M, D] sums, not an [M, M] pass: against a loop over pairs."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 0, 2, 1])
    _, metrics = SupConLoss(normalize=False)(x, target)
    rows, labels = x.reshape(10, 3), target.repeat_interleave(2)
    pairs = [(i, j) for i in range(10) for j in range(10) if i != j]
    positive = [float(rows[i] @ rows[j]) for i, j in pairs if labels[i] == labels[j]]
    negative = [float(rows[i] @ rows[j]) for i, j in pairs if labels[i] != labels[j]]
    expected = torch.tensor(
        [sum(positive) / len(positive), sum(negative) / len(negative)], dtype=torch.float64
    )
    actual = torch.stack([metrics["mean_positive_similarity"], metrics["mean_negative_similarity"]])
    torch.testing.assert_close(actual, expected)


def test_similarity_means_without_negatives_are_exactly_zero():
    """One label (SupCon) or one pair (InfoNCE): no negative pair, so 0, not the rounding residue of
    the [M, D] sums' difference."""
    x = torch.tensor([[1.0, 2.0], [0.3, 0.7], [-1.1, 0.2]])
    metrics = SupConLoss(normalize=False)(x, torch.tensor([4, 4, 4])).metrics
    assert metrics["mean_negative_similarity"].item() == 0.0
    metrics = InfoNCELoss(normalize=False)(x[:1], x[1:2]).metrics
    assert metrics["mean_negative_similarity"].item() == 0.0


# ----------------------------------------------------------------------------------------------------
# the chunked path of SupCon and InfoNCE against the whole-matrix path
# ----------------------------------------------------------------------------------------------------


def _loss_grad_metrics(fn, x, *args, **kwargs):
    x = x.detach().requires_grad_()
    loss, metrics = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(97, 16), (40, 3, 16)], ids=["2d", "3views"])
@pytest.mark.parametrize("chunk_size", [1, 13, 64, 4096])
def test_supcon_chunked_equals_whole_matrix(dtype, rtol, normalize, shape, chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    target = torch.randint(0, 12, (shape[0],), generator=g)
    target[-1] = 1000  # alone in the 2-D case: an anchor without positives
    options = {"temperature": 0.2, "normalize": normalize}
    whole = _loss_grad_metrics(supervised_contrastive_loss_with_metrics, x, target, **options)
    chunked = _loss_grad_metrics(
        supervised_contrastive_loss_with_metrics, x, target, chunk_size=chunk_size, **options
    )
    torch.testing.assert_close(chunked[0], whole[0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(chunked[1], whole[1], rtol=rtol, atol=rtol * whole[1].abs().max().item())
    assert chunked[2].keys() == whole[2].keys()
    for key, value in whole[2].items():
        torch.testing.assert_close(chunked[2][key], value, rtol=rtol, atol=rtol, msg=key)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_info_nce_chunked_equals_whole_matrix(dtype, rtol, chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    a = torch.randn(50, 8, generator=g, dtype=dtype)
    b = (a + 0.5 * torch.randn(50, 8, generator=g, dtype=dtype)).requires_grad_()
    whole = _loss_grad_metrics(info_nce_loss_with_metrics, a, b, temperature=0.1)
    chunked = _loss_grad_metrics(info_nce_loss_with_metrics, a, b, temperature=0.1, chunk_size=chunk_size)
    torch.testing.assert_close(chunked[0], whole[0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(chunked[1], whole[1], rtol=rtol, atol=rtol * whole[1].abs().max().item())
    assert 0 < whole[2]["accuracy"] < 1  # the accuracy metric is not trivially equal
    for key, value in whole[2].items():
        torch.testing.assert_close(chunked[2][key], value, rtol=rtol, atol=rtol, msg=key)


def test_supcon_chunked_gradient_of_both_views_reaches_positive_embeddings():
    """InfoNCE's chunked gradient flows into both inputs (the second view through the concatenation)."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b, temperature=0.4, chunk_size=4), (a, b))


@pytest.mark.parametrize("shape", [(5, 4), (1, 4), (1, 1, 4)])
def test_supcon_chunked_without_positive_pairs_is_exactly_zero_with_zero_gradient(shape):
    x = torch.randn(*shape, requires_grad=True)
    loss, metrics = SupConLoss(chunk_size=2)(x, torch.arange(shape[0]))
    loss.backward()
    assert loss.item() == 0.0 and metrics["anchors_with_positives"].item() == 0.0
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize(
    ("fused", "plain"),
    [
        (lambda x, t: supervised_contrastive_loss(x, t, chunk_size=6), supervised_contrastive_loss),
        (lambda x, t: contrastive_loss(x, t, margin=3.0), None),  # eager: the fused function
        (
            lambda x, t: info_nce_loss(x[:10], x[10:]),
            lambda x, t: info_nce_loss(x[:10], x[10:], chunk_size=7),
        ),
    ],
    ids=["supcon_chunked", "contrastive", "info_nce"],
)
def test_gradient_written_in_forward_scales_by_the_incoming_gradient_and_retains_graph(fused, plain):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (20,), generator=g)
    loss = fused(x, target)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (tripled,) = torch.autograd.grad(3 * loss, x)  # the stored gradient is not consumed or scaled in place
    torch.testing.assert_close(tripled, 3 * once)
    if plain is not None:
        (reference,) = torch.autograd.grad(plain(x, target), x)
        torch.testing.assert_close(once, reference, rtol=1e-5, atol=1e-7)
    else:
        _, _, expected = brute_force_contrastive(x.detach(), target, margin=3.0)
        torch.testing.assert_close(once.double(), expected, rtol=1e-4, atol=1e-6)


def test_supcon_chunked_large_logits_stay_finite():
    x = (torch.randn(16, 4) * 1e3).requires_grad_()
    loss = supervised_contrastive_loss(
        x, torch.arange(16) % 3, temperature=0.01, normalize=False, chunk_size=5
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_supcon_chunked_without_grad_computes_no_gradient():
    x = torch.randn(12, 4)
    target = torch.arange(12) % 3
    with torch.no_grad():
        chunked = supervised_contrastive_loss(x.requires_grad_(), target, chunk_size=5)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, supervised_contrastive_loss(x.detach(), target))


def test_supcon_chunked_module_and_registry():
    loss_fn = build_loss({"name": "supcon", "params": {"temperature": 0.3, "chunk_size": 4}})
    assert isinstance(loss_fn, SupConLoss) and loss_fn.chunk_size == 4 and "chunk_size=4" in repr(loss_fn)
    g = torch.Generator().manual_seed(8)
    x, target = torch.randn(10, 2, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    chunked, whole = loss_fn(x, target), SupConLoss(temperature=0.3)(x, target)
    torch.testing.assert_close(chunked.loss, whole.loss)
    assert chunked.metrics.keys() == whole.metrics.keys()
    assert all(v.ndim == 0 and not v.requires_grad for v in chunked.metrics.values())
    assert InfoNCELoss(chunk_size=3).chunk_size == 3


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, "4"])
@pytest.mark.parametrize("fn", [supervised_contrastive_loss, info_nce_loss, contrastive_loss])
def test_bad_chunk_size(fn, chunk_size):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        fn(
            x,
            x if fn is info_nce_loss else torch.zeros(4, dtype=torch.long),
            chunk_size=chunk_size,
        )
    with pytest.raises(ValueError, match="`chunk_size`"):
        SupConLoss(chunk_size=chunk_size)
    with pytest.raises(ValueError, match="`chunk_size`"):
        ContrastiveLoss(chunk_size=chunk_size)


def _contrastive_loss_grad_metrics(x, target, **options):
    leaf = x.clone().requires_grad_()
    loss, metrics = contrastive_loss_with_metrics(leaf, target, margin=2.0, negative_weight=0.7, **options)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert all(m.ndim == 0 and not m.requires_grad for m in metrics.values())
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_contrastive_fused_blocks_equal_plain_ops_with_metrics_and_gradient(dtype, monkeypatch):
    """The fused function in explicit chunks and in automatic blocks (of one row: BLOCK_ELEMENTS made
    tiny) against the plain whole-matrix ops."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 6, generator=g) + 3.0).to(dtype)
    target = torch.randint(-2, 5, (37,), generator=g) * 1000  # labels are compared, not ranged
    x[4] = x[3]  # coinciding embeddings: d = 0 (finite gradient)
    # Blocks and the whole matrix round the Gram product differently; at d = 0 that rounding
    # becomes sqrt(eps·|x|²) in the distance, hence an fp64 tolerance well above eps.
    rtol = 1e-5 if dtype == torch.float32 else 1e-8
    chunked = _contrastive_loss_grad_metrics(x, target, chunk_size=8)
    monkeypatch.setattr(CROSS_ENTROPY_MODULE, "BLOCK_ELEMENTS", 40)
    blocks = _contrastive_loss_grad_metrics(x, target)
    monkeypatch.setattr(CONTRASTIVE_MODULE, "fused_path", lambda: False)
    whole = _contrastive_loss_grad_metrics(x, target)
    for fused in (chunked, blocks):
        torch.testing.assert_close(fused[0], whole[0], rtol=rtol, atol=rtol)
        torch.testing.assert_close(fused[1], whole[1], rtol=rtol, atol=rtol)
        assert fused[2].keys() == whole[2].keys()
        for key, value in whole[2].items():
            torch.testing.assert_close(fused[2][key], value, rtol=rtol, atol=rtol, msg=key)
    module = ContrastiveLoss(margin=2.0, negative_weight=0.7, chunk_size=8)
    torch.testing.assert_close(module(x, target).loss, whole[0], rtol=rtol, atol=rtol)


def test_contrastive_fused_without_grad_computes_no_gradient():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(3))
    target = torch.arange(12) % 3
    with torch.no_grad():
        loss = contrastive_loss(x.requires_grad_(), target)
    assert not loss.requires_grad
    expected = brute_force_contrastive(x.detach(), target)[0]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # float32 vs float64


@pytest.mark.parametrize("labels", [[], [7], [3, 3, 3], [0, 5, 0, -1, 5, 0, 2], list(range(9))])
def test_same_label_count_is_the_number_of_equal_ordered_pairs(labels):
    labels = torch.tensor(labels, dtype=torch.long)
    expected = int((labels[:, None] == labels[None, :]).sum())
    assert CONTRASTIVE_MODULE._same_label_count(labels).item() == expected


def test_contrastive_chunked_keeps_no_n_by_n_tensor():
    """Forward and backward with chunks of 4 rows of 64: no tensor of 64 x 64 elements or more is made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel())
            return out

    x, target = torch.randn(64, 3, requires_grad=True), torch.arange(64) % 5
    with Largest() as chunked:
        contrastive_loss(x, target, chunk_size=4).backward()
    with Largest() as whole:
        contrastive_loss(x, target).backward()
    assert chunked.largest == 4 * 64 and whole.largest == 64 * 64


# ----------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the whole-matrix path
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_supcon_has_no_graph_break(normalize):
    """``torch._dynamo.explain`` traces without compiling (cheap): one graph, no break."""
    x = torch.randn(8, 2, 5, requires_grad=True)
    target = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0])
    explanation = torch._dynamo.explain(SupConLoss(temperature=0.2, normalize=normalize))(x, target)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.slow  # an inductor C++ build: about 8 s on a loaded 2-core CPU
def test_supcon_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 2, 5, generator=g)
    target = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0])
    loss_fn = SupConLoss(temperature=0.2)
    eager = _loss_grad_metrics(lambda x, t: loss_fn(x, t), x, target)
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    compiled = _loss_grad_metrics(lambda x, t: compiled_fn(x, t), x, target)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    for key, value in eager[2].items():
        torch.testing.assert_close(compiled[2][key], value, msg=key)


# ----------------------------------------------------------------------------------------------------
# all three
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "kwargs"),
    [
        ("contrastive", ContrastiveLoss, {"margin": 2.0}),
        ("infonce", InfoNCELoss, {"temperature": 0.2}),
        ("supcon", SupConLoss, {"temperature": 0.2, "normalize": False}),
    ],
)
def test_registered_names(name, cls, kwargs):
    loss = build_loss({"name": name, "params": kwargs})
    assert type(loss) is cls and all(getattr(loss, k) == v for k, v in kwargs.items())


@pytest.mark.parametrize(
    "call",
    [
        lambda x, t: contrastive_loss_with_metrics(x, t),
        lambda x, t: info_nce_loss_with_metrics(x, x.flip(0)),
        lambda x, t: supervised_contrastive_loss_with_metrics(torch.stack([x, x.flip(0)], dim=1), t),
    ],
    ids=["contrastive", "infonce", "supcon"],
)
def test_a_batch_of_1024_by_128(call):
    """No [N, N, D] intermediate (that would be 512 MiB in fp32 here); forward and backward run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g, requires_grad=True)
    loss, metrics = call(x, torch.randint(0, 10, (1024,), generator=g))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())


LABELS = torch.zeros(4, dtype=torch.long)
BAD_INPUTS = [
    (contrastive_loss, {"embeddings": torch.ones(4, 2).long(), "target": LABELS}, TypeError,
     "`embeddings` must be a floating"),
    (contrastive_loss, {"embeddings": torch.ones(4, 2, 3), "target": LABELS}, ValueError,
     r"`embeddings` must have 2 dimensions, got shape \(4, 2, 3\)"),
    (contrastive_loss, {"embeddings": torch.ones(4, 2), "target": torch.zeros(4)}, TypeError,
     "`target` must hold integer class labels"),
    (contrastive_loss, {"embeddings": torch.ones(4, 2), "target": LABELS[:3]}, ValueError,
     r"`target` must have shape \(4,\).*got \(3,\)"),
    (contrastive_loss, {"embeddings": torch.ones(4, 2), "target": LABELS, "margin": 0.0}, ValueError,
     "`margin` must be positive"),
    (contrastive_loss, {"embeddings": torch.ones(4, 2), "target": LABELS, "negative_weight": -1.0},
     ValueError, "`negative_weight` must be non-negative"),
    (info_nce_loss, {"embeddings": torch.ones(4, 2), "positive_embeddings": torch.ones(3, 2)}, ValueError,
     r"`embeddings` and `positive_embeddings` must have the same shape, got \(4, 2\) and \(3, 2\)"),
    (info_nce_loss, {"embeddings": torch.ones(4, 2), "positive_embeddings": torch.ones(4, 2).int()},
     TypeError, "`positive_embeddings` must be a floating"),
    (info_nce_loss, {"embeddings": torch.ones(4, 2), "positive_embeddings": torch.ones(4, 2),
     "temperature": 0.0}, ValueError, "`temperature` must be positive"),
    (supervised_contrastive_loss, {"embeddings": torch.ones(4), "target": LABELS}, ValueError,
     "`embeddings` must have 2 or 3 dimensions"),
    (supervised_contrastive_loss, {"embeddings": torch.ones(4, 2, 3), "target": torch.zeros(4, 2).long()},
     ValueError, r"`target` must have shape \(4,\)"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "kwargs", "error", "pattern"), BAD_INPUTS)
def test_bad_inputs_name_the_argument(fn, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (ContrastiveLoss, {"margin": -1.0}, "margin"),
        (ContrastiveLoss, {"negative_weight": -0.5}, "negative_weight"),
        (InfoNCELoss, {"temperature": 0.0}, "temperature"),
        (SupConLoss, {"temperature": -0.1}, "temperature"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# the configs, end to end
# ----------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_contrastive.yaml", "digits_supcon.yaml"])
def test_config_reaches_95_percent_knn_validation_accuracy(config, tmp_path):
    from lightning_losses.cli import build_cli

    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    best = cli.trainer.checkpoint_callback.best_model_score
    assert best is not None and best.item() >= 0.95, best
    assert cli.trainer.callback_metrics["val/knn_accuracy"] >= 0.95


@pytest.mark.usefixtures("contrastive_path")
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize(
    "loss_fn",
    [contrastive_loss_with_metrics, supervised_contrastive_loss_with_metrics, info_nce_loss_with_metrics],
    ids=["contrastive", "supcon", "info_nce"],
)
def test_bf16_autocast_leaves_the_products_in_float32(loss_fn, chunk_size):
    """Under bf16 autocast the loss, metrics and gradient are the float32 ones: the Gram and similarity
    products are not handed to autocast (a bf16 Gram matrix gives distances off by far more than 1e-5)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=g) + 2.0
    paired = loss_fn is info_nce_loss_with_metrics
    second = torch.randn(10, 8, generator=g) if paired else torch.arange(10) % 3

    def run(autocast):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, metrics = loss_fn(leaf, second, chunk_size=chunk_size)
        # backward outside autocast, as Lightning runs it
        return loss.detach(), torch.autograd.grad(loss, leaf)[0], metrics

    expected, mixed = run(False), run(True)
    torch.testing.assert_close(mixed[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], expected[1], rtol=1e-5, atol=1e-6)
    for key, value in expected[2].items():
        torch.testing.assert_close(mixed[2][key], value, rtol=1e-5, atol=1e-6, msg=key)
