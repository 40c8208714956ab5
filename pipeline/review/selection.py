"""The review page's section of a ``select`` stage: the chosen variant and why, every candidate, the Pareto plot.

Built only from the run record: the stage's metrics parsed as a ``SelectionReport``
(``pipeline.records.variants``). Registered in ``pipeline.review.page.STAGE_SECTIONS`` under ``select``.
Torch-free.
"""

from __future__ import annotations

import html
from typing import Any

from pipeline.records.selection import SelectionCandidate, SelectionReport
from pipeline.records.variants import selection_reports
from pipeline.review import plots
from pipeline.review.units import format_bytes, format_figure, is_fraction, metric_label

OBJECTIVE_PHRASES = {"latency": "the fastest (median latency at batch {batch})", "size": "the smallest on disk",
                     "throughput": "the highest throughput (samples/s at batch {batch})"}


def _drop(metric: str, drop: float | None) -> str:
    """A loss of the metric vs FP32: '0.28 pt' for fractions, else the number ('-' when not measured)."""
    if drop is None:
        return "-"
    shown = round(drop * 100, 2) + 0.0 if is_fraction(metric) else float(f"{drop:.4g}") + 0.0  # + 0.0: no "-0.00"
    return f"{shown:.2f} pt" if is_fraction(metric) else f"{shown:.4g}"


def constraints_line(report: SelectionReport) -> str:
    """The budget the choice was made under, as one line of text."""
    limits = report.constraints
    parts = [f"max_drop {_drop(report.metric, limits.max_drop)} on {metric_label(report.metric)}"]
    if limits.max_relative_drop is not None:
        parts.append(f"max_relative_drop {limits.max_relative_drop:.1%}")
    if limits.min_agreement:
        parts.append(f"min_agreement {limits.min_agreement:.1%}")
    if limits.max_latency_ms is not None:
        parts.append(f"max_latency_ms {limits.max_latency_ms:g}")
    if limits.max_size_mb is not None:
        parts.append(f"max_size_mb {limits.max_size_mb:g}")
    return " · ".join(parts)


def why_chosen(report: SelectionReport) -> str:
    """The chosen candidate's figures and why it won, as one sentence of text."""
    best = report.candidates[report.chosen]
    within = sum(1 for entry in report.candidates.values() if entry.meets_budget)
    won = OBJECTIVE_PHRASES[report.objective].format(batch=report.batch_size)
    return (f"{won} of the {within} candidate(s) within budget on {report.target}: {best.latency_p50_ms:.3f} ms p50 at batch "
            f"{report.batch_size} (speed-up {best.speedup_vs_baseline:.2f}× vs the FP32 baseline on {report.baseline.kind}), "
            f"{format_bytes(best.size_bytes)}, "
            f"{metric_label(report.metric)} {format_figure(report.metric, best.value)} (drop {_drop(report.metric, best.drop)}).")


def candidate_cells(name: str, entry: SelectionCandidate, report: SelectionReport) -> list[tuple[str, str]]:
    """One table row: name, kind, metric, drop, latency, size, on the front, status, reason (escaped HTML, CSS class)."""
    measured = entry.value is not None
    cells = [
        name, entry.kind, format_figure(report.metric, entry.value) if measured else "-", _drop(report.metric, entry.drop),
        f"{entry.latency_p50_ms:.3f}" if entry.latency_p50_ms is not None else "-", format_bytes(entry.size_bytes),
        "yes" if entry.on_pareto_front else "", entry.status.replace("_", " "), entry.reason or "",
    ]
    numeric = {2, 3, 4, 5}
    return [(html.escape(cell), "num" if position in numeric else "") for position, cell in enumerate(cells)]


def plot_rows(report: SelectionReport) -> list[dict[str, Any]]:
    """The baseline and the measured candidates as the metric/latency plot reads them (over the drop budget: rejected)."""
    rows = [{"variant": f"{report.baseline.stage} (FP32)", "kind": report.baseline.kind, "metric": report.metric,
             "higher_is_better": report.higher_is_better, "value": report.baseline.value, "latency_p50_ms": report.baseline.latency_p50_ms,
             "status": "baseline"}]
    for name, entry in report.candidates.items():
        if entry.value is None:
            continue
        over = entry.drop is not None and entry.drop > report.constraints.max_drop
        rows.append({"variant": name, "kind": entry.kind, "metric": report.metric, "higher_is_better": report.higher_is_better,
                     "value": entry.value, "latency_p50_ms": entry.latency_p50_ms, "status": "rejected" if over else "accepted"})
    return rows


def selection_html(record: dict[str, Any], stage: dict[str, Any]) -> str:
    """The section of one finished ``select`` stage (see ``pipeline.review.page.STAGE_SECTIONS``)."""
    from pipeline.review.page import markup_table  # page imports this module for its registry

    report = dict(selection_reports(record))[stage["name"]]
    name = html.escape(stage["name"])
    best = report.candidates[report.chosen]
    headers = ["candidate", "kind", metric_label(report.metric), "drop", f"p50 ms @{report.batch_size}", "size", "Pareto", "status",
               "reason"]
    rows = [candidate_cells(candidate, entry, report) for candidate, entry in report.candidates.items()]
    objective_note = ("" if report.objective != "size" else
                      "<p class='note'>The objective is size: the plot shows latency; the table's Pareto column is the front by size.</p>")
    return "\n".join([
        f"<h2>Selection: {name}</h2>",
        f"<p>chosen: <strong>{html.escape(report.chosen)}</strong> ({html.escape(best.kind)}, by {html.escape(report.objective)}) — "
        f"{html.escape(why_chosen(report))}</p>",
        f"<p class='meta'>budget: {html.escape(constraints_line(report))} · timed {report.rounds} interleaved round(s), "
        f"≥{report.min_iterations} calls, {report.threads} thread(s)</p>",
        markup_table(headers, rows, [entry.status for entry in report.candidates.values()], table_class="selection"),
        plots.accuracy_latency_svg(plot_rows(report), report.batch_size, report.constraints.max_drop, chosen=report.chosen,
                                   element_id=f"plot-selection-{stage['name']}"),
        objective_note,
        search_note(record),
    ])


def search_note(record: dict[str, Any]) -> str:
    """What the run's search tried and what its budget left out (``record['search']``), or '' for a run without a matrix."""
    search = record.get("search")
    if not isinstance(search, dict) or not search.get("trials"):
        return ""
    limits = ", ".join(f"{name} {search[name]:g}" for name in ("max_trials", "max_minutes") if search.get(name) is not None)
    tried, not_tried = search.get("tried") or [], search.get("not_tried") or []
    text = f"Search: {len(tried)} of {search['trials']} trial(s) tried" + (f" (budget: {limits})" if limits else "")
    if not_tried:
        text += f"; not tried, for the budget: {', '.join(not_tried)}; the choice is the best of those tried"
    return f"<p class='meta'>{html.escape(text)}.</p>"
