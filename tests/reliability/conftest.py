"""Hypothesis settings of the property suite, and the counts this suite reports at the end of a run.

Profiles (the property tests apply one explicitly, so nothing else in the test session changes):

- ``reliability`` (default): derandomized (the same examples every run: a seed derived from each test),
  no deadline (CPU timings on a shared machine vary), failures printed with their reproduction blob;
- ``reliability-thorough``: the same, ten times the examples (a nightly run). Choose it with
  ``LIGHTNING_LOSSES_HYPOTHESIS_PROFILE=reliability-thorough``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.reliability._stats import BAD_INPUT, EXAMPLES

_COMMON = {
    "derandomize": True,
    "deadline": None,
    "print_blob": True,
    "database": None,  # derandomized: a stored failure would only replay what the seed gives anyway
    "suppress_health_check": (HealthCheck.too_slow, HealthCheck.differing_executors),
}
settings.register_profile("reliability", **_COMMON)
settings.register_profile("reliability-thorough", **_COMMON)

PROFILE = os.environ.get("LIGHTNING_LOSSES_HYPOTHESIS_PROFILE", "reliability")
EXAMPLE_SCALE = 10 if PROFILE == "reliability-thorough" else 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Bad-input cases run per loss and hypothesis examples run (when those tests ran)."""
    if BAD_INPUT:
        terminalreporter.section("bad-input cases run per loss")
        for loss in sorted(BAD_INPUT):
            terminalreporter.write_line(f"{loss:28s} {BAD_INPUT[loss]:4d}")
        terminalreporter.write_line(f"{'total':28s} {sum(BAD_INPUT.values()):4d}")
    if EXAMPLES:
        terminalreporter.section(f"hypothesis examples run (profile {PROFILE})")
        per_property: dict[str, int] = {}
        per_loss: dict[str, int] = {}
        for (prop, loss), n in EXAMPLES.items():
            per_property[prop] = per_property.get(prop, 0) + n
            per_loss[loss] = per_loss.get(loss, 0) + n
        for prop in sorted(per_property):
            terminalreporter.write_line(f"{prop:28s} {per_property[prop]:5d}")
        terminalreporter.write_line(
            "per loss: " + ", ".join(f"{loss} {n}" for loss, n in sorted(per_loss.items()))
        )
        terminalreporter.write_line(f"{'total':28s} {sum(EXAMPLES.values()):5d}")
