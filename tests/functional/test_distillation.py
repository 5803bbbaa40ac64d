import contextlib
import importlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lightning_losses import LossModule
from lightning_losses.examples import MLP, DictDataset
from lightning_losses.functional.cross_entropy import cross_entropy
from lightning_losses.functional.distillation import distillation_loss, kl_divergence
from lightning_losses.losses.distillation import KLDivergenceLoss
from lightning_losses.registry import build_loss
from tests.helpers import quiet_trainer
from tests.loss_tester import CONFIGS, LossTester

# ----------------------------------------------------------------------------------------------------
# independent references: Python loops over rows and classes in float64, on probabilities
# ----------------------------------------------------------------------------------------------------


def softened(row, temperature):
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def brute_force_kl(p, q):
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q, strict=True) if pc > 0)


def brute_force_divergence(p_teacher, q_student, direction, beta):
    if direction == "forward":
        return brute_force_kl(p_teacher, q_student)
    if direction == "reverse":
        return brute_force_kl(q_student, p_teacher)
    mixture = [beta * p + (1 - beta) * q for p, q in zip(p_teacher, q_student, strict=True)]
    return beta * brute_force_kl(p_teacher, mixture) + (1 - beta) * brute_force_kl(q_student, mixture)


def brute_force_distillation(
    logits,
    teacher_logits,
    target=None,
    mask=None,
    temperature=4.0,
    alpha=0.7,
    direction="forward",
    beta=0.5,
    ignore_index=-100,
):
    """α·CE + (1 − α)·T²·D, each a (mask-weighted) mean over the same valid rows (non-zero mask and, with
    a target, target != ignore_index); T²·D alone without target."""
    num_classes = logits.shape[-1]
    rows = logits.reshape(-1, num_classes).tolist()
    teacher_rows = teacher_logits.reshape(-1, num_classes).tolist()
    weights = [1.0] * len(rows) if mask is None else mask.reshape(-1).double().tolist()
    labels = [None] * len(rows) if target is None else target.reshape(-1).tolist()
    kl_sum = kl_count = 0.0
    for row, teacher_row, m, t in zip(rows, teacher_rows, weights, labels, strict=True):
        if m != 0 and t != ignore_index:
            p, q = softened(teacher_row, temperature), softened(row, temperature)
            kl_sum += m * brute_force_divergence(p, q, direction, beta)
            kl_count += m
    kl_term = temperature**2 * (kl_sum / kl_count if kl_count else 0.0)
    if target is None:
        return torch.tensor(kl_term, dtype=torch.float64)
    ce_sum = ce_count = 0.0
    for row, t, m in zip(rows, target.reshape(-1).tolist(), weights, strict=True):
        if m != 0 and t != ignore_index:
            ce_sum += -m * math.log(softened(row, 1.0)[t])
            ce_count += m
    ce_term = ce_sum / ce_count if ce_count else 0.0
    return torch.tensor(alpha * ce_term + (1 - alpha) * kl_term, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# the shared checks
# ----------------------------------------------------------------------------------------------------


class TestDistillationTokenLevel(LossTester):
    """``[B, T, V]`` with targets (one ignored), a bool mask, every direction."""

    functional = staticmethod(distillation_loss)
    module_class = KLDivergenceLoss
    option_sets = [
        {},
        {"temperature": 1.0, "alpha": 0.2},
        {"direction": "reverse", "temperature": 2.0},
        {"direction": "jsd"},
        {"direction": "jsd", "beta": 0.2, "temperature": 3.0, "alpha": 0.4},
    ]
    grad_inputs = ("logits", "teacher_logits")
    mask_input = "mask"
    config = "digits_distillation.yaml"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        logits = (3 * torch.randn(3, 4, 5, generator=g)).to(dtype)
        teacher_logits = (3 * torch.randn(3, 4, 5, generator=g)).to(dtype)
        target = torch.randint(0, 5, (3, 4), generator=g)
        target[0, 1] = -100
        mask = torch.rand(3, 4, generator=g) > 0.3
        return {"logits": logits, "teacher_logits": teacher_logits, "target": target, "mask": mask}

    def reference(self, **inputs_and_options):
        return brute_force_distillation(**inputs_and_options)


class TestDistillationWithoutTargets(LossTester):
    """``[N, C]`` without targets (the divergence term alone), a float mask of weights."""

    functional = staticmethod(distillation_loss)
    module_class = KLDivergenceLoss
    option_sets = [
        {"temperature": 1.0},
        {"temperature": 4.0, "direction": "reverse"},
        {"temperature": 2.0, "direction": "jsd", "beta": 0.7},
    ]
    grad_inputs = ("logits", "teacher_logits")
    mask_input = "mask"

    def make_inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(100 + seed)
        logits = (2 * torch.randn(6, 7, generator=g)).to(dtype)
        teacher_logits = (2 * torch.randn(6, 7, generator=g)).to(dtype)
        mask = torch.rand(6, generator=g) * (torch.rand(6, generator=g) > 0.3)
        return {"logits": logits, "teacher_logits": teacher_logits, "mask": mask}

    def reference(self, **inputs_and_options):
        return brute_force_distillation(**inputs_and_options)


# ----------------------------------------------------------------------------------------------------
# the math, against torch and hand-computed cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_forward_and_reverse_equal_torch_kl_div_on_n_by_c(temperature):
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    log_q, log_p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    torch.testing.assert_close(
        kl_divergence(student, teacher, temperature=temperature),
        F.kl_div(log_q, log_p, reduction="batchmean", log_target=True),
    )
    torch.testing.assert_close(
        kl_divergence(student, teacher, temperature=temperature, direction="reverse"),
        F.kl_div(log_p, log_q, reduction="batchmean", log_target=True),
    )


def test_token_level_mean_is_over_valid_tokens_not_the_batch_size():
    student, teacher = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(kl_divergence(student, teacher), per_token.mean())
    batchmean = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)  # the guide's: ÷ B only
    torch.testing.assert_close(batchmean, 3 * per_token.mean())
    mask = torch.tensor([[True, True, False], [False, True, False]])
    torch.testing.assert_close(kl_divergence(student, teacher, mask), per_token[mask].mean())


