"""Property-based tests (hypothesis) of every registered loss on random valid shapes, masks and values.

For each loss a strategy draws a small problem: shapes, option values, masks (none, bool, or float weights;
all-masked included), ``ignore_index`` targets, and values from a seeded generator at scales from 0.1 to
30 (confident logits). Inputs are float64, so the comparisons below are tight. The properties:

- ``finite``: the loss and every gradient (inputs and parameters) are finite; and the loss is >= 0 where
  the math says so: every loss but ``clipped_pg``, ``custom_sequence`` (``-A log pi`` is negative for
  ``A < 0``), ``reward_shaping`` (the policy term likewise, and ``-c_H H``) and ``multi_task`` with
  uncertainty weighting (``s_i`` may be negative);
- ``permutation``: permuting the batch (rows, sequences, transitions; *pairs* for ``dpo``, whose rows
  are chosen/rejected interleaved) permutes the gradients and leaves the loss unchanged. It applies to
  every registered loss: each is a sum or mean over rows, or (contrastive, InfoNCE, SupCon) over all pairs
  of rows, which a permutation maps onto themselves; ``adversarial`` too, since each sample's attack
  direction depends on that sample only (a linear model, no batch statistics);
- ``masked``: entries that do not count (masked elements, ``ignore_index`` targets, tokens never scored
  under ``shift``, masked samples, absent tasks) have no effect: changing them to other values (NaN/inf
  too, for the inputs noted ``nan_ok``) leaves the loss and the other gradients unchanged and gives them
  exactly zero gradient. Not applicable to ``contrastive``, ``infonce`` and ``supcon``: they take no mask
  and every row is some pair's partner.

Gradients of a NaN placed inside a masked row of ``[..., V]`` logits are not part of the contract (see
``test_bad_input``'s module docstring): the masked property puts finite values there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_losses import losses as L
from lightning_losses.registry import available_losses
from tests.reliability._stats import EXAMPLES
from tests.reliability.conftest import EXAMPLE_SCALE, PROFILE

torch.set_num_threads(1)
F64 = torch.float64
SCALES = (0.1, 1.0, 5.0, 30.0)


@dataclass
class Problem:
    module: nn.Module
    inputs: dict[str, Any]
    grads: tuple[str, ...] = ()  # floating inputs differentiated (parameters always are)
    rows: tuple[str, ...] = ()  # per-row inputs, permuted together along dim 0
    group: int = 1  # rows move in groups of this many (dpo: pairs)
    free: dict[str, Tensor] = field(default_factory=dict)  # input -> bool, True where it does not count
    nan_ok: frozenset[str] = frozenset()  # inputs whose free entries may also be NaN/inf
    nonnegative: bool = True


# ----------------------------------------------------------------------------------------------------
# drawing helpers: shapes, options and masks through hypothesis, values from a seeded generator
# ----------------------------------------------------------------------------------------------------


def generator(draw: st.DrawFn) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def randint(g: torch.Generator, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=g)


def draw_mask(
    draw: st.DrawFn, g: torch.Generator, shape: tuple[int, ...], optional: bool = True
) -> Tensor | None:
    kind = draw(st.sampled_from(("none", "bool", "float") if optional else ("bool", "float")))
    if kind == "none":
        return None
    density = draw(st.sampled_from((0.0, 0.5, 0.8, 1.0)))
    keep = torch.rand(shape, generator=g) < density
    if kind == "bool":
        return keep
    return torch.where(keep, torch.rand(shape, generator=g, dtype=F64) + 0.25, 0.0)


def off(mask: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """Where ``mask`` (None: nothing) rules an entry out."""
    return torch.zeros(shape, dtype=torch.bool) if mask is None else mask == 0


def classes(free_rows: Tensor, num_classes: int) -> Tensor:
    """A ``[..., C]`` bool of the rows ``free_rows``, all classes."""
    return free_rows.unsqueeze(-1).expand(*free_rows.shape, num_classes)


def token_layout(
    batch: int, steps: int, token_mask: Tensor | None, sample_mask: Tensor | None, shift: bool
) -> tuple[Tensor, Tensor]:
    """``(ids_free [B, T], rows_free [B, T])``: token positions of ``[B, T]`` inputs that are never scored
    or counted, and logits rows that score nothing counted."""
    counted = ~off(token_mask, (batch, steps))
    if sample_mask is not None:
        counted = counted & (sample_mask != 0).reshape(-1, 1)
    if not shift:
        return ~counted, ~counted
    ids_free = ~counted
    ids_free[:, 0] = True  # never scored
    rows_free = torch.ones(batch, steps, dtype=torch.bool)
    rows_free[:, :-1] = ids_free[:, 1:]  # row t scores token t + 1; the last row scores nothing
    return ids_free, rows_free


def mask_free(mask: Tensor | None, sample_mask: Tensor | None, shift: bool) -> Tensor | None:
    """Entries of a ``[B, T]`` token mask never read: column 0 under ``shift``, rows of masked samples."""
    if mask is None:
        return None
    free = torch.zeros(mask.shape, dtype=torch.bool)
    if shift:
        free[:, 0] = True
    if sample_mask is not None:
        free |= (sample_mask == 0).reshape(-1, 1)
    return free


def add_free(free: dict[str, Tensor], name: str, where: Tensor | None) -> None:
    if where is not None and bool(where.any()):
        free[name] = where


# ----------------------------------------------------------------------------------------------------
# one strategy per registered loss
# ----------------------------------------------------------------------------------------------------


def _class_problem(draw: st.DrawFn, g: torch.Generator, rank3: bool | None = None) -> dict[str, Any]:
    """logits ``[B, C]`` / ``[B, T, C]``, targets with some ``ignore_index``, an optional mask."""
    batch, num_classes = draw(st.integers(1, 5)), draw(st.integers(2, 5))
    rank3 = draw(st.booleans()) if rank3 is None else rank3
    rows = (batch, draw(st.integers(1, 3))) if rank3 else (batch,)
    scale = draw(st.sampled_from(SCALES))
    logits = randn(g, *rows, num_classes, scale=scale)
    target = randint(g, num_classes, *rows)
    if draw(st.booleans()):
        target = torch.where(torch.rand(rows, generator=g) < 0.3, -100, target)
    mask = draw_mask(draw, g, rows)
    free_rows = off(mask, rows) | (target == -100)
    return {
        "inputs": {"logits": logits, "target": target} | ({} if mask is None else {"mask": mask}),
        "free": {"logits": classes(free_rows, num_classes), "target": off(mask, rows)},
        "num_classes": num_classes,
    }


@st.composite
def cross_entropy(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    p = _class_problem(draw, g)
    smoothing = draw(st.sampled_from((0.0, 0.1)))
    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(p["num_classes"], generator=g) + 0.2).tolist()
    free = {k: v for k, v in p["free"].items() if bool(v.any())}
    return Problem(
        L.CrossEntropyLoss(label_smoothing=smoothing, weight=weight),
        p["inputs"],
        ("logits",),
        tuple(p["inputs"]),
        free=free,
    )


@st.composite
def focal(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    mode = draw(st.sampled_from(("multiclass", "binary", "multilabel")))
    gamma = draw(st.sampled_from((0.0, 0.5, 2.0)))
    alpha = draw(st.sampled_from((None, 0.25)))
    module = L.FocalLoss(mode=mode, gamma=gamma, alpha=alpha)
    if mode == "multiclass":
        p = _class_problem(draw, g)
        free = {k: v for k, v in p["free"].items() if bool(v.any())}
        return Problem(module, p["inputs"], ("logits",), tuple(p["inputs"]), free=free)
    batch = draw(st.integers(1, 5))
    shape = (batch,) if mode == "binary" and draw(st.booleans()) else (batch, draw(st.integers(1, 4)))
    logits = randn(g, *shape, scale=draw(st.sampled_from(SCALES)))
    target = (torch.rand(shape, generator=g) < 0.5).long()
    if draw(st.booleans()):  # soft targets
        target = torch.rand(shape, generator=g, dtype=F64)
    mask = draw_mask(draw, g, shape)
    inputs = {"logits": logits, "target": target} | ({} if mask is None else {"mask": mask})
    free: dict[str, Tensor] = {}
    add_free(free, "logits", off(mask, shape))
    add_free(free, "target", off(mask, shape))
    return Problem(module, inputs, ("logits",), tuple(inputs), free=free, nan_ok=frozenset({"target"}))


@st.composite
def mse(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    batch = draw(st.integers(1, 5))
    shape = (batch,) if draw(st.booleans()) else (batch, draw(st.integers(1, 4)))
    scale = draw(st.sampled_from(SCALES))
    mask_shape = shape if draw(st.booleans()) else shape[:1]
    mask = draw_mask(draw, g, mask_shape)
    inputs = {"preds": randn(g, *shape, scale=scale), "target": randn(g, *shape, scale=scale)}
    if mask is not None:
        inputs["mask"] = mask
    free: dict[str, Tensor] = {}
    where = off(mask, mask_shape).reshape(*mask_shape, *([1] * (len(shape) - len(mask_shape)))).expand(shape)
    add_free(free, "preds", where)
    add_free(free, "target", where)
    return Problem(L.MSELoss(), inputs, ("preds",), tuple(inputs), free=free, nan_ok=frozenset(free))


@st.composite
def kl_divergence(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    p = _class_problem(draw, g)
    inputs = p["inputs"]
    inputs["teacher_logits"] = randn(g, *inputs["logits"].shape, scale=draw(st.sampled_from(SCALES)))
    with_target = draw(st.booleans())
    free = dict(p["free"])
    free["teacher_logits"] = free["logits"]
    if not with_target:  # then the ignore_index targets do not rule rows out
        target = inputs.pop("target")
        rows = target.shape
        free_rows = off(inputs.get("mask"), rows)
        free = {
            "logits": classes(free_rows, p["num_classes"]),
            "teacher_logits": classes(free_rows, p["num_classes"]),
        }
    module = L.KLDivergenceLoss(
        temperature=draw(st.sampled_from((0.5, 1.0, 4.0))),
        alpha=draw(st.sampled_from((0.0, 0.5, 1.0))),
        direction=draw(st.sampled_from(("forward", "reverse", "jsd"))),
        beta=draw(st.sampled_from((0.1, 0.5))),
    )
    free = {k: v for k, v in free.items() if bool(v.any())}
    return Problem(module, inputs, ("logits",), tuple(inputs), free=free)


def _embeddings(draw: st.DrawFn, g: torch.Generator, views: bool) -> Tensor:
    batch, dim = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    shape = (batch, draw(st.integers(1, 3)), dim) if views and draw(st.booleans()) else (batch, dim)
    embeddings = randn(g, *shape, scale=draw(st.sampled_from(SCALES)))
    if batch > 1 and draw(st.booleans()):  # coinciding rows: zero distances
        embeddings[1] = embeddings[0]
    return embeddings


@st.composite
def contrastive(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    embeddings = _embeddings(draw, g, views=False)
    target = randint(g, draw(st.integers(1, 3)), len(embeddings))
    module = L.ContrastiveLoss(
        margin=draw(st.sampled_from((0.5, 1.0, 2.0))), negative_weight=draw(st.sampled_from((0.0, 1.0)))
    )
    inputs = {"embeddings": embeddings, "target": target}
    return Problem(module, inputs, ("embeddings",), tuple(inputs))


def _contrastive_options(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "temperature": draw(st.sampled_from((0.1, 0.5, 1.0))),
        "normalize": draw(st.booleans()),
        "chunk_size": draw(st.sampled_from((None, 1, 3))),
    }


@st.composite
def infonce(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    embeddings = _embeddings(draw, g, views=False)
    positives = embeddings + randn(g, *embeddings.shape, scale=draw(st.sampled_from(SCALES)))
    inputs = {"embeddings": embeddings, "positive_embeddings": positives}
    return Problem(L.InfoNCELoss(**_contrastive_options(draw)), inputs, tuple(inputs), tuple(inputs))


@st.composite
def supcon(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    embeddings = _embeddings(draw, g, views=True)
    inputs = {"embeddings": embeddings, "target": randint(g, draw(st.integers(1, 4)), len(embeddings))}
    return Problem(L.SupConLoss(**_contrastive_options(draw)), inputs, ("embeddings",), tuple(inputs))


def _tokens(
    draw: st.DrawFn, g: torch.Generator, batch: int | None = None, max_scale: float = 30.0
) -> dict[str, Any]:
    batch = draw(st.integers(1, 4)) if batch is None else batch
    steps, vocab = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    scale = draw(st.sampled_from(tuple(s for s in SCALES if s <= max_scale)))
    return {
        "batch": batch,
        "steps": steps,
        "vocab": vocab,
        "next_token_logits": randn(g, batch, steps, vocab, scale=scale),
        "input_ids": randint(g, vocab, batch, steps),
        "shift": draw(st.booleans()),
    }


def _token_free(
    t: dict[str, Any], token_mask: Tensor | None, sample_mask: Tensor | None
) -> dict[str, Tensor]:
    ids_free, rows_free = token_layout(t["batch"], t["steps"], token_mask, sample_mask, t["shift"])
    free: dict[str, Tensor] = {}
    add_free(free, "next_token_logits", classes(rows_free, t["vocab"]))
    add_free(free, "input_ids", ids_free)
    add_free(free, "token_mask", mask_free(token_mask, sample_mask, t["shift"]))
    return free


@st.composite
def nll(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    t = _tokens(draw, g)
    token_mask = draw_mask(draw, g, (t["batch"], t["steps"]))
    inputs = {"next_token_logits": t["next_token_logits"], "input_ids": t["input_ids"]}
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    free = _token_free(t, token_mask, None)
    return Problem(L.NLLLoss(shift=t["shift"]), inputs, ("next_token_logits",), tuple(inputs), free=free)


@st.composite
def clipped_pg(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    t = _tokens(draw, g, max_scale=5.0)  # k3 = exp(log ratio) - ...: keep log-probabilities > -700
    batch, steps = t["batch"], t["steps"]
    kl_beta = draw(st.sampled_from((0.0, 0.1)))
    module = L.ClippedPGLoss(
        ratio_clip_c=draw(st.sampled_from((None, 3.0))),
        disable_ppo_ratio=draw(st.booleans()),
        aggregation=draw(st.sampled_from(("token", "sequence"))),
        kl_beta=kl_beta,
        kl_type=draw(st.sampled_from(("k1", "k2", "k3"))),
        shift=t["shift"],
    )
    per_token = draw(st.booleans())
    token_mask = draw_mask(draw, g, (batch, steps))
    sample_mask = draw_mask(draw, g, (batch,))
    inputs: dict[str, Any] = {
        "next_token_logits": t["next_token_logits"],
        "input_ids": t["input_ids"],
        "advantages": randn(g, batch, steps) if per_token else randn(g, batch),
        "prev_logprobs": -3 * torch.rand(batch, steps, generator=g, dtype=F64),
    }
    if kl_beta:
        inputs["reference_logprobs"] = -3 * torch.rand(batch, steps, generator=g, dtype=F64)
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    if sample_mask is not None:
        inputs["sample_mask"] = sample_mask
    free = _token_free(t, token_mask, sample_mask)
    ids_free = free.get("input_ids", torch.zeros(batch, steps, dtype=torch.bool))
    for name in ("prev_logprobs", "reference_logprobs"):
        if name in inputs:
            add_free(free, name, ids_free)
    add_free(free, "advantages", ids_free if per_token else off(sample_mask, (batch,)))
    constants = frozenset({"prev_logprobs", "reference_logprobs", "advantages"})
    return Problem(
        module, inputs, ("next_token_logits",), tuple(inputs), free=free, nan_ok=constants, nonnegative=False
    )


@st.composite
def dpo(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    pairs = draw(st.integers(1, 3))
    t = _tokens(draw, g, batch=2 * pairs)
    batch, steps = t["batch"], t["steps"]
    token_mask = draw_mask(draw, g, (batch, steps))
    pair_mask = draw_mask(draw, g, (pairs,))
    sample_mask = None if pair_mask is None else pair_mask.repeat_interleave(2)
    inputs: dict[str, Any] = {
        "next_token_logits": t["next_token_logits"],
        "input_ids": t["input_ids"],
        "reference_logprobs": -3 * torch.rand(batch, steps, generator=g, dtype=F64),
    }
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    if sample_mask is not None:
        inputs["sample_mask"] = sample_mask
    module = L.DPOLoss(
        beta=draw(st.sampled_from((0.1, 1.0))),
        average_log_probs=draw(st.booleans()),
        sft_weight=draw(st.sampled_from((0.0, 0.5))),
        shift=t["shift"],
    )
    free = _token_free(t, token_mask, sample_mask)
    add_free(free, "reference_logprobs", free.get("input_ids"))
    return Problem(
        module,
        inputs,
        ("next_token_logits",),
        tuple(inputs),
        group=2,
        free=free,
        nan_ok=frozenset({"reference_logprobs"}),
    )


@st.composite
def custom_sequence(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    t = _tokens(draw, g)
    batch, steps = t["batch"], t["steps"]
    token_mask = draw_mask(draw, g, (batch, steps))
    sample_mask = draw_mask(draw, g, (batch,))
    inputs: dict[str, Any] = {
        "next_token_logits": t["next_token_logits"],
        "input_ids": t["input_ids"],
        "advantages": randn(g, batch),
    }
    if draw(st.booleans()):
        inputs |= {"rewards": randn(g, batch), "values": randn(g, batch)}
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    if sample_mask is not None:
        inputs["sample_mask"] = sample_mask
    module = L.CustomSequenceLoss(
        alpha=draw(st.sampled_from((0.0, 1.0))), beta=draw(st.sampled_from((0.0, 0.5))), shift=t["shift"]
    )
    free = _token_free(t, token_mask, sample_mask)
    for name in ("advantages", "rewards", "values"):
        if name in inputs:
            add_free(free, name, off(sample_mask, (batch,)))
    return Problem(
        module,
        inputs,
        ("next_token_logits", "values"),
        tuple(inputs),
        free=free,
        nan_ok=frozenset({"advantages", "rewards", "values"}),
        nonnegative=False,
    )


@st.composite
def reward_shaping(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    batch, actions = draw(st.integers(1, 6)), draw(st.integers(2, 4))
    logits = randn(g, batch, actions, scale=draw(st.sampled_from(SCALES)))
    taken = randint(g, actions, batch)
    if draw(st.booleans()):  # invalid-action masking: -inf logits of actions not taken
        ruled_out = (torch.rand(batch, actions, generator=g) < 0.4) & (
            torch.arange(actions) != taken.unsqueeze(1)
        )
        logits = logits.masked_fill(ruled_out, -math.inf)
    inputs: dict[str, Any] = {
        "policy_logits": logits,
        "values": randn(g, batch),
        "actions": taken,
        "advantages": randn(g, batch),
        "returns": randn(g, batch),
    }
    if draw(st.booleans()):
        inputs |= {
            "potentials": randn(g, batch),
            "next_potentials": randn(g, batch),
            "terminated": torch.rand(batch, generator=g) < 0.3,
        }
    mask = draw_mask(draw, g, (batch,))
    if mask is not None:
        inputs["mask"] = mask
    module = L.RewardShapingLoss(
        value_weight=draw(st.sampled_from((0.0, 0.5))),
        entropy_weight=draw(st.sampled_from((0.0, 0.01, 1.0))),
        shaping_weight=draw(st.sampled_from((0.0, 0.1))),
        discount=draw(st.sampled_from((0.0, 0.99))),
    )
    rows = off(mask, (batch,))
    free: dict[str, Tensor] = {}
    for name in inputs:
        if name != "mask":
            add_free(free, name, classes(rows, actions) if name == "policy_logits" else rows)
    nan_ok = frozenset(free) - {"actions", "terminated"}
    return Problem(
        module,
        inputs,
        ("policy_logits", "values"),
        tuple(inputs),
        free=free,
        nan_ok=nan_ok,
        nonnegative=False,
    )


def _hidden(draw: st.DrawFn, g: torch.Generator) -> dict[str, Any]:
    batch, steps, hidden, vocab = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 4)),
        draw(st.integers(2, 7)),
    )
    scale = draw(st.sampled_from(SCALES[:3]))
    ids = randint(g, vocab, batch, steps)
    if draw(st.booleans()):
        ids = torch.where(torch.rand(batch, steps, generator=g) < 0.3, -100, ids)
    return {
        "batch": batch,
        "steps": steps,
        "vocab": vocab,
        "hidden_states": randn(g, batch, steps, hidden, scale=scale),
        "lm_head_weight": randn(g, vocab, hidden),
        "lm_head_bias": randn(g, vocab) if draw(st.booleans()) else None,
        "input_ids": ids,
        "shift": draw(st.booleans()),
        "chunk_size": draw(st.sampled_from((None, 1, 3))),
    }


def _hidden_free(h: dict[str, Any], token_mask: Tensor | None, ids: Tensor | None) -> dict[str, Tensor]:
    batch, steps = h["batch"], h["steps"]
    ids_free, rows_free = token_layout(batch, steps, token_mask, None, h["shift"])
    if ids is not None:  # ignore_index ids are not free (they rule their row out) but their rows are
        ignored = ids == -100
        rows_free = rows_free.clone()
        if h["shift"]:
            rows_free[:, :-1] |= ignored[:, 1:]
        else:
            rows_free |= ignored
        ids_free = ids_free & ~ignored
    free: dict[str, Tensor] = {}
    hidden_size = h["hidden_states"].shape[-1]
    add_free(free, "hidden_states", classes(rows_free, hidden_size))
    if ids is not None:
        add_free(free, "input_ids", ids_free)
    add_free(free, "token_mask", mask_free(token_mask, None, h["shift"]))
    return free


@st.composite
def fused_linear_cross_entropy(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    h = _hidden(draw, g)
    token_mask = draw_mask(draw, g, (h["batch"], h["steps"]))
    inputs = {k: h[k] for k in ("hidden_states", "lm_head_weight", "input_ids")}
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    if h["lm_head_bias"] is not None:
        inputs["lm_head_bias"] = h["lm_head_bias"]
    module = L.FusedLinearCrossEntropyLoss(
        shift=h["shift"], label_smoothing=draw(st.sampled_from((0.0, 0.1))), chunk_size=h["chunk_size"]
    )
    rows = ("hidden_states", "input_ids", "token_mask")
    free = _hidden_free(h, token_mask, h["input_ids"])
    return Problem(
        module,
        inputs,
        ("hidden_states", "lm_head_weight", "lm_head_bias"),
        tuple(r for r in rows if r in inputs),
        free=free,
    )


@st.composite
def fused_linear_distillation(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    h = _hidden(draw, g)
    teacher_size = draw(st.integers(1, 4))
    token_mask = draw_mask(draw, g, (h["batch"], h["steps"]))
    inputs: dict[str, Any] = {
        "hidden_states": h["hidden_states"],
        "lm_head_weight": h["lm_head_weight"],
        "teacher_hidden_states": randn(
            g, h["batch"], h["steps"], teacher_size, scale=draw(st.sampled_from(SCALES[:3]))
        ),
        "teacher_lm_head_weight": randn(g, h["vocab"], teacher_size),
    }
    with_ids = draw(st.booleans())
    if with_ids:
        inputs["input_ids"] = h["input_ids"]
    if token_mask is not None:
        inputs["token_mask"] = token_mask
    module = L.FusedLinearDistillationLoss(
        temperature=draw(st.sampled_from((0.5, 2.0))),
        alpha=draw(st.sampled_from((0.0, 0.5, 1.0))),
        direction=draw(st.sampled_from(("forward", "reverse", "jsd"))),
        shift=h["shift"],
        chunk_size=h["chunk_size"],
    )
    free = _hidden_free(h, token_mask, inputs.get("input_ids"))
    if "hidden_states" in free:
        teacher_rows = free["hidden_states"][..., 0]
        free["teacher_hidden_states"] = classes(teacher_rows, teacher_size)
    rows = ("hidden_states", "teacher_hidden_states", "input_ids", "token_mask")
    return Problem(
        module, inputs, ("hidden_states", "lm_head_weight"), tuple(r for r in rows if r in inputs), free=free
    )


@st.composite
def adversarial(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    batch, features, num_classes = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(2, 4))
    model = nn.Linear(features, num_classes).double()
    with torch.no_grad():
        model.weight.copy_(randn(g, num_classes, features, scale=draw(st.sampled_from(SCALES[:3]))))
        model.bias.copy_(randn(g, num_classes))
    mask = draw_mask(draw, g, (batch,))
    inputs: dict[str, Any] = {
        "model": model,
        "inputs": torch.rand(batch, features, generator=g, dtype=F64),
        "target": randint(g, num_classes, batch),
    }
    if mask is not None:
        inputs["mask"] = mask
    module = L.AdversarialLoss(
        epsilon=draw(st.sampled_from((0.0, 0.05, 0.2))),
        alpha=draw(st.sampled_from((0.0, 0.5, 1.0))),
        num_steps=draw(st.integers(1, 3)),
    )
    free: dict[str, Tensor] = {}
    add_free(free, "inputs", classes(off(mask, (batch,)), features))
    add_free(free, "target", off(mask, (batch,)))
    rows = tuple(k for k in inputs if k != "model")
    return Problem(module, inputs, ("inputs",), rows, free=free)


@st.composite
def combined(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    p = _class_problem(draw, g)
    module = L.CombinedLoss(
        {
            "ce": {"name": "cross_entropy", "params": {"label_smoothing": draw(st.sampled_from((0.0, 0.1)))}},
            "focal": {"name": "focal", "params": {"gamma": draw(st.sampled_from((0.0, 2.0)))}},
        },
        loss_weights=[draw(st.sampled_from((0.0, 0.5, 1.0))), draw(st.sampled_from((0.5, 2.0)))],
    )
    free = {k: v for k, v in p["free"].items() if bool(v.any())}
    return Problem(module, p["inputs"], ("logits",), tuple(p["inputs"]), free=free)


@st.composite
def multi_task(draw: st.DrawFn) -> Problem:
    g = generator(draw)
    uncertainty = draw(st.booleans())
    init = draw(st.sampled_from((-1.0, 0.0, 1.0)))
    if draw(st.booleans()):  # per-sample task ids: each task sees its samples as a mask
        p = _class_problem(draw, g, rank3=False)
        batch = len(p["inputs"]["logits"])
        task_ids = randint(g, 2, batch)
        module = L.MultiTaskLoss(
            {"a": "cross_entropy", "b": {"name": "focal", "params": {"gamma": 1.0}}},
            uncertainty_weighting=uncertainty,
            init_log_variance=init,
        )
        inputs = p["inputs"] | {"task_ids": task_ids}
        free = {k: v for k, v in p["free"].items() if bool(v.any())}
        return Problem(module, inputs, ("logits",), tuple(inputs), free=free, nonnegative=not uncertainty)
    p = _class_problem(draw, g, rank3=False)
    batch = len(p["inputs"]["logits"])
    scale = draw(st.sampled_from(SCALES))
    reg_mask = draw_mask(draw, g, (batch,))
    inputs = p["inputs"] | {
        "reg_pred": randn(g, batch, scale=scale),
        "reg_target": randn(g, batch, scale=scale),
    }
    if reg_mask is not None:
        inputs["reg_mask"] = reg_mask
    module = L.MultiTaskLoss(
        {"cls": "cross_entropy", "reg": "mse"},
        task_weights=[draw(st.sampled_from((0.5, 1.0))), draw(st.sampled_from((0.0, 1.0, 2.0)))],
        uncertainty_weighting=uncertainty,
        init_log_variance=init,
        regression_tasks=["reg"] if uncertainty and draw(st.booleans()) else [],
        input_maps={"reg": {"preds": "reg_pred", "target": "reg_target", "mask": "reg_mask"}},
    )
    free = {k: v for k, v in p["free"].items() if bool(v.any())}
    add_free(free, "reg_pred", off(reg_mask, (batch,)))
    add_free(free, "reg_target", off(reg_mask, (batch,)))
    return Problem(
        module,
        inputs,
        ("logits", "reg_pred"),
        tuple(inputs),
        free=free,
        nan_ok=frozenset({"reg_pred", "reg_target"}),
        nonnegative=not uncertainty,
    )


STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Problem]]] = {
    "adversarial": adversarial,
    "clipped_pg": clipped_pg,
    "combined": combined,
    "contrastive": contrastive,
    "cross_entropy": cross_entropy,
    "custom_sequence": custom_sequence,
    "dpo": dpo,
    "focal": focal,
    "fused_linear_cross_entropy": fused_linear_cross_entropy,
    "fused_linear_distillation": fused_linear_distillation,
    "infonce": infonce,
    "kl_divergence": kl_divergence,
    "mse": mse,
    "multi_task": multi_task,
    "nll": nll,
    "reward_shaping": reward_shaping,
    "supcon": supcon,
}
NO_MASK = ("contrastive", "infonce", "supcon")  # no mask, every row is a pair's partner
SLOW = {"adversarial": 0.5, "fused_linear_distillation": 0.5}  # fewer examples (time)

# examples per (property, loss): 17 * (120 + 80) + 14 * 80, less the SLOW ones, at the default profile
EXAMPLES_PER_LOSS = {"finite": 120, "permutation": 80, "masked": 80}


def profile(prop: str, loss: str) -> settings:
    n = max(5, round(EXAMPLES_PER_LOSS[prop] * SLOW.get(loss, 1.0) * EXAMPLE_SCALE))
    return settings(settings.get_profile(PROFILE), max_examples=n)


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------


def evaluate(problem: Problem, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | None]]:
    """The loss and the gradients of ``problem.grads`` inputs and of every parameter (``param:<name>``)."""
    inputs = dict(inputs)
    targets: dict[str, Tensor] = {}
    for name in problem.grads:
        value = inputs.get(name)
        if isinstance(value, Tensor) and value.is_floating_point():
            inputs[name] = targets[name] = value.detach().clone().requires_grad_(True)
    for name, param in problem.module.named_parameters():
        targets[f"param:{name}"] = param
    model = inputs.get("model")
    if isinstance(model, nn.Module):
        for name, param in model.named_parameters():
            targets[f"param:model.{name}"] = param
    loss = problem.module(**inputs)[0]
    if not loss.requires_grad:
        return loss.detach(), dict.fromkeys(targets)
    grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
    return loss.detach(), dict(zip(targets, grads, strict=True))


def permuted(problem: Problem, perm: Tensor) -> dict[str, Any]:
    """The inputs with the batch permuted (in groups of ``problem.group`` rows)."""
    rows = (perm.unsqueeze(1) * problem.group + torch.arange(problem.group)).reshape(-1)
    return {k: v.index_select(0, rows) if k in problem.rows else v for k, v in problem.inputs.items()}


def changed_where_free(problem: Problem, g: torch.Generator, with_nan: bool) -> dict[str, Any]:
    """The inputs with every entry that does not count replaced (NaN/inf too for ``nan_ok`` inputs)."""
    inputs = dict(problem.inputs)
    for name, where in problem.free.items():
        value = inputs[name]
        if value.dtype == torch.bool:
            other = torch.rand(value.shape, generator=g) < 0.5
        elif value.is_floating_point():
            other = 20 * torch.randn(value.shape, generator=g, dtype=value.dtype)
            if name in ("token_mask", "sample_mask", "mask", "reg_mask"):
                other = other.abs()
            elif name == "inputs":  # the adversarial inputs' valid range
                other = torch.rand(value.shape, generator=g, dtype=value.dtype)
            elif with_nan and name in problem.nan_ok:
                specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=value.dtype)
                pick = torch.randint(0, 3, value.shape, generator=g)
                other = torch.where(torch.rand(value.shape, generator=g) < 0.5, specials[pick], other)
        else:
            other = torch.randint(-200, 200, value.shape, generator=g)
        inputs[name] = torch.where(where, other.to(value.dtype), value)
    return inputs


def close(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    if actual is None or expected is None:
        assert (actual is None or not bool(actual.any())) and (
            expected is None or not bool(expected.any())
        ), what
        return
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, msg=what)


# ----------------------------------------------------------------------------------------------------
# the properties
# ----------------------------------------------------------------------------------------------------

LOSSES = sorted(STRATEGIES)


def _run(prop: str, loss: str, body: Callable[[Problem, st.DrawFn], None]) -> None:
    @profile(prop, loss)
    @given(problem=STRATEGIES[loss](), data=st.data())
    def check(problem: Problem, data: st.DataObject) -> None:
        EXAMPLES[(prop, loss)] += 1
        body(problem, data.draw)

    check()


@pytest.mark.parametrize("loss", LOSSES)
def test_finite_loss_and_gradients(loss: str) -> None:
    """Finite loss and gradients on every valid input; loss >= 0 where the math says so."""

    def body(problem: Problem, draw: st.DrawFn) -> None:
        value, grads = evaluate(problem, problem.inputs)
        assert value.ndim == 0 and torch.isfinite(value), f"non-finite loss {value}"
        for name, grad in grads.items():
            assert grad is None or bool(torch.isfinite(grad).all()), f"non-finite gradient of {name}"
        if problem.nonnegative:
            assert value >= -1e-10, f"negative loss {value.item()}"

    _run("finite", loss, body)


@pytest.mark.parametrize("loss", LOSSES)
def test_batch_permutation_invariance(loss: str) -> None:
    """Permuting the batch leaves the loss unchanged and permutes the per-row gradients."""

    def body(problem: Problem, draw: st.DrawFn) -> None:
        size = len(problem.inputs[problem.rows[0]]) // problem.group
        perm = torch.tensor(draw(st.permutations(range(size))), dtype=torch.long)
        value, grads = evaluate(problem, problem.inputs)
        other, other_grads = evaluate(problem, permuted(problem, perm))
        close(other, value, "the loss of the permuted batch")
        rows = (perm.unsqueeze(1) * problem.group + torch.arange(problem.group)).reshape(-1)
        for name, grad in grads.items():
            expected = grad.index_select(0, rows) if grad is not None and name in problem.rows else grad
            close(other_grads[name], expected, f"the gradient of {name}")

    _run("permutation", loss, body)


@pytest.mark.parametrize("loss", [name for name in LOSSES if name not in NO_MASK])
def test_masked_entries_have_no_effect(loss: str) -> None:
    """Entries that do not count: changing them changes neither the loss nor the other gradients, and
    their own gradient is exactly 0."""

    def body(problem: Problem, draw: st.DrawFn) -> None:
        if not problem.free:
            return  # nothing masked in this draw
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        value, grads = evaluate(problem, problem.inputs)
        other, other_grads = evaluate(problem, changed_where_free(problem, g, with_nan=draw(st.booleans())))
        close(other, value, "the loss after changing entries that do not count")
        for name, grad in other_grads.items():
            free = problem.free.get(name)
            if free is not None and grad is not None:
                assert bool((grad[free] == 0).all()), f"non-zero gradient of {name} where it does not count"
                close(grad[~free], grads[name][~free], f"the gradient of {name} where it counts")
            else:
                close(grad, grads[name], f"the gradient of {name}")

    _run("masked", loss, body)


def test_every_registered_loss_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(available_losses())
    assert (
        sum(
            max(5, round(n * SLOW.get(loss, 1.0)))
            for prop, n in EXAMPLES_PER_LOSS.items()
            for loss in LOSSES
            if not (prop == "masked" and loss in NO_MASK)
        )
        >= 1000
    ), "at least 1,000 examples per run"
