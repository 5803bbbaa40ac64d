"""``python -m benchmarks.kernel_counts`` at the smoke sizes: every case runs on ``meta`` and is counted."""

import json

import torch
import torch.nn.functional as F

from benchmarks.kernel_counts import count_kernels, main


def test_counts_are_the_compute_ops_of_forward_and_backward():
    logits = torch.ones(4, 3, device="meta", requires_grad=True)
    target = torch.zeros(4, dtype=torch.long, device="meta")
    counts = count_kernels(lambda: F.cross_entropy(logits, target))
    # log_softmax and nll_loss each way, and the seed gradient; no views, no bare allocations
    assert dict(counts) == {
        "aten._log_softmax.default": 1,
        "aten.nll_loss_forward.default": 1,
        "aten.ones_like.default": 1,
        "aten.nll_loss_backward.default": 1,
        "aten._log_softmax_backward_data.default": 1,
    }


def test_smoke_run_counts_every_case(tmp_path, capsys):
    out = tmp_path / "counts.json"
    rows = main(["--quick", "--only", "cross_entropy", "kl_divergence", "supcon", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert {r["loss"] for r in rows} == {"cross_entropy", "kl_divergence", "supcon"}
    by_reference = {(r["loss"], r["reference"]): r for r in rows}
    ce = by_reference["cross_entropy", "F.cross_entropy"]
    assert ce["reference_kernels"] == 5 and ce["ours"] > ce["ours_functional"] > ce["reference_kernels"]
    assert ce["ratio"] == ce["ours"] / 5
    # the guide's KL reads a value (.item()), pml's SupCon a data-dependent shape: a sync on a GPU each
    assert by_reference["kl_divergence", "guide KLDivergenceLoss"]["note"].startswith("reads values")
    assert by_reference["supcon", "pml SupConLoss"]["note"].startswith("reads values")
    assert "kernels per forward + backward" in capsys.readouterr().out