def test_global_count_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(6, 3, 5, generator=g), torch.randn(6, 3, 5, generator=g)
    target, mask = torch.randint(0, 5, (6, 3), generator=g), torch.rand(6, 3, generator=g) > 0.4
    options = {"temperature": 2.0, "alpha": 0.3, "direction": "jsd"}
    full = distillation_loss(student.double(), teacher.double(), target, mask, **options).loss
    count = mask.sum()
    parts = sum(
        distillation_loss(student[s].double(), teacher[s].double(), target[s], mask[s], count, **options).loss
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize(
    ("direction", "expected"), [("forward", 2e4), ("reverse", 2e4), ("jsd", math.log(2))]
)
def test_confident_logits_stay_finite(direction, expected):
    # softmax(x).log() (the guide's) gives log 0 = -inf here; in log space KL = 1·(0 − (−2e4)) = 2e4
    student = torch.tensor([[-1e4, 1e4]], requires_grad=True)
    teacher = torch.tensor([[1e4, -1e4]])
    loss = kl_divergence(student, teacher, direction=direction)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss, torch.tensor(expected))


def reference_divergence(student, teacher, temperature, direction, beta=0.5):
    """One row's divergence in float64 torch, differentiable: each distribution is a softmax over its own
    finite logits only (a ruled-out class is absent, not a -inf), and KL(a ‖ b) = Σ_{a_c > 0} a_c log(a_c/b_c)
    by a loop, +inf when b lacks a class a has."""

    def probabilities(logits):
        finite = [c for c, x in enumerate(logits.tolist()) if math.isfinite(x)]
        soft = torch.softmax(logits[finite] / temperature, dim=0)
        return {c: soft[i] for i, c in enumerate(finite)}

    def kl(a, b):
        if any(c not in b for c in a):
            return torch.tensor(math.inf, dtype=torch.float64)
        return sum(a[c] * (torch.log(a[c]) - torch.log(b[c])) for c in a)

    p, q = probabilities(teacher), probabilities(student)
    if direction == "forward":
        return kl(p, q)
    if direction == "reverse":
        return kl(q, p)
    zero = torch.zeros((), dtype=torch.float64)
    m = {c: beta * p.get(c, zero) + (1 - beta) * q.get(c, zero) for c in p.keys() | q.keys()}
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("ruled_out_by", ["teacher", "student", "both"])
def test_classes_ruled_out_by_a_minus_inf_logit(direction, ruled_out_by):
    """A -inf logit (class 1 of row 0) gives exact values and NaN-free gradients into both sides (the
    functional lets gradients reach the teacher), also in a masked-out row (row 1) where each KL is +inf."""
    inf = float("-inf")
    student = torch.tensor([[0.5, -1.0, 2.0, 0.3], [inf, 1.0, 0.0, 2.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.2, 0.0, -0.5], [1.0, 0.0, -1.0, inf]], dtype=torch.float64)
    if ruled_out_by in ("student", "both"):
        student[0, 1] = inf
    if ruled_out_by in ("teacher", "both"):
        teacher[0, 1] = inf
    student.requires_grad_()
    teacher.requires_grad_()
    temperature, mask = 2.0, torch.tensor([True, False])
    loss = kl_divergence(student, teacher, mask, temperature=temperature, direction=direction)
    loss.backward()
    assert not student.grad.isnan().any() and not teacher.grad.isnan().any()
    assert (student.grad[1] == 0).all() and (teacher.grad[1] == 0).all()  # the masked-out row

    ref_student, ref_teacher = student[0].detach().clone(), teacher[0].detach().clone()
    ref_student.requires_grad_()
    ref_teacher.requires_grad_()
    expected = reference_divergence(ref_student, ref_teacher, temperature, direction)
    if (direction, ruled_out_by) in {("forward", "student"), ("reverse", "teacher")}:
        # P has mass where Q has none: KL = +inf by definition; Q's gradient stays the exact (q − p)/T
        assert expected == math.inf and loss == math.inf
        p = torch.softmax(ref_teacher.masked_fill(ref_teacher.isinf(), -1e300) / temperature, 0)
        q = torch.softmax(ref_student.masked_fill(ref_student.isinf(), -1e300) / temperature, 0)
        q_side = student.grad[0] if direction == "forward" else teacher.grad[0]
        torch.testing.assert_close(
            q_side, (q - p) / temperature if direction == "forward" else (p - q) / temperature
        )
        assert student.grad.isfinite().all() and teacher.grad.isfinite().all()
        return
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(student.grad[0], ref_student.grad)
    torch.testing.assert_close(teacher.grad[0], ref_teacher.grad)


