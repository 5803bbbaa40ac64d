"""The core losses under ``torch.compile(fullgraph=True)``: no graph break, and the compiled loss, metrics
and input gradients equal eager ones.

``torch._dynamo.explain`` traces without compiling (cheap), so every option combination is checked for
graph breaks; the inductor compile (a C++ build per loss on CPU, seconds each) runs for one case per
loss, and for the other combinations only in the ``slow`` run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_losses.losses.contrastive import ContrastiveLoss
from lightning_losses.losses.cross_entropy import CrossEntropyLoss
from lightning_losses.losses.distillation import KLDivergenceLoss
from lightning_losses.losses.focal import FocalLoss
from lightning_losses.losses.nll import NLLLoss
from lightning_losses.losses.policy_gradient import ClippedPGLoss

B, T, V, N = 2, 5, 7, 8

Case = Callable[[torch.Generator], tuple[nn.Module, dict[str, Any]]]


def _logits(g: torch.Generator, *shape: int) -> Tensor:
    return (torch.randn(*shape, generator=g) * 2).requires_grad_()


def _targets(g: torch.Generator, *shape: int, ignored: bool = False) -> Tensor:
    target = torch.randint(0, V, shape, generator=g)
    if ignored:
        target.view(-1)[0] = -100
    return target


def _mask(g: torch.Generator) -> Tensor:
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 1] = True  # at least one valid token per row (the shifted PG losses score [:, 1:])
    return mask


def _pg_inputs(g: torch.Generator, **extra: Any) -> dict[str, Any]:
    return {
        "next_token_logits": _logits(g, B, T, V),
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "advantages": torch.randn(B, T, generator=g),
        "prev_logprobs": -torch.rand(B, T, generator=g),
        **extra,
    }


CASES: dict[str, Case] = {
    # the four core losses, each in a common configuration (compiled with inductor in the fast run)
    "cross_entropy": lambda g: (CrossEntropyLoss(), {"logits": _logits(g, N, V), "target": _targets(g, N)}),
    "focal": lambda g: (FocalLoss(gamma=2.0), {"logits": _logits(g, N, V), "target": _targets(g, N)}),
    "kl_divergence": lambda g: (
        KLDivergenceLoss(temperature=2.0, alpha=0.7),
        {
            "logits": _logits(g, N, V),
            "teacher_logits": torch.randn(N, V, generator=g),
            "target": _targets(g, N),
        },
    ),
    "clipped_pg": lambda g: (
        ClippedPGLoss(kl_beta=0.1),
        _pg_inputs(
            g,
            reference_logprobs=-torch.rand(B, T, generator=g),
            token_mask=_mask(g),
            global_valid_toks=torch.tensor(7.0),
        ),
    ),
    # other options: masks, ignore_index, [B, T, V] logits, global counts, the other modes and directions
    "cross_entropy_masked_3d": lambda g: (
        CrossEntropyLoss(label_smoothing=0.1),
        {
            "logits": _logits(g, B, T, V),
            "target": _targets(g, B, T, ignored=True),
            "mask": _mask(g),
            "global_valid_toks": torch.tensor(6.0),
        },
    ),
    "focal_masked_3d_alpha": lambda g: (
        FocalLoss(gamma=0.5, alpha=0.25),
        {"logits": _logits(g, B, T, V), "target": _targets(g, B, T, ignored=True), "mask": _mask(g)},
    ),
    "focal_binary": lambda g: (
        FocalLoss(mode="binary", alpha=0.25),
        {"logits": _logits(g, N), "target": (torch.rand(N, generator=g) > 0.5).float()},
    ),
    "focal_multilabel_soft": lambda g: (
        FocalLoss(mode="multilabel", gamma=1.5),
        {"logits": _logits(g, N, V), "target": torch.rand(N, V, generator=g)},
    ),
    "kl_reverse_masked_3d": lambda g: (
        KLDivergenceLoss(direction="reverse"),
        {
            "logits": _logits(g, B, T, V),
            "teacher_logits": torch.randn(B, T, V, generator=g),
            "target": _targets(g, B, T, ignored=True),
            "mask": _mask(g),
            "global_valid_toks": torch.tensor(6.0),
        },
    ),
    "kl_jsd_no_target": lambda g: (
        KLDivergenceLoss(direction="jsd", beta=0.3),
        {"logits": _logits(g, N, V), "teacher_logits": torch.randn(N, V, generator=g)},
    ),
    "clipped_pg_sequence_dual_clip": lambda g: (
        ClippedPGLoss(
            aggregation="sequence", ratio_clip_c=3.0, kl_beta=0.1, kl_type="k2", kl_output_clamp=10.0
        ),
        _pg_inputs(
            g,
            reference_logprobs=-torch.rand(B, T, generator=g),
            token_mask=_mask(g),
            sample_mask=torch.tensor([1.0, 0.0]),
            global_valid_seqs=torch.tensor(1.0),
        ),
    ),
    "clipped_pg_local_mean": lambda g: (ClippedPGLoss(), _pg_inputs(g)),
    # eager runs the fused function, compile the whole-matrix ops: the two must agree
    "contrastive": lambda g: (
        ContrastiveLoss(margin=2.0, negative_weight=0.7),
        {"embeddings": _logits(g, N, V), "target": torch.randint(0, 3, (N,), generator=g)},
    ),
    "nll": lambda g: (
        NLLLoss(),
        {"next_token_logits": _logits(g, B, T, V), "input_ids": _targets(g, B, T), "token_mask": _mask(g)},
    ),
}
CORE = ("cross_entropy", "focal", "kl_divergence", "clipped_pg")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no cache or recompile count carried from one test to the next
    yield
    torch._dynamo.reset()


def _case(name: str) -> tuple[nn.Module, dict[str, Any]]:
    return CASES[name](torch.Generator().manual_seed(0))


def _run(fn: Callable[..., Any], inputs: dict[str, Any]) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The loss and metrics, and the gradients of the loss with respect to the inputs that require them."""
    inputs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    loss, metrics = fn(**inputs)
    leaves = [v for v in inputs.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    return {"__loss__": loss.detach(), **metrics}, list(grads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_graph_break(name):
    loss_fn, inputs = _case(name)
    explanation = torch._dynamo.explain(loss_fn)(**inputs)
    reasons = [
        f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in explanation.break_reasons
    ]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def _check_compiled_equals_eager(name: str) -> None:
    loss_fn, inputs = _case(name)
    eager_values, eager_grads = _run(loss_fn, inputs)
    compiled_values, compiled_grads = _run(torch.compile(loss_fn, fullgraph=True), inputs)
    assert compiled_values.keys() == eager_values.keys()
    for key, value in eager_values.items():
        torch.testing.assert_close(compiled_values[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert len(eager_grads) >= 1
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        assert eager.abs().sum() > 0  # a gradient that is there to compare
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CORE)
def test_compiled_equals_eager(name):
    _check_compiled_equals_eager(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - set(CORE)))
def test_compiled_equals_eager_other_options(name):
    _check_compiled_equals_eager(name)


def test_compiled_loss_still_refuses_bad_shapes():
    """Shape checks are plain Python on static shapes, so they run while tracing. Without ``fullgraph``
    the ``ValueError`` comes out as in eager mode; with it, torch wraps it in its own ``Unsupported``
    error (a ``RuntimeError``) that still carries the message."""
    logits, bad_target = torch.randn(N, V), torch.zeros(N + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="`target` must have shape"):
        torch.compile(CrossEntropyLoss())(logits, bad_target)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="`target` must have shape"):
        torch.compile(CrossEntropyLoss(), fullgraph=True)(logits, bad_target)
