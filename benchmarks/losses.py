"""Forward + backward time of the library's losses against the implementations users would pick instead,
and which of the guide's snippets run at all.

Run (the suite's entry point, ``python -m benchmarks``, is this module's :func:`main`)::

    python -m benchmarks [--quick] [--only cross_entropy supcon ...] [--compile] [--repeats 5] \\
        [--json out.json]

Pairs, each on the same inputs in the same run (the library's ``nn.Module``, metrics included, against):

- ``cross_entropy``: ``CrossEntropyLoss`` vs ``F.cross_entropy`` on ``[B·T, V]`` logits;
- ``focal_multiclass``: ``FocalLoss`` vs the straightforward softmax focal loss
  (:func:`~benchmarks.references.softmax_focal`);
- ``focal_sigmoid``: ``FocalLoss(mode="multilabel", alpha=0.25)`` vs torchvision's ``sigmoid_focal_loss``
  formula written out (:func:`~benchmarks.references.sigmoid_focal`);
- ``kl_divergence``: ``KLDivergenceLoss`` (no targets: :math:`T^2` KL) vs ``F.kl_div(log_softmax(s/T),
  log_softmax(t/T), log_target=True)`` and vs the guide's ``KLDivergenceLoss``; ``kl_reverse`` /
  ``jsd``: ``KLDivergenceLoss(direction="reverse")`` / ``(direction="jsd", beta=0.5)`` vs the same
  ``F.kl_div`` with the arguments swapped / the log-space generalized JSD GKD trainers write
  (:func:`~benchmarks.references.jsd_composition`);
- ``contrastive`` / ``supcon`` / ``infonce``: ``ContrastiveLoss`` / ``SupConLoss`` / ``InfoNCELoss`` vs
  pytorch-metric-learning's ``ContrastiveLoss`` / ``SupConLoss`` / ``NTXentLoss`` (and the guide's
  ``ContrastiveLoss``; SimCLR's usual ``F.cross_entropy`` form for InfoNCE), embeddings of dim 128;
- ``mse``: ``MSELoss`` vs ``F.mse_loss``, and with a mask (size ``rows``: padded rows; ``tokens``: a
  value head's ``[B, T]`` with a masked prompt and padding) vs the masked mean
  ``F.mse_loss(reduction="none") * mask``;
- ``reward_shaping``: ``RewardShapingLoss`` (A2C terms and a potential-based shaping term) vs the same
  loss by hand over ``torch.distributions.Categorical`` (CleanRL's and Stable-Baselines3's form) and over
  ``log_softmax``;
- ``multi_task`` / ``combined``: ``MultiTaskLoss`` (uncertainty weighting) / ``CombinedLoss`` (weights 0.75,
  0.25) of a ``cross_entropy`` and an ``mse`` task vs the same sums written by hand over ``F.cross_entropy``
  and ``F.mse_loss``;
- ``adversarial``: ``AdversarialLoss`` (FGSM, and PGD of 3 steps) training an MLP vs the same clean +
  α · adversarial loss with the attack written by hand; the model's forward and backward passes are most
  of the time, so the ratio shows the wrapper's cost;
- ``nll`` / ``clipped_pg`` / ``dpo``: ``NLLLoss`` / ``ClippedPGLoss`` / ``DPOLoss`` on next-token logits
  ``[B, T, V]`` (a quarter of each sequence a masked prompt) vs ``F.cross_entropy`` with ``ignore_index``
  (Hugging Face's SFT loss) and the plain PPO-clip and DPO formulas, each over
  ``log_softmax(...).gather(...)`` and over ``gather - logsumexp`` (TRL's ``selective_log_softmax``);
- ``guide``: every loss snippet of the guide on small inputs: runs / crashes (error) / NaN.

Time: one warm-up run of every variant (it compiles, with ``--compile``), then ``--repeats`` rounds that
run every variant of a case in turn (a change of load on a shared machine hits all alike), each twice
with the second call timed (so it meets the caches its own last call left, not another variant's); the
median per variant. ``ratio`` is ours / reference: below 1 is faster than the reference. Peak memory
(CUDA only: ``max_memory_allocated`` above the inputs) is given as ours / reference. Values: ``agree``
says whether the two losses are equal (relative 1e-4) where their definitions coincide.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import references as ref
from benchmarks.guide_code import load as load_guide
from lightning_losses.examples.models import MLP
from lightning_losses.functional import (
    clipped_pg_loss,
    contrastive_loss,
    cross_entropy,
    distillation_loss,
    dpo_loss,
    focal_loss,
    info_nce_loss,
    mse,
    nll_loss,
    reward_shaping_loss,
    supervised_contrastive_loss,
)
from lightning_losses.functional.cross_entropy import FUSED_MIN_ELEMENTS
from lightning_losses.functional.regression import FUSED_MIN_ELEMENTS as MSE_FUSED_MIN_ELEMENTS
from lightning_losses.functional.regression import (
    MASKED_FUSED_MIN_ELEMENTS as MSE_MASKED_FUSED_MIN_ELEMENTS,
)
from lightning_losses.losses import (
    AdversarialLoss,
    ClippedPGLoss,
    CombinedLoss,
    ContrastiveLoss,
    CrossEntropyLoss,
    DPOLoss,
    FocalLoss,
    InfoNCELoss,
    KLDivergenceLoss,
    MSELoss,
    MultiTaskLoss,
    NLLLoss,
    RewardShapingLoss,
    SupConLoss,
)

__all__ = ["LOSSES", "Case", "Reference", "build_cases", "format_table", "main", "run_guide", "run_suite"]

LOSSES = (
    "cross_entropy",
    "focal_multiclass",
    "focal_sigmoid",
    "kl_divergence",
    "kl_reverse",
    "jsd",
    "contrastive",
    "supcon",
    "infonce",
    "mse",
    "reward_shaping",
    "multi_task",
    "combined",
    "adversarial",
    "nll",
    "clipped_pg",
    "dpo",
    "guide",
)
Inputs = dict[str, Tensor]
PML_NTXENT_LIMIT = 2 * 2**30  # bytes: pytorch-metric-learning's NTXentLoss is skipped above this estimate
SLOW_VARIANT = 20.0  # a variant this many times slower than ours (warm-up call) is timed apart


@dataclass
class Reference:
    """A reference implementation: ``fn(inputs) -> loss``; ``agrees``: its value should equal ours;
    ``skip``: why it is not run (too big)."""

    name: str
    fn: Callable[[Inputs], Tensor]
    agrees: bool
    note: str = ""
    compilable: bool = True
    skip: str | None = None


@dataclass
class Case:
    """One loss at one size: its inputs, ours, the references, and extra value checks
    ``(name, ours_value_fn, reference_value_fn)`` whose values must be equal."""

    loss: str
    size: str
    make: Callable[[], Inputs]
    grad_keys: tuple[str, ...]
    ours: Callable[[Inputs], Tensor]
    references: list[Reference]
    checks: list[tuple[str, Callable[[Inputs], Tensor], Callable[[Inputs], Tensor]]] = field(
        default_factory=list
    )
    functional: Callable[[Inputs], Tensor] | None = None


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(n: int, num_classes: int, g: torch.Generator) -> Tensor:
    """``n`` labels, every class present at least twice (``n >= 2 · num_classes``), shuffled."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


