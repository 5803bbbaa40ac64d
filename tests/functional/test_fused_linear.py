"""Fused linear cross-entropy / distillation against the unfused path (``F.linear`` + the loss on the
whole logits) and against ``NLLLoss`` / ``KLDivergenceLoss`` for the modules.

Tolerances are relative to the largest entry of the reference (``atol = rtol · max|ref|``): fused and
unfused sum the same terms in a different order, so a near-zero entry of a gradient can differ by the
rounding of its large neighbours.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_losses import LossModule
from lightning_losses.examples.causal_lm import TinyCausalLM
from lightning_losses.functional.distillation import distillation_loss, kl_divergence
from lightning_losses.functional.fused_linear import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_distillation,
)
from lightning_losses.losses.distillation import KLDivergenceLoss
from lightning_losses.losses.fused_linear import FusedLinearCrossEntropyLoss, FusedLinearDistillationLoss
from lightning_losses.losses.nll import NLLLoss
from lightning_losses.registry import build_loss
from tests.functional.test_distillation import reference_divergence_fp64
from tests.helpers import no_host_to_device, quiet_trainer

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close_rel(actual, expected, rtol, msg=""):
    expected = expected.to(actual.dtype)
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def value_and_grads(fn, tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return [loss.detach(), *(t.grad.clone() for t in tensors)]


def reference_ce(
    hidden, weight, target, mask=None, global_valid_toks=None, bias=None, ignore_index=-100, ls=0.0
):
    """Plain torch on the whole logits: per-row F.cross_entropy, weighted by the mask, / the count."""
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    flat_target = target.reshape(-1)
    per_row = F.cross_entropy(
        logits, flat_target, ignore_index=ignore_index, label_smoothing=ls, reduction="none"
    )
    weights = torch.ones_like(per_row) if mask is None else mask.reshape(-1).to(per_row.dtype)
    weights = weights * (flat_target != ignore_index)
    count = weights.sum() if global_valid_toks is None else global_valid_toks
    return (per_row * weights).sum() / count


def make_ce_inputs(dtype, seed, rows=(37,), hidden=8, vocab=19, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) / 2).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, rows, generator=g)
    mask = torch.rand(rows, generator=g) > 0.25
    target[~mask] = -100  # padding ids under the mask, as a data collator writes them
    target.view(-1)[1] = -100  # and one ignored target inside the mask
    mask.view(-1)[1] = True
    return h, w, b, target, mask


CE_CASES = [
    {"chunk_size": 5},  # 37 rows: chunks of 5 do not divide N
    {"chunk_size": 64},  # N < chunk: one chunk
    {"chunk_size": 1, "bias": False},
    {"chunk_size": 8, "ls": 0.1},
    {"chunk_size": 6, "float_mask": True, "global": 40.5},
    {"chunk_size": 4, "rows": (3, 7)},  # [B, T, H] hidden states
    {"chunk_size": None, "no_mask": True},  # the default chunk size
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CE_CASES, ids=str)
def test_cross_entropy_matches_unfused(dtype, case):
    h, w, b, target, mask = make_ce_inputs(
        dtype, 0, rows=case.get("rows", (37,)), bias=case.get("bias", True)
    )
    if case.get("float_mask"):
        mask = mask * torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))
    if case.get("no_mask"):
        mask, target = None, target.clamp(min=0)
    count = None if "global" not in case else torch.tensor(case["global"])
    ls = case.get("ls", 0.0)
    tensors = [t for t in (h, w, b) if t is not None]
    fused = value_and_grads(
        lambda: fused_linear_cross_entropy(
            h, w, target, mask, count, bias=b, label_smoothing=ls, chunk_size=case["chunk_size"]
        ),
        tensors,
    )
    unfused = value_and_grads(lambda: reference_ce(h, w, target, mask, count, bias=b, ls=ls), tensors)
    for name, a, e in zip(["loss", "hidden", "weight", "bias"], fused, unfused, strict=False):
        assert a.dtype == dtype
        assert_close_rel(a, e, RTOL[dtype], msg=f"{name} {case}")


def test_cross_entropy_matches_library_cross_entropy():
    from lightning_losses.functional.cross_entropy import cross_entropy

    h, w, b, target, mask = make_ce_inputs(torch.float64, 3, rows=(4, 6))
    fused = fused_linear_cross_entropy(h, w, target, mask, bias=b, label_smoothing=0.2, chunk_size=5)
    unfused = cross_entropy(F.linear(h, w, b), target, mask, label_smoothing=0.2)
    assert_close_rel(fused, unfused, 1e-12)


def test_hand_computed_case():
    # logits [[0, log 3]] and [[log 3, 0]]: p(target) = 3/4 and 1/4
    hidden = torch.tensor([[1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3)]], dtype=torch.float64, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 1]), chunk_size=1)
    assert math.isclose(loss.item(), -(math.log(0.75) + math.log(0.25)) / 2, rel_tol=1e-14)
    loss.backward()
    # ∂/∂z = (p − onehot)/2 = [[1/8, −1/8], [3/8, −3/8]]; ∂/∂h = ∂z · W; ∂/∂W = ∂zᵀ · h
    torch.testing.assert_close(
        hidden.grad, torch.tensor([[-math.log(3) / 8], [-3 * math.log(3) / 8]]).double()
    )
    torch.testing.assert_close(weight.grad, torch.tensor([[1 / 8 - 3 / 8], [-1 / 8 + 3 / 8]]).double())


def test_gradcheck_cross_entropy():
    h, w, b, target, mask = make_ce_inputs(torch.float64, 2, rows=(5,), hidden=3, vocab=4)
    weights = mask * torch.rand(5, dtype=torch.float64)

    def fn(h, w, b):
        return fused_linear_cross_entropy(h, w, target, weights, bias=b, label_smoothing=0.1, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7)


def test_all_masked_is_exactly_zero():
    h, w, b, target, _ = make_ce_inputs(torch.float32, 0)
    ht, wt = torch.randn(37, 5), torch.randn(19, 5)
    all_ignored = torch.full_like(target, -100)
    masked_out = torch.zeros(37, dtype=torch.bool)
    for make in (
        lambda: fused_linear_cross_entropy(h, w, target, masked_out, bias=b, chunk_size=8),
        lambda: fused_linear_cross_entropy(h, w, all_ignored, torch.ones(37), bias=b, chunk_size=8),
        lambda: (
            fused_linear_distillation(h, w, ht, wt, target, masked_out, student_bias=b, chunk_size=8).loss
        ),
        lambda: (
            fused_linear_distillation(h, w, ht, wt, all_ignored, student_bias=b, direction="reverse").loss
        ),
        lambda: (
            fused_linear_distillation(
                h, w, ht, wt, None, torch.zeros(37), student_bias=b, direction="jsd"
            ).loss
        ),
    ):
        loss, *grads = value_and_grads(make, [h, w, b])
        assert loss.item() == 0.0
        for grad in grads:
            assert torch.count_nonzero(grad) == 0


def test_micro_batches_with_one_global_count_add_up():
    h, w, b, target, mask = make_ce_inputs(torch.float64, 4, rows=(40,))
    ht, wt = torch.randn(40, 5, dtype=torch.float64), torch.randn(19, 5, dtype=torch.float64)
    count = (mask & (target != -100)).sum()
    for fn in (
        lambda rows, c: fused_linear_cross_entropy(
            h[rows], w, target[rows], mask[rows], c, bias=b, chunk_size=7
        ),
        lambda rows, c: (
            fused_linear_distillation(
                h[rows], w, ht[rows], wt, target[rows], mask[rows], c, student_bias=b, direction="reverse"
            ).loss
        ),
    ):
        full = value_and_grads(lambda fn=fn: fn(slice(None), None), [h, w, b])
        parts = [
            value_and_grads(lambda s=s, fn=fn: fn(s, count), [h, w, b]) for s in (slice(0, 13), slice(13, 40))
        ]
        for index, whole in enumerate(full):
            assert_close_rel(parts[0][index] + parts[1][index], whole, 1e-12)


def test_bf16_inputs_compute_in_fp32():
    h, w, b, target, mask = make_ce_inputs(torch.float32, 5)
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    loss16 = fused_linear_cross_entropy(h16, w16, target, mask, bias=b16, chunk_size=8)
    assert loss16.dtype == torch.float32
    loss16.backward()
    assert h16.grad.dtype == w16.grad.dtype == b16.grad.dtype == torch.bfloat16
    # the same bf16 values in fp32: only the gradients' final rounding to bf16 differs
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h16, w16, b16))
    loss32 = reference_ce(h32, w32, target, mask, bias=b32)
    loss32.backward()
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-5)
    for low, high in ((h16, h32), (w16, w32), (b16, b32)):
        torch.testing.assert_close(low.grad.float(), high.grad, rtol=1e-2, atol=1e-3)
    # and within bf16's tolerance of the fp32 inputs' loss
    torch.testing.assert_close(loss16, reference_ce(h, w, target, mask, bias=b), rtol=2e-2, atol=2e-2)


def test_frozen_weight_no_grad_and_second_backward():
    h, w, b, target, mask = make_ce_inputs(torch.float64, 6)
    w.requires_grad_(False)
    loss = fused_linear_cross_entropy(h, w, target, mask, bias=b, chunk_size=5)
    loss.backward(retain_graph=True)
    loss.backward()  # the stored gradients are not consumed: twice the gradient
    expected = value_and_grads(lambda: reference_ce(h, w, target, mask, bias=b), [h, b])
    h.grad, b.grad = None, None
    fused_linear_cross_entropy(h, w, target, mask, bias=b, chunk_size=5).backward()
    assert_close_rel(h.grad, expected[1], 1e-12)
    assert w.grad is None
    with torch.no_grad():
        assert_close_rel(fused_linear_cross_entropy(h, w, target, mask, bias=b), expected[0], 1e-12)


def ids(*shape):
    return torch.zeros(*shape, dtype=torch.long)


randn = torch.randn
ce, distill = fused_linear_cross_entropy, fused_linear_distillation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ce(randn(4, 8), randn(5, 7), ids(4)),
         r"`weight` must have shape \[V, 8\].*\(5, 7\).*`hidden` of shape \(4, 8\)"),
        (lambda: ce(randn(4, 8), randn(5, 8), ids(3)), r"`target` must have shape \(4,\).*got \(3,\)"),
        (lambda: ce(randn(4, 8), randn(5, 8), ids(4), randn(4, 1)),
         r"`mask` must have shape \(4,\).*\(4, 1\)"),
        (lambda: ce(randn(4, 8), randn(5, 8), ids(4), bias=randn(6)),
         r"`bias` must have shape \(5,\).*\(5, 8\).*got \(6,\)"),
        (lambda: ce(randn(8), randn(5, 8), ids(4)), r"`hidden` must have 2 or 3 dimensions.*\(8,\)"),
        (lambda: ce(randn(4, 8), randn(5, 8), torch.tensor([0, 1, 5, 2])),
         r"`target` must lie in \[0, 5\).*\[0, 5\]"),
        (lambda: ce(randn(4, 8), randn(5, 8), ids(4), chunk_size=0),
         r"`chunk_size` must be a positive integer"),
        (lambda: ce(randn(4, 8), randn(5, 8), ids(4), label_smoothing=1.5),
         r"`label_smoothing` must be in \[0, 1\]"),
        (lambda: distill(randn(4, 8), randn(5, 8), randn(3, 6), randn(5, 6)),
         r"`teacher_hidden` and `student_hidden` must hold the same rows.*\(3, 6\) and \(4, 8\)"),
        (lambda: distill(randn(4, 8), randn(5, 8), randn(4, 6), randn(7, 6)),
         r"same vocabulary.*\(7, 6\) and \(5, 8\)"),
        (lambda: distill(randn(4, 8), randn(5, 8), randn(4, 6), randn(5, 8)),
         r"`teacher_weight` must have shape \[V, 6\].*\(5, 8\)"),
        (lambda: distill(randn(4, 8), randn(5, 8), randn(4, 6), randn(5, 6), direction="kl"),
         r"`direction` must be"),
        (lambda: FusedLinearCrossEntropyLoss()(randn(2, 5, 8), randn(9, 8), ids(2, 4)),
         r"`input_ids` must have shape \(2, 5\).*got \(2, 4\)"),
        (lambda: FusedLinearCrossEntropyLoss()(randn(10, 8), randn(9, 8), ids(10)),
         r"`hidden_states` must have 3 dimensions.*\(10, 8\)"),
    ],
)  # fmt: skip
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_default_chunk_size_bounds_the_chunk_logits():
    assert default_chunk_size(32768) == 1024
    assert default_chunk_size(7) * 7 <= 2**25 < (default_chunk_size(7) + 1) * 7
    assert default_chunk_size(2**30) == 1


# ----------------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------------


def make_distillation_inputs(dtype, seed, rows=(29,), vocab=17):
    h, w, b, target, mask = make_ce_inputs(dtype, seed, rows=rows, vocab=vocab)
    g = torch.Generator().manual_seed(seed + 100)
    ht = torch.randn(*rows, 5, generator=g, dtype=dtype)
    wt = torch.randn(vocab, 5, generator=g, dtype=dtype)
    bt = torch.randn(vocab, generator=g, dtype=dtype)
    return h, w, b, ht, wt, bt, target, mask


DISTILL_CASES = [
    {"direction": "forward", "temperature": 1.0, "target": False},
    {"direction": "forward", "temperature": 2.0, "target": True, "alpha": 0.3},
    {"direction": "forward", "temperature": 1.0, "target": True, "alpha": 0.6},  # softmax(z) = q
    {"direction": "forward", "temperature": 0.5, "target": True, "alpha": 0.0, "global": 33.0},
    {"direction": "reverse", "temperature": 1.0, "target": True, "alpha": 0.5},
    {"direction": "reverse", "temperature": 3.0, "target": False},
    {"direction": "jsd", "temperature": 1.0, "target": True, "beta": 0.2, "alpha": 0.0},
    {"direction": "jsd", "temperature": 2.0, "target": False, "beta": 0.5, "global": 31.0},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", DISTILL_CASES, ids=str)
def test_distillation_matches_unfused(dtype, case):
    h, w, b, ht, wt, bt, target, mask = make_distillation_inputs(
        dtype, 7, rows=(3, 10) if case["target"] else (29,)
    )
    target = target if case["target"] else None
    count = None if "global" not in case else torch.tensor(case["global"])
    options = {k: case[k] for k in ("temperature", "direction", "beta", "alpha") if k in case}
    fused_terms = fused_linear_distillation(
        h, w, ht, wt, target, mask, count, student_bias=b, teacher_bias=bt, chunk_size=4, **options
    )
    unfused_terms = distillation_loss(F.linear(h, w, b), F.linear(ht, wt, bt), target, mask, count, **options)
    assert_close_rel(fused_terms.kl_loss, unfused_terms.kl_loss, RTOL[dtype])
    if target is None:
        assert fused_terms.task_loss is None
    else:
        assert_close_rel(fused_terms.task_loss, unfused_terms.task_loss, RTOL[dtype])
    fused = value_and_grads(lambda: fused_terms.loss, [h, w, b])
    unfused = value_and_grads(lambda: unfused_terms.loss, [h, w, b])
    for name, a, e in zip(["loss", "hidden", "weight", "bias"], fused, unfused, strict=True):
        assert_close_rel(a, e, RTOL[dtype], msg=f"{name} {case}")


@pytest.mark.parametrize("vocab", [17, 300], ids=["bmm-row-dots", "wide"])
def test_distillation_equals_kl_divergence_without_target(vocab):
    h, w, _, ht, wt, _, _, mask = make_distillation_inputs(torch.float64, 8, vocab=vocab)
    for direction in ("forward", "reverse", "jsd"):
        fused = fused_linear_distillation(
            h, w, ht, wt, mask=mask, temperature=1.5, direction=direction, beta=0.7
        )
        unfused = kl_divergence(h @ w.T, ht @ wt.T, mask, temperature=1.5, direction=direction, beta=0.7)
        assert_close_rel(fused.loss, 1.5**2 * unfused, 1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_gradcheck_distillation(direction):
    h, w, b, ht, wt, bt, target, mask = make_distillation_inputs(torch.float64, 9, rows=(5,), vocab=4)

    def fn(h, w, b):
        return fused_linear_distillation(
            h,
            w,
            ht,
            wt,
            target,
            mask,
            student_bias=b,
            teacher_bias=bt,
            temperature=2.0,
            alpha=0.4,
            direction=direction,
            beta=0.3,
            chunk_size=2,
        ).loss

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7)


def test_padded_vocabulary_is_exact_and_nan_free():
    """Classes with a -inf bias in both heads (a vocabulary padded to a round size) have p = q = 0."""
    h, w, b, ht, wt, bt, target, mask = make_distillation_inputs(torch.float64, 10)
    target = target.clamp(max=13)
    with torch.no_grad():
        b[14:] = -math.inf
        bt[14:] = -math.inf
    for direction in ("forward", "reverse", "jsd"):
        kw = {"temperature": 2.0, "direction": direction, "alpha": 0.5}
        fused = value_and_grads(
            lambda kw=kw: (
                fused_linear_distillation(
                    h, w, ht, wt, target, mask, student_bias=b, teacher_bias=bt, chunk_size=6, **kw
                ).loss
            ),
            [h, w, b],
        )
        unfused = value_and_grads(
            lambda kw=kw: distillation_loss(F.linear(h, w, b), F.linear(ht, wt, bt), target, mask, **kw).loss,
            [h, w, b],
        )
        for a, e in zip(fused, unfused, strict=True):
            assert torch.isfinite(a).all()
            assert_close_rel(a, e, 1e-12)
    ce = value_and_grads(
        lambda: fused_linear_cross_entropy(h, w, target, mask, bias=b, chunk_size=6), [h, w, b]
    )
    assert all(torch.isfinite(t).all() for t in ce)
    assert_close_rel(ce[0], reference_ce(h, w, target, mask, bias=b), 1e-12)


def test_forward_kl_is_infinite_where_only_the_student_rules_a_class_out():
    h, w, b, ht, wt, bt, _, _ = make_distillation_inputs(torch.float64, 11)
    with torch.no_grad():
        b[0] = -math.inf
    fused = fused_linear_distillation(h, w, ht, wt, student_bias=b, teacher_bias=bt)
    unfused = kl_divergence(F.linear(h, w, b), F.linear(ht, wt, bt))
    assert fused.loss.item() == unfused.item() == math.inf


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_distillation_chunks_take_the_finite_form_until_one_is_not_finite(dtype, direction, monkeypatch):
    """Chunks of 4 rows: the finite form runs until chunk 2, whose row 9 has logits ±0.9·max (the
    teacher's; for reverse KL the student's: the side whose zero probability the KL's first argument
    multiplies). Their centred difference overflows there, not in log_softmax; that chunk, its logits
    computed again, and every later one take the guarded form. Value, terms and gradients equal the
    unfused path's."""
    fused_linear = importlib.import_module("lightning_losses.functional.fused_linear")
    calls = []

    def spy(form):
        original = getattr(fused_linear, form)

        def called(*args):
            calls.append(form)
            return original(*args)

        return called

    for form in ("_finite_distillation_chunk", "_distillation_chunk"):
        monkeypatch.setattr(fused_linear, form, spy(form))
    h, w, b, ht, wt, bt, target, mask = make_distillation_inputs(dtype, 14)
    huge = 0.9 * torch.finfo(dtype).max
    hidden, weight, bias = (h, w, b) if direction == "reverse" else (ht, wt, bt)
    with torch.no_grad():
        hidden[9], weight[:, 0], bias[:2] = 0.0, 0.0, 0.0
        hidden[9, 0], weight[0, 0], weight[1, 0] = huge, 1.0, -1.0
    target[9], mask[9] = 0, True
    options = {"temperature": 1.0, "alpha": 0.4, "direction": direction, "beta": 0.3}
    fused_terms = fused_linear_distillation(
        h, w, ht, wt, target, mask, student_bias=b, teacher_bias=bt, chunk_size=4, **options
    )
    assert calls == ["_finite_distillation_chunk"] * 3 + ["_distillation_chunk"] * 6
    unfused_terms = distillation_loss(F.linear(h, w, b), F.linear(ht, wt, bt), target, mask, **options)
    assert_close_rel(fused_terms.kl_loss, unfused_terms.kl_loss, RTOL[dtype])
    assert_close_rel(fused_terms.task_loss, unfused_terms.task_loss, RTOL[dtype])
    fused = value_and_grads(lambda: fused_terms.loss, [h, w, b])
    unfused = value_and_grads(lambda: unfused_terms.loss, [h, w, b])
    for name, a, e in zip(["loss", "hidden", "weight", "bias"], fused, unfused, strict=True):
        assert torch.isfinite(a).all(), name
        assert_close_rel(a, e, RTOL[dtype], msg=name)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_divergence_is_exact_for_a_nearby_or_shifted_student(offset, direction):
    """The student's head is the teacher's (bias + offset: the same distribution) plus noise, so the
    divergence is ~1e-7 (JSD ~2e-8), at fp32's limit: against fp64 on the same fp32 logits, the finite
    forms' centred logits err no more than the log_softmax path (here 0.3-9e-9 against 6-10e-9;
    subtracting the uncentred logits errs by 3.4e-8 at offset 100)."""
    g = torch.Generator().manual_seed(15)
    ht, wt = torch.randn(256, 32, generator=g), torch.randn(1000, 32, generator=g)
    bt = torch.randn(1000, generator=g)
    h = ht + 1e-4 * torch.randn(256, 32, generator=g)
    options = {"temperature": 1.0, "direction": direction, "beta": 0.3}
    fused = fused_linear_distillation(h, wt, ht, wt, student_bias=bt + offset, teacher_bias=bt, **options)
    logits, teacher_logits = F.linear(h, wt, bt + offset), F.linear(ht, wt, bt)  # the chunk's, in fp32
    exact = reference_divergence_fp64(logits, teacher_logits, direction)
    log_softmax_path = kl_divergence(logits, teacher_logits.requires_grad_(), **options)  # teacher grad
    assert 0 < exact < 1e-5
    error, log_softmax_error = (abs(x.double() - exact) for x in (fused.kl_loss, log_softmax_path))
    assert error <= 2 * log_softmax_error + 5e-9


