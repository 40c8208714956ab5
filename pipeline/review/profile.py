"""The review page's section for a finished ``benchmark`` stage: where each model's time goes, and its trace files.

For ``pipeline.review.page``'s per-stage registry (``STAGE_SECTIONS``, keyed by ``uses``): a stacked bar of
milliseconds per call by operator type for every profiled model, and a table linking each model's Chrome trace
(a file of the benchmark's artifact, linked relative to the page like ``pipeline.review.artifacts``'s links),
naming the models slower than the model they were made from. Torch-free.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from pipeline.records.parse import parse_record
from pipeline.records.reports import BenchmarkEntry, BenchmarkReport
from pipeline.review.artifacts import relative_href, reports_dir
from pipeline.review.plots import svg_element
from pipeline.review.tables import slower_than_source

OTHER = "other"  # the bucket of the operator types a profile or the plot leaves out (pipeline.torchkit.profiling.OTHER)
PLOTTED_TYPES = 10  # operator types the bar names; the rest of every model's time is drawn as OTHER
OTHER_COLOR = "#bdbdbd"
SHOWN_PER_MODEL = 3  # costliest operator types the table lists per model
TRACE_NOTE = ("Open a trace in Chrome at chrome://tracing (Load) or drop it on https://ui.perfetto.dev: every op of "
              "the profiled calls on a timeline, by thread. Profiled times include the profiler's own cost per op, so for "
              "small models they run above the timed latency: read the shares, and the timings table for speed.")


def plotted_types(models: list[tuple[str, BenchmarkEntry]]) -> list[str]:
    """The operator types the bar names: those costliest in any one model, at most ``PLOTTED_TYPES``."""
    largest: dict[str, float] = {}
    for _, entry in models:
        for op, ms in (entry.top_operators or {}).items():
            if op != OTHER:
                largest[op] = max(largest.get(op, 0.0), ms)
    return sorted(largest, key=lambda op: -largest[op])[:PLOTTED_TYPES]


def operator_bars_svg(models: list[tuple[str, BenchmarkEntry]], batch: int | None, element_id: str) -> str:
    """One horizontal bar per profiled model, stacked by operator type (ms per call), the rest of its time as OTHER."""
    types = plotted_types(models)
    figure = Figure(figsize=(8.0, 1.6 + 0.45 * len(models)))
    axes = figure.add_subplot()
    names = [name for name, _ in models]
    left = [0.0] * len(models)
    palette = matplotlib.colormaps["tab20"]
    for index, op in enumerate([*types, OTHER]):
        if op == OTHER:
            widths = [sum(ms for name, ms in (entry.top_operators or {}).items() if name not in types) for _, entry in models]
        else:
            widths = [(entry.top_operators or {}).get(op, 0.0) for _, entry in models]
        color = OTHER_COLOR if op == OTHER else palette(index % palette.N)
        axes.barh(names, widths, left=left, color=color, label=op, gid=f"ops-{index}")
        left = [start + width for start, width in zip(left, widths)]
    axes.invert_yaxis()
    axes.set_xlabel(f"milliseconds per call{f' at batch {batch}' if batch else ''}, by operator type")
    axes.set_title("Where the time goes")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return svg_element(figure, element_id)


def trace_cell(stage: dict[str, Any], entry: BenchmarkEntry, page_dir: Path | None) -> str:
    """A link to the model's trace file in the stage's artifact, or why there is none (escaped HTML)."""
    if entry.trace_file is None:
        return html.escape(entry.profile_note or "not profiled")
    path = Path(stage["artifact"]) / entry.trace_file if stage.get("artifact") else None
    if path is None or not path.is_file():
        return f"{html.escape(entry.trace_file)} (not in the store)"
    return f'<a href="{html.escape(relative_href(path, page_dir))}">{html.escape(entry.trace_file)}</a>'


def costliest(entry: BenchmarkEntry) -> str:
    """The model's costliest operator types with their share of its profiled time, e.g. ``aten::conv2d 81%``."""
    total = sum((entry.top_operators or {}).values())
    named = [(op, ms) for op, ms in (entry.top_operators or {}).items() if op != OTHER]
    ranked = sorted(named, key=lambda item: -item[1])[:SHOWN_PER_MODEL]
    return ", ".join(f"{op} {ms / total:.0%}" for op, ms in ranked) if total else "-"


def profile_section(record: dict[str, Any], stage: dict[str, Any]) -> str:
    """The HTML of a finished benchmark stage's profiles, for ``pipeline.review.page.STAGE_SECTIONS``: the stacked bar
    of every profiled model, a table of each model's profiled time, costliest operators, trace link and whether it
    is slower than the model it was made from, and how to open a trace; "" when the stage profiled nothing."""
    from pipeline.review.page import markup_table  # page imports this module for its registry

    report = parse_record(BenchmarkReport, stage.get("metrics") or {},
                          f"run {record.get('run_id')}: stage '{stage.get('name')}' (benchmark): metrics do not match the benchmark report")
    models = [(report.baseline_stage, report.baseline), *report.variants.items()]
    if report.profile_batch is None and not any(entry.top_operators for _, entry in models):
        return ""
    profiled = [(name, entry) for name, entry in models if entry.top_operators]
    flags = slower_than_source(record)
    page_dir = reports_dir(record)
    rows = [[(html.escape(name), ""), (html.escape(entry.runtime), ""),
             (f"{sum(entry.top_operators.values()):.3f}" if entry.top_operators else "-", "num"),
             (html.escape(costliest(entry)), ""), (trace_cell(stage, entry, page_dir), "links"), (html.escape(flags.get(name, "")), "")]
            for name, entry in models]
    name = html.escape(str(stage.get("name")))
    plot = operator_bars_svg(profiled, report.profile_batch, f"plot-operators-{name}") if profiled else ""
    table = markup_table(["model", "runtime", "profiled ms / call", "costliest operators", "trace", "vs the model it was made from"],
                         rows, table_class="profiles")
    batch = f" at batch {report.profile_batch}" if report.profile_batch else ""
    return (f'<section class="stage-section profile"><h2>{name}: where the time goes{batch}</h2>{plot}{table}'
            f"<p class='note'>{html.escape(TRACE_NOTE)}</p></section>")