def test_jensen_shannon_properties():
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
    )
    jsd = kl_divergence(a, b, direction="jsd", beta=0.5)
    torch.testing.assert_close(jsd, kl_divergence(b, a, direction="jsd", beta=0.5))  # symmetric at β = 0.5
    assert 0 < jsd < math.log(2)
    # P = teacher, Q = student: swapping them is β → 1 − β
    torch.testing.assert_close(
        kl_divergence(a, b, direction="jsd", beta=0.2), kl_divergence(b, a, direction="jsd", beta=0.8)
    )
    for direction in ("forward", "reverse", "jsd"):
        assert kl_divergence(a, a.clone(), direction=direction).abs() < 1e-12


def test_temperature_squared_keeps_hintons_gradient_scale():
    # Hinton et al., eq. 4: at high T with zero-mean logits, ∂KL/∂z_i ≈ (z_i − v_i)/(N·T²) for N classes,
    # so the T²-scaled term has gradient ≈ (z_i − v_i)/N, independent of T.
    student = torch.tensor([[1.0, -2.0, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    distillation_loss(student, teacher, temperature=200.0).loss.backward()
    torch.testing.assert_close(student.grad, (student.detach() - teacher) / 4, rtol=1e-2, atol=1e-4)


def test_alpha_mixes_the_task_term_and_is_unused_without_targets():
    student, teacher = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1])
    only_task = distillation_loss(student, teacher, target, alpha=1.0)
    torch.testing.assert_close(only_task.loss, F.cross_entropy(student, target))
    torch.testing.assert_close(only_task.task_loss, cross_entropy(student, target))
    without_target = distillation_loss(student, teacher, alpha=1.0, temperature=3.0)
    assert without_target.task_loss is None
    torch.testing.assert_close(without_target.loss, 9 * kl_divergence(student, teacher, temperature=3.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"logits": torch.ones(2, 3, dtype=torch.long)}, TypeError, "`logits` must be a floating"),
        ({"teacher_logits": torch.ones(2, 3, dtype=torch.long)}, TypeError, "`teacher_logits` must be a"),
        ({"logits": torch.ones(6), "teacher_logits": torch.ones(6)}, ValueError, "`logits` must have 2 or 3"),
        ({"teacher_logits": torch.ones(2, 4)}, ValueError, r"same shape, got \(2, 3\) and \(2, 4\)"),
        ({"mask": torch.ones(3)}, ValueError, r"`mask` must have shape \(2,\)"),
        ({"target": torch.tensor([0, 1, 2])}, ValueError, r"`target` must have shape \(2,\)"),
        ({"target": torch.tensor([0, 3])}, ValueError, r"`target` must lie in \[0, 3\)"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be positive"),
        ({"alpha": 1.5}, ValueError, r"`alpha` must be in \[0, 1\]"),
        ({"direction": "sideways"}, ValueError, "`direction` must be one of"),
        ({"direction": "jsd", "beta": 1.0}, ValueError, r"`beta` must be in \(0, 1\)"),
        ({"direction": "jsd", "beta": 0.0}, ValueError, r"`beta` must be in \(0, 1\)"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, pattern):
    inputs = {"logits": torch.ones(2, 3), "teacher_logits": torch.zeros(2, 3)}
    with pytest.raises(error, match=pattern):
        distillation_loss(**(inputs | kwargs))


# ----------------------------------------------------------------------------------------------------
# the module: metrics, teacher sources, the frozen teacher
# ----------------------------------------------------------------------------------------------------


def test_metrics_follow_the_guide_keys():
    student, teacher, target = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss_fn = KLDivergenceLoss(temperature=2.0, alpha=0.25)
    loss, metrics = loss_fn(student, teacher, target)
    terms = distillation_loss(student, teacher, target, temperature=2.0, alpha=0.25)
    assert metrics["total_loss"] == metrics["loss"] == loss.detach()
    assert metrics["kl_loss"] == terms.kl_loss and metrics["task_loss"] == terms.task_loss
    assert metrics["temperature"] == 2.0
    assert set(KLDivergenceLoss.partial_metrics) == {"total_loss", "kl_loss", "task_loss"}


def test_metric_keys_are_the_same_with_and_without_targets():
    # DDP ranks holding labelled and unlabelled batches must sync the same metrics at the epoch's end
    student, teacher, target = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss_fn = KLDivergenceLoss(temperature=2.0, alpha=0.25)
    labelled, unlabelled = loss_fn(student, teacher, target).metrics, loss_fn(student, teacher).metrics
    assert (
        sorted(labelled)
        == sorted(unlabelled)
        == ["kl_loss", "loss", "task_loss", "temperature", "total_loss"]
    )
    assert unlabelled["task_loss"] == 0 and unlabelled["task_loss"].ndim == 0
    assert not unlabelled["task_loss"].requires_grad


def test_ignore_index_rows_count_in_neither_term():
    # padding marked only by its target (-100 under a mask of ones) is skipped by the divergence too
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.tensor([[1, -100, 3], [0, 2, -100]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    keep = torch.tensor([[True, False, True], [True, False, False]])  # mask and target != -100, by hand
    temperature = 2.0
    log_q, log_p = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    kl_rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    ce_rows = F.cross_entropy(student.reshape(-1, 4), target.reshape(-1), reduction="none", ignore_index=-100)
    expected_kl = temperature**2 * kl_rows[keep].mean()
    expected_ce = ce_rows.reshape(2, 3)[keep].mean()
    terms = distillation_loss(student, teacher, target, mask, temperature=temperature, alpha=0.4)
    torch.testing.assert_close(terms.kl_loss, expected_kl)
    torch.testing.assert_close(terms.task_loss, expected_ce)
    torch.testing.assert_close(terms.loss, 0.4 * expected_ce + 0.6 * expected_kl)
    # with a global count: sums over the same rows
    count = torch.tensor(5)
    terms = distillation_loss(student, teacher, target, mask, count, temperature=temperature, alpha=0.4)
    torch.testing.assert_close(terms.kl_loss, temperature**2 * kl_rows[keep].sum() / 5)
    torch.testing.assert_close(terms.task_loss, ce_rows.reshape(2, 3)[keep].sum() / 5)


def test_options_are_checked_when_the_module_is_built():
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got 1.5"):
        KLDivergenceLoss(alpha=1.5)
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        KLDivergenceLoss(temperature=-1.0)
    with pytest.raises(ValueError, match=r"`beta` must be in \(0, 1\)"):
        KLDivergenceLoss(direction="jsd", beta=1.0)


def test_registry_builds_it_from_the_guides_schema():
    loss_fn = build_loss({"name": "kl_divergence", "params": {"temperature": 2.0, "alpha": 0.5}})
    assert isinstance(loss_fn, KLDivergenceLoss) and (loss_fn.temperature, loss_fn.alpha) == (2.0, 0.5)
    assert (KLDivergenceLoss().temperature, KLDivergenceLoss().alpha) == (4.0, 0.7)  # the guide's defaults


def test_teacher_logits_must_come_from_exactly_one_source(tmp_path):
    student, teacher_logits, inputs = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match="got neither"):
        KLDivergenceLoss()(student)
    with_teacher = KLDivergenceLoss(teacher=nn.Linear(5, 3))
    with pytest.raises(ValueError, match="got both"):
        with_teacher(student, teacher_logits, inputs=inputs)
    with pytest.raises(ValueError, match="needs `inputs`"):
        with_teacher(student)
    with pytest.raises(ValueError, match="needs `teacher`"):
        KLDivergenceLoss(teacher_checkpoint="teacher.ckpt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        KLDivergenceLoss(teacher=nn.Linear(5, 3), teacher_checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"other.weight": torch.zeros(3, 5)}}, tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match=r"starts with 'model\.'; its keys start with \['other\.'\]"):
        KLDivergenceLoss(teacher=nn.Linear(5, 3), teacher_checkpoint=str(tmp_path / "wrong.ckpt"))


def test_module_treats_teacher_logits_as_constants():
    student = torch.randn(4, 3, requires_grad=True)
    teacher_logits = torch.randn(4, 3, requires_grad=True)  # e.g. another network's live output
    KLDivergenceLoss()(student, teacher_logits, torch.tensor([0, 1, 2, 0])).loss.backward()
    assert student.grad is not None and teacher_logits.grad is None


def test_teacher_is_frozen_in_eval_mode_and_called_without_grad():
    teacher = MLP(5, 3, hidden=(8,), dropout=0.5)
    loss_fn = KLDivergenceLoss(teacher=teacher)
    module = LossModule(MLP(5, 3, hidden=(4,)), loss_fn)
    module.train()  # what Lightning does at the start of every training epoch
    assert module.model.training and loss_fn.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    inputs = torch.randn(6, 5)
    first, second = loss_fn.teacher_forward(inputs), loss_fn.teacher_forward(inputs)
    torch.testing.assert_close(first, second)  # dropout off
    assert not loss_fn.teacher_forward(inputs.requires_grad_()).requires_grad  # under no_grad: no graph
    student = torch.randn(6, 3, requires_grad=True)
    loss_fn(student, inputs=inputs).loss.backward()
    assert student.grad is not None and all(p.grad is None for p in teacher.parameters())
    trained = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.model.parameters()}


def test_teacher_may_return_a_dict():
    class DictTeacher(nn.Module):
        def forward(self, inputs):
            return {"scores": inputs * 2}

    student, inputs = torch.randn(3, 4), torch.randn(3, 4)
    loss_fn = KLDivergenceLoss(teacher=DictTeacher(), teacher_output_key="scores")
    expected = distillation_loss(student, inputs * 2).loss
    torch.testing.assert_close(loss_fn(student, inputs=inputs).loss, expected)
    with pytest.raises(ValueError, match="without `teacher_output_key` 'logits'"):
        KLDivergenceLoss(teacher=DictTeacher())(student, inputs=inputs)


def test_loss_module_resolves_teacher_logits_and_the_token_count_by_name():
    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 5)

        def forward(self, features):
            return self.linear(features)

    g = torch.Generator().manual_seed(0)
    batch = {
        "features": torch.randn(2, 3, 4, generator=g),
        "teacher_logits": torch.randn(2, 3, 5, generator=g),
        "target": torch.randint(0, 5, (2, 3), generator=g),
        "mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }
    module = LossModule(TokenModel(), KLDivergenceLoss(temperature=2.0))
    _, kwargs, global_count = module._loss_inputs(batch, module(batch))
    assert global_count == 3 and kwargs["global_valid_toks"] == 3
    assert kwargs["teacher_logits"] is batch["teacher_logits"]
    loss = module._step(batch).loss
    expected = distillation_loss(
        module.model(batch["features"]),
        batch["teacher_logits"],
        batch["target"],
        batch["mask"],
        temperature=2.0,
    ).loss
    torch.testing.assert_close(loss, expected)


def test_loss_module_counts_the_rows_the_loss_averages_over():
    """``global_valid_toks`` is the loss's own denominator: the mask without the ignore_index rows."""

    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 5)

        def forward(self, features):
            return self.linear(features)

    g = torch.Generator().manual_seed(1)
    batch = {
        "features": torch.randn(2, 3, 4, generator=g),
        "teacher_logits": torch.randn(2, 3, 5, generator=g),
        "target": torch.tensor([[2, -100, 4], [-100, 0, 1]]),  # one -100 under the mask, one outside it
        "mask": torch.tensor([[1, 1, 1], [0, 1, 0]]),
    }
    loss_fn = KLDivergenceLoss(temperature=2.0, alpha=0.3)
    module = LossModule(TokenModel(), loss_fn)
    _, kwargs, global_count = module._loss_inputs(batch, module(batch))
    assert global_count == kwargs["global_valid_toks"] == 3  # (0,0), (0,2), (1,1)
    logits = module.model(batch["features"]).detach()
    expected = brute_force_distillation(
        logits.double(), batch["teacher_logits"].double(), batch["target"], batch["mask"], 2.0, 0.3
    )
    torch.testing.assert_close(module._step(batch).loss.double(), expected, rtol=1e-5, atol=1e-6)
    # without targets or a mask every row counts, and the count is still taken (an all-reduce under DDP)
    unlabelled = {"features": batch["features"], "teacher_logits": batch["teacher_logits"]}
    _, kwargs, global_count = module._loss_inputs(unlabelled, module(unlabelled))
    assert global_count == kwargs["global_valid_toks"] == 6


def digits_like_batches(num_rows=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs, target = torch.rand(num_rows, 64, generator=g), torch.randint(0, 10, (num_rows,), generator=g)
    return torch.utils.data.DataLoader(DictDataset(inputs=inputs, target=target), batch_size=16)


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # the frozen teacher's
def test_fit_loads_the_teacher_checkpoint_and_never_changes_the_teacher(tmp_path):
    teacher_module = LossModule(
        MLP(64, 10, hidden=(32,), dropout=0.2), nn.CrossEntropyLoss(), input_map={"input": "logits"}
    )
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(teacher_module, digits_like_batches())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")  # a LossModule checkpoint: keys "model.<...>"

    loss_fn = KLDivergenceLoss(
        teacher=MLP(64, 10, hidden=(32,), dropout=0.2), teacher_checkpoint=str(tmp_path / "teacher.ckpt")
    )
    loaded = {k: v.clone() for k, v in loss_fn.teacher.state_dict().items()}
    for name, weight in teacher_module.model.state_dict().items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0)

    student = LossModule(MLP(64, 10, hidden=(8,)), loss_fn)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    quiet_trainer(max_epochs=2).fit(student, digits_like_batches(seed=1))
    assert not loss_fn.teacher.training
    for name, weight in loss_fn.teacher.state_dict().items():
        torch.testing.assert_close(weight, loaded[name], rtol=0, atol=0)
    assert any(not torch.equal(before[k], v) for k, v in student.model.state_dict().items())


@pytest.mark.parametrize("config", ["digits_teacher.yaml", "digits_student_baseline.yaml"])
def test_other_configs_print(config, capsys):
    from lightning_losses.cli import build_cli

    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_cli(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert "class_path" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
def test_teacher_then_student_end_to_end(tmp_path):
    """The three configs on a short schedule: teacher → checkpoint → distilled student (and the baseline)."""
    from lightning_losses.cli import build_cli

    def run(name, epochs, edit=lambda config: None):
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        config["trainer"]["max_epochs"] = epochs
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / name)
        edit(config)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return build_cli(["fit", "--config", str(path), "--trainer.enable_progress_bar=false"])

    teacher = run("digits_teacher", 3)
    (checkpoint,) = Path(tmp_path / "digits_teacher").glob("teacher.ckpt")

    def use_teacher(config):
        config["model"]["loss"]["init_args"]["teacher_checkpoint"] = str(checkpoint)

    student = run("digits_distillation", 3, use_teacher)
    baseline = run("digits_student_baseline", 3)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, weight in student.model.loss.teacher.state_dict().items():
        torch.testing.assert_close(weight, saved[f"model.{name}"], rtol=0, atol=0)
    for cli in (teacher, student, baseline):
        assert cli.trainer.callback_metrics["val/accuracy"] > 0.7
    assert "val/kl_loss" in student.trainer.callback_metrics


# P has mass where Q has none (KL = +inf): a student -inf where the teacher is finite (forward), the reverse
RULES_OUT_A_CLASS_OF_THE_OTHER = {"forward": "student", "reverse": "teacher"}


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_divergence_equals_the_unfused_path(dtype, direction, monkeypatch):
    """A constant teacher takes the fused, blockwise divergence (blocks of 2 rows here); a teacher that
    requires grad the plain log_softmax path. Same value and student gradient, also with -inf logits
    (ruled-out classes on either side, an all -inf masked row, a side ruling out a class of the other:
    +inf for KL) and a float mask; fp64 gradcheck of the fused path."""
    monkeypatch.setattr(
        importlib.import_module("lightning_losses.functional.cross_entropy"), "BLOCK_ELEMENTS", 8
    )
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(7, 4, generator=g)).to(dtype)
    teacher = (3 * torch.randn(7, 4, generator=g)).to(dtype)
    student[0, 1] = teacher[1, 2] = -math.inf  # a class either side rules out
    student[2, 0] = teacher[2, 0] = -math.inf  # ruled out by both
    student[3], teacher[3] = -math.inf, -math.inf  # a padding row, masked below
    mask = torch.tensor([1.0, 0.5, 1.0, 0.0, 2.0, 1.0, 1.0], dtype=dtype)
    options = {"direction": direction, "beta": 0.3}
    for temperature in (1.0, 4.0):
        x = student.clone().requires_grad_()
        fused = kl_divergence(x, teacher, mask, temperature=temperature, **options)
        (fused_grad,) = torch.autograd.grad(fused, x)
        y, constant = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        plain = kl_divergence(y, constant, mask, temperature=temperature, **options)
        (plain_grad,) = torch.autograd.grad(plain, y)
        torch.testing.assert_close(fused, plain)
        rows = [0, 1, 2, 4, 5, 6]  # the plain path's log_softmax of the all -inf row 3 has a NaN gradient
        torch.testing.assert_close(fused_grad[rows], plain_grad[rows])
        assert torch.isfinite(fused_grad).all() and fused_grad[3].abs().sum() == 0
    if direction in RULES_OUT_A_CLASS_OF_THE_OTHER:
        wrong_student, wrong_teacher = student.clone(), teacher.clone()
        (wrong_student if direction == "forward" else wrong_teacher)[5, 0] = -math.inf
        x = wrong_student.requires_grad_()
        loss = kl_divergence(x, wrong_teacher, mask, **options)
        assert loss == math.inf and torch.isfinite(torch.autograd.grad(loss, x)[0]).all()
    if dtype == torch.float64:
        finite_student, finite_teacher = torch.randn(5, 6, dtype=dtype), torch.randn(5, 6, dtype=dtype)
        assert torch.autograd.gradcheck(
            lambda s: kl_divergence(s, finite_teacher, temperature=2.0, **options),
            (finite_student.requires_grad_(),),
        )


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_fused_divergence_keeps_a_nan_logit_visible_in_the_loss(side, direction):
    """A NaN logit makes its row's KL NaN (the zeroing of 0 · log 0 must not hide it) and the loss NaN;
    masked out, the row changes nothing, and no gradient is NaN."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 5, 6, generator=g)
    (student if side == "student" else teacher)[2, 3] = math.nan
    x = student.clone().requires_grad_()
    loss = kl_divergence(x, teacher, temperature=2.0, direction=direction)
    assert loss.isnan()
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    x = student.clone().requires_grad_()
    masked = kl_divergence(x, teacher, mask, temperature=2.0, direction=direction)
    (grad,) = torch.autograd.grad(masked, x)
    rows = [0, 1, 3, 4]
    y = student[rows].clone().requires_grad_()
    expected = kl_divergence(y, teacher[rows], temperature=2.0, direction=direction)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(grad[rows], torch.autograd.grad(expected, y)[0])
    assert grad[2].abs().sum() == 0


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_fused_divergence_gradient_written_in_forward_scales_and_survives_a_second_backward(direction):
    """The gradient is made in the forward pass and only scaled per row in the backward: a second
    backward (retain_graph) of 3·loss gets 3× the first, and both equal the plain path's."""
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 9, 7, generator=g)
    mask = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 1.0, 3.0, 1.0])
    x = student.clone().requires_grad_()
    loss = kl_divergence(x, teacher, mask, temperature=2.0, direction=direction)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (tripled,) = torch.autograd.grad(3 * loss, x)
    torch.testing.assert_close(tripled, 3 * once)
    y = student.clone().requires_grad_()
    (plain,) = torch.autograd.grad(
        kl_divergence(y, teacher.clone().requires_grad_(), mask, temperature=2.0, direction=direction), y
    )
    torch.testing.assert_close(once, plain)
    with torch.no_grad():
        no_grad = kl_divergence(
            student.clone().requires_grad_(), teacher, mask, temperature=2.0, direction=direction
        )
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, loss.detach())


