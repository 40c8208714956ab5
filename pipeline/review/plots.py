"""The report's plots, drawn with matplotlib and returned as inline SVG text (no files, no network).

Each function takes plain rows built from a run record (``pipeline.review.page``) and returns the
``<svg>`` element as a string, so an HTML page can embed it and stay one self-contained file.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here, and no GUI toolkit in CI

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from pipeline.records.selection import pareto_front  # noqa: E402 (also part of this module's interface)
from pipeline.review.dag import dag_figure, dag_levels  # noqa: E402,F401 (dag_levels: part of this module's interface)
from pipeline.review.labels import place_labels  # noqa: E402
from pipeline.review.units import is_fraction, metric_label, metric_title, plot_scale  # noqa: E402

STATE_COLORS = {
    "done": "#2e7d32", "cached": "#00838f", "failed": "#c62828", "rejected": "#c62828",
    "skipped": "#f9a825", "running": "#546e7a",
}
BASELINE_COLOR, VARIANT_COLOR, FRONT_COLOR, REJECTED_COLOR, CHOSEN_COLOR = "#37474f", "#1565c0", "#e65100", "#c62828", "#2e7d32"
KIND_COLORS = {"torch": VARIANT_COLOR, "onnx": "#8e24aa", "engine": "#00897b", "openvino": "#6d4c41"}


def svg_element(figure: Figure, element_id: str) -> str:
    """The figure as an ``<svg>`` element (XML prologue dropped) carrying ``id=element_id``."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": element_id, "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<svg\b", f'<svg id="{element_id}" role="img"', text, count=1)


def kind_color(row: dict[str, Any]) -> str:
    """The colour of a model in the plots: the baseline's own, else its artifact kind's."""
    return BASELINE_COLOR if row["status"] == "baseline" else KIND_COLORS.get(row["kind"], VARIANT_COLOR)