HOST_BOUND_ELEMENTS = 1 << 14
"""Logit sizes below this many elements are host-bound: a call's time is a few µs per ATen op (and
autograd node), and the library's loss makes more of them than a bare formula (input checks, masks,
metrics), whatever the kernels do."""
_HOST_BOUND_NOTE = "host-bound size: ours runs more ATen ops (checks, masks, metrics), a few us each"


def _logit_cases(loss: str, sizes: Sequence[tuple[int, int]], device: str) -> list[Case]:
    cases = []
    for n, c in sizes:

        def make(n: int = n, c: int = c) -> Inputs:
            g = _generator()
            inputs = {
                "logits": torch.randn(n, c, generator=g),
                "target": torch.randint(0, c, (n,), generator=g),
                "teacher_logits": 2 * torch.randn(n, c, generator=g),
                "multilabel": (torch.rand(n, c, generator=g) < 0.1).float(),
            }
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["logits"].requires_grad_()
            return inputs

        size = f"{n}x{c}"
        if loss == "cross_entropy":
            ce = CrossEntropyLoss().to(device)
            ours = lambda x, ce=ce: ce(x["logits"], x["target"]).loss  # noqa: E731
            functional = lambda x: cross_entropy(x["logits"], x["target"])  # noqa: E731
            refs = [
                Reference(
                    "F.cross_entropy",
                    lambda x: F.cross_entropy(x["logits"], x["target"]),
                    True,
                    note=(
                        "ours: fused (one [N, C] tensor: the gradient); range check (CPU), accuracy by amax"
                        if device == "cpu" and n * c >= FUSED_MIN_ELEMENTS
                        else "ours: F.cross_entropy with ignore_index, range check (CPU), accuracy by argmax"
                    ),
                )
            ]
        elif loss == "focal_multiclass":
            focal = FocalLoss(mode="multiclass", gamma=2.0)
            ours = lambda x, f=focal: f(x["logits"], x["target"]).loss  # noqa: E731
            functional = lambda x: focal_loss(x["logits"], x["target"], gamma=2.0)  # noqa: E731
            refs = [
                Reference(
                    "softmax focal (plain torch)",
                    lambda x: ref.softmax_focal(x["logits"], x["target"]),
                    True,
                    note="ours: one softmax per block, exact 1-p_t; one [N, C] tensor (the gradient)",
                )
            ]
        elif loss == "focal_sigmoid":
            focal = FocalLoss(mode="multilabel", gamma=2.0, alpha=0.25)
            ours = lambda x, f=focal: f(x["logits"], x["multilabel"]).loss  # noqa: E731
            functional = lambda x: focal_loss(  # noqa: E731
                x["logits"], x["multilabel"], mode="multilabel", gamma=2.0, alpha=0.25
            )
            refs = [
                Reference(
                    "torchvision sigmoid_focal_loss formula",
                    lambda x: ref.sigmoid_focal(x["logits"], x["multilabel"]),
                    True,
                    note="ours: fused per block of rows, gradient made in the forward, no bool selects",
                )
            ]
        elif loss == "kl_divergence":
            kl = KLDivergenceLoss(temperature=4.0)
            guide_kl = load_guide("KLDivergenceLoss")({"temperature": 4.0})
            ours = lambda x, kl=kl: kl(x["logits"], x["teacher_logits"]).loss  # noqa: E731

            def functional(x: Inputs) -> Tensor:
                return distillation_loss(x["logits"], x["teacher_logits"], temperature=4.0).loss

            refs = [
                Reference(
                    "F.kl_div composition",
                    lambda x: ref.kl_div_composition(x["logits"], x["teacher_logits"], 4.0),
                    True,
                    note="ours: fused forward KL per block of rows, the gradient written in the forward "
                    "pass (one [N, V] tensor)",
                ),
                Reference(
                    "guide KLDivergenceLoss",
                    lambda x, g=guide_kl: g(x["logits"], x["teacher_logits"])[0],
                    True,
                    note="softmax(...).log(): inf/NaN once a probability underflows (see guide table)",
                    compilable=False,
                ),
            ]
        elif loss in ("kl_reverse", "jsd"):
            direction = "reverse" if loss == "kl_reverse" else "jsd"
            kl = KLDivergenceLoss(temperature=4.0, direction=direction)
            ours = lambda x, kl=kl: kl(x["logits"], x["teacher_logits"]).loss  # noqa: E731

            def functional(x: Inputs, direction: str = direction) -> Tensor:
                return distillation_loss(
                    x["logits"], x["teacher_logits"], temperature=4.0, direction=direction
                ).loss

            note = (
                f"ours: fused {'reverse KL' if loss == 'kl_reverse' else 'JSD'} per block of rows (CPU), the "
                "gradient written in the forward pass (one [N, V] tensor)"
            )
            refs = [
                Reference("F.kl_div composition", lambda x: ref.reverse_kl_composition(
                    x["logits"], x["teacher_logits"], 4.0), True, note=note)
                if loss == "kl_reverse"
                else Reference("log-space JSD (GKD form)", lambda x: ref.jsd_composition(
                    x["logits"], x["teacher_logits"], 4.0, 0.5), True, note=note)
            ]  # fmt: skip
        else:
            raise ValueError(f"not a logit loss: {loss!r}")
        if n * c < HOST_BOUND_ELEMENTS:
            for reference in refs:
                reference.note = f"{_HOST_BOUND_NOTE}; {reference.note}"
        cases.append(Case(loss, size, make, ("logits",), ours, refs, functional=functional))
    return cases