# per direction: (finite form, guarded form, the side whose -inf class the finite form cannot take)
BLOCK_FORMS = {
    "forward": ("_finite_block_kl", "_guarded_block_kl", "teacher"),
    "reverse": ("_finite_block_reverse_kl", "_plain_block_divergence", "student"),
    "jsd": ("_finite_block_jsd", "_plain_block_divergence", "teacher"),
}


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
def test_fused_divergence_takes_the_finite_form_until_a_block_is_not_finite(dtype, direction, monkeypatch):
    """Blocks of 2 rows: the finite form runs until the block holding a ruled-out class (rows 4-5; of the
    teacher, for reverse KL of the student: a class with no mass under the KL's first argument, finite
    all the same), which and whose successor the guarded form computes; value and gradient equal the
    plain path's."""
    distillation = importlib.import_module("lightning_losses.functional.distillation")
    monkeypatch.setattr(
        importlib.import_module("lightning_losses.functional.cross_entropy"), "BLOCK_ELEMENTS", 8
    )
    calls = []

    def spy(form):
        original = getattr(distillation, form)

        def called(s, u, grad, block, **options):
            calls.append((form, block.start))
            return original(s, u, grad, block, **options)

        return called

    finite_form, guarded_form, side = BLOCK_FORMS[direction]
    for form in (finite_form, guarded_form):
        monkeypatch.setattr(distillation, form, spy(form))
    g = torch.Generator().manual_seed(8)
    student, teacher = (3 * torch.randn(2, 8, 4, generator=g)).to(dtype)
    (teacher if side == "teacher" else student)[4, 1] = -math.inf
    options = {"temperature": 2.0, "direction": direction, "beta": 0.3}
    x = student.clone().requires_grad_()
    fused = kl_divergence(x, teacher, **options)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert calls == [
        (finite_form, 0),
        (finite_form, 2),
        (finite_form, 4),
        (guarded_form, 4),
        (guarded_form, 6),
    ]
    assert torch.isfinite(fused)
    y = student.clone().requires_grad_()
    plain = kl_divergence(y, teacher.clone().requires_grad_(), **options)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grad, torch.autograd.grad(plain, y)[0])
    assert fused_grad.dtype == dtype


