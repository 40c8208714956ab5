"""One run as a review page: a self-contained HTML report with plots, and Markdown for PR comments.

Both are built only from the run record (``<store>/runs/<run_id>.json``): the stage DAG with each
stage's state and time, the variants table, the recipe's metric (top-1, MSE, ...) vs latency with the Pareto
front, sizes, and for classification the per-class accuracy changes against the FP32 baseline.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any, Callable

from pipeline.records.variants import read_variants
from pipeline.review import plots
from pipeline.review.artifacts import artifact_links, library_versions, machine_facts, metric_budget, reports_dir
from pipeline.review.profile import profile_section
from pipeline.review.selection import selection_html
from pipeline.review.sensitivity import sensitivity_section
from pipeline.review.stage_facts import stage_highlights
from pipeline.review.tables import benchmark_warnings, metric_cells, metric_headers, run_metric, status_cell, variant_rows
from pipeline.review.units import format_bytes, metric_label, metric_title

PAGE_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; padding: 0 1.5rem; max-width: 1100px; color: #212121; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #e0e0e0; }
.meta { color: #616161; font-size: 0.9rem; } .state { font-weight: 600; padding: 0 0.4rem; border-radius: 4px; color: white; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; } th, td { border: 1px solid #e0e0e0; padding: 4px 8px; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.chosen td { background: #e8f5e9; font-weight: 600; } tr.not_comparable td { color: #9e9e9e; }
tr.rejected td { background: #ffebee; } tr.baseline td { background: #eceff1; } .note { color: #616161; font-style: italic; }
svg { max-width: 100%; height: auto; } code.key { font-size: 0.75rem; overflow-wrap: anywhere; color: #455a64; }
td.links a { margin-right: 0.5rem; white-space: nowrap; } td.figures { font-size: 0.85rem; } ul.figures { margin: 0; padding-left: 1rem; }
table.facts th { text-align: left; } .verdict-ok { color: #2e7d32; font-weight: 600; } .verdict-bad { color: #c62828; font-weight: 600; }
ul.warnings { background: #fff8e1; border-left: 4px solid #f9a825; padding: 0.5rem 0.5rem 0.5rem 1.8rem; }
"""

StageSection = Callable[[dict[str, Any], dict[str, Any]], str]
STAGE_SECTIONS: dict[str, StageSection] = {"select": selection_html, "sensitivity": sensitivity_section, "benchmark": profile_section}
"""Sections of the page that belong to one kind of stage, by the stage's ``uses``.

``section(record, stage) -> str`` is called once for each finished (done or cached) stage of that ``uses``, in
the record's stage order, after the variants and before the machine facts. ``record`` is the run record as a
dict (as the store reads it: parse a report with ``pipeline.records.variants``), ``stage`` that stage's entry of
``record["stages"]`` (a dict: ``name``, ``uses``, ``state``, ``metrics``, ``artifact``, ...). It returns the
section's HTML, an ``<h2>`` and what follows, with every text escaped (``markup_table`` builds tables), or ""
to add nothing. A section module plugs in with one entry here, e.g. ``"sensitivity": sensitivity_html``.
"""


def stage_sections(record: dict[str, Any]) -> list[str]:
    """The ``STAGE_SECTIONS`` of every finished stage that has one, in the record's stage order."""
    return [section for stage in record["stages"] if stage["state"] in ("done", "cached") and stage["uses"] in STAGE_SECTIONS
            if (section := STAGE_SECTIONS[stage["uses"]](record, stage))]


def timed_batch(rows: list[dict[str, Any]]) -> int | None:
    """The batch size the latency columns were measured at, when a benchmark stage ran."""
    return next((row["latency_batch"] for row in rows if row["latency_batch"]), None)


def class_deltas(record: dict[str, Any]) -> tuple[list[str], list[list[float | None]]]:
    """Per-class top-1 change vs FP32 for every validated variant (from the run's ``validate`` stages)."""
    shown = [variant for variant in read_variants(record) if variant.status != "baseline" and variant.validation.per_class_delta]
    return [variant.name for variant in shown], [variant.validation.per_class_delta for variant in shown]


