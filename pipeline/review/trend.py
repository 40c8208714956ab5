"""A recipe's nightly runs side by side: each variant's metric (top-1, MSE, ...) and latency relative to the FP32 baseline, night by night.

Read only from the store's run records (those with a ``nightly`` key), through ``read_variants``; latency
is compared at each night's first timed batch size. ``optipipe report --trend RECIPE`` writes the page to
``<store>/reports/<recipe>-trend.html``, next to the nights' own pages, which it links.
"""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from pipeline.records.variants import read_variants
from pipeline.review.page import page_document
from pipeline.review.plots import svg_element
from pipeline.review.units import is_fraction, metric_label, plot_scale


def nightly_records(records: list[dict[str, Any]], recipe: str) -> list[dict[str, Any]]:
    """The nightly runs of ``recipe`` among ``records``, oldest first."""
    return sorted((r for r in records if r["recipe"]["name"] == recipe and r.get("nightly")), key=lambda r: r["started_at"])


def night_figures(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant name -> its metric, the metric's change vs FP32 (in plot units: points for fractions) and its p50 latency
    as a multiple of the baseline's."""
    variants = read_variants(record)
    baseline = next((variant for variant in variants if variant.status == "baseline"), None)
    base_timing = baseline.benchmark if baseline else None
    batch = next(iter(base_timing.batches)) if base_timing else None
    figures = {}
    for variant in variants:
        if variant.status == "baseline":
            continue
        timing = variant.benchmark.batches.get(batch) if variant.benchmark and batch else None
        ratio = timing.p50_ms / base_timing.batches[batch].p50_ms if timing and base_timing else None
        metric = variant.validation.metric
        figures[variant.name] = {"metric": metric, "delta": variant.validation.delta * plot_scale(metric), "latency_ratio": ratio}
    return figures


def newest_metric(per_night: list[dict[str, dict[str, Any]]]) -> str:
    """The metric the newest night with a validated variant measured (top1 when none did)."""
    return next((figures["metric"] for night in reversed(per_night) for figures in night.values()), "top1")


def trend_svg(nights: list[dict[str, Any]]) -> str:
    """Two panels over the nights: the metric's change vs FP32 and latency relative to FP32, a line per variant; a
    night that measured another metric than the newest (the recipe's task changed) leaves a gap in the upper panel."""
    per_night = [night_figures(record) for record in nights]
    names = sorted({name for figures in per_night for name in figures})
    metric = newest_metric(per_night)
    figure = Figure(figsize=(8.0, 6.0))
    accuracy, latency = figure.subplots(2, 1, sharex=True)
    positions = list(range(len(nights)))
    for name in names:
        nightly = [figures.get(name) for figures in per_night]
        deltas = [shown["delta"] if shown and shown["metric"] == metric else None for shown in nightly]
        ratios = [shown["latency_ratio"] if shown else None for shown in nightly]
        for axes, values in ((accuracy, deltas), (latency, ratios)):
            axes.plot(positions, [float("nan") if value is None else value for value in values], marker="o", label=name)
    accuracy.axhline(0.0, color="#37474f", linewidth=1)
    latency.axhline(1.0, color="#37474f", linewidth=1)
    accuracy.set_ylabel(f"Δ {metric_label(metric)} vs FP32" + (" (pt)" if is_fraction(metric) else ""))
    latency.set_ylabel("p50 latency / FP32")
    latency.set_xticks(positions, [record["run_id"] for record in nights], rotation=30, ha="right", fontsize=8)
    accuracy.set_title("Variants against the FP32 baseline, night by night")
    for axes in (accuracy, latency):
        axes.grid(True, alpha=0.3)
    accuracy.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return svg_element(figure, "plot-trend")


def _night_row(record: dict[str, Any]) -> str:
    """One night: its run (linked to its page), state, checkpoint choice, reference run and regressions."""
    night = record["nightly"]
    regressions = night.get("regressions") or []
    cells = [
        f"<a href='{html.escape(record['run_id'])}.html'>{html.escape(record['run_id'])}</a>", html.escape(record["state"]),
        html.escape(str(night.get("checkpoint_choice") or "-")), html.escape(str(night.get("reference_run") or "-")),
        html.escape("; ".join(regressions) or "none"),
    ]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def trend_report(records: list[dict[str, Any]], recipe: str) -> str:
    """The trend page of ``recipe``'s nightly runs among ``records``, one self-contained HTML document."""
    nights = nightly_records(records, recipe)
    title = f"{recipe} · nightly trend"
    sections = [f"<h1>{html.escape(title)}</h1>", f"<p class='meta'>{len(nights)} nightly run(s)</p>"]
    if not nights:
        sections.append(f"<p class='note'>No nightly run of recipe {html.escape(recipe)} in this store yet.</p>")
        return page_document(title, sections)
    head = "".join(f"<th>{header}</th>" for header in ("run", "state", "checkpoint", "compared with", "regressions"))
    sections += [trend_svg(nights), "<h2>Nights</h2>",
                 f"<table class='nights'><thead><tr>{head}</tr></thead><tbody>{''.join(map(_night_row, reversed(nights)))}</tbody></table>"]
    return page_document(title, sections)
