"""Bad input never passes silently: a table of bad inputs for every registered loss.

Every case ends in one of four outcomes, checked by :func:`test_bad_input`:

- ``Raises``: a ``ValueError`` / ``TypeError`` whose message names the argument *and* the shape, dtype
  or values seen (``match=`` asserts both);
- ``ZERO``: exactly 0 with a zero gradient into every floating input and parameter (all-masked input,
  all targets ``ignore_index``, an empty batch: "no valid element gives exactly 0");
- ``NONFINITE``: a NaN or ``+inf`` in an element that counts gives a non-finite loss (see below);
- ``Finite``: a documented finite result with finite gradients (``-inf`` logits ruling a class out,
  out-of-range ids at masked positions, ``ignore_index`` targets), equal to a value when one is given.

Non-finite inputs (the policy the losses follow, and that this table pins down): losses do not read
tensor values to look for NaN/inf (on an accelerator that would be a host-device sync per step, and
``-inf`` logits are legitimate: a padded or ruled-out vocabulary entry). So

- a NaN in an element that counts propagates: the loss is NaN (``+inf`` inputs give NaN or ``+inf``),
  never an exception and never a finite number that hides it; ``LossModule``'s ``nan_policy``
  (default ``"raise"``) stops such a step, checked at the end of this file;
- an element that does not count (masked out, ``ignore_index``, a sequence of a masked-out sample, an
  absent task) never reaches the loss or its gradient, NaN or inf included (the property suite checks
  that masked values have no effect at all);
- a ``-inf`` logit rules its class out: the loss stays finite, with finite gradients, unless that class
  is the target (then ``+inf``: the probability of the target is 0).

Cases that fail in files another helper owns right now are marked ``xfail(strict=True)`` with the fix
proposed in their reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_losses import losses as L
from lightning_losses.registry import available_losses, build_loss
from tests.reliability._stats import BAD_INPUT

pytestmark = pytest.mark.timeout(60)  # never a hang

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------------
# outcomes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    error: type[Exception] | tuple[type[Exception], ...]
    match: str


@dataclass(frozen=True)
class Finite:
    """A finite loss (equal to ``value`` when given) with finite gradients; ``grads=False`` for a NaN inside a
    masked-out row of ``[..., V]`` logits: the loss is exact, but that row's log-softmax backward may carry
    the NaN into the row's own gradient (the documented limit: removing it would copy the whole logits)."""

    value: float | None = None
    grads: bool = True


ZERO = "zero"
NONFINITE = "nonfinite"


def names(argument: str, *seen: Any) -> str:
    """A ``match=`` pattern: the message names `argument` and then shows everything in ``seen`` (shapes,
    dtypes, values), in that order."""
    parts = [re.escape(f"`{argument}`")] + [re.escape(str(s)) for s in seen]
    return "(?s)" + ".*".join(parts)


def shape_error(argument: str, *seen: Any) -> Raises:
    return Raises(ValueError, names(argument, *seen))


def dtype_error(argument: str, *seen: Any) -> Raises:
    return Raises(TypeError, names(argument, *seen))


def range_error(argument: str, classes: int, low: int | None = None, high: int | None = None) -> Raises:
    """``argument`` must lie in ``[0, classes)``; the message shows the range seen (``None``: any value)."""
    seen = [r"-?\d+" if v is None else str(v) for v in (low, high)]
    return Raises(
        ValueError,
        rf"(?s)`{argument}` must lie in \[0, {classes}\).*got values in \[{seen[0]}, {seen[1]}\]",
    )


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A registered loss: how to build it and a valid set of (small) inputs."""

    make: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    grads: tuple[str, ...]  # floating inputs whose gradients ZERO/Finite cases check
    config: dict[str, Any] = field(default_factory=dict)  # params build_loss needs (composites)


@dataclass(frozen=True)
class Case:
    loss: str
    name: str
    expect: Raises | Finite | str
    change: Callable[[dict[str, Any]], dict[str, Any]] = lambda inputs: inputs
    make: Callable[[], nn.Module] | None = None  # instead of the spec's module
    call: bool = True  # False: the error is raised while building the module
    xfail: str | None = None


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Replace inputs; a callable value is applied to the inputs (e.g. to derive a shape)."""

    def change(inputs: dict[str, Any]) -> dict[str, Any]:
        out = dict(inputs)
        for key, value in changes.items():
            out[key] = value(inputs) if callable(value) else value
        return out

    return change


