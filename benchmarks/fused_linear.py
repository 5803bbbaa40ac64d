"""Time and peak memory of the fused linear losses against the unfused path (logits, then the loss).

Run::

    python -m benchmarks.fused_linear --n 8192 --hidden 512 --vocab 32768 --dtype float32 --repeats 5 \\
        --json out.json [--compile] [--chunk-size 512] [--pairs ce,distill,reverse,jsd]

Variants, each one forward + backward of the loss from hidden states ``[N, H]`` that require grad and an
LM-head weight ``[V, H]`` that requires grad (targets: random token ids):

- ``unfused_ce``: ``F.cross_entropy(F.linear(hidden, weight), target)``;
- ``fused_ce``: :func:`lightning_losses.functional.fused_linear.fused_linear_cross_entropy`;
- ``unfused_distill``: forward KL at ``T = 1`` by the library's
  :func:`~lightning_losses.functional.distillation.distillation_loss` on ``F.linear(hidden, weight)`` and
  the teacher's ``F.linear(teacher_hidden, teacher_weight)`` (computed under ``no_grad``);
- ``fused_distill``: :func:`~lightning_losses.functional.fused_linear.fused_linear_distillation`, same;
- ``unfused_reverse`` / ``fused_reverse``, ``unfused_jsd`` / ``fused_jsd`` (pairs ``reverse``, ``jsd``,
  not run by default): the same with reverse KL, with the generalized JSD (β = 0.5).

Time: the median of ``--repeats`` runs after one warm-up run (``torch.cuda.synchronize`` after each on a
GPU). The two variants of a pair run in one process (a fresh subprocess on CPU), alternately, on the same
inputs, so that a change of load on a shared machine hits both alike.

Peak memory *above the inputs*: the most memory held at once during one forward + backward, minus what was
held just before it (the inputs; the gradients it produces count, for both paths alike):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
  ``reset_peak_memory_stats()`` (exact: the caching allocator's own count of live tensor bytes).
- CPU: the process's resident memory. Each variant runs in a fresh subprocess, so that memory freed by
  another variant cannot be reused unseen. In it: inputs are made (and so touched), one warm-up run goes
  by (it also compiles, with ``--compile``), the kernel's high-water mark is reset to the current resident
  size (``echo 5 > /proc/self/clear_refs``), the current size ``VmRSS`` is read, one run, then the peak
  ``VmHWM``; the peak above the inputs is ``VmHWM - VmRSS``. The measuring subprocess sets glibc's
  ``MALLOC_MMAP_THRESHOLD_=65536``: every block of 64 KiB or more is then its own ``mmap`` and goes back to
  the system when freed, so resident memory follows live tensors (glibc's default raises the threshold
  up to 32 MiB after frees, and a block served from a heap freed earlier would not raise resident memory).
  The timing runs in another fresh subprocess with the default allocator. Without ``clear_refs`` (not
  Linux), the peak is ``ru_maxrss`` (``resource.getrusage``) after the run minus before it: a lower bound.

``--in-process`` measures every variant in this process instead (fast, for the smoke test; on CPU the
memory figures are then only indicative). The table prints fused/unfused ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_losses.functional.distillation import distillation_loss
from lightning_losses.functional.fused_linear import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_distillation,
)

__all__ = ["PAIRS", "main", "measure_memory", "measure_times", "run_benchmark"]

PAIRS: dict[str, tuple[str, str]] = {
    "ce": ("unfused_ce", "fused_ce"),
    "distill": ("unfused_distill", "fused_distill"),
    "reverse": ("unfused_reverse", "fused_reverse"),
    "jsd": ("unfused_jsd", "fused_jsd"),
}
DIRECTIONS = {"distill": "forward", "reverse": "reverse", "jsd": "jsd"}  # of the distillation pairs
MIB = 2**20


def make_inputs(
    n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Hidden states and weights of a student and a teacher (scaled so logits are O(1)), targets."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return {
        "hidden": randn(n, hidden).requires_grad_(),
        "weight": randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
        "teacher_hidden": randn(n, hidden),
        "teacher_weight": randn(vocab, hidden, scale=hidden**-0.5),
        "target": torch.randint(0, vocab, (n,), generator=generator).to(device),
    }


def loss_fn(variant: str, chunk_size: int | None, compile: bool) -> Callable[[dict[str, Any]], torch.Tensor]:
    """The loss of ``variant`` as a function of the inputs."""
    if variant == "unfused_ce":
        return lambda x: F.cross_entropy(F.linear(x["hidden"], x["weight"]).float(), x["target"])
    if variant == "fused_ce":
        return lambda x: fused_linear_cross_entropy(
            x["hidden"], x["weight"], x["target"], chunk_size=chunk_size, compile=compile
        )
    path, _, pair = variant.partition("_")
    if pair in DIRECTIONS and path == "unfused":

        def unfused_distill(x: dict[str, Any]) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])
            logits = F.linear(x["hidden"], x["weight"])
            return distillation_loss(logits, teacher_logits, temperature=1.0, direction=DIRECTIONS[pair]).loss

        return unfused_distill
    if pair in DIRECTIONS and path == "fused":
        return lambda x: fused_linear_distillation(
            x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], temperature=1.0,
            direction=DIRECTIONS[pair], chunk_size=chunk_size, compile=compile,
        ).loss  # fmt: skip
    raise ValueError(f"unknown variant {variant!r}; known: {[v for pair in PAIRS.values() for v in pair]}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clear_grads(inputs: dict[str, Any]) -> None:
    for name in ("hidden", "weight"):
        inputs[name].grad = None


def _run_once(fn: Callable[[dict[str, Any]], torch.Tensor], inputs: dict[str, Any], device: str) -> float:
    _clear_grads(inputs)
    loss = fn(inputs)
    loss.backward()
    _sync(device)
    return float(loss.detach())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_above_inputs(run: Callable[[], float], device: str) -> tuple[int, float, str]:
    """``(bytes, loss, method)`` of one call of ``run``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = run()
        return torch.cuda.max_memory_allocated() - before, loss, "cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        loss = run()
        return (_status_kib("VmHWM") - before) * 1024, loss, "VmHWM-VmRSS"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, loss, "ru_maxrss"


