"""docs/benchmarks.png: one small panel per measure, Ember beside its reference.

Bars are medians, whiskers span min to max over the runs (matplotlib, Agg
backend, no display needed); measures without numbers are left out.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import Measure, Results
from benchmarks.stats import summarize

COLUMNS = 4
PANEL_IN = (3.4, 2.6)
EMBER_COLOR, REFERENCE_COLOR = "#d9480f", "#1c7ed6"
TITLE_WIDTH = 34


def _bars(m: Measure) -> list[tuple[str, list[float], str]]:
    bars = [("Ember", m.ember, EMBER_COLOR)]
    if m.reference:
        bars.append((m.reference_name, m.reference, REFERENCE_COLOR))
    return bars


def _wrap(text: str) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, TITLE_WIDTH))


def _panel(ax, m: Measure) -> None:
    bars = _bars(m)
    summaries = [summarize(values) for _, values, _ in bars]
    medians = [s.median for s in summaries]
    errors = [[s.median - s.low for s in summaries], [s.high - s.median for s in summaries]]
    names = [name for name, _, _ in bars]
    ax.bar(names, medians, color=[c for _, _, c in bars], yerr=errors, capsize=4)
    ratio = "" if m.ratio is None else f" — ratio {m.ratio:.2f}"
    if m.missing:
        ratio += " — a run failed"
    ax.set_title(_wrap(f"{m.title} [{m.where}]{ratio}"), fontsize=8)
    ax.set_ylabel(f"{m.unit} ({m.better} is better)", fontsize=7)
    ax.tick_params(labelsize=7)


def draw(results: Results, path: Path) -> Path | None:
    """Write the chart; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in results.measures if m.ember]
    if not shown:
        return None
    rows = (len(shown) + COLUMNS - 1) // COLUMNS
    size = (PANEL_IN[0] * COLUMNS, PANEL_IN[1] * rows)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=size, squeeze=False)
    for ax, m in zip(list(axes.flat)[:len(shown)], shown, strict=True):
        _panel(ax, m)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Ember beside QEMU (median, whiskers min–max)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
