"""Scaling of the losses with problem size: time vs tokens N for token losses, time and peak memory vs
batch size for pairwise losses, and the largest batch each pairwise loss handles within a memory budget.

Run::

    python -m benchmarks.scaling --token-sizes 2048,4096,8192,16384 --vocab 8192 \\
        --pair-sizes 512,1024,2048,4096 --dim 128 --chunk-size 1024 --repeats 3 --json out.json

    # the 16k x 128 SupCon target: the whole-matrix path against the chunked one
    python -m benchmarks.scaling --token-sizes "" --pair-sizes 16384 --pair-variants supcon,supcon_chunked \\
        --repeats 1

Variants, each one forward + backward (inputs that require grad, random data, fixed seed):

- token losses on logits ``[N, V]`` and random class targets: ``cross_entropy``
  (:func:`~lightning_losses.functional.cross_entropy.cross_entropy`) and ``focal``
  (:func:`~lightning_losses.functional.focal.focal_loss`, ``gamma=2``). Linear in ``N``: the table prints
  time / N (µs per token) and its ratio to the smallest size's (1.0 = exactly linear);
- pairwise losses on a batch of ``N`` embeddings ``[N, D]`` (labels: ``N // 8`` classes, so every row has
  positives): ``contrastive`` (margin), ``supcon``, ``infonce`` and their ``*_chunked`` variants
  (``chunk_size``); ``infonce`` takes two views of ``N / 2`` pairs (the same ``N`` rows in the similarity
  matrix).

Time: the median of ``--repeats`` runs after one warm-up run, all variants of one size in one process,
alternately (a change of load on a shared machine hits all of them alike).

Peak memory *above the inputs* (pairwise losses): as in :mod:`benchmarks.fused_linear`, each (variant, N) in
a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``: ``VmHWM - VmRSS`` around one forward + backward
after ``clear_refs`` (CUDA: ``max_memory_allocated``). ``--in-process`` measures in this process instead
(fast, for the smoke test; CPU figures only indicative).

Largest batch within ``--budget-gib`` (default 8): from a **memory model fitted to the measured peaks**,
``peak(N) = a N² + b N + c`` (least squares over the measured sizes; with fewer than 3 sizes ``c = 0``,
with 1 size ``peak = a N²``), plus the inputs and their gradients (``2 N D`` elements) and the labels; the
largest ``N`` whose total fits. The time model ``t = α N²`` (fitted the same way) gives the time at that
``N``. Extrapolations: check one with ``--pair-sizes <N>`` when the machine has the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.fused_linear import _peak_above_inputs
from lightning_losses.functional.contrastive import (
    contrastive_loss,
    info_nce_loss,
    supervised_contrastive_loss,
)
from lightning_losses.functional.cross_entropy import cross_entropy
from lightning_losses.functional.focal import focal_loss

__all__ = [
    "PAIR_VARIANTS",
    "TOKEN_VARIANTS",
    "fit_memory_model",
    "largest_batch",
    "main",
    "measure_memory",
    "measure_times",
    "run_benchmark",
]

TOKEN_VARIANTS = ("cross_entropy", "focal")
PAIR_VARIANTS = (
    "contrastive",
    "contrastive_chunked",
    "supcon",
    "supcon_chunked",
    "infonce",
    "infonce_chunked",
)
MIB, GIB = 2**20, 2**30


def make_inputs(
    variant: str, n: int, *, vocab: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The inputs of ``variant`` at size ``n`` (tokens or batch); the floating ones require grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    if variant in TOKEN_VARIANTS:
        return {"logits": randn(n, vocab), "target": torch.randint(0, vocab, (n,), generator=g).to(device)}
    if variant.startswith("infonce"):
        return {"embeddings": randn(n // 2, dim), "positive_embeddings": randn(n // 2, dim)}
    labels = torch.randint(0, max(1, n // 8), (n,), generator=g).to(device)
    return {"embeddings": randn(n, dim), "target": labels}


def loss_fn(variant: str, chunk_size: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The loss of ``variant`` as a function of its inputs."""
    functions: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
        "cross_entropy": lambda x: cross_entropy(x["logits"], x["target"]),
        "focal": lambda x: focal_loss(x["logits"], x["target"], gamma=2.0),
        "contrastive": lambda x: contrastive_loss(x["embeddings"], x["target"]),
        "contrastive_chunked": lambda x: contrastive_loss(
            x["embeddings"], x["target"], chunk_size=chunk_size
        ),
        "supcon": lambda x: supervised_contrastive_loss(x["embeddings"], x["target"]),
        "supcon_chunked": lambda x: supervised_contrastive_loss(
            x["embeddings"], x["target"], chunk_size=chunk_size
        ),
        "infonce": lambda x: info_nce_loss(x["embeddings"], x["positive_embeddings"]),
        "infonce_chunked": lambda x: info_nce_loss(
            x["embeddings"], x["positive_embeddings"], chunk_size=chunk_size
        ),
    }
    if variant not in functions:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(functions)}")
    return functions[variant]