def latency_ticks(low: float, high: float) -> list[float]:
    """Log-axis ticks on the 1-2-5 sequence between ``low`` and ``high``; finer steps (1..9, then halves) while that
    gives fewer than three."""
    for steps in ((1, 2, 5), tuple(range(1, 10)), tuple(half / 2 for half in range(2, 20))):
        ticks = [step * 10.0 ** exponent for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for step in steps]
        ticks = [float(f"{tick:.6g}") for tick in ticks if low <= tick <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def _label_points(axes: Any, figure: Figure, names: list[str], points: list[tuple[float, float]]) -> None:
    """Label each point with its name where no label covers another label or a marker (``pipeline.review.labels``)."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    to_points = 72.0 / figure.dpi
    display = [(x * to_points, y * to_points) for x, y in axes.transData.transform(points)]
    sizes = []
    for name in names:
        probe = axes.text(0, 0, name, fontsize=9)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width * to_points, extent.height * to_points))
        probe.remove()
    for name, point, spot in zip(names, points, place_labels(display, sizes)):
        arrow = {"arrowstyle": "-", "color": "#9e9e9e", "lw": 0.8, "shrinkA": 0, "shrinkB": 4} if spot.leader else None
        axes.annotate(name, point, textcoords="offset points", xytext=(spot.dx, spot.dy), ha=spot.align, va="bottom",
                      fontsize=9, arrowprops=arrow, gid=f"label-{name}")


def _budget_line(axes: Any, metric: str, higher_is_better: bool, baseline_value: float, budget: float) -> float:
    """The worst value of the metric the validate stage accepts (baseline - budget, or + budget for a lower-is-better
    metric), drawn across the plot; returns it in the plot's units."""
    scale = plot_scale(metric)
    limit = (baseline_value - budget if higher_is_better else baseline_value + budget) * scale
    shown = f"{budget * scale:.2g} pt" if is_fraction(metric) else f"{budget:.4g}"
    axes.axhline(limit, color=REJECTED_COLOR, linestyle=":", linewidth=1.5, zorder=1, gid="accuracy-budget",
                 label=f"{metric_label(metric)} budget ({'−' if higher_is_better else '+'}{shown} vs FP32)")
    return limit


def _legend_handles(rows: list[dict[str, Any]], chosen: str | None = None) -> list[Line2D]:
    """One legend entry per marker colour and shape used: the baseline, each kind, rejected, the chosen one."""
    handles = [Line2D([], [], marker="s", color=BASELINE_COLOR, linestyle="", label="FP32 baseline")]
    kinds = sorted({row["kind"] for row in rows if row["status"] != "baseline"})
    handles += [Line2D([], [], marker="o", color=KIND_COLORS.get(kind, VARIANT_COLOR), linestyle="", label=kind) for kind in kinds]
    if any(row["status"] == "rejected" for row in rows):
        handles.append(Line2D([], [], marker="X", color=REJECTED_COLOR, linestyle="", label="rejected"))
    if chosen is not None:
        handles.append(Line2D([], [], marker="*", color=CHOSEN_COLOR, markersize=12, linestyle="", label=f"chosen ({chosen})"))
    return handles


def _metric_axis(axes: Any, metric: str, higher_is_better: bool, values: list[float]) -> None:
    """The y axis of the metric: its name, unit and better direction, with a margin round ``values`` (never past 100%)."""
    margin = (max(values) - min(values)) * 0.15
    if is_fraction(metric):
        margin = max(0.5, margin)
        axes.set_ylim(min(values) - margin, min(100.0 + margin / 2, max(values) + margin))
    else:
        margin = margin or max(abs(max(values)) * 0.05, 1e-6)
        axes.set_ylim(min(values) - margin, max(values) + margin)
    direction = "higher is better" if higher_is_better else "lower is better"
    axes.set_ylabel(f"{metric_label(metric)} (%; {direction})" if is_fraction(metric) else f"{metric_label(metric)} ({direction})")


def accuracy_latency_svg(rows: list[dict[str, Any]], batch: int, budget: float | None = None, chosen: str | None = None,
                         element_id: str = "plot-accuracy-latency") -> str:
    """The run's metric against median latency at ``batch`` for every timed variant: colour by kind, the Pareto front
    (in the metric's direction) joined and ringed, the budget (``max_drop``, in the metric's units) as a dotted line
    when known, and the ``chosen`` variant (a select stage's choice) as a green star; ``element_id`` tells several
    such plots on one page apart."""
    timed = [row for row in rows if row["latency_p50_ms"] is not None]
    metric, higher_is_better = timed[0]["metric"], timed[0]["higher_is_better"]
    points = [(row["latency_p50_ms"], row["value"] * plot_scale(metric)) for row in timed]
    front = pareto_front(points, higher_is_better)
    figure = Figure(figsize=(7.5, 4.6))
    axes = figure.add_subplot()
    for index, (row, (latency, value)) in enumerate(zip(timed, points)):
        marker = "s" if row["status"] == "baseline" else "X" if row["status"] == "rejected" else "o"
        axes.scatter([latency], [value], s=60, marker=marker, color=REJECTED_COLOR if row["status"] == "rejected" else kind_color(row),
                     zorder=3)
        if index in front:
            axes.scatter([latency], [value], s=180, facecolors="none", edgecolors=FRONT_COLOR, linewidths=2, zorder=4)
        if row["variant"] == chosen:
            axes.scatter([latency], [value], s=320, marker="*", color=CHOSEN_COLOR, edgecolors="white", linewidths=0.8, zorder=5,
                         gid="chosen-point")
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color=FRONT_COLOR, linestyle="--",
              linewidth=1.5, label="Pareto front", zorder=2)
    values = [value for _, value in points]
    baseline = next((row for row in timed if row["status"] == "baseline"), None)
    if budget is not None and baseline is not None:
        values.append(_budget_line(axes, metric, higher_is_better, baseline["value"], budget))
    _metric_axis(axes, metric, higher_is_better, values)
    latencies = [latency for latency, _ in points]
    axes.set_xscale("log")
    axes.set_xlim(min(latencies) / 1.8, max(latencies) * 1.8)  # room for the labels either side
    axes.set_xticks(latency_ticks(*axes.get_xlim()))
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(f"median latency at batch {batch} (ms, log scale; lower is better)")
    axes.set_title(f"{metric_title(metric)} vs latency")
    axes.grid(True, which="major", alpha=0.3)
    _label_points(axes, figure, [row["variant"] for row in timed], points)
    handles = _legend_handles(timed, chosen) + axes.get_legend_handles_labels()[0]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(handles), 4), fontsize=9, frameon=False)
    return svg_element(figure, element_id)


def size_bars_svg(rows: list[dict[str, Any]]) -> str:
    """Horizontal bars of each variant's size on disk, labelled with the ratio to the baseline."""
    baseline_size = next((row["size_bytes"] for row in rows if row["status"] == "baseline"), None)
    figure = Figure(figsize=(7.5, 0.5 + 0.45 * len(rows)))
    axes = figure.add_subplot()
    names = [row["variant"] for row in rows]
    sizes_kb = [row["size_bytes"] / 1000 for row in rows]
    colors = [REJECTED_COLOR if row["status"] == "rejected" else kind_color(row) for row in rows]
    bars = axes.barh(names, sizes_kb, color=colors)
    labels = [f"{size:,.1f} kB" + (f"  ({baseline_size / row['size_bytes']:.2f}× smaller)" if baseline_size and row["status"] != "baseline" else "")
              for size, row in zip(sizes_kb, rows)]
    axes.bar_label(bars, labels=labels, padding=4, fontsize=9)
    axes.invert_yaxis()
    axes.set_xlabel("size on disk (kB)")
    axes.set_title("Model size")
    axes.set_xlim(0, max(sizes_kb) * 1.6)
    return svg_element(figure, "plot-sizes")


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
    return svg_element(figure, "plot-class-deltas")


def dag_svg(dag: dict[str, list[str]], stages: dict[str, dict[str, Any]]) -> str:
    """The recipe's stage graph left to right (``pipeline.review.dag``), each box coloured by the stage's state."""
    return svg_element(dag_figure(dag, stages, STATE_COLORS), "plot-dag")