def without(*keys: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda inputs: {k: v for k, v in inputs.items() if k not in keys}


def set_at(name: str, index: Any, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Write ``value`` at ``index`` of a copy of input ``name``."""

    def change(inputs: dict[str, Any]) -> dict[str, Any]:
        tensor = inputs[name].detach().clone()
        tensor[index] = value
        return {**inputs, name: tensor}

    return change


def chain(*changes: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(inputs: dict[str, Any]) -> dict[str, Any]:
        for fn in changes:
            inputs = fn(inputs)
        return inputs

    return change


def as_int(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return with_(**{name: lambda inputs: inputs[name].round().long()})


def as_float(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return with_(**{name: lambda inputs: inputs[name].float()})


def empty_rows(*names_: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Keep no row (first dimension 0) of the named inputs."""
    return with_(**{n: (lambda inputs, n=n: inputs[n][:0]) for n in names_})


# -- valid inputs, one factory per loss (B = 4 rows / 2 sequences; small) -----------------------------


def classification(g: torch.Generator | None = None) -> dict[str, Any]:
    g = g or gen()
    return {"logits": torch.randn(4, 3, generator=g), "target": torch.tensor([0, 2, 1, 2])}


def regression() -> dict[str, Any]:
    g = gen()
    return {"preds": torch.randn(4, 2, generator=g), "target": torch.randn(4, 2, generator=g)}


def distillation() -> dict[str, Any]:
    g = gen()
    return {"logits": torch.randn(4, 3, generator=g), "teacher_logits": torch.randn(4, 3, generator=g)}


def embeddings_and_labels() -> dict[str, Any]:
    return {"embeddings": torch.randn(4, 3, generator=gen()), "target": torch.tensor([0, 0, 1, 1])}


def two_views() -> dict[str, Any]:
    g = gen()
    return {
        "embeddings": torch.randn(4, 3, generator=g),
        "positive_embeddings": torch.randn(4, 3, generator=g),
    }


def tokens(batch: int = 2) -> dict[str, Any]:
    g = gen()
    return {
        "next_token_logits": torch.randn(batch, 5, 6, generator=g),
        "input_ids": torch.randint(0, 6, (batch, 5), generator=g),
    }


def policy() -> dict[str, Any]:
    g = gen(1)
    return tokens() | {
        "advantages": torch.randn(2, generator=g),
        "prev_logprobs": -torch.rand(2, 5, generator=g) - 1.0,
    }


def preference() -> dict[str, Any]:
    return tokens(batch=4) | {"reference_logprobs": -torch.rand(4, 5, generator=gen(1)) - 1.0}


def sequence() -> dict[str, Any]:
    g = gen(1)
    return tokens() | {
        "advantages": torch.randn(2, generator=g),
        "rewards": torch.randn(2, generator=g),
        "values": torch.randn(2, generator=g),
    }


def actor_critic() -> dict[str, Any]:
    g = gen()
    return {
        "policy_logits": torch.randn(4, 3, generator=g),
        "values": torch.randn(4, generator=g),
        "actions": torch.tensor([0, 2, 1, 1]),
        "advantages": torch.randn(4, generator=g),
        "returns": torch.randn(4, generator=g),
        "potentials": torch.randn(4, generator=g),
        "next_potentials": torch.randn(4, generator=g),
    }


def hidden_states() -> dict[str, Any]:
    g = gen()
    return {
        "hidden_states": torch.randn(2, 5, 4, generator=g),
        "lm_head_weight": torch.randn(6, 4, generator=g),
        "input_ids": torch.randint(0, 6, (2, 5), generator=g),
    }


def teacher_hidden_states() -> dict[str, Any]:
    g = gen(1)
    return hidden_states() | {
        "teacher_hidden_states": torch.randn(2, 5, 3, generator=g),
        "teacher_lm_head_weight": torch.randn(6, 3, generator=g),
    }


def attacked() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": nn.Linear(4, 3),
        "inputs": torch.rand(4, 4, generator=gen()),
        "target": torch.tensor([0, 2, 1, 2]),
    }


def two_tasks() -> dict[str, Any]:
    g = gen(1)
    return classification() | {
        "reg_pred": torch.randn(4, generator=g),
        "reg_target": torch.randn(4, generator=g),
    }


COMBINED = {"loss_functions": ["cross_entropy", "focal"], "loss_weights": [0.5, 2.0]}
MULTI_TASK = {
    "tasks": {"cls": "cross_entropy", "reg": "mse"},
    "uncertainty_weighting": True,
    "input_maps": {"reg": {"preds": "reg_pred", "target": "reg_target", "mask": "reg_mask"}},
}

SPECS: dict[str, Spec] = {
    "cross_entropy": Spec(L.CrossEntropyLoss, classification, ("logits",)),
    "focal": Spec(L.FocalLoss, classification, ("logits",)),
    "mse": Spec(L.MSELoss, regression, ("preds",)),
    "kl_divergence": Spec(L.KLDivergenceLoss, distillation, ("logits",)),
    "contrastive": Spec(L.ContrastiveLoss, embeddings_and_labels, ("embeddings",)),
    "infonce": Spec(L.InfoNCELoss, two_views, ("embeddings", "positive_embeddings")),
    "supcon": Spec(L.SupConLoss, embeddings_and_labels, ("embeddings",)),
    "nll": Spec(L.NLLLoss, tokens, ("next_token_logits",)),
    "clipped_pg": Spec(L.ClippedPGLoss, policy, ("next_token_logits",)),
    "dpo": Spec(L.DPOLoss, preference, ("next_token_logits",)),
    "custom_sequence": Spec(L.CustomSequenceLoss, sequence, ("next_token_logits", "values")),
    "reward_shaping": Spec(L.RewardShapingLoss, actor_critic, ("policy_logits", "values")),
    "fused_linear_cross_entropy": Spec(
        L.FusedLinearCrossEntropyLoss, hidden_states, ("hidden_states", "lm_head_weight")
    ),
    "fused_linear_distillation": Spec(
        L.FusedLinearDistillationLoss, teacher_hidden_states, ("hidden_states", "lm_head_weight")
    ),
    "adversarial": Spec(lambda: L.AdversarialLoss(num_steps=2), attacked, ("inputs",)),
    "combined": Spec(lambda: L.CombinedLoss(**COMBINED), classification, ("logits",), COMBINED),
    "multi_task": Spec(lambda: L.MultiTaskLoss(**MULTI_TASK), two_tasks, ("logits", "reg_pred"), MULTI_TASK),
}

CASES: list[Case] = []


def add(loss: str, name: str, expect: Raises | Finite | str, change=None, **kwargs: Any) -> None:
    CASES.append(Case(loss, name, expect, change or (lambda inputs: inputs), **kwargs))


def mask_cases(
    loss: str, mask: str, rows: tuple[int, ...], all_masked: Finite | str = ZERO, **kwargs: Any
) -> None:
    """All-masked (``all_masked``: ZERO unless other terms remain), wrong shape, wrong dtype and non-tensor
    masks named ``mask`` of shape ``rows``."""
    wrong = (rows[0] + 1, *rows[1:])
    add(
        loss, f"{mask}-all-masked", all_masked, with_(**{mask: torch.zeros(rows, dtype=torch.bool)}), **kwargs
    )
    add(loss, f"{mask}-all-zero-weights", all_masked, with_(**{mask: torch.zeros(rows)}), **kwargs)
    add(loss, f"{mask}-wrong-shape", shape_error(mask, wrong), with_(**{mask: torch.ones(wrong)}), **kwargs)
    add(
        loss,
        f"{mask}-complex-dtype",
        dtype_error(mask, "torch.complex64"),
        with_(**{mask: torch.ones(rows, dtype=torch.complex64)}),
        **kwargs,
    )
    add(loss, f"{mask}-not-a-tensor", dtype_error(mask, "list"), with_(**{mask: [1] * rows[0]}), **kwargs)


def unknown_param_case(loss: str) -> None:
    params = dict(SPECS[loss].config) | {"not_an_option": 1}
    add(
        loss,
        "config-unknown-parameter",
        Raises(
            ValueError,
            rf"(?s)cannot build the loss '{loss}' with parameters .*'not_an_option'.*its parameters are \[",
        ),
        make=lambda: build_loss({"name": loss, "params": params}),
        call=False,
    )


# -- class logits: cross_entropy, focal (multiclass) ---------------------------------------------------

for loss in ("cross_entropy", "focal"):
    add(loss, "logits-rank-1", shape_error("logits", (4,)), with_(logits=torch.randn(4)))
    add(loss, "logits-rank-4", shape_error("logits", (2, 2, 1, 3)), with_(logits=torch.randn(2, 2, 1, 3)))
    add(
        loss,
        "target-batch-mismatch",
        shape_error("target", (5,)),
        with_(target=torch.tensor([0, 1, 2, 0, 1])),
    )
    add(
        loss,
        "target-rank-2",
        shape_error("target", (4, 1)),
        with_(target=torch.zeros(4, 1, dtype=torch.long)),
    )
    add(loss, "integer-logits", dtype_error("logits", (4, 3), "torch.int64"), as_int("logits"))
    add(loss, "floating-target", dtype_error("target", (4,), "torch.float32"), as_float("target"))
    add(
        loss,
        "bool-target",
        dtype_error("target", "torch.bool"),
        with_(target=torch.ones(4, dtype=torch.bool)),
    )
    add(loss, "target-too-large", range_error("target", 3, 0, 3), set_at("target", 1, 3))
    add(loss, "target-negative", range_error("target", 3, -1, 2), set_at("target", 0, -1))
    add(loss, "target-ignore-index-is-skipped", Finite(), set_at("target", 0, -100))
    add(loss, "target-all-ignore-index", ZERO, with_(target=torch.full((4,), -100)))
    add(
        loss,
        "target-out-of-range-where-masked",
        Finite(),
        chain(set_at("target", 0, 7), with_(mask=torch.tensor([0.0, 1.0, 1.0, 1.0]))),
    )
    mask_cases(loss, "mask", (4,))
    add(loss, "empty-batch", ZERO, empty_rows("logits", "target"))
    add(loss, "nan-logit", NONFINITE, set_at("logits", (1, 0), NAN))
    add(loss, "posinf-logit", NONFINITE, set_at("logits", (1, 1), INF))
    add(loss, "neginf-logit-other-class", Finite(), set_at("logits", (1, 0), -INF))
    add(loss, "neginf-logit-target-class", NONFINITE, set_at("logits", (1, 2), -INF))
    add(
        loss,
        "nan-logit-of-ignored-row",
        Finite() if loss == "focal" else Finite(grads=False),
        chain(set_at("logits", (1, 0), NAN), set_at("target", 1, -100)),
    )
    unknown_param_case(loss)

add(
    "cross_entropy",
    "config-class-weight-shape",
    shape_error("weight", (3,), "(2,)"),
    make=lambda: L.CrossEntropyLoss(weight=[1.0, 2.0]),
)
add(
    "cross_entropy",
    "config-label-smoothing-out-of-range",
    Raises(ValueError, names("label_smoothing", "1.5")),
    make=lambda: L.CrossEntropyLoss(label_smoothing=1.5),
    call=False,
)
add(
    "focal",
    "config-negative-gamma",
    Raises(ValueError, names("gamma", "-1")),
    make=lambda: L.FocalLoss(gamma=-1.0),
    call=False,
)
add(
    "focal",
    "config-unknown-mode",
    Raises(ValueError, names("mode", "softmax")),
    make=lambda: L.FocalLoss(mode="softmax"),
    call=False,
)  # type: ignore[arg-type]
add(
    "focal",
    "class-alpha-shape",
    shape_error("alpha", "(2,)"),
    make=lambda: L.FocalLoss(alpha=[0.25, 0.75]),
)
add(
    "focal",
    "binary-target-out-of-range",
    Raises(ValueError, names("target", "[0, 1]", "got values in [0.0, 2.0]")),
    with_(logits=torch.zeros(4), target=torch.tensor([0.0, 1.0, 2.0, 1.0])),
    make=lambda: L.FocalLoss(mode="binary"),
)
add(
    "focal",
    "binary-shape-mismatch",
    shape_error("logits", (4,), (5,)),
    with_(logits=torch.zeros(4), target=torch.ones(5)),
    make=lambda: L.FocalLoss(mode="binary"),
)
add(
    "focal",
    "binary-nan-target",
    Raises(ValueError, names("target", "[0, 1]", "nan")),
    with_(logits=torch.zeros(4), target=torch.tensor([0.0, NAN, 1.0, 1.0])),
    make=lambda: L.FocalLoss(mode="binary"),
)
add(
    "focal",
    "multiclass-single-class",
    shape_error("logits", (4, 1)),
    with_(logits=torch.zeros(4, 1), target=torch.zeros(4, dtype=torch.long)),
)

# -- mse -------------------------------------------------------------------------------------------------

add(
    "mse",
    "preds-target-shape-mismatch",
    shape_error("preds", (4, 2), (4, 3)),
    with_(target=torch.zeros(4, 3)),
)
add("mse", "batch-mismatch", shape_error("preds", (4, 2), (5, 2)), with_(target=torch.zeros(5, 2)))
add("mse", "integer-preds", dtype_error("preds", (4, 2), "torch.int64"), as_int("preds"))
add("mse", "integer-target-is-a-number", Finite(), as_int("target"))
mask_cases("mse", "mask", (4,))
add("mse", "per-element-mask-all-masked", ZERO, with_(mask=torch.zeros(4, 2)))
add("mse", "mask-trailing-shape", shape_error("mask", (4, 2), (4, 3)), with_(mask=torch.ones(4, 3)))
add("mse", "empty-batch", ZERO, empty_rows("preds", "target"))
add("mse", "nan-preds", NONFINITE, set_at("preds", (0, 1), NAN))
add("mse", "nan-target", NONFINITE, set_at("target", (2, 0), NAN))
add("mse", "posinf-preds", NONFINITE, set_at("preds", (0, 0), INF))
add(
    "mse",
    "nan-of-masked-row",
    Finite(),
    chain(
        set_at("preds", (0, 1), NAN), set_at("target", (0, 0), INF), with_(mask=torch.tensor([0, 1, 1, 1]))
    ),
)
unknown_param_case("mse")

# -- kl_divergence ---------------------------------------------------------------------------------------

kl = "kl_divergence"
add(
    kl,
    "logits-rank-1",
    shape_error("logits", (3,)),
    with_(logits=torch.randn(3), teacher_logits=torch.randn(3)),
)
add(
    kl,
    "teacher-shape-mismatch",
    shape_error("logits", (4, 3), (4, 4)),
    with_(teacher_logits=torch.randn(4, 4)),
)
add(
    kl,
    "teacher-batch-mismatch",
    shape_error("logits", (4, 3), (5, 3)),
    with_(teacher_logits=torch.randn(5, 3)),
)
add(kl, "integer-logits", dtype_error("logits", "torch.int64"), as_int("logits"))
add(kl, "integer-teacher-logits", dtype_error("teacher_logits", "torch.int64"), as_int("teacher_logits"))
add(kl, "target-batch-mismatch", shape_error("target", (5,)), with_(target=torch.zeros(5, dtype=torch.long)))
add(kl, "floating-target", dtype_error("target", (4,), "torch.float32"), with_(target=torch.zeros(4)))
add(kl, "target-too-large", range_error("target", 3, 0, 3), with_(target=torch.tensor([0, 3, 1, 2])))
add(kl, "target-all-ignore-index", ZERO, with_(target=torch.full((4,), -100)))
add(kl, "no-teacher", Raises(ValueError, names("teacher_logits", "got neither")), without("teacher_logits"))
mask_cases(kl, "mask", (4,))
add(kl, "empty-batch", ZERO, empty_rows("logits", "teacher_logits"))
add(kl, "nan-logit", NONFINITE, set_at("logits", (0, 0), NAN))
add(kl, "nan-teacher-logit", NONFINITE, set_at("teacher_logits", (3, 2), NAN))
add(
    kl,
    "neginf-class-ruled-out-by-both",
    Finite(),
    chain(set_at("logits", (0, 1), -INF), set_at("teacher_logits", (0, 1), -INF)),
)
add(kl, "neginf-student-only-forward-kl", NONFINITE, set_at("logits", (0, 1), -INF))
add(
    kl,
    "nan-of-masked-row",
    Finite(grads=False),
    chain(set_at("logits", (0, 1), NAN), with_(mask=torch.tensor([False, True, True, True]))),
)
add(
    kl,
    "config-zero-temperature",
    Raises(ValueError, names("temperature", "0")),
    make=lambda: L.KLDivergenceLoss(temperature=0.0),
    call=False,
)
add(
    kl,
    "config-unknown-direction",
    Raises(ValueError, names("direction", "sideways")),
    make=lambda: L.KLDivergenceLoss(direction="sideways"),
    call=False,
)  # type: ignore[arg-type]
unknown_param_case(kl)

# -- contrastive, infonce, supcon ------------------------------------------------------------------------

for loss in ("contrastive", "supcon"):
    add(loss, "embeddings-rank-1", shape_error("embeddings", (4,)), with_(embeddings=torch.randn(4)))
    add(
        loss,
        "target-batch-mismatch",
        shape_error("target", (5,), (4, 3)),
        with_(target=torch.tensor([0, 0, 1, 1, 2])),
    )
    add(loss, "integer-embeddings", dtype_error("embeddings", "torch.int64"), as_int("embeddings"))
    add(loss, "floating-target", dtype_error("target", (4,), "torch.float32"), as_float("target"))
    add(loss, "target-not-a-tensor", dtype_error("target", "list"), with_(target=[0, 0, 1, 1]))
    add(loss, "empty-batch", ZERO, empty_rows("embeddings", "target"))
    add(loss, "nan-embedding", NONFINITE, set_at("embeddings", (2, 1), NAN))
    add(loss, "posinf-embedding", NONFINITE, set_at("embeddings", (2, 1), INF))
    add(loss, "single-row", ZERO, with_(embeddings=lambda i: i["embeddings"][:1], target=torch.tensor([0])))
    add(loss, "labels-any-integers", Finite(), with_(target=torch.tensor([-7, -7, 10**6, 10**6])))
    unknown_param_case(loss)
add(
    "contrastive",
    "embeddings-rank-3",
    shape_error("embeddings", (4, 2, 3)),
    with_(embeddings=torch.randn(4, 2, 3)),
)
add(
    "contrastive",
    "config-zero-margin",
    Raises(ValueError, names("margin", "0")),
    make=lambda: L.ContrastiveLoss(margin=0.0),
    call=False,
)
add(
    "supcon",
    "embeddings-rank-4",
    shape_error("embeddings", (4, 2, 1, 3)),
    with_(embeddings=torch.randn(4, 2, 1, 3)),
)
add(
    "contrastive",
    "config-negative-weight",
    Raises(ValueError, names("negative_weight", "-1")),
    make=lambda: L.ContrastiveLoss(negative_weight=-1.0),
    call=False,
)
add("contrastive", "coinciding-embeddings", Finite(), with_(embeddings=torch.ones(4, 3)))
add("supcon", "no-positive-pair", ZERO, with_(target=torch.tensor([0, 1, 2, 3])))
add(
    "supcon",
    "config-chunk-size",
    Raises(ValueError, names("chunk_size", "0")),
    make=lambda: L.SupConLoss(chunk_size=0),
    call=False,
)

iv = "infonce"
add(
    iv,
    "embeddings-rank-1",
    shape_error("embeddings", (4,)),
    with_(embeddings=torch.randn(4), positive_embeddings=torch.randn(4)),
)
add(
    iv,
    "views-batch-mismatch",
    shape_error("embeddings", (4, 3), (5, 3)),
    with_(positive_embeddings=torch.randn(5, 3)),
)
add(
    iv,
    "views-dim-mismatch",
    shape_error("embeddings", (4, 3), (4, 2)),
    with_(positive_embeddings=torch.randn(4, 2)),
)
add(iv, "integer-embeddings", dtype_error("embeddings", "torch.int64"), as_int("embeddings"))
add(
    iv,
    "integer-positive-embeddings",
    dtype_error("positive_embeddings", "torch.int64"),
    as_int("positive_embeddings"),
)
add(
    iv,
    "empty-batch",
    ZERO,
    empty_rows("embeddings", "positive_embeddings"),
)
add(
    iv,
    "empty-batch-chunked",
    ZERO,
    empty_rows("embeddings", "positive_embeddings"),
    make=lambda: L.InfoNCELoss(chunk_size=2),
)
add(
    iv,
    "views-rank-3",
    shape_error("embeddings", (4, 2, 3)),
    with_(embeddings=torch.randn(4, 2, 3), positive_embeddings=torch.randn(4, 2, 3)),
)
add(
    iv,
    "single-pair",
    Finite(),
    with_(
        embeddings=lambda i: i["embeddings"][:1], positive_embeddings=lambda i: i["positive_embeddings"][:1]
    ),
)
add(iv, "posinf-embedding", NONFINITE, set_at("embeddings", (1, 1), INF))
add(iv, "zero-embedding-row", Finite(), set_at("embeddings", 2, 0.0))
add(
    iv,
    "config-chunk-size",
    Raises(ValueError, names("chunk_size", "-2")),
    make=lambda: L.InfoNCELoss(chunk_size=-2),
    call=False,
)
add(iv, "nan-embedding", NONFINITE, set_at("embeddings", (2, 1), NAN))
add(iv, "nan-positive-embedding", NONFINITE, set_at("positive_embeddings", (0, 0), NAN))
add(
    iv,
    "config-zero-temperature",
    Raises(ValueError, names("temperature", "0")),
    make=lambda: L.InfoNCELoss(temperature=0.0),
    call=False,
)
unknown_param_case(iv)

# -- next-token losses: nll, clipped_pg, dpo, custom_sequence ---------------------------------------------


def token_cases(loss: str, batch: int, sample_mask: bool, all_tokens_masked: Finite | str = ZERO) -> None:
    add(
        loss,
        "logits-rank-2",
        shape_error("next_token_logits", (batch, 5)),
        with_(next_token_logits=torch.randn(batch, 5)),
    )
    add(
        loss,
        "input-ids-batch-mismatch",
        shape_error("input_ids", (batch, 5), (batch + 2, 5)),
        with_(input_ids=torch.zeros(batch + 2, 5, dtype=torch.long)),
    )
    add(
        loss,
        "input-ids-length-mismatch",
        shape_error("input_ids", (batch, 5), (batch, 4)),
        with_(input_ids=torch.zeros(batch, 4, dtype=torch.long)),
    )
    add(loss, "integer-logits", dtype_error("next_token_logits", "torch.int64"), as_int("next_token_logits"))
    add(loss, "floating-input-ids", dtype_error("input_ids", "torch.float32"), as_float("input_ids"))
    add(loss, "input-ids-too-large", range_error("input_ids", 6, None, 6), set_at("input_ids", (0, 3), 6))
    add(
        loss, "input-ids-negative", range_error("input_ids", 6, -100, None), set_at("input_ids", (1, 2), -100)
    )
    add(
        loss,
        "input-ids-out-of-range-where-masked",
        Finite(),
        chain(
            set_at("input_ids", (0, 3), 99),
            with_(
                token_mask=lambda i: torch.ones(batch, 5).index_put_(
                    (torch.tensor(0), torch.tensor(3)), torch.tensor(0.0)
                )
            ),
        ),
    )
    add(
        loss,
        "input-id-0-never-scored-with-shift",
        Finite(),
        set_at("input_ids", (0, 0), -1),
    )
    mask_cases(loss, "token_mask", (batch, 5), all_masked=all_tokens_masked)
    if sample_mask:
        mask_cases(loss, "sample_mask", (batch,))
    add(loss, "empty-batch", ZERO, lambda i: {k: v[:0] if isinstance(v, Tensor) else v for k, v in i.items()})
    add(loss, "nan-logit", NONFINITE, set_at("next_token_logits", (0, 1, 2), NAN))
    add(
        loss,
        "neginf-logit-other-token",
        Finite(),
        lambda i: set_at("next_token_logits", (0, 1, (int(i["input_ids"][0, 2]) + 1) % 6), -INF)(i),
    )
    add(
        loss,
        "nan-logit-of-masked-token",
        Finite(grads=False),
        chain(
            set_at("next_token_logits", (0, 1, 2), NAN),
            with_(
                token_mask=lambda i: torch.ones(batch, 5).index_put_(
                    (torch.tensor(0), torch.tensor(2)), torch.tensor(0.0)
                )
            ),
        ),
    )
    unknown_param_case(loss)


token_cases("nll", 2, sample_mask=False)
token_cases("clipped_pg", 2, sample_mask=True)
# no token counts: every pair's margin is 0, -log σ(0) = log 2 (with zero gradient)
token_cases("dpo", 4, sample_mask=True, all_tokens_masked=Finite(math.log(2.0)))
# no token counts: the value term (values vs rewards) remains
token_cases("custom_sequence", 2, sample_mask=True, all_tokens_masked=Finite())

pg = "clipped_pg"
add(pg, "advantages-batch-mismatch", shape_error("advantages", (3,)), with_(advantages=torch.zeros(3)))
add(
    pg,
    "advantages-per-token-wrong-length",
    shape_error("advantages", (2, 4)),
    with_(advantages=torch.zeros(2, 4)),
)
add(
    pg,
    "integer-advantages",
    dtype_error("advantages", "torch.int64"),
    with_(advantages=torch.zeros(2, dtype=torch.long)),
)
add(
    pg,
    "prev-logprobs-shape",
    shape_error("prev_logprobs", (2, 5), (2, 4)),
    with_(prev_logprobs=torch.zeros(2, 4)),
)
add(
    pg,
    "reference-logprobs-shape",
    shape_error("reference_logprobs", (2, 5), (3, 5)),
    with_(reference_logprobs=torch.zeros(3, 5)),
)
add(pg, "nan-advantage", NONFINITE, set_at("advantages", 1, NAN))
add(pg, "nan-prev-logprob", NONFINITE, set_at("prev_logprobs", (1, 2), NAN))
add(
    pg,
    "nan-everywhere-in-masked-sample",
    Finite(grads=False),
    chain(
        set_at("advantages", 1, NAN),
        set_at("prev_logprobs", (1,), NAN),
        set_at("next_token_logits", (1,), NAN),
        set_at("input_ids", (1,), -100),
        with_(sample_mask=torch.tensor([True, False])),
    ),
)
add(
    pg,
    "kl-without-reference",
    Raises(ValueError, names("reference_logprobs", "kl_beta=0.1")),
    make=lambda: L.ClippedPGLoss(kl_beta=0.1),
)
add(
    pg,
    "config-unknown-aggregation",
    Raises(ValueError, names("aggregation", "tokens")),
    make=lambda: L.ClippedPGLoss(aggregation="tokens"),
    call=False,
)
add(
    pg,
    "config-ratio-clip-min",
    Raises(ValueError, names("ratio_clip_min", "1.5")),
    make=lambda: L.ClippedPGLoss(ratio_clip_min=1.5),
    call=False,
)

add(
    "dpo",
    "odd-batch",
    shape_error("next_token_logits", (3, 5, 6)),
    lambda i: {k: v[:3] for k, v in i.items()},
)
add(
    "dpo",
    "reference-shape",
    shape_error("reference_logprobs", (4, 5), (4, 4)),
    with_(reference_logprobs=torch.zeros(4, 4)),
)
add(
    "dpo",
    "integer-reference",
    dtype_error("reference_logprobs", "torch.int64"),
    with_(reference_logprobs=torch.zeros(4, 5, dtype=torch.long)),
)
add(
    "dpo",
    "sample-mask-splits-a-pair",
    Raises(ValueError, names("sample_mask", "[True, False, True, True]")),
    with_(sample_mask=torch.tensor([True, False, True, True])),
)
add("dpo", "nan-reference", NONFINITE, set_at("reference_logprobs", (1, 3), NAN))
add("dpo", "nan-reference-at-unread-column-0", Finite(), set_at("reference_logprobs", (1, 0), NAN))
add(
    "dpo",
    "config-zero-beta",
    Raises(ValueError, names("beta", "0")),
    make=lambda: L.DPOLoss(beta=0.0),
    call=False,
)

cs = "custom_sequence"
add(cs, "advantages-batch-mismatch", shape_error("advantages", (2,), (3,)), with_(advantages=torch.zeros(3)))
add(cs, "values-batch-mismatch", shape_error("values", (2,), (1,)), with_(values=torch.zeros(1)))
add(cs, "rewards-rank-2", shape_error("rewards", (2,), (2, 1)), with_(rewards=torch.zeros(2, 1)))
add(
    cs,
    "integer-advantages",
    dtype_error("advantages", "torch.int64"),
    with_(advantages=torch.zeros(2, dtype=torch.long)),
)
add(cs, "values-without-rewards", shape_error("values", (2,), "rewards"), without("rewards"))
add(cs, "nan-advantage", NONFINITE, set_at("advantages", 0, NAN))
add(cs, "nan-value", NONFINITE, set_at("values", 0, NAN))
add(
    cs,
    "nan-in-masked-sample",
    Finite(grads=False),
    chain(
        set_at("advantages", 1, NAN),
        set_at("rewards", 1, INF),
        set_at("values", 1, NAN),
        set_at("next_token_logits", (1,), NAN),
        with_(sample_mask=torch.tensor([1.0, 0.0])),
    ),
)
add(
    cs,
    "config-negative-alpha",
    Raises(ValueError, names("alpha", "-1")),
    make=lambda: L.CustomSequenceLoss(alpha=-1.0),
    call=False,
)

# -- reward_shaping ----------------------------------------------------------------------------------------

rs = "reward_shaping"
add(rs, "logits-rank-3", shape_error("policy_logits", (4, 1, 3)), with_(policy_logits=torch.randn(4, 1, 3)))
add(rs, "integer-logits", dtype_error("policy_logits", "torch.int64"), as_int("policy_logits"))
for arg in ("values", "advantages", "returns", "potentials", "next_potentials"):
    add(rs, f"{arg}-batch-mismatch", shape_error(arg, (4,), (5,)), with_(**{arg: torch.zeros(5)}))
add(
    rs, "integer-values", dtype_error("values", "torch.int64"), with_(values=torch.zeros(4, dtype=torch.long))
)
add(
    rs,
    "actions-batch-mismatch",
    shape_error("actions", (4,), (3,)),
    with_(actions=torch.zeros(3, dtype=torch.long)),
)
add(rs, "floating-actions", dtype_error("actions", "torch.float32"), as_float("actions"))
add(rs, "actions-too-large", range_error("actions", 3, 0, 3), set_at("actions", 2, 3))
add(rs, "actions-negative", range_error("actions", 3, -1, 2), set_at("actions", 2, -1))
add(
    rs,
    "actions-out-of-range-where-masked",
    Finite(),
    chain(set_at("actions", 2, 9), with_(mask=torch.tensor([1, 1, 0, 1]))),
)
add(
    rs,
    "potentials-without-next",
    Raises(ValueError, names("potentials", "next_potentials")),
    without("next_potentials"),
)
add(
    rs,
    "terminated-shape",
    shape_error("terminated", (4,), (2,)),
    with_(terminated=torch.zeros(2, dtype=torch.bool)),
)
mask_cases(rs, "mask", (4,))
add(rs, "empty-batch", ZERO, lambda i: {k: v[:0] for k, v in i.items()})
add(rs, "nan-logit", NONFINITE, set_at("policy_logits", (1, 1), NAN))
add(rs, "nan-return", NONFINITE, set_at("returns", 3, NAN))
add(rs, "neginf-logit-invalid-action", Finite(), set_at("policy_logits", (0, 1), -INF))
add(rs, "neginf-logit-taken-action", NONFINITE, set_at("policy_logits", (0, 0), -INF))
add(
    rs,
    "nan-in-masked-transition",
    Finite(),
    chain(
        set_at("policy_logits", (2,), NAN),
        set_at("values", 2, NAN),
        set_at("advantages", 2, INF),
        set_at("returns", 2, NAN),
        set_at("potentials", 2, NAN),
        with_(mask=torch.tensor([True, True, False, True])),
    ),
)
add(
    rs,
    "config-discount",
    Raises(ValueError, names("discount", "1.5")),
    make=lambda: L.RewardShapingLoss(discount=1.5),
    call=False,
)
unknown_param_case(rs)

# -- fused linear ----------------------------------------------------------------------------------------

for loss in ("fused_linear_cross_entropy", "fused_linear_distillation"):
    add(loss, "hidden-rank-2", shape_error("hidden_states", (2, 4)), with_(hidden_states=torch.randn(2, 4)))
    add(
        loss,
        "weight-hidden-size",
        shape_error("lm_head_weight", (6, 3), (2, 5, 4)),
        with_(lm_head_weight=torch.randn(6, 3)),
    )
    add(loss, "integer-hidden", dtype_error("hidden_states", "torch.int64"), as_int("hidden_states"))
    add(loss, "integer-weight", dtype_error("lm_head_weight", "torch.int64"), as_int("lm_head_weight"))
    add(
        loss,
        "input-ids-batch-mismatch",
        shape_error("input_ids", (2, 5), (3, 5)),
        with_(input_ids=torch.zeros(3, 5, dtype=torch.long)),
    )
    add(loss, "floating-input-ids", dtype_error("input_ids", "torch.float32"), as_float("input_ids"))
    add(loss, "input-ids-too-large", range_error("input_ids", 6, None, 6), set_at("input_ids", (1, 2), 6))
    add(loss, "input-ids-ignore-index", Finite(), set_at("input_ids", (1, 2), -100))
    add(loss, "input-ids-all-ignore-index", ZERO, with_(input_ids=torch.full((2, 5), -100)))
    mask_cases(loss, "token_mask", (2, 5))
    add(loss, "bias-shape", shape_error("lm_head_bias", (6,), (5,)), with_(lm_head_bias=torch.zeros(5)))
    add(
        loss,
        "empty-batch",
        ZERO,
        lambda i: {
            k: v[:0] if k not in ("lm_head_weight", "teacher_lm_head_weight") else v for k, v in i.items()
        },
    )
    add(loss, "nan-hidden", NONFINITE, set_at("hidden_states", (1, 1, 0), NAN))
    add(loss, "nan-weight", NONFINITE, set_at("lm_head_weight", (2, 1), NAN))
    add(
        loss,
        "config-chunk-size",
        Raises(ValueError, names("chunk_size", "0")),
        make=lambda loss=loss: build_loss(loss, chunk_size=0),
        call=False,
    )
    unknown_param_case(loss)
fd = "fused_linear_distillation"
add(
    fd,
    "teacher-rows-mismatch",
    shape_error("teacher_hidden_states", (2, 6, 3), (2, 5, 4)),
    with_(teacher_hidden_states=torch.randn(2, 6, 3)),
)
add(
    fd,
    "teacher-vocabulary-mismatch",
    shape_error("teacher_lm_head_weight", (7, 3), (6, 4)),
    with_(teacher_lm_head_weight=torch.randn(7, 3)),
)
add(
    fd,
    "teacher-hidden-size",
    shape_error("teacher_lm_head_weight", (6, 4), (2, 5, 3)),
    with_(teacher_lm_head_weight=torch.randn(6, 4)),
)
add(
    fd,
    "integer-teacher-hidden",
    dtype_error("teacher_hidden_states", "torch.int64"),
    as_int("teacher_hidden_states"),
)
add(fd, "nan-teacher-hidden", NONFINITE, set_at("teacher_hidden_states", (0, 1, 1), NAN))
add(fd, "no-input-ids-all-masked", ZERO, chain(without("input_ids"), with_(token_mask=torch.zeros(2, 5))))

# -- adversarial -------------------------------------------------------------------------------------------

adv = "adversarial"
add(adv, "integer-inputs", dtype_error("inputs", "torch.int64"), as_int("inputs"))
add(
    adv,
    "target-batch-mismatch",
    shape_error("target", (5,), (4, 4)),
    with_(target=torch.zeros(5, dtype=torch.long)),
)
add(adv, "floating-target", dtype_error("target", (4,), "torch.float32"), as_float("target"))
add(adv, "target-too-large", range_error("target", 3, 1, 3), set_at("target", 0, 3))
add(adv, "target-all-ignore-index", ZERO, with_(target=torch.full((4,), -100)))
add(adv, "model-not-callable", dtype_error("model", "str"), with_(model="linear"))
add(adv, "logits-batch-mismatch", shape_error("logits", (5, 3), (4, 4)), with_(logits=torch.zeros(5, 3)))
mask_cases(adv, "mask", (4,))
add(adv, "empty-batch", ZERO, empty_rows("inputs", "target"))
add(adv, "nan-inputs", NONFINITE, set_at("inputs", (1, 2), NAN))
add(
    adv,
    "config-unknown-base-loss",
    Raises(ValueError, r"unknown loss name 'nope'; known losses"),
    make=lambda: L.AdversarialLoss(base_loss="nope"),
    call=False,
)
add(
    adv,
    "config-num-steps",
    Raises(ValueError, names("num_steps", "0")),
    make=lambda: L.AdversarialLoss(num_steps=0),
    call=False,
)
add(
    adv,
    "config-negative-epsilon",
    Raises(ValueError, names("epsilon", "-0.1")),
    make=lambda: L.AdversarialLoss(epsilon=-0.1),
    call=False,
)
unknown_param_case(adv)

# -- combined, multi_task (and the registry) ---------------------------------------------------------------

cb = "combined"
add(cb, "integer-logits", dtype_error("logits", "torch.int64"), as_int("logits"))
add(cb, "target-batch-mismatch", shape_error("target", (5,)), with_(target=torch.zeros(5, dtype=torch.long)))
add(cb, "floating-target", dtype_error("target", "torch.float32"), as_float("target"))
add(cb, "target-too-large", range_error("target", 3, 1, 3), set_at("target", 0, 3))
mask_cases(cb, "mask", (4,))
add(cb, "empty-batch", ZERO, empty_rows("logits", "target"))
add(cb, "nan-logit", NONFINITE, set_at("logits", (0, 0), NAN))
add(
    cb,
    "unexpected-input",
    Raises(TypeError, r"(?s)unexpected inputs \['tagret'\].*'target'"),
    with_(tagret=torch.zeros(4)),
)
add(cb, "missing-input", Raises(TypeError, r"(?s)missing required inputs \['target'\]"), without("target"))
add(
    cb,
    "config-unknown-loss-name",
    Raises(ValueError, r"unknown loss name 'focall'; known losses: .*focal"),
    make=lambda: L.CombinedLoss(["cross_entropy", "focall"]),
    call=False,
)
add(
    cb,
    "config-unknown-component-parameter",
    Raises(ValueError, r"cannot build the loss 'focal' with parameters \['gamma', 'gamme'\]"),
    make=lambda: L.CombinedLoss(["cross_entropy", {"name": "focal", "params": {"gamma": 1.0, "gamme": 2.0}}]),
    call=False,
)
add(
    cb,
    "config-unknown-spec-key",
    Raises(ValueError, r"unknown keys \['parmas'\] in the loss spec for 'focal'"),
    make=lambda: L.CombinedLoss([{"name": "focal", "parmas": {}}]),
    call=False,
)
add(
    cb,
    "config-bad-class-path",
    Raises(ValueError, r"cannot import the loss class_path 'torch\.nn\.NoSuchLoss'"),
    make=lambda: L.CombinedLoss([{"class_path": "torch.nn.NoSuchLoss"}]),
    call=False,
)
add(
    cb,
    "config-weights-length",
    Raises(ValueError, names("loss_weights", "got 3")),
    make=lambda: L.CombinedLoss(["cross_entropy", "focal"], loss_weights=[1, 2, 3]),
    call=False,
)
add(
    cb,
    "config-weights-unknown-name",
    Raises(ValueError, names("loss_weights", "['mse']")),
    make=lambda: L.CombinedLoss(["cross_entropy", "focal"], loss_weights={"mse": 1.0}),
    call=False,
)
add(
    cb,
    "config-input-map-unknown-loss",
    Raises(ValueError, names("input_maps", "'mse'")),
    make=lambda: L.CombinedLoss(["cross_entropy"], input_maps={"mse": {}}),
    call=False,
)
add(
    cb,
    "config-input-map-unknown-parameter",
    Raises(ValueError, r"(?s)'cross_entropy'.*\['logit'\]"),
    make=lambda: L.CombinedLoss(["cross_entropy"], input_maps={"cross_entropy": {"logit": "x"}}),
    call=False,
)
add(
    cb,
    "config-no-losses",
    Raises(ValueError, names("loss_functions", "at least one")),
    make=lambda: L.CombinedLoss([]),
    call=False,
)
add(
    cb,
    "config-single-spec-not-list",
    Raises(ValueError, names("loss_functions", "wrap it in a list")),
    make=lambda: L.CombinedLoss("focal"),
    call=False,
)  # type: ignore[arg-type]
unknown_param_case(cb)

mt = "multi_task"
add(mt, "integer-logits", dtype_error("logits", "torch.int64"), as_int("logits"))
add(mt, "task-target-batch-mismatch", shape_error("preds", (4,), (5,)), with_(reg_target=torch.zeros(5)))
add(mt, "floating-target", dtype_error("target", "torch.float32"), as_float("target"))
add(mt, "target-too-large", range_error("target", 3, 1, 3), set_at("target", 0, 3))
add(mt, "all-tasks-masked", ZERO, with_(mask=torch.zeros(4), reg_mask=torch.zeros(4)))
mask_cases(mt, "mask", (4,), all_masked=Finite())  # the other task remains
add(mt, "reg_mask-all-masked", Finite(), with_(reg_mask=torch.zeros(4, dtype=torch.bool)))
add(
    mt,
    "reg_mask-wrong-shape",
    Raises(ValueError, r"(?s)the loss 'reg' \(MSELoss\).*'mask': 'reg_mask'.*`mask`.*\(4,\).*\(5,\)"),
    with_(reg_mask=torch.ones(5)),
)
add(
    mt,
    "reg_mask-complex-dtype",
    Raises(TypeError, r"(?s)the loss 'reg' \(MSELoss\).*'mask': 'reg_mask'.*`mask`.*torch\.complex64"),
    with_(reg_mask=torch.ones(4, dtype=torch.complex64)),
)
add(
    mt,
    "reg_mask-not-a-tensor",
    Raises(TypeError, r"(?s)'mask': 'reg_mask'.*`mask` must be a torch\.Tensor, got list"),
    with_(reg_mask=[1, 1, 1, 1]),
)
add(mt, "empty-batch", ZERO, empty_rows("logits", "target", "reg_pred", "reg_target"))
add(mt, "nan-task-input", NONFINITE, set_at("reg_pred", 0, NAN))
add(mt, "nan-in-absent-task", Finite(), chain(set_at("reg_pred", 0, NAN), with_(reg_mask=torch.zeros(4))))
add(
    mt,
    "unexpected-input",
    Raises(TypeError, r"(?s)unexpected inputs \['task_idz'\]"),
    with_(task_idz=torch.zeros(4)),
)
task_ids_module = lambda: L.MultiTaskLoss({"a": "cross_entropy", "b": "focal"})  # noqa: E731
with_task_ids = lambda ids: chain(without("reg_pred", "reg_target"), with_(task_ids=ids))  # noqa: E731
add(
    mt,
    "task-ids-out-of-range",
    range_error("task_ids", 2, 0, 2),
    with_task_ids(torch.tensor([0, 1, 2, 0])),
    make=task_ids_module,
)
add(
    mt,
    "task-ids-floating",
    dtype_error("task_ids", "torch.float32"),
    with_task_ids(torch.tensor([0.0, 1.0, 1.0, 0.0])),
    make=task_ids_module,
)
add(
    mt,
    "task-ids-rank-2",
    shape_error("task_ids", (4, 1)),
    with_task_ids(torch.zeros(4, 1, dtype=torch.long)),
    make=task_ids_module,
)
add(
    mt,
    "task-ids-batch-mismatch",
    shape_error("mask", (5,)),
    with_task_ids(torch.zeros(5, dtype=torch.long)),
    make=task_ids_module,
)
add(
    mt,
    "task-ids-one-task-absent",
    Finite(),
    with_task_ids(torch.zeros(4, dtype=torch.long)),
    make=task_ids_module,
)
add(
    mt,
    "task-ids-maskless-loss-refused",
    Raises(ValueError, r"(?s)`task_ids`.*'b' \(MSELoss\).*`mask`"),
    chain(with_task_ids(torch.tensor([0, 1, 0, 1])), with_(soft=torch.zeros(4, 3))),
    make=lambda: L.MultiTaskLoss(
        {"a": "cross_entropy", "b": {"class_path": "torch.nn.MSELoss"}},
        input_maps={"b": {"input": "logits", "target": "soft"}},
    ),
)
add(
    mt,
    "config-unknown-task-loss",
    Raises(ValueError, r"unknown loss name 'crossentropy'; known losses"),
    make=lambda: L.MultiTaskLoss({"a": "crossentropy"}),
    call=False,
)
add(
    mt,
    "config-unknown-task-parameter",
    Raises(ValueError, r"cannot build the loss 'mse' with parameters \['reduction'\]"),
    make=lambda: L.MultiTaskLoss({"a": {"name": "mse", "params": {"reduction": "sum"}}}),
    call=False,
)
add(
    mt,
    "config-task-weights-unknown-task",
    Raises(ValueError, names("task_weights", "'depth'", "['cls', 'reg']")),
    make=lambda: L.MultiTaskLoss(MULTI_TASK["tasks"], task_weights={"depth": 1.0}),
    call=False,
)
add(
    mt,
    "config-task-weights-index",
    Raises(ValueError, names("task_weights", "index 5", "2 tasks")),
    make=lambda: L.MultiTaskLoss(MULTI_TASK["tasks"], task_weights={5: 1.0}),
    call=False,
)
add(
    mt,
    "config-task-weights-negative",
    Raises(ValueError, names("task_weights", "-1.0")),
    make=lambda: L.MultiTaskLoss(MULTI_TASK["tasks"], task_weights=[1.0, -1.0]),
    call=False,
)
add(
    mt,
    "config-regression-unknown-task",
    Raises(ValueError, names("regression_tasks", "['depth']")),
    make=lambda: L.MultiTaskLoss(MULTI_TASK["tasks"], uncertainty_weighting=True, regression_tasks=["depth"]),
    call=False,
)
add(
    mt,
    "config-task-name-with-dot",
    Raises(ValueError, names("tasks", "'a.b'")),
    make=lambda: L.MultiTaskLoss({"a.b": "mse"}),
    call=False,
)
unknown_param_case(mt)

# the registry itself, under every registered name: an unknown name and a spec of the wrong type
for loss in SPECS:
    add(
        loss,
        "config-misspelled-name",
        Raises(ValueError, rf"unknown loss name '{loss}_x'; known losses: .*{loss}"),
        make=lambda loss=loss: build_loss(f"{loss}_x"),
        call=False,
    )


# ----------------------------------------------------------------------------------------------------
# the test
# ----------------------------------------------------------------------------------------------------

COUNTS = Counter(case.loss for case in CASES)


def _params() -> list[Any]:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        params.append(pytest.param(case, id=f"{case.loss}-{case.name}", marks=marks))
    return params


def _prepare(case: Case) -> tuple[nn.Module, dict[str, Any], dict[str, Tensor]]:
    spec = SPECS[case.loss]
    module = (case.make or spec.make)()
    inputs = case.change(spec.inputs())
    leaves = {}
    for name in spec.grads:
        value = inputs.get(name)
        if isinstance(value, Tensor) and value.is_floating_point():
            inputs[name] = leaves[name] = value.detach().clone().requires_grad_(True)
    return module, inputs, leaves


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case) -> None:
    BAD_INPUT[case.loss] += 1
    if isinstance(case.expect, Raises):
        with pytest.raises(case.expect.error, match=case.expect.match):
            module, inputs, _ = _prepare(case)
            if case.call:
                module(**inputs)
        return
    module, inputs, leaves = _prepare(case)
    loss = module(**inputs)[0]
    assert loss.ndim == 0
    if case.expect == NONFINITE:
        assert not torch.isfinite(loss), f"expected a non-finite loss from a non-finite input, got {loss}"
        return
    assert torch.isfinite(loss), f"a silent non-finite loss: {loss}"
    targets = list(leaves.values()) + [p for p in module.parameters() if p.requires_grad]
    model = inputs.get("model")
    if isinstance(model, nn.Module):
        targets += list(model.parameters())
    grads = (
        torch.autograd.grad(loss, targets, allow_unused=True) if loss.requires_grad else [None] * len(targets)
    )
    if not isinstance(case.expect, Finite) or case.expect.grads:
        for grad in grads:
            assert grad is None or torch.isfinite(grad).all(), "a non-finite gradient"
    if case.expect == ZERO:
        assert loss.item() == 0.0, f"expected exactly 0, got {loss.item()}"
        for grad in grads:
            assert grad is None or torch.count_nonzero(grad) == 0, "expected a zero gradient"
    elif isinstance(case.expect, Finite) and case.expect.value is not None:
        assert loss.item() == pytest.approx(case.expect.value)