def _run_once(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], inputs: dict[str, Any], device: str
) -> float:
    for value in inputs.values():
        value.grad = None
    loss = fn(inputs)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return float(loss.detach())


def measure_memory(
    variant: str, n: int, *, vocab: int, dim: int, dtype: str, device: str, chunk_size: int, **_: Any
) -> dict[str, Any]:
    """One warm-up run of ``variant`` at size ``n``, then one run's peak memory above the inputs, here."""
    inputs = make_inputs(variant, n, vocab=vocab, dim=dim, dtype=getattr(torch, dtype), device=device)
    fn = loss_fn(variant, chunk_size)
    loss = _run_once(fn, inputs, device)
    for value in inputs.values():
        value.grad = None
    peak, _, method = _peak_above_inputs(lambda: _run_once(fn, inputs, device), device)
    return {"variant": variant, "n": n, "loss": loss, "peak_bytes": peak, "memory_method": method}


def measure_times(
    variants: Sequence[str],
    n: int,
    *,
    vocab: int,
    dim: int,
    dtype: str,
    device: str,
    chunk_size: int,
    repeats: int,
    **_: Any,
) -> dict[str, dict[str, Any]]:
    """Median forward + backward time of each variant at size ``n``: one warm-up each, then ``repeats``
    rounds running every variant once in turn."""
    fns = {v: loss_fn(v, chunk_size) for v in variants}
    inputs = {
        v: make_inputs(v, n, vocab=vocab, dim=dim, dtype=getattr(torch, dtype), device=device)
        for v in variants
    }
    losses = {v: _run_once(fn, inputs[v], device) for v, fn in fns.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, fn in fns.items():
            start = time.perf_counter()
            _run_once(fn, inputs[v], device)
            times[v].append(time.perf_counter() - start)
    return {v: {"time_s": statistics.median(t), "times_s": t, "loss": losses[v]} for v, t in times.items()}


def _memory_in_subprocess(variant: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.scaling", "--worker", f"{variant}:{n}", "--options"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [*command, json.dumps(options)], env=env, cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:  # e.g. killed for memory: report it instead of a number
        return {"variant": variant, "n": n, "error": f"exit code {done.returncode}: {done.stderr[-500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _least_squares(columns: list[list[float]], values: list[float]) -> list[float]:
    a = torch.tensor(columns, dtype=torch.float64).T
    b = torch.tensor(values, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


def fit_memory_model(sizes: Sequence[int], peaks: Sequence[float]) -> tuple[float, float, float]:
    """``(a, b, c)`` of ``peak(N) = a N² + b N + c`` by least squares (``c = 0`` below 3 sizes, ``b = 0``
    with 1 size); a negative ``a`` (memory not growing quadratically, plus noise) is refitted with ``a = 0``.

    >>> [round(v, 6) for v in fit_memory_model([1, 2, 3, 4], [6.0, 17.0, 34.0, 57.0])]  # 3N² + 2N + 1
    [3.0, 2.0, 1.0]
    """
    ns = [float(n) for n in sizes]
    if len(ns) == 1:
        return peaks[0] / ns[0] ** 2, 0.0, 0.0
    if len(ns) == 2:
        a, b = _least_squares([[n * n for n in ns], ns], list(peaks))
        return a, b, 0.0
    a, b, c = _least_squares([[n * n for n in ns], ns, [1.0] * len(ns)], list(peaks))
    if a < 0:
        b, c = _least_squares([ns, [1.0] * len(ns)], list(peaks))
        return 0.0, b, c
    return a, b, c


def largest_batch(model: tuple[float, float, float], per_row_bytes: float, budget_bytes: float) -> int | None:
    """The largest ``N`` with ``a N² + (b + per_row_bytes) N + c <= budget_bytes`` (``None``: no bound
    found below 2**40, e.g. a model without a growing term).

    >>> largest_batch((1.0, 0.0, 0.0), 0.0, 100.0), largest_batch((0.0, 1.0, 0.0), 1.0, 100.0)
    (10, 50)
    """
    a, b, c = model
    b = b + per_row_bytes

    def total(n: int) -> float:
        return a * n * n + b * n + c

    if total(1) > budget_bytes:
        return 0
    low, high = 1, 2
    while total(high) <= budget_bytes:
        low, high = high, high * 2
        if high > 2**40:
            return None
    while high - low > 1:  # total(low) fits, total(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if total(mid) <= budget_bytes else (low, mid)
    return low


def run_benchmark(
    *,
    token_sizes: Sequence[int] = (2048, 4096, 8192, 16384),
    pair_sizes: Sequence[int] = (512, 1024, 2048, 4096),
    vocab: int = 8192,
    dim: int = 128,
    dtype: str = "float32",
    device: str = "cpu",
    chunk_size: int = 1024,
    repeats: int = 3,
    token_variants: Sequence[str] = TOKEN_VARIANTS,
    pair_variants: Sequence[str] = PAIR_VARIANTS,
    budget_gib: float = 8.0,
    in_process: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure everything; returns ``{"config", "token", "pairwise", "largest_batch"}``."""
    options = {"vocab": vocab, "dim": dim, "dtype": dtype, "device": device, "chunk_size": chunk_size}
    options_for_worker = options | {"threads": threads}
    isolate = not in_process and not device.startswith("cuda")
    token: list[dict[str, Any]] = []
    for n in token_sizes:
        for variant, r in measure_times(token_variants, n, repeats=repeats, **options).items():
            token.append({"variant": variant, "n": n, **r, "us_per_token": r["time_s"] / n * 1e6})
    for variant in token_variants:
        rows = [r for r in token if r["variant"] == variant]
        for r in rows:
            r["per_token_vs_smallest"] = r["us_per_token"] / rows[0]["us_per_token"]

    pairwise: list[dict[str, Any]] = []
    for n in pair_sizes:
        times = measure_times(pair_variants, n, repeats=repeats, **options)
        for variant in pair_variants:
            memory = (
                _memory_in_subprocess(variant, n, options_for_worker)
                if isolate
                else measure_memory(variant, n, **options)
            )
            pairwise.append({**memory, **times[variant]})

    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    largest: dict[str, Any] = {}
    for variant in pair_variants:
        rows = [r for r in pairwise if r["variant"] == variant and "peak_bytes" in r]
        if not rows:
            continue
        sizes = [r["n"] for r in rows]
        model = fit_memory_model(sizes, [float(r["peak_bytes"]) for r in rows])
        per_row = 2 * dim * element + 8  # embeddings and their gradient, a label
        n_max = largest_batch(model, per_row, budget_gib * GIB)
        alpha = _least_squares([[float(n) ** 2 for n in sizes]], [r["time_s"] for r in rows])[0]
        largest[variant] = {
            "n": n_max,
            "method": f"memory model fitted to measured peaks at N={sizes}",
            "model_bytes": {"a_n2": model[0], "b_n": model[1] + per_row, "c": model[2]},
            "predicted_time_s": None if n_max is None else alpha * n_max**2,
        }
    config = options | {
        "repeats": repeats,
        "budget_gib": budget_gib,
        "in_process": in_process,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    return {"config": config, "token": token, "pairwise": pairwise, "largest_batch": largest}


def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables of a :func:`run_benchmark` report."""
    c = report["config"]
    lines = [
        f"{c['dtype']} on {c['device_name']}, {c['threads']} threads, median of {c['repeats']} runs, "
        f"V={c['vocab']} D={c['dim']} chunk_size={c['chunk_size']}"
    ]
    if report["token"]:
        lines += ["", f"{'token loss':<16} {'N':>7} {'fwd+bwd s':>10} {'us/token':>9} {'vs smallest N':>14}"]
        for r in report["token"]:
            lines.append(
                f"{r['variant']:<16} {r['n']:>7} {r['time_s']:>10.4f} {r['us_per_token']:>9.3f} "
                f"{r['per_token_vs_smallest']:>13.2f}x"
            )
    if report["pairwise"]:
        whole_time = {(r["variant"], r["n"]): r["time_s"] for r in report["pairwise"]}
        lines += [
            "",
            f"{'pairwise loss':<16} {'N':>7} {'fwd+bwd s':>10} {'peak MiB':>10} {'vs whole':>9} {'loss':>10}",
        ]
        for r in report["pairwise"]:
            peak = f"{r['peak_bytes'] / MIB:>10.1f}" if "peak_bytes" in r else f"{'failed':>10}"
            base = whole_time.get((r["variant"].removesuffix("_chunked"), r["n"]))
            ratio = (
                f"{r['time_s'] / base:>8.2f}x" if r["variant"].endswith("_chunked") and base else f"{'':>9}"
            )
            lines.append(
                f"{r['variant']:<16} {r['n']:>7} {r['time_s']:>10.4f} {peak} {ratio} {r['loss']:>10.5f}"
            )
    if report["largest_batch"]:
        lines += [
            "",
            f"largest batch within {c['budget_gib']} GiB (from the memory model fitted to measured peaks):",
        ]
        for variant, r in report["largest_batch"].items():
            n = "no bound below 2**40" if r["n"] is None else f"N = {r['n']}"
            t = "" if r["predicted_time_s"] is None else f", predicted fwd+bwd {r['predicted_time_s']:.1f} s"
            m = r["model_bytes"]
            lines.append(
                f"  {variant:<16} {n}{t}  (peak ≈ {m['a_n2']:.3g} N² + {m['b_n']:.3g} N + {m['c']:.3g} bytes)"
            )
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _names(text: str, known: Sequence[str], parser: argparse.ArgumentParser, flag: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown {flag} {unknown}; choose from {list(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token-sizes", default="2048,4096,8192,16384", help="comma-separated N (tokens)")
    parser.add_argument("--pair-sizes", default="512,1024,2048,4096", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=8192, help="classes V of the token losses")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D of the pairwise losses")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--chunk-size", type=int, default=1024, help="anchor rows per chunk (chunked variants)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--token-variants", default=",".join(TOKEN_VARIANTS))
    parser.add_argument("--pair-variants", default=",".join(PAIR_VARIANTS))
    parser.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the largest batch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (CPU memory indicative)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker is not None:  # a subprocess measuring the memory of "<variant>:<n>"; prints one JSON line
        variant, n = args.worker.split(":")
        options = json.loads(args.options)
        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        print(json.dumps(measure_memory(variant, int(n), **options)))
        return None

    report = run_benchmark(
        token_sizes=_sizes(args.token_sizes),
        pair_sizes=_sizes(args.pair_sizes),
        vocab=args.vocab,
        dim=args.dim,
        dtype=args.dtype,
        device=args.device,
        chunk_size=args.chunk_size,
        repeats=args.repeats,
        token_variants=_names(args.token_variants, TOKEN_VARIANTS, parser, "--token-variants"),
        pair_variants=_names(args.pair_variants, PAIR_VARIANTS, parser, "--pair-variants"),
        budget_gib=args.budget_gib,
        in_process=args.in_process,
        threads=args.threads,
    )
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