def test_teacher_gets_no_gradient():
    h, w, b, ht, wt, bt, target, mask = make_distillation_inputs(torch.float32, 12)
    ht.requires_grad_(), wt.requires_grad_(), bt.requires_grad_()
    fused_linear_distillation(h, w, ht, wt, target, mask, student_bias=b, teacher_bias=bt).loss.backward()
    assert ht.grad is None and wt.grad is None and bt.grad is None
    assert h.grad is not None and torch.count_nonzero(w.grad) > 0


@pytest.mark.slow
def test_compiled_chunks_match_eager():
    h, w, b, ht, wt, _, target, mask = make_distillation_inputs(torch.float32, 13)
    for compiled_fn, eager_fn in (
        (
            lambda: fused_linear_cross_entropy(h, w, target, mask, bias=b, chunk_size=8, compile=True),
            lambda: fused_linear_cross_entropy(h, w, target, mask, bias=b, chunk_size=8),
        ),
        (
            lambda: (
                fused_linear_distillation(
                    h, w, ht, wt, target, mask, student_bias=b, chunk_size=8, direction="jsd", compile=True
                ).loss
            ),
            lambda: (
                fused_linear_distillation(
                    h, w, ht, wt, target, mask, student_bias=b, chunk_size=8, direction="jsd"
                ).loss
            ),
        ),
    ):
        for a, e in zip(
            value_and_grads(compiled_fn, [h, w, b]), value_and_grads(eager_fn, [h, w, b]), strict=True
        ):
            assert_close_rel(a, e, 1e-5)


