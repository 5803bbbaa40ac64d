"""Render a run's logged metrics (a ``CSVLogger``'s ``metrics.csv``) into one PNG.

``lightning-losses plot runs/digits_cross_entropy`` (or :func:`plot_metrics` in Python) draws one panel
per metric: every loss term, task metric and learned weight, with its train steps, train epoch means,
validation and test values against the global step. Needs matplotlib (``pip install
"lightning-losses[plot]"``).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["find_metrics_file", "metric_panels", "metrics_figure", "plot_metrics", "read_metrics"]

Series = list[tuple[float, float]]  # (step, value)
_STAGE = re.compile(r"^(train|val|test)/")


def find_metrics_file(path: str | Path) -> Path:
    """The ``metrics.csv`` at ``path``: the file itself, in the folder, or in its newest ``version_*``.

    Raises:
        FileNotFoundError: naming the path and what was looked for.
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    versions = sorted(
        (p for p in path.glob("version_*") if (p / "metrics.csv").is_file()),
        key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1,
    )
    if versions:
        return versions[-1] / "metrics.csv"
    raise FileNotFoundError(
        f"no metrics.csv at {str(path)!r}: give a CSVLogger run folder (e.g. runs/NAME/version_0), "
        "the folder holding its versions (the newest is used), or the file itself"
    )


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Every column of a ``metrics.csv`` as ``[(step, value), ...]``, empty cells skipped.

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
    >>> _ = file.write_text("epoch,step,train/loss,val/loss\\n0,0,2.0,\\n0,9,,1.5\\n")
    >>> read_metrics(file)
    {'train/loss': [(0.0, 2.0)], 'val/loss': [(9.0, 1.5)]}
    """
    series: dict[str, Series] = {}
    with open(find_metrics_file(path), newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or "nan")
            for key, cell in row.items():
                if key in ("epoch", "step") or cell in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(cell)))
    return series


def metric_panels(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group logged keys into panels by metric name (stage prefix and ``_epoch`` dropped); ``loss`` first.

    >>> metric_panels(["train/loss", "train/loss_epoch", "val/loss", "val/accuracy", "lr"])
    {'loss': ['train/loss', 'train/loss_epoch', 'val/loss'], 'accuracy': ['val/accuracy'], 'lr': ['lr']}
    """
    panels: dict[str, list[str]] = {}
    for key in keys:
        name = _STAGE.sub("", key)
        if key.startswith("train/") and name.endswith("_epoch"):
            name = name[: -len("_epoch")]
        panels.setdefault(name, []).append(key)
    return dict(sorted(panels.items(), key=lambda item: (item[0] != "loss", item[0])))


def metrics_figure(path: str | Path, keys: Sequence[str] | None = None, columns: int = 3) -> Any:
    """A matplotlib ``Figure`` of the metrics of a run (shown inline in a notebook).

    Args:
        path: a CSVLogger run folder, the folder of its versions, or a ``metrics.csv``.
        keys: metric names to draw (panel names such as ``loss`` or ``accuracy``); all by default.
        columns: panels per row.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('plotting needs matplotlib: pip install "lightning-losses[plot]"') from error
    csv_path = find_metrics_file(path)
    series = read_metrics(csv_path)
    panels = metric_panels(list(series))
    if keys is not None:
        unknown = sorted(set(keys) - set(panels))
        if unknown:
            raise ValueError(f"`keys` names {unknown}, which were not logged; logged: {sorted(panels)}")
        panels = {name: panels[name] for name in keys}
    if not panels:
        raise ValueError(f"{csv_path} holds no metric values")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (name, panel_keys) in zip(axes.flat, panels.items(), strict=False):
        for key in panel_keys:
            steps, values = zip(*series[key], strict=True)
            per_step = f"{key}_epoch" in series  # a step-level train value beside its epoch mean
            style = {"linewidth": 0.8, "alpha": 0.5} if per_step else {"marker": "o", "markersize": 3}
            label = key.removesuffix("_epoch") + (" (epoch)" if key.endswith("_epoch") else "")
            axis.plot(steps, values, label=label, **style)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(str(csv_path.parent))
    figure.tight_layout()
    return figure


def plot_metrics(
    path: str | Path, output: str | Path | None = None, keys: Sequence[str] | None = None, columns: int = 3
) -> Path:
    """Draw the metrics of a run (:func:`metrics_figure`) into a PNG; returns its path (default:
    ``metrics.png`` beside the CSV)."""
    import matplotlib.pyplot as plt

    figure = metrics_figure(path, keys, columns)
    output = Path(output) if output is not None else find_metrics_file(path).with_name("metrics.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def plot_main(args: Sequence[str]) -> Path:
    """``lightning-losses plot LOG_DIR [--output PNG] [--keys NAME ...] [--columns N]``."""
    parser = argparse.ArgumentParser(prog="lightning-losses plot", description=plot_metrics.__doc__)
    parser.add_argument(
        "path", help="a CSVLogger run folder (runs/NAME or runs/NAME/version_N) or metrics.csv"
    )
    parser.add_argument("--output", "-o", default=None, help="the PNG to write (default: beside the CSV)")
    parser.add_argument("--keys", nargs="+", default=None, help="metric names to draw, e.g. loss accuracy")
    parser.add_argument("--columns", type=int, default=3, help="panels per row")
    options = parser.parse_args(list(args))
    import matplotlib

    matplotlib.use("Agg")  # a file, no window (the CLI only)
    written = plot_metrics(options.path, options.output, options.keys, options.columns)
    print(written)
    return written
