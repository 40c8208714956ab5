"""The report's plots, drawn with matplotlib and returned as inline SVG text (no files, no network).

Each function takes plain rows built from a run record (``pipeline.review.page``) and returns the
``<svg>`` element as a string, so an HTML page can embed it and stay one self-contained file.
"""

from __future__ import annotations

import io
import re
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display here, and no GUI toolkit in CI

from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

STATE_COLORS = {
    "done": "#2e7d32", "cached": "#00838f", "failed": "#c62828", "rejected": "#c62828",
    "skipped": "#f9a825", "running": "#546e7a",
}
BASELINE_COLOR, VARIANT_COLOR, FRONT_COLOR, REJECTED_COLOR = "#37474f", "#1565c0", "#e65100", "#c62828"


def _svg(figure: Figure, element_id: str) -> str:
    """The figure as an ``<svg>`` element (XML prologue dropped) carrying ``id=element_id``."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": element_id, "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<svg\b", f'<svg id="{element_id}" role="img"', text, count=1)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none is both as fast (lower x) and as accurate (higher y)."""
    front = []
    for index, (latency, accuracy) in enumerate(points):
        dominated = any(
            other_latency <= latency and other_accuracy >= accuracy and (other_latency, other_accuracy) != (latency, accuracy)
            for other_latency, other_accuracy in points
        )
        if not dominated:
            front.append(index)
    return sorted(front, key=lambda index: points[index][0])


def accuracy_latency_svg(rows: list[dict[str, Any]], batch: int) -> str:
    """Top-1 against median latency at ``batch`` for every timed variant, the Pareto front joined and ringed."""
    timed = [row for row in rows if row["latency_p50_ms"] is not None]
    points = [(row["latency_p50_ms"], row["top1"] * 100) for row in timed]
    front = pareto_front(points)
    figure = Figure(figsize=(7.5, 4.2))
    axes = figure.add_subplot()
    for index, (row, (latency, accuracy)) in enumerate(zip(timed, points)):
        color = BASELINE_COLOR if row["status"] == "baseline" else REJECTED_COLOR if row["status"] == "rejected" else VARIANT_COLOR
        axes.scatter([latency], [accuracy], s=60, color=color, zorder=3)
        if index in front:
            axes.scatter([latency], [accuracy], s=180, facecolors="none", edgecolors=FRONT_COLOR, linewidths=2, zorder=4)
        axes.annotate(row["variant"], (latency, accuracy), textcoords="offset points", xytext=(7, 5), fontsize=9)
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color=FRONT_COLOR, linestyle="--",
              linewidth=1.5, label="Pareto front", zorder=2)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    accuracies = [accuracy for _, accuracy in points]
    margin = max(0.5, (max(accuracies) - min(accuracies)) * 0.15)
    axes.set_ylim(min(accuracies) - margin, min(100.0 + margin / 2, max(accuracies) + margin))
    axes.set_xlabel(f"median latency at batch {batch} (ms, log scale; lower is better)")
    axes.set_ylabel("top-1 (%)")
    axes.set_title("Accuracy vs latency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    return _svg(figure, "plot-accuracy-latency")


def size_bars_svg(rows: list[dict[str, Any]]) -> str:
    """Horizontal bars of each variant's size on disk, labelled with the ratio to the baseline."""
    baseline_size = next((row["size_bytes"] for row in rows if row["status"] == "baseline"), None)
    figure = Figure(figsize=(7.5, 0.5 + 0.45 * len(rows)))
    axes = figure.add_subplot()
    names = [row["variant"] for row in rows]
    sizes_kb = [row["size_bytes"] / 1000 for row in rows]
    colors = [BASELINE_COLOR if row["status"] == "baseline" else REJECTED_COLOR if row["status"] == "rejected" else VARIANT_COLOR for row in rows]
    bars = axes.barh(names, sizes_kb, color=colors)
    labels = [f"{size:,.1f} kB" + (f"  ({baseline_size / row['size_bytes']:.2f}× smaller)" if baseline_size and row["status"] != "baseline" else "")
              for size, row in zip(sizes_kb, rows)]
    axes.bar_label(bars, labels=labels, padding=4, fontsize=9)
    axes.invert_yaxis()
    axes.set_xlabel("size on disk (kB)")
    axes.set_title("Model size")
    axes.set_xlim(0, max(sizes_kb) * 1.6)
    return _svg(figure, "plot-sizes")


def class_delta_heatmap_svg(variants: list[str], deltas: list[list[float | None]]) -> str:
    """Per-class top-1 change vs FP32 (percentage points), one row per variant, red for losses."""
    values = [[float("nan") if value is None else value * 100 for value in row] for row in deltas]
    classes = max((len(row) for row in values), default=0)
    figure = Figure(figsize=(max(5.0, 0.6 * classes + 2.5), 0.8 + 0.5 * len(variants)))
    axes = figure.add_subplot()
    limit = max([abs(value) for row in values for value in row if value == value] + [1.0])
    image = axes.imshow(values, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit), aspect="auto")
    for row_index, row in enumerate(values):
        for column, value in enumerate(row):
            if value == value:
                axes.text(column, row_index, f"{value:+.1f}", ha="center", va="center", fontsize=8,
                          color="white" if abs(value) > limit * 0.6 else "black")
    axes.set_xticks(range(classes), [str(index) for index in range(classes)])
    axes.set_yticks(range(len(variants)), variants)
    axes.set_xlabel("class")
    axes.set_title("Per-class top-1 change vs FP32 (points)")
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    return _svg(figure, "plot-class-deltas")


def dag_levels(dag: dict[str, list[str]]) -> dict[str, int]:
    """Each stage's column in the drawing: 0 for sources, else one more than its deepest need (any key order)."""
    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            levels[name] = 1 + max((level(need) for need in dag.get(name, []) if need in dag), default=-1)
        return levels[name]

    for name in dag:
        level(name)
    return levels


def dag_svg(dag: dict[str, list[str]], stages: dict[str, dict[str, Any]]) -> str:
    """The recipe's stage graph left to right, each box coloured by the stage's state and showing its time."""
    depth = dag_levels(dag)
    order = [name for name in stages if name in dag] + [name for name in dag if name not in stages]
    columns: dict[int, list[str]] = {}
    for name in order:
        columns.setdefault(depth[name], []).append(name)
    rows = max(len(names) for names in columns.values())
    figure = Figure(figsize=(1.9 * len(columns) + 0.4, 0.9 * rows + 0.6))
    axes = figure.add_subplot()
    position = {name: (level, -row) for level, names in columns.items() for row, name in enumerate(names)}
    for name, needs in dag.items():
        for need in needs:
            axes.annotate("", xy=(position[name][0] - 0.38, position[name][1]), xytext=(position[need][0] + 0.38, position[need][1]),
                          arrowprops={"arrowstyle": "->", "color": "#78909c", "lw": 1.2})
    for name, (x, y) in position.items():
        stage = stages.get(name, {})
        state = stage.get("state", "not run")
        timing = f" · {stage['seconds']:.2f}s" if state == "done" else ""
        axes.text(x, y, f"{name}\n{state}{timing}", ha="center", va="center", fontsize=9, color="white",
                  bbox={"boxstyle": "round,pad=0.45", "facecolor": STATE_COLORS.get(state, "#9e9e9e"), "edgecolor": "none"})
    axes.set_xlim(-0.6, len(columns) - 0.4)
    axes.set_ylim(-rows + 0.4, 0.6)
    axes.axis("off")
    return _svg(figure, "plot-dag")

