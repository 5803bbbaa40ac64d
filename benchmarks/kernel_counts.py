"""Kernels per call on the accelerator path: how many ATen ops that compute (views, metadata changes and
bare allocations left out) each loss's forward + backward dispatches, ours against its references.

Run::

    python -m benchmarks.kernel_counts [--quick] [--only cross_entropy focal_multiclass ...] [--json out.json]

The cases are :mod:`benchmarks.losses`'s, on ``meta`` tensors: they hold no data, so every call takes the
path an accelerator takes (no CPU value checks, no CPU-only fused blocks) and costs nothing, whatever the
size. On a GPU at small sizes a call's time is the host's, a few µs for each kernel launched on top of the
Python, so this count is what the library can cut there; it is exact, needs no GPU and does not move
between runs. Times measured on ``meta`` would be no proxy: meta kernels are largely Python
(``F.cross_entropy`` takes ~2.8 ms there). A reference that reads values (``Tensor.item()``, a
data-dependent shape: a host-device sync on a GPU) cannot run on ``meta`` and is reported as such.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.losses import LOSSES, Inputs, build_cases

# ops that launch no kernel: metadata changes and allocations (a caching allocator's, on a GPU)
_NO_KERNEL = frozenset(
    {
        "aten._unsafe_view.default",
        "aten.squeeze_.dim",
        "aten.unsqueeze_.default",
        "aten.as_strided_.default",
        "aten.empty.memory_format",
        "aten.empty_like.default",
        "aten.empty_strided.default",
        "aten.new_empty.default",
        "aten.new_empty_strided.default",
        "aten.lift_fresh.default",
    }
)


class _KernelCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if not func.is_view and name not in _NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable[[], Tensor]) -> collections.Counter[str]:
    """The compute ops ``fn()`` and the backward of its result dispatch, by name.

    >>> import torch
    >>> x = torch.ones(3, device="meta", requires_grad=True)
    >>> sorted(count_kernels(lambda: (x * 2).sum()).items())
    [('aten.mul.Tensor', 2), ('aten.ones_like.default', 1), ('aten.sum.default', 1)]
    """
    counter = _KernelCounter()
    with counter:
        loss = fn()
        if loss.requires_grad:
            loss.backward()
    return counter.counts


def _count(fn: Callable[[Inputs], Tensor], inputs: Inputs, grad_keys: Sequence[str]) -> int | str:
    """The kernel count of one fwd+bwd call, or why it cannot run on ``meta``."""
    for key in grad_keys:
        if key in inputs:
            inputs[key].grad = None
    try:
        return sum(count_kernels(lambda: fn(inputs)).values())
    except (RuntimeError, NotImplementedError) as error:
        return f"reads values ({str(error).splitlines()[0][:60]})"


def run(names: Sequence[str] = LOSSES, *, quick: bool = False) -> list[dict[str, Any]]:
    """One row per case and reference: kernels of ours (module, functional) and of the reference."""
    rows = []
    for case in build_cases([n for n in names if n != "guide"], quick=quick, device="meta"):
        inputs = case.make()
        ours = _count(case.ours, inputs, case.grad_keys)
        if isinstance(ours, str):
            raise RuntimeError(f"{case.loss} {case.size}: ours {ours}")  # the meta tests guard against it
        functional = None if case.functional is None else _count(case.functional, inputs, case.grad_keys)
        for reference in case.references:
            ref = reference.skip or _count(reference.fn, inputs, case.grad_keys)
            rows.append(
                {
                    "loss": case.loss,
                    "size": case.size,
                    "reference": reference.name,
                    "ours": ours,
                    "ours_functional": functional,
                    "reference_kernels": ref if isinstance(ref, int) else None,
                    "ratio": ours / ref if isinstance(ref, int) and ref else None,
                    "note": "" if isinstance(ref, int) else ref,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "kernels per forward + backward on the accelerator path (meta tensors); ours = the loss module "
        "(metrics included), fn = its functional form",
        f"{'loss':<17}{'size':<21}{'reference':<42}{'ours':>6}{'fn':>6}{'ref':>6}{'ratio':>8}  note",
    ]
    for r in rows:
        fn = "-" if r["ours_functional"] is None else str(r["ours_functional"])
        ref = "-" if r["reference_kernels"] is None else str(r["reference_kernels"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"{r['loss']:<17}{r['size']:<21}{r['reference'][:41]:<42}{r['ours']:>6}{fn:>6}{ref:>6}{ratio:>8}"
            f"  {r['note']}".rstrip()
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_counts", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the smoke run's sizes")
    parser.add_argument("--only", nargs="+", choices=LOSSES, default=list(LOSSES), metavar="NAME")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.only, quick=args.quick)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