# ----------------------------------------------------------------------------------------------------
# the modules
# ----------------------------------------------------------------------------------------------------


def make_lm_batch(dtype=torch.float64, seed=14, batch=3, steps=7, hidden=6, vocab=13):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, steps, hidden, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    ids = torch.randint(0, vocab, (batch, steps), generator=g)
    mask = torch.rand(batch, steps, generator=g) > 0.3
    ids[~mask] = -100
    return h, w, ids, mask


@pytest.mark.parametrize("shift", [True, False])
def test_cross_entropy_module_equals_nll_on_materialized_logits(shift):
    h, w, ids, mask = make_lm_batch()
    for count in (None, torch.tensor(25)):
        fused_fn = FusedLinearCrossEntropyLoss(shift=shift, chunk_size=4)
        fused = value_and_grads(lambda f=fused_fn, c=count: f(h, w, ids, mask, c).loss, [h, w])
        unfused = value_and_grads(lambda c=count: NLLLoss(shift=shift)(h @ w.T, ids, mask, c).loss, [h, w])
        for a, e in zip(fused, unfused, strict=True):
            assert_close_rel(a, e, 1e-12)
        inputs = {"input_ids": ids, "token_mask": mask, "hidden_states": h}
        assert fused_fn.valid_tokens(inputs).sum() == NLLLoss(shift=shift).valid_tokens(inputs).sum()
    output = fused_fn(h, w, ids, mask)
    assert output.metrics["num_valid_tokens"] == NLLLoss(shift=shift).valid_tokens(inputs).sum()
    for value in output.metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_distillation_module_equals_kl_divergence_loss_on_shifted_logits():
    h, w, ids, mask = make_lm_batch(seed=15)
    g = torch.Generator().manual_seed(16)
    ht, wt = torch.randn(3, 7, 4, generator=g, dtype=torch.float64), torch.randn(13, 4, generator=g).double()
    options = {"temperature": 2.0, "alpha": 0.4, "direction": "reverse"}
    fused_fn = FusedLinearDistillationLoss(**options, chunk_size=5)
    fused = fused_fn(h, w, ht, wt, ids, mask)
    unfused = KLDivergenceLoss(**options)((h @ w.T)[:, :-1], (ht @ wt.T)[:, :-1], ids[:, 1:], mask[:, 1:])
    for key in ("loss", "kl_loss", "task_loss"):
        assert_close_rel(fused.metrics[key], unfused.metrics[key], 1e-12, msg=key)
    grads = [torch.autograd.grad(out.loss, [h, w]) for out in (fused, unfused)]
    for a, e in zip(*grads, strict=True):
        assert_close_rel(a, e, 1e-12)
    assert (
        fused.metrics["num_valid_tokens"]
        == fused_fn.valid_tokens({"hidden_states": h, "input_ids": ids, "token_mask": mask}).sum()
    )
    without_ids = fused_fn(h, w, ht, wt, token_mask=mask)
    assert without_ids.metrics["task_loss"] == 0
    assert_close_rel(without_ids.loss, without_ids.metrics["kl_loss"], 1e-15)


