import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_losses import set_value_checks
from lightning_losses.functional import cross_entropy
from lightning_losses.functional.cross_entropy import cross_entropy_with_metrics
from lightning_losses.losses import CrossEntropyLoss
from tests.loss_tester import LossTester

CLASS_WEIGHTS = [0.5, 2.0, 1.0, 1.5, 0.25]
CROSS_ENTROPY_MODULE = importlib.import_module("lightning_losses.functional.cross_entropy")


@pytest.fixture(autouse=True, params=["plain", "fused"])
def computation_path(request, monkeypatch):
    """Every test of this file runs twice: through ``F.cross_entropy`` (what logits below
    ``FUSED_MIN_ELEMENTS`` take) and through the fused function, in blocks of a few rows."""
    if request.param == "fused":
        monkeypatch.setattr(CROSS_ENTROPY_MODULE, "FUSED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(CROSS_ENTROPY_MODULE, "BLOCK_ELEMENTS", 16)
    return request.param


def brute_force_cross_entropy(logits, target, mask, ignore_index=-100, label_smoothing=0.0, weight=None):
    """A Python loop over elements and classes in float64."""
    num_classes = logits.shape[-1]
    w = weight if weight is not None else [1.0] * num_classes
    rows, targets, masks = (
        logits.reshape(-1, num_classes).tolist(),
        target.reshape(-1).tolist(),
        mask.reshape(-1).tolist(),
    )
    numerator = denominator = 0.0
    for row, t, m in zip(rows, targets, masks, strict=True):
        if t == ignore_index or m == 0:
            continue
        log_z = math.log(sum(math.exp(x) for x in row))
        log_p = [x - log_z for x in row]
        smooth = sum(w[c] * log_p[c] for c in range(num_classes)) / num_classes
        numerator += m * (-(1 - label_smoothing) * w[t] * log_p[t] - label_smoothing * smooth)
        denominator += m * w[t]
    return torch.tensor(numerator / denominator if denominator else 0.0, dtype=torch.float64)


class TestCrossEntropy(LossTester):
    functional = staticmethod(cross_entropy)
    module_class = CrossEntropyLoss
    option_sets = [
        {},
        {"label_smoothing": 0.1},
        {"weight": CLASS_WEIGHTS},
        {"weight": CLASS_WEIGHTS, "label_smoothing": 0.3},
    ]
    grad_inputs = ("logits",)
    mask_input = "mask"
    config = "digits_cross_entropy.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(3, 4, 5, generator=g)).to(dtype)
        target = torch.randint(0, 5, (3, 4), generator=g)
        target[0, 1] = -100
        mask = torch.rand(3, 4, generator=g) > 0.3
        return {"logits": logits, "target": target, "mask": mask}

    def functional_options(self, options):
        if "weight" in options:
            return options | {"weight": torch.tensor(options["weight"])}
        return options

    def reference(self, logits, target, mask, **options):
        return brute_force_cross_entropy(logits, target, mask, **options)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2}, {"weight": torch.tensor(CLASS_WEIGHTS, dtype=torch.float64)}]
)
def test_equals_torch_cross_entropy_on_n_by_c(options):
    logits, target = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, -100, 2])
    torch.testing.assert_close(
        cross_entropy(logits, target, **options), F.cross_entropy(logits, target, **options)
    )


