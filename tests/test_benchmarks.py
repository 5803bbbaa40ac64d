"""Smoke tests of ``python -m benchmarks`` (:mod:`benchmarks.losses`) at tiny sizes: every row is produced,
timings are positive, the losses equal their references where the definitions coincide, and the guide's
snippets fail the way the report says. The figures themselves are not checked here."""

import json
import math

import pytest
import torch

from benchmarks import references as ref
from benchmarks.guide_code import SNIPPETS, load
from benchmarks.losses import LOSSES, build_cases, format_table, main, run_guide

torch.set_num_threads(1)

needs_pml = pytest.mark.skipif(not ref.pml_available(), reason="pytorch-metric-learning not installed")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    report = main(["--quick", "--repeats", "2", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def test_every_row_is_produced_with_positive_times(quick_report, capsys):
    expected = {(c.loss, r.name) for c in build_cases(LOSSES, quick=True, device="cpu") for r in c.references}
    rows = {(r["loss"], r["reference"]): r for r in quick_report["rows"]}
    assert set(rows) == expected
    assert {loss for loss, _ in rows} == set(LOSSES) - {"guide"}
    for row in rows.values():
        assert row["ours_ms"] > 0
        # composites and the adversarial wrapper have no functional form of the same inputs to time
        assert (row["ours_functional_ms"] is None) == (
            row["loss"] in ("multi_task", "combined", "adversarial")
        )
        assert row["ours_functional_ms"] is None or row["ours_functional_ms"] > 0
        assert row["ours_compiled_ms"] is None and row["peak_memory_ratio"] is None  # no --compile, CPU
        if row["reference_ms"] is not None:  # run (not skipped)
            assert row["reference_ms"] > 0 and row["ratio"] == pytest.approx(
                row["ours_ms"] / row["reference_ms"]
            )
            assert ("REFERENCE FASTER" in row["note"]) == (row["ratio"] > 1)
    table = format_table(quick_report)
    for loss, reference in rows:
        assert loss in table and reference in table


@needs_pml
def test_values_agree_where_the_definitions_coincide(quick_report):
    rows = quick_report["rows"]
    assert all(r["reference_value"] is not None for r in rows)  # quick sizes: nothing skipped
    for r in rows:
        assert r["agree"] == r["should_agree"], r
        if r["should_agree"]:
            assert math.isclose(r["ours_value"], r["reference_value"], rel_tol=1e-4), r
    # PML's contrastive loss hinges d, ours d²: only the positive term (d²) is the same
    (check,) = quick_report["checks"]
    assert check["loss"] == "contrastive" and check["agree"]
    assert math.isclose(check["ours"], check["reference"], rel_tol=1e-5) and check["ours"] > 0


def test_references_match_hand_computed_values():
    # torchvision's formula at p = 1/2, t = 1, γ = 2, α = 0.25: 0.25 · (1/2)² · log 2
    assert ref.sigmoid_focal(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(
        0.25 * 0.25 * math.log(2)
    )
    # softmax focal at two equal logits: p_t = 1/2, -(1/2)² · log(1/2)
    assert ref.softmax_focal(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(0.25 * math.log(2))
    # KL of identical distributions is 0; T² · KL by a brute-force sum otherwise
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert ref.kl_div_composition(s, s, 2.0).item() == pytest.approx(0.0, abs=1e-12)
    p, q = (t / 2).softmax(-1), (s / 2).softmax(-1)
    assert ref.kl_div_composition(s, t, 2.0).item() == pytest.approx(
        4 * (p * (p / q).log()).sum(-1).mean().item()
    )
    # two orthogonal unit pairs at τ = 1: -log(e / (e + 2)) (InfoNCE's doctest value)
    views = torch.eye(2)
    assert ref.info_nce_cross_entropy(views, views, 1.0).item() == pytest.approx(
        -math.log(math.e / (math.e + 2))
    )


def test_guide_snippets_fail_as_reported():
    rows = run_guide()
    status = {(r["snippet"], r["inputs"]): r["status"] for r in rows}
    assert {r["snippet"] for r in rows} == set(SNIPPETS)
    assert all(r["literal"].startswith("crashes (") for r in rows)  # nemo_rl / BaseLossFunction missing
    by_snippet: dict[str, list[str]] = {}
    for (snippet, _), s in status.items():
        by_snippet.setdefault(snippet, []).append(s)
    assert by_snippet["RewardShapingLoss"] == [
        "crashes (AttributeError: 'Tensor' object has no attribute 'entropy')"
    ]
    assert by_snippet["CombinedLoss"][0].startswith("crashes (NameError")
    assert sorted(by_snippet["ContrastiveLoss"]) == ["NaN", "runs"]
    assert sorted(by_snippet["KLDivergenceLoss"]) == ["NaN", "runs"]
    assert by_snippet["AdversarialLoss"] == ["runs"]


def test_guide_kl_and_contrastive_equal_ours_on_ordinary_inputs():
    """Where the guide's code runs and means the same loss, it gives our value (so the timing rows compare
    like with like)."""
    from lightning_losses.losses import ContrastiveLoss, KLDivergenceLoss

    g = torch.Generator().manual_seed(0)
    s, t, y = (
        torch.randn(6, 7, generator=g),
        torch.randn(6, 7, generator=g),
        torch.randint(0, 7, (6,), generator=g),
    )
    guide_kl = load("KLDivergenceLoss")({"temperature": 3.0, "alpha": 0.6})
    ours = KLDivergenceLoss(temperature=3.0, alpha=0.6)(s, t, y).loss
    assert guide_kl(s, t, y)[0].item() == pytest.approx(ours.item(), rel=1e-5)
    x, labels = torch.randn(10, 4, generator=g), torch.arange(10) % 3
    guide_contrastive = load("ContrastiveLoss")({"margin": 2.0})
    ours = ContrastiveLoss(margin=2.0)(x, labels).loss
    assert guide_contrastive(x, labels)[0].item() == pytest.approx(ours.item(), rel=1e-5)


def test_only_and_bad_arguments(capsys):
    report = main(["--quick", "--repeats", "1", "--only", "cross_entropy"])
    assert {r["loss"] for r in report["rows"]} == {"cross_entropy"} and report["guide"] == []
    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])


@pytest.mark.slow
def test_compile_adds_compiled_timings_side_by_side():
    report = main(["--quick", "--repeats", "1", "--compile", "--only", "cross_entropy", "kl_divergence"])
    for row in report["rows"]:
        assert row["ours_compiled_ms"] > 0
        if row["reference"] == "guide KLDivergenceLoss":  # .item() in its forward: not compiled
            assert row["reference_compiled_ms"] is None and row["compiled_ratio"] is None
        else:
            assert row["compiled_ratio"] == pytest.approx(
                row["ours_compiled_ms"] / row["reference_compiled_ms"]
            )
    assert "ours cmp" in format_table(report)