def test_registered_names():
    assert isinstance(build_loss("fused_linear_cross_entropy"), FusedLinearCrossEntropyLoss)
    assert isinstance(
        build_loss({"name": "fused_linear_distillation", "params": {"alpha": 0.0}}),
        FusedLinearDistillationLoss,
    )


def test_loss_module_step_equals_nll_on_logits():
    """One SGD step through LossModule: the fused loss on {hidden_states, lm_head_weight} moves every weight
    of TinyCausalLM exactly as NLLLoss on its logits does."""
    torch.manual_seed(0)
    fused_model = TinyCausalLM(
        vocab_size=11, d_model=16, num_layers=1, num_heads=2, max_len=8, return_logits=False
    )
    unfused_model = TinyCausalLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, max_len=8)
    unfused_model.load_state_dict(fused_model.state_dict())
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 8, generator=g) > 0.2
    batch = {"input_ids": torch.randint(1, 11, (4, 8), generator=g), "token_mask": mask}
    for model, loss in ((fused_model, FusedLinearCrossEntropyLoss(chunk_size=5)), (unfused_model, NLLLoss())):
        module = LossModule(model, loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        quiet_trainer(max_steps=1).fit(module, DataLoader([batch], batch_size=None))
    for (name, a), b in zip(
        fused_model.state_dict().items(), unfused_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(fused_model.lm_head.weight, TinyCausalLM(11, 16, 1, 2, 8).lm_head.weight)


def test_loss_module_runs_distillation_from_batch_teacher():
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, max_len=8, return_logits=False)
    teacher = TinyCausalLM(
        vocab_size=11, d_model=8, num_layers=1, num_heads=2, max_len=8, return_logits=False
    )
    ids = torch.randint(1, 11, (4, 8))
    with torch.no_grad():
        teacher_out = teacher(ids)
    batch = {
        "input_ids": ids,
        "token_mask": torch.ones(4, 8, dtype=torch.bool),
        "teacher_hidden_states": teacher_out["hidden_states"],
        "teacher_lm_head_weight": teacher_out["lm_head_weight"],
    }
    before = model.lm_head.weight.detach().clone()
    loss = FusedLinearDistillationLoss(temperature=1.0, alpha=0.5)
    module = LossModule(model, loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert {"train/loss", "train/kl_loss", "train/task_loss"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(model.lm_head.weight, before)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (
            {"lm_head_weight": torch.randn(6, 3)},
            ValueError,
            r"`lm_head_weight` must have shape \[V, 4\].*\(6, 3\)",
        ),
        (
            {"lm_head_weight": torch.ones(6, 4, dtype=torch.long)},
            TypeError,
            "`lm_head_weight` must be a floating",
        ),
        ({"lm_head_bias": torch.zeros(5)}, ValueError, r"`lm_head_bias` must have shape \(6,\).*got \(5,\)"),
        ({"input_ids": torch.zeros(2, 5)}, TypeError, r"`input_ids` must hold integer class indices"),
        ({"input_ids": torch.full((2, 5), 6)}, ValueError, r"`input_ids` must lie in \[0, 6\)"),
        ({"token_mask": torch.ones(2, 4)}, ValueError, r"`token_mask` must have shape \(2, 5\)"),
    ],
)
def test_module_errors_name_the_module_inputs(change, error, pattern):
    """The modules' errors name their own inputs (``lm_head_weight``, ``input_ids``), not the functional's."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 5, 4, generator=g),
        "lm_head_weight": torch.randn(6, 4, generator=g),
        "input_ids": torch.randint(0, 6, (2, 5), generator=g),
    }
    with pytest.raises(error, match=pattern):
        FusedLinearCrossEntropyLoss()(**(inputs | change))
    teacher = {"teacher_hidden_states": torch.randn(2, 5, 3), "teacher_lm_head_weight": torch.randn(6, 3)}
    with pytest.raises(error, match=pattern):
        FusedLinearDistillationLoss()(**(inputs | teacher | change))


def test_module_ids_never_scored_are_not_checked():
    """With ``shift`` the first id is never scored: any value there is fine, as in ``NLLLoss``."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.randint(0, 6, (2, 5), generator=g)
    padded = ids.clone()
    padded[:, 0] = -1
    torch.testing.assert_close(
        FusedLinearCrossEntropyLoss()(hidden, weight, padded).loss, NLLLoss()(hidden @ weight.T, ids).loss
    )
    with pytest.raises(ValueError, match=r"`teacher_hidden_states` must hold the tokens of `hidden_states`"):
        FusedLinearDistillationLoss()(hidden, weight, torch.randn(2, 4, 3), torch.randn(6, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_modules_make_no_host_read_off_the_cpu(direction, dtype):
    """Both modules on ``meta`` tensors (no data: a host read raises; so does CPU data moved to them, under
    ``no_host_to_device``), the chunked path an accelerator takes: forward, backward and metrics."""
    h, w, ids, mask = make_lm_batch(dtype=torch.float32)
    ht, wt = torch.randn(3, 7, 4), torch.randn(13, 4)
    cases = [
        (FusedLinearCrossEntropyLoss(chunk_size=4, label_smoothing=0.1), (h, w), (ids, mask)),
        (
            FusedLinearDistillationLoss(chunk_size=5, alpha=0.4, temperature=2.0, direction=direction),
            (h, w),
            (ht, wt, ids, mask),
        ),
    ]
    for loss_fn, (hidden, weight), rest in cases:
        leaves = [t.detach().to("meta", dtype).requires_grad_() for t in (hidden, weight)]
        on_meta = [t.to("meta", dtype) if t.is_floating_point() else t.to("meta") for t in rest]
        with no_host_to_device():
            output = loss_fn(*leaves, *on_meta)
            output.loss.backward()
        assert output.loss.is_meta and output.loss.dtype == torch.float32 and set(output.metrics) >= {"loss"}
        assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modules_on_cuda_match_cpu_without_host_sync(dtype):
    """Both modules on CUDA: forward, backward and metrics make no host-device sync, and give the CPU's
    fp32 loss and gradients (bf16 inputs within bf16 rounding)."""
    h, w, ids, mask = make_lm_batch(dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    ht, wt = torch.randn(3, 7, 4, generator=g), torch.randn(13, 4, generator=g)
    cases = [
        (FusedLinearCrossEntropyLoss(chunk_size=4, label_smoothing=0.1), (h, w), (ids, mask)),
        (FusedLinearDistillationLoss(chunk_size=5, alpha=0.4, temperature=2.0), (h, w), (ht, wt, ids, mask)),
    ]
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for loss_fn, (hidden, weight), rest in cases:
        expected = value_and_grads(lambda f=loss_fn, a=(hidden, weight, *rest): f(*a).loss, [hidden, weight])
        cuda_leaves = [t.detach().to("cuda", dtype).requires_grad_() for t in (hidden, weight)]
        cuda_rest = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in rest]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            output = loss_fn(*cuda_leaves, *cuda_rest)
            output.loss.backward()
            metrics = dict(output.metrics)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert output.loss.dtype == torch.float32 and set(metrics) >= {"loss"}
        actual = [output.loss.detach(), *(t.grad for t in cuda_leaves)]
        for a, e in zip(actual, expected, strict=True):
            assert_close_rel(a.float().cpu(), e, rtol, msg=type(loss_fn).__name__)


def test_cross_entropy_of_confident_logits_equals_unfused():
    """Logits of standard deviation 30: most exponentials underflow (floored at e^-86.3 in the chunks,
    where exp turns subnormal); value and gradients equal the fp64 unfused path's."""
    g = torch.Generator().manual_seed(16)
    h, w = torch.randn(40, 8, generator=g), 10 * torch.randn(300, 8, generator=g)
    target = torch.randint(0, 300, (40,), generator=g)
    logits = F.linear(h, w)
    assert (logits - logits.amax(-1, keepdim=True) < -87).float().mean() > 0.25
    h, w = h.requires_grad_(), w.requires_grad_()
    fused = value_and_grads(lambda: fused_linear_cross_entropy(h, w, target, chunk_size=16), [h, w])
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference = value_and_grads(lambda: reference_ce(hd, wd, target), [hd, wd])
    for name, a, e in zip(["loss", "hidden", "weight"], fused, reference, strict=True):
        assert_close_rel(a.double(), e, 1e-5, msg=name)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_distillation_of_confident_logits_equals_unfused(direction):
    """The student's logits of standard deviation ~30, with a target: the divergence's and the CE term's
    exponents floored in the finite chunks; terms and gradients equal the fp64 unfused path's."""
    g = torch.Generator().manual_seed(17)
    h, w = torch.randn(40, 8, generator=g), 10 * torch.randn(300, 8, generator=g)
    ht, wt = torch.randn(40, 5, generator=g), torch.randn(300, 5, generator=g)
    target = torch.randint(0, 300, (40,), generator=g)
    logits = F.linear(h, w)
    assert (logits - logits.amax(-1, keepdim=True) < -87).float().mean() > 0.25
    h, w = h.requires_grad_(), w.requires_grad_()
    options = {"temperature": 1.0, "alpha": 0.4, "direction": direction, "beta": 0.3}
    fused = fused_linear_distillation(h, w, ht, wt, target, chunk_size=16, **options)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    unfused = distillation_loss(F.linear(hd, wd), F.linear(ht.double(), wt.double()), target, **options)
    assert_close_rel(fused.kl_loss.double(), unfused.kl_loss, 1e-5)
    assert_close_rel(fused.task_loss.double(), unfused.task_loss, 1e-5)
    fused_grads = value_and_grads(lambda: fused.loss, [h, w])
    unfused_grads = value_and_grads(lambda: unfused.loss, [hd, wd])
    for name, a, e in zip(["loss", "hidden", "weight"], fused_grads, unfused_grads, strict=True):
        assert_close_rel(a.double(), e, 1e-5, msg=name)