def test_global_count_makes_micro_batches_add_up():
    logits, target = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 4, (6, 3))
    mask = torch.rand(6, 3) > 0.5
    full = cross_entropy(logits, target, mask)
    count = mask.sum()
    parts = sum(
        cross_entropy(logits[s], target[s], mask[s], count) for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(parts, full)


def test_masked_targets_may_be_out_of_range():
    logits = torch.randn(2, 3)
    loss = cross_entropy(logits, torch.tensor([1, 99]), torch.tensor([True, False]))
    torch.testing.assert_close(loss, F.cross_entropy(logits[:1], torch.tensor([1])))


def test_accuracy_is_argmax_with_its_first_index_winning_ties():
    """The fused path finds hits from the largest other logit and asks argmax only about tied rows:
    both paths must give argmax's accuracy, also for ties, a masked row and an ignored one."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 6, generator=g)
    target = torch.randint(0, 6, (12,), generator=g)
    logits[3, 1] = logits[3, 4] = logits[3].max() + 1.0  # tie: argmax is 1
    target[3] = 1
    logits[5, 0] = logits[5, 2] = logits[5].max() + 1.0  # tie: argmax is 0, not the target
    target[5] = 2
    logits[7] = 0.0  # every class tied: argmax is 0
    target[7] = 0
    target[9] = -100
    mask = torch.ones(12, dtype=torch.bool)
    mask[10] = False
    metrics = CrossEntropyLoss()(logits, target, mask).metrics
    counted = mask & (target != -100)
    expected = (logits.argmax(-1) == target)[counted].float().mean()
    torch.testing.assert_close(metrics["accuracy"], expected)


@pytest.mark.parametrize("ignore_index", [-100, 0], ids=["not-a-class", "class-0"])
def test_accuracy_without_a_mask_leaves_ignored_targets_out(ignore_index):
    """Ignored targets count neither as hits nor in the denominator; with ``ignore_index`` a class, an
    ignored row whose argmax is that class is no hit either."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 5, generator=g)
    target = torch.randint(1, 5, (16,), generator=g)
    target[[2, 7, 11]] = ignore_index
    logits[[2, 7, 11], 0] = 10.0  # argmax 0 in the ignored rows
    metrics = CrossEntropyLoss(ignore_index=ignore_index)(logits, target).metrics
    counted = target != ignore_index
    expected = (logits.argmax(-1) == target)[counted].float().mean()
    torch.testing.assert_close(metrics["accuracy"], expected)


def test_confident_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor(1e4))


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3, "weight": CLASS_WEIGHTS}])
def test_gradient_from_the_forward_survives_a_second_backward(options):
    """The fused path writes the softmax into the gradient in the forward pass and scales it in the
    backward: a second backward through the same graph (``retain_graph``) recomputes it, both equal the
    brute-force gradient, and a row whose target probability underflows keeps its exact loss."""
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(9, 5, generator=g, dtype=torch.float64)).float()
    logits[4] = torch.tensor([0.0, 200.0, 0.0, 0.0, 0.0])  # p_t = e^-200 underflows in fp32
    logits.requires_grad_()
    target = torch.randint(0, 5, (9,), generator=g)
    target[4], target[6] = 0, -100
    if "weight" in options:
        options = options | {"weight": torch.tensor(options["weight"])}
    loss = cross_entropy(logits, target, **options)
    (once,) = torch.autograd.grad(3 * loss, logits, retain_graph=True)
    (twice,) = torch.autograd.grad(3 * loss, logits)
    torch.testing.assert_close(once, twice)
    reference_options = options | ({"weight": options["weight"].double()} if "weight" in options else {})
    x = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(x, target, **reference_options)
    (expected_grad,) = torch.autograd.grad(3 * expected, x)
    torch.testing.assert_close(loss.double(), expected)
    torch.testing.assert_close(once.double(), expected_grad)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(logits, target, **options), loss.detach())


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"logits": torch.ones(3, dtype=torch.long), "target": torch.zeros(3)},
            TypeError,
            "`logits` must be a floating",
        ),
        (
            {"logits": torch.ones(4), "target": torch.zeros(4)},
            ValueError,
            "`logits` must have 2 or 3 dimensions",
        ),
        (
            {"logits": torch.ones(4, 3), "target": torch.zeros(5, dtype=torch.long)},
            ValueError,
            r"`target` must have shape \(4,\)",
        ),
        (
            {"logits": torch.ones(4, 3), "target": torch.zeros(4)},
            TypeError,
            "`target` must hold integer class indices",
        ),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 3])},
            ValueError,
            r"`target` must lie in \[0, 3\)",
        ),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "mask": torch.ones(3)},
            ValueError,
            "`mask` must have shape",
        ),
        (
            {"logits": torch.ones(2, 3), "target": torch.tensor([0, 1]), "weight": torch.ones(2)},
            ValueError,
            "`weight` must have shape",
        ),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        cross_entropy(**kwargs)