def pareto_variants(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the timed variants on the metric/latency Pareto front (in the metric's direction), fastest first."""
    timed = [row for row in rows if row["latency_p50_ms"] is not None]
    if not timed:
        return []
    front = plots.pareto_front([(row["latency_p50_ms"], row["value"]) for row in timed], higher_is_better=timed[0]["higher_is_better"])
    return [timed[index]["variant"] for index in front]


def _variant_cells(row: dict[str, Any]) -> list[str]:
    timed = row["latency_p50_ms"] is not None
    return [
        row["variant"], row["kind"], *metric_cells(row), format_bytes(row["size_bytes"]),
        f"{row['latency_p50_ms']:.3f}" if timed else "-", f"{row['speedup_vs_baseline']:.2f}×" if timed else "-", status_cell(row),
    ]


def _variant_headers(rows: list[dict[str, Any]]) -> list[str]:
    batch = timed_batch(rows)
    return ["variant", "kind", *metric_headers(rows), "size", f"p50 ms @{batch}" if batch else "p50 ms", "speed-up", "status"]


def _stage_detail(stage: dict[str, Any]) -> str:
    if stage.get("reason"):
        return stage["reason"]
    return f"{stage['key'][:12]}…" if stage.get("key") else ""


def _html_table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None, numeric_from: int = 2) -> str:
    """A table of plain-text cells (escaped here); columns from ``numeric_from`` up to the last are right-aligned figures."""
    cells = [[(html.escape(cell), "num" if numeric_from <= position < len(row) - 1 else "") for position, cell in enumerate(row)] for row in rows]
    return markup_table(headers, cells, row_classes)


def markup_table(headers: list[str], rows: list[list[tuple[str, str]]], row_classes: list[str] | None = None, table_class: str = "") -> str:
    """A table of cells given as (HTML already escaped, CSS class) pairs; the stage sections (``STAGE_SECTIONS``) use it too."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = []
    for index, cells in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes else ""
        tds = "".join(f'<td class="{kind}">{markup}</td>' if kind else f"<td>{markup}</td>" for markup, kind in cells)
        body.append(f"<tr{css}>{tds}</tr>")
    opening = f'<table class="{table_class}">' if table_class else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _artifact_cell(stage: dict[str, Any], page_dir: Any) -> str:
    """A stage's whole artifact key and links to its folder, main file and manifest (or why it has none)."""
    if stage.get("reason"):
        return html.escape(stage["reason"])
    if not stage.get("key"):
        return ""
    links = " ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in artifact_links(stage, page_dir))
    return f'<code class="key">{html.escape(stage["key"])}</code><br>{links}'


def _figures_cell(stage: dict[str, Any]) -> str:
    """The stage's highlighted figures as a short list."""
    figures = stage_highlights(stage)
    if not figures:
        return ""
    items = "".join(f"<li>{html.escape(label)}: {html.escape(value)}</li>" for label, value in figures)
    return f"<ul class='figures'>{items}</ul>"


def stages_table_html(record: dict[str, Any]) -> str:
    """Each stage: implementation, state, seconds, its figures, and its artifact key with links (relative to the page)."""
    page_dir = reports_dir(record)
    rows = [
        [(html.escape(stage["name"]), ""), (html.escape(stage["uses"]), ""), (html.escape(stage["state"]), ""),
         (f"{stage['seconds']:.2f}", "num"), (_figures_cell(stage), "figures"), (_artifact_cell(stage, page_dir), "links")]
        for stage in record["stages"]
    ]
    return markup_table(["stage", "uses", "state", "seconds", "figures", "artifact key · files / reason"], rows)


def round_spread_cell(timing: Any) -> str:
    """How far a batch size's interleaved rounds disagreed: the spread of their medians and its range in ms ('-' in older reports)."""
    if timing.spread is None:
        return "-"
    return f"{timing.spread:.0%} ({timing.round_p5_ms:.3f}–{timing.round_p95_ms:.3f})"


def warnings_html(record: dict[str, Any]) -> str:
    """The benchmark stages' warnings (a loaded machine, noisy rounds) as a highlighted list, or ""."""
    warnings = benchmark_warnings(record)
    if not warnings:
        return ""
    return "<ul class='warnings'>" + "".join(f"<li>warning: {html.escape(warning)}</li>" for warning in warnings) + "</ul>"


def timings_table_html(record: dict[str, Any]) -> str:
    """Every timed model at every batch size: p50, p95, throughput, speed-up vs FP32, peak memory and the rounds' spread."""
    rows, classes = [], []
    for variant in read_variants(record):
        if variant.benchmark is None:
            continue
        for batch, timing in variant.benchmark.batches.items():
            rows.append([
                (html.escape(variant.name), ""), (html.escape(variant.benchmark.runtime), ""), (batch, "num"),
                (f"{timing.p50_ms:.3f}", "num"), (f"{timing.p95_ms:.3f}", "num"), (f"{timing.throughput_per_s:,.0f}", "num"),
                (f"{variant.benchmark.speedup_vs_baseline.get(batch, 0.0):.2f}×", "num"),
                (format_bytes(variant.benchmark.peak_rss_bytes), "num"), (round_spread_cell(timing), "num"),
            ])
            classes.append(variant.status)
    headers = ["variant", "runtime", "batch", "p50 ms", "p95 ms", "samples/s", "speed-up", "peak RSS", "round spread (p5–p95 ms)"]
    return markup_table(headers, rows, classes, table_class="timings")


def machine_html(record: dict[str, Any]) -> str:
    """Where the run ran and with what: host, CPU and threads of the timings, and the libraries' versions."""
    facts = machine_facts(record) + [(library, version) for library, version in library_versions(record).items()]
    rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>" for label, value in facts)
    return f"<table class='facts'><tbody>{rows}</tbody></table>"


def nightly_html(record: dict[str, Any]) -> list[str]:
    """The night's verdict: the checkpoint chosen, the reference run, each regression and whether it was promoted."""
    night = record.get("nightly")
    if not night:
        return []
    regressions = night.get("regressions") or []
    promoted = record["state"] == "succeeded" and not regressions
    verdict = ("no regressions: promoted to latest" if promoted else
               f"{len(regressions)} regression(s): not promoted" if regressions else f"run {record['state']}: not promoted")
    reference = night.get("reference_run")
    compared = (f"compared with the last good night, run <a href='{html.escape(reference)}.html'>{html.escape(reference)}</a>"
                if reference else "first nightly run of this recipe: nothing to compare with")
    parts = ["<h2>Nightly</h2>",
             f"<p class='{'verdict-ok' if promoted else 'verdict-bad'}'>{html.escape(verdict)}</p>",
             f"<p>checkpoint: {html.escape(str(night.get('checkpoint_choice') or '-'))}<br>{compared}</p>"]
    if regressions:
        parts.append("<ul>" + "".join(f"<li>{html.escape(regression)}</li>" for regression in regressions) + "</ul>")
    return parts


def _header_lines(record: dict[str, Any]) -> tuple[str, str]:
    title = f"{record['recipe']['name']} · run {record['run_id']}"
    seconds = "-" if record.get("seconds") is None else f"{record['seconds']:.1f} s"
    meta = (
        f"checkpoint {record['checkpoint']['path']} (sha256 {record['checkpoint']['sha256'][:12]}…) · "
        f"started {record['started_at']} · {seconds} · baseline {record.get('baseline', '-')}"
    )
    return title, meta


def _variant_sections(record: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The variants table, every batch size's timings, the metric vs latency, sizes and (classification) per-class changes."""
    sections = [_html_table(_variant_headers(rows), [_variant_cells(row) for row in rows], [row["status"] for row in rows])]
    metric = run_metric(rows)
    batch = timed_batch(rows)
    if not batch:
        plotted = html.escape(metric_label(metric))
        sections.append(f"<p class='note'>No benchmark stage in this run: add one to plot {plotted} against latency.</p>")
    else:
        front = pareto_variants(rows)
        sections += [
            "<h2>Timings at every batch size</h2>", timings_table_html(record),
            f"<h2>{html.escape(metric_title(metric))} vs latency</h2>", plots.accuracy_latency_svg(rows, batch, metric_budget(record)),
            f"<p>Pareto front (fastest first): <strong>{html.escape(' → '.join(front))}</strong></p>",
        ]
    sections += ["<h2>Size on disk</h2>", plots.size_bars_svg(rows)]
    names, deltas = class_deltas(record)
    if names:
        sections += ["<h2>Per-class accuracy change vs FP32</h2>", plots.class_delta_heatmap_svg(names, deltas)]
    return sections


def html_report(record: dict[str, Any]) -> str:
    """The whole review page for one run, as one HTML document with inline SVG plots; its links to artifact
    files are relative to ``<store>/reports/``, where ``optipipe report`` writes it."""
    rows = variant_rows(record)
    title, meta = _header_lines(record)
    state_color = plots.STATE_COLORS["done" if record["state"] == "succeeded" else "failed" if record["state"] in ("failed", "crashed") else "running"]
    sections = [
        f"<h1>{html.escape(title)} <span class='state' style='background:{state_color}'>{html.escape(record['state'])}</span></h1>",
        f"<p class='meta'>{html.escape(meta)}</p>",
    ]
    if record.get("message"):
        sections.append(f"<p><strong>Problems:</strong> {html.escape(record['message'])}</p>")
    sections += nightly_html(record)
    stages = {stage["name"]: stage for stage in record["stages"]}
    dag = record.get("dag") or {stage["name"]: [] for stage in record["stages"]}
    sections += ["<h2>Stages</h2>", plots.dag_svg(dag, stages), stages_table_html(record)]
    sections += ["<h2>Variants against the FP32 baseline</h2>", warnings_html(record)]
    if rows:
        sections += _variant_sections(record, rows)
    else:
        sections.append("<p class='note'>No validate stage finished in this run, so there are no variants to compare.</p>")
    sections += stage_sections(record)
    sections += ["<h2>Machine and versions</h2>", machine_html(record)]
    return page_document(title, sections)


def page_document(title: str, sections: list[str]) -> str:
    """One self-contained HTML document (the page style inline, no scripts) of ``sections``."""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(sections)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)} · optipipe</title>"
        f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n"
        f"<p class='meta'>optipipe report · generated {generated}</p></body></html>\n"
    )


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_summary(record: dict[str, Any]) -> str:
    """The short form (Prefect's markdown artifact): state, variants table and the Pareto front."""
    rows = variant_rows(record)
    title, meta = _header_lines(record)
    parts = [f"## {title}: **{record['state']}**", meta]
    if record.get("message"):
        parts.append(f"**Problems:** {record['message']}")
    if rows:
        parts.append(_markdown_table(_variant_headers(rows), [_variant_cells(row) for row in rows]))
        parts += [f"**Warning:** {warning}" for warning in benchmark_warnings(record)]
        front = pareto_variants(rows)
        if front:
            parts.append(f"Pareto front ({metric_label(run_metric(rows))} vs latency, fastest first): **{' → '.join(front)}**")
    return "\n\n".join(parts) + "\n"


