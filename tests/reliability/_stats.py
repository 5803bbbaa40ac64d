"""Counts the reliability suite reports at the end of a run (``conftest.pytest_terminal_summary``)."""

from __future__ import annotations

from collections import Counter

EXAMPLES: Counter[tuple[str, str]] = Counter()
"""Hypothesis examples run, by ``(property, loss)``: incremented once per execution of a test body."""

BAD_INPUT: Counter[str] = Counter()
"""Bad-input cases run, by loss (``test_bad_input``)."""