def test_every_registered_loss_has_cases() -> None:
    """The table covers every registered name, each with a fair share of cases."""
    assert set(SPECS) == set(available_losses()), "add a Spec (and cases) for a new loss"
    thin = {loss: COUNTS[loss] for loss in SPECS if COUNTS[loss] < 15}
    assert not thin, f"losses with fewer than 15 bad-input cases: {thin}"


def test_case_ids_are_unique() -> None:
    ids = [f"{c.loss}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]


# ----------------------------------------------------------------------------------------------------
# the non-finite policy end to end: LossModule stops a NaN that counts, a masked one never shows
# ----------------------------------------------------------------------------------------------------


def _token_batch(poison: tuple[int, int], masked: bool) -> dict[str, Tensor]:
    g = gen(3)
    batch = {
        "features": torch.randn(2, 4, 3, generator=g),
        "target": torch.randn(2, 4, generator=g),
        "mask": torch.ones(2, 4, dtype=torch.bool),
    }
    batch["target"][poison] = NAN
    if masked:
        batch["mask"][poison] = False
    return batch


@pytest.mark.parametrize("masked", [False, True], ids=["counted-nan-raises", "masked-nan-trains"])
def test_loss_module_nan_policy_catches_a_counted_nan(masked: bool) -> None:
    from torch.utils.data import DataLoader

    from lightning_losses import LossModule
    from tests.helpers import TokenRegressor, quiet_trainer

    torch.manual_seed(0)
    module = LossModule(TokenRegressor(), L.MSELoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = DataLoader([_token_batch((1, 2), masked)], batch_size=None)
    if not masked:
        with pytest.raises(FloatingPointError, match="non-finite training loss"):
            quiet_trainer(max_steps=1).fit(module, data)
        return
    quiet_trainer(max_steps=1).fit(module, data)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.skipped_steps.item() == 0