def markdown_report(record: dict[str, Any]) -> str:
    """The PR-comment form: the summary, the stage DAG (mermaid), stage states, per-class changes."""
    parts = [markdown_summary(record).rstrip()]
    dag = record.get("dag") or {}
    states = {stage["name"]: stage["state"] for stage in record["stages"]}
    if dag:
        edges = [f"    {need} --> {name}" for name, needs in dag.items() for need in needs]
        nodes = [f'    {name}["{name}: {states.get(name, "not run")}"]' for name in dag]
        parts.append("```mermaid\nflowchart LR\n" + "\n".join(nodes + edges) + "\n```")
    stage_rows = [[s["name"], s["uses"], s["state"], f"{s['seconds']:.2f}", _stage_detail(s)] for s in record["stages"]]
    parts.append(_markdown_table(["stage", "uses", "state", "seconds", "artifact key / reason"], stage_rows))
    names, deltas = class_deltas(record)
    if names:
        classes = max(len(row) for row in deltas)
        table_rows = [[name] + ["-" if value is None else f"{value * 100:+.1f}" for value in row] for name, row in zip(names, deltas)]
        parts.append("Per-class top-1 change vs FP32 (points):\n\n" + _markdown_table(["variant"] + [str(c) for c in range(classes)], table_rows))
    return "\n\n".join(parts) + "\n"