def _regression_cases(sizes: Sequence[tuple[tuple[int, int], str | None]], device: str) -> list[Case]:
    """``MSELoss`` on ``[N, D]`` predictions: no mask, a per-row mask (the last quarter of the rows
    padding) or, as a value head's ``[B, T]`` would have, a per-token mask (the first quarter of each
    sequence a prompt, every other sequence padded over its last eighth)."""
    loss_fn = MSELoss()
    cases = []
    for (n, d), masked in sizes:

        def make(n: int = n, d: int = d, masked: str | None = masked) -> Inputs:
            g = _generator()
            inputs = {"preds": torch.randn(n, d, generator=g), "target": torch.randn(n, d, generator=g)}
            if masked == "rows":
                inputs["mask"] = torch.arange(n) < n - n // 4
            elif masked == "tokens":
                mask = torch.ones(n, d, dtype=torch.bool)
                mask[:, : d // 4] = False
                mask[::2, d - d // 8 :] = False
                inputs["mask"] = mask
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["preds"].requires_grad_()
            return inputs

        fused = n * d >= (MSE_FUSED_MIN_ELEMENTS if masked is None else MSE_MASKED_FUSED_MIN_ELEMENTS)
        note = (
            "ours: one fused sum of squares (BLAS dot; the gradient w*d made in the forward)"
            if fused
            else "ours: plain ops (a fused function's Python would cost more at this size)"
        )
        if masked is None:
            ours = lambda x, f=loss_fn: f(x["preds"], x["target"]).loss  # noqa: E731
            functional = lambda x: mse(x["preds"], x["target"])  # noqa: E731
            refs = [Reference("F.mse_loss", lambda x: F.mse_loss(x["preds"], x["target"]), True, note=note)]
        else:
            ours = lambda x, f=loss_fn: f(x["preds"], x["target"], x["mask"]).loss  # noqa: E731
            functional = lambda x: mse(x["preds"], x["target"], x["mask"])  # noqa: E731
            refs = [
                Reference(
                    "F.mse_loss(reduction='none') * mask",
                    lambda x: ref.masked_mse(x["preds"], x["target"], x["mask"]),
                    True,
                    note=f"{note}; masked entries zeroed before any product (NaN-safe)",
                )
            ]
        if n * d < HOST_BOUND_ELEMENTS:
            refs[0].note = f"{_HOST_BOUND_NOTE}; {refs[0].note}"
        size = f"{n}x{d}" + ("" if masked is None else f" {masked}")
        cases.append(Case("mse", size, make, ("preds",), ours, refs, functional=functional))
    return cases


def _composite_cases(loss: str, sizes: Sequence[tuple[int, int, int]], device: str) -> list[Case]:
    """``MultiTaskLoss`` / ``CombinedLoss`` of a classification task (``[N, C]`` logits) and a regression
    task (``[N, D]`` predictions), each task's inputs by name."""
    maps = {"digit": {"logits": "logits"}, "ink": {"preds": "preds", "target": "regression_target"}}
    if loss == "multi_task":
        module: torch.nn.Module = MultiTaskLoss(
            {"digit": "cross_entropy", "ink": "mse"},
            uncertainty_weighting=True,
            init_log_variance=0.5,
            regression_tasks=["ink"],
            input_maps=maps,
        )
    elif loss == "combined":
        module = CombinedLoss(
            ["cross_entropy", "mse"], loss_weights=[0.75, 0.25], input_maps={"mse": maps["ink"]}
        )
    else:
        raise ValueError(f"not a composite loss: {loss!r}")
    module = module.to(device)
    cases = []
    for n, c, d in sizes:

        def make(n: int = n, c: int = c, d: int = d) -> Inputs:
            g = _generator()
            inputs = {
                "logits": torch.randn(n, c, generator=g),
                "target": torch.randint(0, c, (n,), generator=g),
                "preds": torch.randn(n, d, generator=g),
                "regression_target": torch.randn(n, d, generator=g),
            }
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["logits"].requires_grad_()
            inputs["preds"].requires_grad_()
            return inputs

        def ours(x: Inputs, f: torch.nn.Module = module) -> Tensor:
            return f(**x).loss

        if loss == "multi_task":
            log_variances = module.log_variances

            def by_hand(x: Inputs, s: Tensor = log_variances) -> Tensor:
                return ref.hand_written_multi_task(
                    x["logits"], x["target"], x["preds"], x["regression_target"], s
                )

            name = "exp(-s) CE + s + (exp(-s) MSE + s) / 2"
        else:

            def by_hand(x: Inputs) -> Tensor:
                return 0.75 * F.cross_entropy(x["logits"], x["target"]) + 0.25 * F.mse_loss(
                    x["preds"], x["regression_target"]
                )

            name = "0.75 F.cross_entropy + 0.25 F.mse_loss"
        note = "ours: the task losses' modules (checks, accuracy), inputs bound by name, every term a metric"
        if n * c < HOST_BOUND_ELEMENTS:
            note = f"{_HOST_BOUND_NOTE}; {note}"
        refs = [Reference(name, by_hand, True, note=note)]
        cases.append(Case(loss, f"{n}x{c} + {n}x{d}", make, ("logits", "preds"), ours, refs))
    return cases


def _adversarial_cases(sizes: Sequence[tuple[int, int, int]], device: str) -> list[Case]:
    """``AdversarialLoss`` training ``MLP(features, 10, hidden=(hidden,))`` on ``[N, features]`` inputs in
    [0, 1], FGSM and 3-step PGD (size ``NxF attack, hidden``); each call first sets the parameters'
    gradients to None."""
    cases = []
    epsilon, alpha = 0.1, 0.5
    for n, features, hidden in sizes:
        model = MLP(features, 10, hidden=(hidden,)).to(device)

        def make(n: int = n, features: int = features) -> Inputs:
            g = _generator()
            inputs = {
                "inputs": torch.rand(n, features, generator=g),
                "target": torch.randint(0, 10, (n,), generator=g),
            }
            return {k: v.to(device) for k, v in inputs.items()}

        for num_steps in (1, 3):
            step_size = epsilon if num_steps == 1 else 2.5 * epsilon / num_steps
            loss_fn = AdversarialLoss(epsilon=epsilon, alpha=alpha, num_steps=num_steps)

            def ours(x: Inputs, f: AdversarialLoss = loss_fn, m: torch.nn.Module = model) -> Tensor:
                m.zero_grad(set_to_none=True)
                return f(m, x["inputs"], x["target"]).loss

            def by_hand(
                x: Inputs, m: torch.nn.Module = model, steps: int = num_steps, eta: float = step_size
            ) -> Tensor:
                m.zero_grad(set_to_none=True)
                return ref.adversarial_training(
                    m, x["inputs"], x["target"], epsilon=epsilon, alpha=alpha, num_steps=steps, step_size=eta
                )

            attack = "FGSM" if num_steps == 1 else f"PGD-{num_steps}"
            refs = [
                Reference(
                    f"{attack} by hand, F.cross_entropy",
                    by_hand,
                    True,
                    note="ours: the library's cross_entropy (checks, accuracy), 4 more metrics",
                    compilable=False,
                )
            ]
            size = f"{n}x{features} {attack}, {hidden}"
            cases.append(Case("adversarial", size, make, (), ours, refs))
    return cases


_ACTOR_CRITIC_KEYS = (
    "policy_logits",
    "values",
    "actions",
    "advantages",
    "returns",
    "potentials",
    "next_potentials",
    "terminated",
)


def _actor_critic_cases(sizes: Sequence[tuple[int, int]], device: str) -> list[Case]:
    """``RewardShapingLoss`` on ``N`` transitions of ``A`` actions (5% of them ending an episode)."""
    loss_fn = RewardShapingLoss()
    cases = []
    for n, actions in sizes:

        def make(n: int = n, actions: int = actions) -> Inputs:
            g = _generator()
            inputs = {
                "policy_logits": torch.randn(n, actions, generator=g),
                "values": torch.randn(n, generator=g),
                "actions": torch.randint(0, actions, (n,), generator=g),
                "advantages": torch.randn(n, generator=g),
                "returns": torch.randn(n, generator=g),
                "potentials": torch.randn(n, generator=g),
                "next_potentials": torch.randn(n, generator=g),
                "terminated": torch.rand(n, generator=g) < 0.05,
            }
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["policy_logits"].requires_grad_()
            inputs["values"].requires_grad_()
            return inputs

        def ours(x: Inputs, f: RewardShapingLoss = loss_fn) -> Tensor:
            return f(*(x[k] for k in _ACTOR_CRITIC_KEYS)).loss

        def functional(x: Inputs) -> Tensor:
            return reward_shaping_loss(*(x[k] for k in _ACTOR_CRITIC_KEYS))

        note = (
            "ours: log-prob and entropy from one log_softmax, gradient by hand (no where for -inf logits); "
            "input checks, 8 metrics"
        )
        if n * actions < HOST_BOUND_ELEMENTS:
            note = f"{_HOST_BOUND_NOTE}; {note}"
        refs = [
            Reference(
                f"A2C + shaping ({form})",
                lambda x, categorical=categorical: ref.actor_critic(
                    *(x[k] for k in _ACTOR_CRITIC_KEYS), categorical=categorical
                ),
                True,
                note=note,
                compilable=not categorical,
            )
            for form, categorical in (("Categorical", True), ("log_softmax", False))
        ]
        cases.append(
            Case(
                "reward_shaping",
                f"{n}x{actions}",
                make,
                ("policy_logits", "values"),
                ours,
                refs,
                functional=functional,
            )
        )
    return cases


_PG_KEYS = ("next_token_logits", "input_ids", "advantages", "prev_logprobs")
_DPO_KEYS = ("next_token_logits", "input_ids", "prev_logprobs")  # DPO reads prev_logprobs as the reference's
_FUSED_TOKEN_NOTE = (
    "ours: fused cross-entropy per token over the whole [B*T, V] (one [B*T, V] tensor: the gradient)"
)
_PLAIN_TOKEN_NOTE = (
    "ours: F.cross_entropy(reduction='none') per token over the whole [B*T, V], then the loss's terms"
)


def _log_probs_refs(name: str, formula: Callable[[Tensor, Inputs], Tensor], note: str) -> list[Reference]:
    """A next-token loss's ``formula(log_probs, inputs)`` over each of the two usual log-prob forms."""
    forms = {
        "log_softmax-gather": ref.taken_log_probs_log_softmax,
        "gather-logsumexp": ref.taken_log_probs_gather_logsumexp,
    }
    return [
        Reference(
            f"{name} ({form})",
            lambda x, taken=taken: formula(taken(x["next_token_logits"], x["input_ids"]), x),
            True,
            note=note,
        )
        for form, taken in forms.items()
    ]


def _token_cases(loss: str, sizes: Sequence[tuple[int, int, int]], device: str) -> list[Case]:
    """Next-token losses on ``[B, T, V]`` logits: a masked prompt (the first quarter of each sequence),
    sampling log-probs near the policy's (ratios near 1, some clipped) for PPO, the same as the frozen
    reference for DPO."""
    cases = []
    for batch, steps, vocab in sizes:
        fused = device == "cpu" and batch * steps * vocab >= FUSED_MIN_ELEMENTS
        note = _FUSED_TOKEN_NOTE if fused else _PLAIN_TOKEN_NOTE

        def make(batch: int = batch, steps: int = steps, vocab: int = vocab) -> Inputs:
            g = _generator()
            logits = torch.randn(batch, steps, vocab, generator=g)
            input_ids = torch.randint(0, vocab, (batch, steps), generator=g)
            token_mask = torch.ones(batch, steps)
            token_mask[:, : steps // 4] = 0
            with torch.no_grad():
                taken = ref.taken_log_probs_gather_logsumexp(logits, input_ids)
            previous = torch.zeros(batch, steps)
            previous[:, 1:] = taken + 0.1 * torch.randn(taken.shape, generator=g)
            inputs = {
                "next_token_logits": logits,
                "input_ids": input_ids,
                "token_mask": token_mask,
                "advantages": torch.randn(batch, generator=g),
                "prev_logprobs": previous,
            }
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["next_token_logits"].requires_grad_()
            return inputs

        if loss == "nll":
            nll = NLLLoss()
            ours = lambda x, f=nll: f(x["next_token_logits"], x["input_ids"], x["token_mask"]).loss  # noqa: E731
            functional = lambda x: nll_loss(x["next_token_logits"], x["input_ids"], x["token_mask"])  # noqa: E731
            refs = [
                Reference(
                    "F.cross_entropy (ignore_index)",
                    lambda x: ref.sft_cross_entropy(x["next_token_logits"], x["input_ids"], x["token_mask"]),
                    True,
                    note=note,
                )
            ]
        elif loss == "clipped_pg":
            pg = ClippedPGLoss()

            def ours(x: Inputs, f: ClippedPGLoss = pg) -> Tensor:
                return f(*(x[k] for k in _PG_KEYS), token_mask=x["token_mask"]).loss

            def functional(x: Inputs) -> Tensor:
                return clipped_pg_loss(*(x[k] for k in _PG_KEYS), token_mask=x["token_mask"]).loss

            refs = _log_probs_refs(
                "PPO clip",
                lambda lp, x: ref.ppo_clip(lp, x["prev_logprobs"], x["advantages"], x["token_mask"]),
                note,
            )
        elif loss == "dpo":
            dpo = DPOLoss(beta=0.1)
            ours = lambda x, f=dpo: f(*(x[k] for k in _DPO_KEYS), token_mask=x["token_mask"]).loss  # noqa: E731
            functional = lambda x: dpo_loss(*(x[k] for k in _DPO_KEYS), token_mask=x["token_mask"]).loss  # noqa: E731
            refs = _log_probs_refs(
                "DPO", lambda lp, x: ref.dpo(lp, x["prev_logprobs"], x["token_mask"]), note
            )
        else:
            raise ValueError(f"not a next-token loss: {loss!r}")
        cases.append(
            Case(
                loss,
                f"{batch}x{steps}x{vocab}",
                make,
                ("next_token_logits",),
                ours,
                refs,
                functional=functional,
            )
        )
    return cases


def _ntxent_bytes(num_pairs: int) -> int:
    """Estimated peak of pytorch-metric-learning's ``NTXentLoss`` on ``2N`` rows: it builds several
    ``[#positive pairs, #negative pairs] = [2N, 2N(2N-2)]`` float tensors (about four at once)."""
    rows = 2 * num_pairs
    return 4 * rows * rows * (rows - 2) * 4


def _embedding_cases(loss: str, batches: Sequence[int], dim: int, device: str) -> list[Case]:
    pml = ref.pml_available()
    no_pml = None if pml else "pytorch-metric-learning not installed"
    cases = []
    for n in batches:

        def make(n: int = n) -> Inputs:
            g = _generator()
            inputs = {
                "embeddings": torch.randn(n, dim, generator=g),
                "positive_embeddings": torch.randn(n, dim, generator=g),
                "target": _labels(n, max(1, n // 8), g),
            }
            inputs["positive_embeddings"] = inputs["embeddings"] + 0.5 * inputs["positive_embeddings"]
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["embeddings"].requires_grad_()
            inputs["positive_embeddings"].requires_grad_()
            return inputs

        checks: list[tuple[str, Callable[[Inputs], Tensor], Callable[[Inputs], Tensor]]] = []
        if loss == "contrastive":
            fn = ContrastiveLoss(margin=1.0)
            guide = load_guide("ContrastiveLoss")({"margin": 1.0})
            ours = lambda x, fn=fn: fn(x["embeddings"], x["target"]).loss  # noqa: E731
            functional = lambda x: contrastive_loss(x["embeddings"], x["target"], margin=1.0)  # noqa: E731
            refs = [
                Reference(
                    "pml ContrastiveLoss",
                    _pml_call(lambda: ref.pml_contrastive(1.0), "embeddings") if pml else _missing,
                    False,
                    note="hinges d, not d² (raw distances, mean over pairs); positive term checked below",
                    compilable=False,
                    skip=no_pml,
                ),
                Reference(
                    "guide ContrastiveLoss",
                    lambda x, g=guide: g(x["embeddings"], x["target"])[0],
                    True,
                    note="torch.cdist; NaN without a positive pair (see guide table)",
                    compilable=False,
                ),
            ]
            if pml:
                checks.append(
                    (
                        "positive term = pml ContrastiveLoss(d², neg_margin=0)",
                        lambda x, fn=fn: fn(x["embeddings"], x["target"]).metrics["positive_loss"],
                        _pml_call(
                            lambda: ref.pml_contrastive(1.0, squared=True, positive_only=True), "embeddings"
                        ),
                    )
                )
        elif loss == "supcon":
            fn = SupConLoss(temperature=0.1)
            ours = lambda x, fn=fn: fn(x["embeddings"], x["target"]).loss  # noqa: E731
            functional = lambda x: supervised_contrastive_loss(  # noqa: E731
                x["embeddings"], x["target"], temperature=0.1
            )
            refs = [
                Reference(
                    "pml SupConLoss",
                    _pml_call(lambda: ref.pml_supcon(0.1), "embeddings") if pml else _missing,
                    True,
                    compilable=False,
                    skip=no_pml,
                )
            ]
        elif loss == "infonce":
            fn = InfoNCELoss(temperature=0.1)
            ours = lambda x, fn=fn: fn(x["embeddings"], x["positive_embeddings"]).loss  # noqa: E731
            functional = lambda x: info_nce_loss(  # noqa: E731
                x["embeddings"], x["positive_embeddings"], temperature=0.1
            )
            too_big = _ntxent_bytes(n) > PML_NTXENT_LIMIT
            refs = [
                Reference(
                    "F.cross_entropy form",
                    lambda x: ref.info_nce_cross_entropy(x["embeddings"], x["positive_embeddings"], 0.1),
                    True,
                    note="ours: one fused function below 32 MiB of s (one product for the gradient, "
                    "normalization's gradient by hand), blocked CE above; metrics ~0.1 ms at small N",
                ),
                Reference(
                    "pml NTXentLoss",
                    _pml_ntxent_call(0.1) if pml else _missing,
                    True,
                    compilable=False,
                    skip=no_pml
                    or (
                        f"needs ~{_ntxent_bytes(n) / 2**30:.0f} GiB ([2N, 2N(2N-2)] masks)"
                        if too_big
                        else None
                    ),
                ),
            ]
        else:
            raise ValueError(f"not an embedding loss: {loss!r}")
        size = f"{n} pairs x {dim}" if loss == "infonce" else f"{n}x{dim}"
        cases.append(
            Case(loss, size, make, ("embeddings", "positive_embeddings"), ours, refs, checks, functional)
        )
    return cases


def _missing(inputs: Inputs) -> Tensor:
    raise RuntimeError("pytorch-metric-learning is not installed")


def _pml_call(build: Callable[[], torch.nn.Module], key: str) -> Callable[[Inputs], Tensor]:
    loss_fn = build()
    return lambda x: loss_fn(x[key], x["target"])


def _pml_ntxent_call(temperature: float) -> Callable[[Inputs], Tensor]:
    loss_fn = ref.pml_ntxent(temperature)

    def call(x: Inputs) -> Tensor:
        n = len(x["embeddings"])
        labels = torch.arange(n, device=x["embeddings"].device).repeat(2)
        return loss_fn(torch.cat([x["embeddings"], x["positive_embeddings"]]), labels)

    return call


def build_cases(names: Sequence[str], *, quick: bool, device: str) -> list[Case]:
    """The cases of ``names`` (see :data:`LOSSES`) at full or ``quick`` (tiny) sizes."""
    # each with 256x1000 (an ImageNet classifier's batch) and 64x10 (digits: 64 rows, 10 classes)
    logit_sizes = {
        "cross_entropy": [(4096, 32768), (4096, 8192), (16384, 1024), (256, 1000), (64, 10)],
        "focal_multiclass": [(4096, 32768), (8192, 1000), (256, 1000), (64, 10)],
        "focal_sigmoid": [(65536, 80), (8192, 1000), (256, 1000), (64, 10)],
        "kl_divergence": [(4096, 32768), (8192, 1000), (256, 1000), (64, 10)],
        "kl_reverse": [(1024, 32768), (8192, 1000), (256, 1000), (64, 10)],
        "jsd": [(1024, 32768), (8192, 1000), (256, 1000), (64, 10)],
    }
    batches = {"contrastive": [256, 1024, 4096], "supcon": [256, 1024, 4096], "infonce": [128, 512, 2048]}
    # [B, T, V]: 4096 scored tokens of a 32k and an 8k vocabulary (an LLM's micro-batch), and a small one
    token_sizes = [(4, 1025, 32768), (8, 513, 8192), (8, 129, 1000)]
    # a regression head's batch, per-row targets, a value head's tokens, a small one (digits: 64 rows)
    mse_sizes = [
        ((4096, 1024), None),
        ((4096, 1024), "rows"),
        ((65536, 16), None),
        ((16, 8192), "tokens"),
        ((64, 1024), "tokens"),
        ((64, 1), None),
    ]
    cases: list[Case] = []
    for name in names:
        if name in logit_sizes:
            cases += _logit_cases(name, [(48, 10)] if quick else logit_sizes[name], device)
        elif name == "mse":
            cases += _regression_cases([((48, 3), None), ((8, 8), "tokens")] if quick else mse_sizes, device)
        elif name == "adversarial":
            # digits (64 rows of 8x8 pixels) with the examples' MLP, and a wider model and batch
            cases += _adversarial_cases([(16, 8, 16)] if quick else [(64, 64, 128), (1024, 64, 1024)], device)
        elif name in ("multi_task", "combined"):
            # digits (64 rows, 10 classes, one regression output), ImageNet-sized classes, a large batch
            sizes = [(16, 5, 1)] if quick else [(64, 10, 1), (2048, 1000, 16), (8192, 1000, 16)]
            cases += _composite_cases(name, sizes, device)
        elif name == "reward_shaping":
            # CartPole A2C (8 envs x 8 steps), an Atari rollout of 16 envs x 128 steps, a large one
            cases += _actor_critic_cases([(16, 2)] if quick else [(64, 2), (2048, 18), (65536, 18)], device)
        elif name in ("nll", "clipped_pg", "dpo"):
            cases += _token_cases(name, [(4, 9, 11)] if quick else token_sizes, device)
        elif name in batches:
            cases += _embedding_cases(name, [32] if quick else batches[name], 8 if quick else 128, device)
    return cases


# ----------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_once(fn: Callable[[Inputs], Tensor], inputs: Inputs, case: Case, device: str) -> float:
    for key in case.grad_keys:
        if key in inputs:
            inputs[key].grad = None
    loss = fn(inputs)
    loss.backward()
    _sync(device)
    return float(loss.detach())


def _peak_bytes(fn: Callable[[Inputs], Tensor], inputs: Inputs, case: Case, device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    for key in case.grad_keys:
        inputs[key].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _run_once(fn, inputs, case, device)
    return torch.cuda.max_memory_allocated() - before


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def measure_case(case: Case, *, repeats: int, device: str, compile: bool) -> dict[str, Any]:
    """Times (median of ``repeats`` alternating rounds after one warm-up run; in each round every variant
    runs twice and the second call is timed, in an order rotated by one from the last round's; variants
    over ``SLOW_VARIANT`` times slower than ours get rounds of their own), values, CUDA peaks and the
    value checks of one case."""
    inputs = case.make()
    variants: dict[str, Callable[[Inputs], Tensor]] = {"ours": case.ours}
    if case.functional is not None:
        variants["ours (functional)"] = case.functional
    active = [r for r in case.references if r.skip is None]
    for r in active:
        variants[r.name] = r.fn
    if compile:
        variants["ours (compiled)"] = torch.compile(case.ours)
        for r in active:
            if r.compilable:
                variants[f"{r.name} (compiled)"] = torch.compile(r.fn)
    values, warm_up_s = {}, {}
    for name, fn in variants.items():
        start = time.perf_counter()
        values[name] = _run_once(fn, inputs, case, device)
        warm_up_s[name] = time.perf_counter() - start
    # A variant over SLOW_VARIANT times slower than ours (pml's NTXent: hundreds of ms, GiBs of masks)
    # is timed in rounds of its own after the others: with glibc's allocator the calls after it ran
    # 1.5x slower for more than eight calls, which its neighbours' one untimed call did not absorb.
    slow = [name for name in variants if warm_up_s[name] > SLOW_VARIANT * warm_up_s["ours"]]
    groups = [[name for name in variants if name not in slow], slow]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for names in filter(None, groups):
        for round_index in range(repeats):
            shift = round_index % len(names)  # the order rotates: no variant always follows another
            for name in names[shift:] + names[:shift]:
                fn = variants[name]
                # one untimed call first: the timed call finds caches and heap as its own previous call
                # left them (as in a training loop), not as the variant before it did
                _run_once(fn, inputs, case, device)
                start = time.perf_counter()
                _run_once(fn, inputs, case, device)
                times[name].append(time.perf_counter() - start)
    peaks = {name: _peak_bytes(fn, inputs, case, device) for name, fn in variants.items()}
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}

    rows = []
    for r in case.references:
        row: dict[str, Any] = {
            "loss": case.loss,
            "size": case.size,
            "reference": r.name,
            "ours_ms": median_ms["ours"],
            "ours_functional_ms": median_ms.get("ours (functional)"),
            "reference_ms": None,
            "ratio": None,
            "ours_compiled_ms": median_ms.get("ours (compiled)"),
            "reference_compiled_ms": median_ms.get(f"{r.name} (compiled)"),
            "compiled_ratio": None,
            "peak_memory_ratio": None,
            "ours_value": values["ours"],
            "reference_value": None,
            "should_agree": r.agrees,
            "agree": None,
            "note": f"skipped: {r.skip}" if r.skip else r.note,
        }
        if r.skip is None:
            row["reference_ms"] = median_ms[r.name]
            row["ratio"] = median_ms["ours"] / median_ms[r.name]
            row["reference_value"] = values[r.name]
            row["agree"] = _close(values["ours"], values[r.name])
            if row["ours_compiled_ms"] is not None and row["reference_compiled_ms"] is not None:
                row["compiled_ratio"] = row["ours_compiled_ms"] / row["reference_compiled_ms"]
            if peaks["ours"] is not None and peaks[r.name]:
                row["peak_memory_ratio"] = peaks["ours"] / peaks[r.name]
            if row["ratio"] > 1.0:
                row["note"] = ("REFERENCE FASTER; " + row["note"]).rstrip("; ")
        rows.append(row)
    checks = []
    for name, ours_fn, ref_fn in case.checks:
        with torch.no_grad():
            a, b = float(ours_fn(inputs)), float(ref_fn(inputs))
        checks.append({"loss": case.loss, "size": case.size, "check": name, "ours": a, "reference": b})
        checks[-1]["agree"] = _close(a, b)
    return {"rows": rows, "checks": checks, "times_ms": {k: v for k, v in times.items()}}


# ----------------------------------------------------------------------------------------------------
# the guide's snippets
# ----------------------------------------------------------------------------------------------------


Trial = Callable[[], tuple[Tensor, list[Tensor], str]]


def _guide_trials() -> list[tuple[str, str, Trial]]:
    """``(snippet, inputs, trial)``; a trial returns the loss, the tensors whose gradients must be finite
    after ``loss.backward()`` and a note on what it saw."""
    g = _generator(1)

    def logits(*shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    def custom_loss_function() -> tuple[Tensor, list[Tensor], str]:
        x = logits(2, 3, 5)
        return load_guide("CustomLossFunction")({})(x, {}, torch.tensor(2), torch.tensor(6))[0], [x], ""

    def custom_sequence() -> tuple[Tensor, list[Tensor], str]:
        x = logits(4, 6, 10)
        data = {"rewards": torch.randn(4, generator=g), "advantages": torch.randn(4, generator=g)}
        loss = load_guide("CustomSequenceLoss")({})(x, data, torch.tensor(4), torch.tensor(24))[0]
        return (
            loss,
            [x],
            "another objective: -(mean of every log-prob) x (mean advantage); value_loss compares means",
        )

    def contrastive(labels: Tensor) -> Trial:
        def trial() -> tuple[Tensor, list[Tensor], str]:
            x = logits(len(labels), 8)
            return load_guide("ContrastiveLoss")({})(x, labels)[0], [x], ""

        return trial

    def kl(scale: float) -> Trial:
        def trial() -> tuple[Tensor, list[Tensor], str]:
            s, t = logits(8, 10, scale=scale), logits(8, 10, scale=scale).detach()
            return (
                load_guide("KLDivergenceLoss")({})(s, t, torch.randint(0, 10, (8,), generator=g))[0],
                [s],
                "",
            )

        return trial

    def reward_shaping() -> tuple[Tensor, list[Tensor], str]:
        x, v = logits(8, 4), logits(8)
        rewards, advantages = torch.randn(8, generator=g), torch.randn(8, generator=g)
        return load_guide("RewardShapingLoss")({})(x, v, rewards, advantages)[0], [x, v], ""

    def multi_task(task_ids: Tensor, task_weights: dict[int, float]) -> Trial:
        def trial() -> tuple[Tensor, list[Tensor], str]:
            config = {"uncertainty_weighting": True, "task_weights": task_weights}
            x = logits(8, 3)
            targets = torch.randint(0, 3, (8,), generator=g)
            loss, metrics = load_guide("MultiTaskLoss")(config)(x, targets, task_ids)
            weight = metrics["task_0_weight"]
            return (
                loss,
                [x],
                (
                    f"task_weights {{0: {task_weights[0]}}} applied as {weight} (int keys never match tensor "
                    "task ids); sigma = the predictions' variance, not learned"
                ),
            )

        return trial

    def adversarial() -> tuple[Tensor, list[Tensor], str]:
        model = torch.nn.Linear(6, 3)
        inputs, targets = torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = load_guide("AdversarialLoss")({})(model, inputs, targets)[0]
        leaked = model.weight.grad is not None
        return (
            loss,
            [model.weight],
            (
                f"its inner backward left gradients in the model before the caller's: {leaked}; "
                f"sets requires_grad on the caller's inputs: {inputs.requires_grad}"
            ),
        )

    def combined() -> tuple[Tensor, list[Tensor], str]:
        config = {
            "loss_weights": [0.6, 0.3, 0.1],
            "loss_functions": [
                {"name": "cross_entropy", "params": {"weight": 1.0}},
                {"name": "focal", "params": {"alpha": 1.0, "gamma": 2.0}},
                {"name": "kl_divergence", "params": {"temperature": 4.0, "alpha": 0.7}},
            ],
        }
        x = logits(8, 3)
        return load_guide("CombinedLoss")(config)(x, torch.randint(0, 3, (8,), generator=g))[0], [x], ""

    return [
        ("CustomLossFunction", "the protocol template, [2, 3, 5] logits", custom_loss_function),
        ("CustomSequenceLoss", "[4, 6, 10] logits, rewards, advantages", custom_sequence),
        ("ContrastiveLoss", "8 x 8 embeddings, 4 classes x 2", contrastive(torch.arange(8) % 4)),
        ("ContrastiveLoss", "8 x 8 embeddings, all labels distinct", contrastive(torch.arange(8))),
        ("KLDivergenceLoss", "[8, 10] logits ~ N(0, 1), targets", kl(1.0)),
        ("KLDivergenceLoss", "[8, 10] confident logits ~ N(0, 100²), targets", kl(100.0)),
        ("RewardShapingLoss", "[8, 4] policy logits, values, rewards, advantages", reward_shaping),
        (
            "MultiTaskLoss",
            "the guide's YAML; tasks 0 (classification) and 1 (regression)",
            multi_task(torch.tensor([0, 1] * 4), {0: 1.0, 1: 0.5, 2: 0.3}),
        ),
        (
            "MultiTaskLoss",
            "classification only (task 0), task_weights {0: 2.0}",
            multi_task(torch.zeros(8, dtype=torch.long), {0: 2.0}),
        ),
        ("AdversarialLoss", "Linear(6, 3), [8, 6] inputs", adversarial),
        ("CombinedLoss", "the guide's YAML (cross_entropy, focal, kl_divergence)", combined),
    ]


def _error(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:100]


def run_guide() -> list[dict[str, Any]]:
    """Each guide snippet on small inputs: ``literal`` (the snippet run as written: its ``nemo_rl`` imports
    and the undefined ``BaseLossFunction``) and ``status`` with the shim (``runs``, ``crashes (error)`` or
    ``NaN`` when the loss or a gradient is not finite)."""
    rows = []
    for snippet, inputs, trial in _guide_trials():
        try:
            load_guide(snippet, shim=False)
            literal = "runs"
        except Exception as exc:
            literal = f"crashes ({_error(exc)})"
        try:
            load_guide(snippet, provide_any=False)
            note = ""
        except NameError as exc:
            note = f"also without `from typing import Any`: {_error(exc)}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss, leaves, seen = trial()
                finite_loss = bool(torch.isfinite(loss.detach()).all())
                loss.backward()
            finite_grads = all(t.grad is None or bool(torch.isfinite(t.grad).all()) for t in leaves)
            status = "runs" if finite_loss and finite_grads else "NaN"
            if status == "NaN":
                seen = f"loss {float(loss.detach())}" + ("" if finite_grads else ", non-finite gradient")
            note = "; ".join(part for part in (seen, note) if part)
        except Exception as exc:
            status = f"crashes ({_error(exc)})"
        rows.append(
            {"snippet": snippet, "inputs": inputs, "literal": literal, "status": status, "note": note}
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------


def run_suite(
    names: Sequence[str] = LOSSES,
    *,
    quick: bool = False,
    repeats: int = 5,
    device: str = "cpu",
    compile: bool = False,
) -> dict[str, Any]:
    """Measure ``names``; returns ``{"config", "rows", "checks", "guide"}``."""
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for case in build_cases(names, quick=quick, device=device):
        result = measure_case(case, repeats=repeats, device=device, compile=compile)
        rows += result["rows"]
        checks += result["checks"]
    config = {
        "quick": quick,
        "repeats": repeats,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "compile": compile,
        "torch": torch.__version__,
    }
    guide = run_guide() if "guide" in names else []
    return {"config": config, "rows": rows, "checks": checks, "guide": guide}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(report: dict[str, Any]) -> str:
    """The plain-text tables: timings, value checks, guide snippets."""
    c = report["config"]
    lines = [
        f"{c['device_name']}, {c['threads']} threads, torch {c['torch']}, median of {c['repeats']} runs "
        f"(forward + backward); ours = the loss module (metrics included), fn = its functional form; "
        f"ratio = ours / reference (< 1: ours faster)",
    ]
    if report["rows"]:
        compiled = c["compile"]
        header = f"{'loss':<16} {'size':<20} {'reference':<38} {'ours ms':>9} {'fn ms':>9} {'ref ms':>9}"
        header += f" {'ratio':>7}"
        if compiled:
            header += f" {'ours cmp':>9} {'ref cmp':>9} {'ratio':>7}"
        header += f" {'peak mem':>8} {'agree':>6}  note"
        lines += ["", header]
        for r in report["rows"]:
            agree = "-" if r["agree"] is None else ("yes" if r["agree"] else "no")
            line = (
                f"{r['loss']:<16} {r['size']:<20} {r['reference']:<38} {_ms(r['ours_ms']):>9} "
                f"{_ms(r['ours_functional_ms']):>9} {_ms(r['reference_ms']):>9} {_ratio(r['ratio']):>7}"
            )
            if compiled:
                line += (
                    f" {_ms(r['ours_compiled_ms']):>9} {_ms(r['reference_compiled_ms']):>9} "
                    f"{_ratio(r['compiled_ratio']):>7}"
                )
            line += f" {_ratio(r['peak_memory_ratio']):>8} {agree:>6}  {r['note']}"
            lines.append(line.rstrip())
    if report["checks"]:
        lines += ["", "value checks (where only part of the definitions coincide):"]
        for k in report["checks"]:
            verdict = "agree" if k["agree"] else "DIFFER"
            lines.append(
                f"  {k['loss']} {k['size']}: {k['check']}: ours {k['ours']:.6g}, "
                f"reference {k['reference']:.6g} -> {verdict}"
            )
    if report["guide"]:
        lines += ["", f"{'guide snippet':<20} {'inputs':<62} {'as written':<58} with shim"]
        for g in report["guide"]:
            lines.append(f"{g['snippet']:<20} {g['inputs']:<62} {g['literal']:<58} {g['status']}")
            if g["note"]:
                lines.append(f"{'':<20}   {g['note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks``: run, print the tables, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=LOSSES, default=list(LOSSES), metavar="NAME",
                        help=f"a subset of: {', '.join(LOSSES)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd ours and references"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_suite(
        args.only, quick=args.quick, repeats=args.repeats, device=args.device, compile=args.compile
    )
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report