def test_loss_module_counts_tokens_from_the_renamed_mask_key():
    """The batch calls the mask `token_mask`; input_map renames it for the loss, and the count follows."""
    from lightning_losses import LossModule
    from tests.helpers import TinyLM

    module = LossModule(
        TinyLM(),
        CrossEntropyLoss(),
        input_map={"logits": "next_token_logits", "target": "labels", "mask": "token_mask"},
    )
    batch = {
        "input_ids": torch.randint(0, 7, (2, 5)),
        "labels": torch.randint(0, 7, (2, 5)),
        "token_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
    }
    args, kwargs, global_count = module._loss_inputs(batch, module(batch))
    assert global_count is not None and kwargs["global_valid_toks"].item() == 4
    loss, _ = CrossEntropyLoss()(*args, **kwargs)
    logits = module(batch)["next_token_logits"]
    keep = batch["token_mask"].bool()
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], batch["labels"][keep]))
    # ignore_index targets under a set mask are not counted: the count is the loss's own denominator
    batch["labels"][0, 0] = -100
    _, kwargs, _ = module._loss_inputs(batch, module(batch))
    assert kwargs["global_valid_toks"].item() == 3
    # an [N, C] batch without any mask is counted too (every valid target), and class weights count
    # as the weighted mean's denominator: the global mean equals F.cross_entropy(weight=...)
    weights = [1.0, 3.0, 1.0, 1.0]
    weighted = LossModule(torch.nn.Linear(3, 4), CrossEntropyLoss(weight=weights))
    plain_batch = {"inputs": torch.ones(3, 3), "target": torch.tensor([0, 1, -100])}
    outputs = {"logits": torch.randn(3, 4)}
    _, kwargs, global_count = weighted._loss_inputs(plain_batch, outputs)
    assert global_count is not None and kwargs["global_valid_toks"].item() == 4.0
    torch.testing.assert_close(
        weighted.loss(**kwargs).loss,
        F.cross_entropy(outputs["logits"], plain_batch["target"], weight=torch.tensor(weights)),
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype_equals_int64(dtype):
    """F.cross_entropy itself takes int64 (or uint8) targets only: others are cast, not refused."""
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    expected = CrossEntropyLoss()(logits, target)
    actual = CrossEntropyLoss()(logits, target.to(dtype))
    torch.testing.assert_close(actual.loss, expected.loss)
    torch.testing.assert_close(actual.metrics["accuracy"], expected.metrics["accuracy"])
    torch.testing.assert_close(actual.loss, F.cross_entropy(logits, target))


@pytest.mark.parametrize("with_count", [False, True], ids=["mean", "global_count"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.2},
        {"weight": CLASS_WEIGHTS},
        {"weight": CLASS_WEIGHTS, "label_smoothing": 0.3},
        {"ignore_index": 2},
    ],
    ids=["plain", "smoothing", "class_weights", "weights_and_smoothing", "ignore_index_a_class"],
)
def test_targets_known_in_range_take_the_same_values_as_unchecked_ones(options, with_count):
    """When the CPU range check has seen every target in [0, C) (and `ignore_index` is no class), the loss
    skips its masks and counts; the values must equal those of the path that never looks (value checks
    off, as on a GPU) and F.cross_entropy. With `ignore_index=2` some targets are that class: ignored."""

    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(9, 5, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4, 2, 1, 0, 3])
    if "weight" in options:
        options = options | {"weight": torch.tensor(CLASS_WEIGHTS, dtype=torch.float64)}
    count = torch.tensor(12) if with_count else None
    results = []
    for mode in ("auto", "never"):
        try:
            set_value_checks(mode)
            loss, metrics = cross_entropy_with_metrics(logits, target, None, count, **options)
        finally:
            set_value_checks("auto")
        (grad,) = torch.autograd.grad(loss, logits)
        results.append((loss, metrics["accuracy"], grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    expected = F.cross_entropy(logits, target, reduction="sum" if with_count else "mean", **options)
    torch.testing.assert_close(results[0][0], expected / 12 if with_count else expected)
    counted = target != options.get("ignore_index", -100)
    hits = (logits.argmax(-1) == target) & counted
    torch.testing.assert_close(results[0][1], (hits.sum() / counted.sum()).double())


@pytest.mark.parametrize("columns", [7, 300], ids=["bmm", "wide"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_row_dot_equals_the_float64_product_sum(columns, overwrite, computation_path):
    """Narrow rows by bmm, wide ones by the product: in place into ``a`` with ``overwrite``, else a block
    of rows at a time (several blocks on the fused path here), never changing ``b``."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 9, columns, generator=g)
    expected = (a.double() * b.double()).sum(-1)
    before_a, before_b = a.clone(), b.clone()
    got = CROSS_ENTROPY_MODULE.row_dot(a, b, overwrite=overwrite)
    torch.testing.assert_close(got, expected.float())
    assert torch.equal(b, before_b)
    assert torch.equal(a, before_a) or (overwrite and columns > CROSS_ENTROPY_MODULE.BMM_MAX_COLUMNS)