def measure_memory(
    variant: str,
    *,
    n: int,
    hidden: int,
    vocab: int,
    dtype: str,
    device: str,
    chunk_size: int | None = None,
    compile: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """One warm-up run of ``variant`` (it compiles, with ``compile``), then one run's peak memory above the
    inputs, in this process."""
    inputs = make_inputs(n, hidden, vocab, getattr(torch, dtype), device)
    fn = loss_fn(variant, chunk_size, compile)
    loss = _run_once(fn, inputs, device)
    _clear_grads(inputs)  # the baseline is the inputs alone
    peak, _, method = _peak_above_inputs(lambda: _run_once(fn, inputs, device), device)
    return {"variant": variant, "loss": loss, "peak_bytes": peak, "memory_method": method}


def measure_times(
    variants: Sequence[str],
    *,
    n: int,
    hidden: int,
    vocab: int,
    dtype: str,
    device: str,
    repeats: int,
    chunk_size: int | None = None,
    compile: bool = False,
    **_: Any,
) -> dict[str, dict[str, Any]]:
    """Forward + backward times of ``variants`` on the same inputs, in this process: one warm-up run each,
    then ``repeats`` rounds that run every variant once in turn (a change of load on a shared machine then
    hits all of them alike); the median per variant."""
    inputs = make_inputs(n, hidden, vocab, getattr(torch, dtype), device)
    fns = {variant: loss_fn(variant, chunk_size, compile) for variant in variants}
    for fn in fns.values():
        _run_once(fn, inputs, device)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, fn in fns.items():
            _clear_grads(inputs)
            start = time.perf_counter()
            _run_once(fn, inputs, device)
            times[variant].append(time.perf_counter() - start)
    return {v: {"time_s": statistics.median(t), "times_s": t} for v, t in times.items()}


def _in_subprocess(worker: str, options: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    command = [
        sys.executable,
        "-m",
        "benchmarks.fused_linear",
        "--worker",
        worker,
        "--options",
        json.dumps(options),
    ]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker} failed with code {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(
    *,
    n: int,
    hidden: int,
    vocab: int,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 5,
    chunk_size: int | None = None,
    compile: bool = False,
    pairs: Sequence[str] = ("ce", "distill"),
    in_process: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure every variant of ``pairs``; returns ``{"config", "results", "ratios"}``.

    On CPU (unless ``in_process``) each variant's memory is measured in its own fresh subprocess (with
    ``MALLOC_MMAP_THRESHOLD_=65536``) and each pair's times in another, with the default allocator.
    """
    options = {
        "n": n, "hidden": hidden, "vocab": vocab, "dtype": dtype, "device": device, "repeats": repeats,
        "chunk_size": chunk_size, "compile": compile, "threads": threads,
    }  # fmt: skip
    isolate = not in_process and not device.startswith("cuda")
    results: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        for variant in PAIRS[pair]:
            if isolate:
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                results[variant] = _in_subprocess(f"memory:{variant}", options, env)
            else:
                results[variant] = measure_memory(variant, **options)
        times = _in_subprocess(f"time:{pair}", options) if isolate else measure_times(PAIRS[pair], **options)
        for variant, timing in times.items():
            results[variant] |= timing
    ratios = {
        pair: {
            "time": results[fused]["time_s"] / results[unfused]["time_s"],
            "peak_memory": results[fused]["peak_bytes"] / max(1, results[unfused]["peak_bytes"]),
        }
        for pair, (unfused, fused) in ((p, PAIRS[p]) for p in pairs)
    }
    config = options | {
        "in_process": in_process,
        "effective_chunk_size": chunk_size or default_chunk_size(vocab),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    return {"config": config, "results": list(results.values()), "ratios": ratios}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the results and the fused/unfused ratios."""
    c = report["config"]
    lines = [
        f"N={c['n']} H={c['hidden']} V={c['vocab']} {c['dtype']} on {c['device_name']}, "
        f"{c['threads']} threads, median of {c['repeats']} runs, chunk_size={c['effective_chunk_size']}, "
        f"compile={c['compile']}",
        f"{'variant':<17} {'fwd+bwd s':>10} {'peak MiB':>10} {'loss':>12}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['variant']:<17} {r['time_s']:>10.3f} {r['peak_bytes'] / MIB:>10.1f} {r['loss']:>12.6f}"
        )
    for pair, ratio in report["ratios"].items():
        lines.append(
            f"{pair}: fused/unfused time {ratio['time']:.3f}x, peak memory {ratio['peak_memory']:.3f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="tokens N")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary V")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk (default: the library's)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-chunk math")
    parser.add_argument(
        "--pairs", default="ce,distill", help="comma-separated subset of: ce, distill, reverse, jsd"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (CPU memory indicative)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:  # a subprocess: "memory:<variant>" or "time:<pair>"; prints one JSON line
        options = json.loads(args.options)
        threads = options.pop("threads", None)
        if threads:
            torch.set_num_threads(threads)
        kind, name = args.worker.split(":")
        result = (
            measure_memory(name, **options) if kind == "memory" else measure_times(PAIRS[name], **options)
        )
        print(json.dumps(result))
        return None

    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown --pairs {unknown}; choose from {sorted(PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_benchmark(
        n=args.n, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype, device=args.device,
        repeats=args.repeats, chunk_size=args.chunk_size, compile=args.compile, pairs=pairs,
        in_process=args.in_process, threads=args.threads,
    )  # fmt: skip
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