def reference_divergence_fp64(student, teacher, direction, beta=0.3):
    """Per-row divergence of fp64 logits by log_softmax and logaddexp, mean over rows."""
    log_q, log_p = student.double().log_softmax(-1), teacher.double().log_softmax(-1)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if direction == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm, kl_qm = ((log_x.exp() * (log_x - log_m)).sum(-1) for log_x in (log_p, log_q))
    return (beta * kl_pm + (1 - beta) * kl_qm).mean()


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_fused_divergence_is_exact_for_a_nearby_or_shifted_student(offset, direction):
    """A student close to the teacher, or the teacher plus a constant (the same distribution): the
    finite form's centred logits keep the fp32 error near the log_softmax form's (here at most 3.6e-9
    on a forward or reverse KL of 1.5e-7, 2.2e-9 on a JSD of 3.2e-8, where subtracting the uncentred
    logits errs by ~1e-7), against an fp64 reference."""
    g = torch.Generator().manual_seed(9)
    teacher = 10 * torch.randn(256, 1000, generator=g)
    student = (teacher + offset + 1e-3 * torch.randn(256, 1000, generator=g)).requires_grad_()
    fused = kl_divergence(student, teacher, direction=direction, beta=0.3)
    exact = reference_divergence_fp64(student.detach(), teacher, direction)
    assert 0 < exact < 1e-6
    assert abs(fused.double() - exact) < 0.1 * exact


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_fused_divergence_of_confident_logits_equals_the_plain_path(direction):
    """Logits of standard deviation 30: most probabilities underflow (the finite forms floor their
    exponents at e^-86, where exp turns subnormal); value and gradient equal the log_softmax path's in
    fp64 (rows spread far beyond the floor, the classes below it weigh nothing)."""
    g = torch.Generator().manual_seed(10)
    student, teacher = 30 * torch.randn(2, 64, 50, generator=g)
    assert (student - student.amax(-1, keepdim=True) < -87).float().mean() > 0.25
    x = student.clone().requires_grad_()
    fused = kl_divergence(x, teacher, direction=direction, beta=0.3)
    (fused_grad,) = torch.autograd.grad(fused, x)
    y = student.double().requires_grad_()
    plain = kl_divergence(y, teacher.double().requires_grad_(), direction=direction, beta=0.3)
    (plain_grad,) = torch.autograd.grad(plain, y)
    torch.testing.assert_close(fused.double(), plain.detach(), rtol=1e-6, atol=0)
    atol = 1e-5 * plain_grad.abs().max().item()  # fp32 against fp64: the log_softmax path errs as much
    torch.testing.assert_close(fused_grad.double(), plain_grad, rtol=1e-5, atol=atol)
