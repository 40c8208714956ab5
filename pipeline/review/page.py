"""One run as a review page: a self-contained HTML report with plots, and Markdown for PR comments.

Both are built only from the run record (``<store>/runs/<run_id>.json``): the stage DAG with each
stage's state and time, the variants table, accuracy vs latency with the Pareto front, sizes, and the
per-class accuracy changes against the FP32 baseline.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any

from pipeline.records.variants import read_variants
from pipeline.review import plots
from pipeline.review.tables import format_bytes, variant_rows

PAGE_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1100px; color: #212121; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #e0e0e0; }
.meta { color: #616161; font-size: 0.9rem; } .state { font-weight: 600; padding: 0 0.4rem; border-radius: 4px; color: white; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; } th, td { border: 1px solid #e0e0e0; padding: 4px 8px; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.rejected td { background: #ffebee; } tr.baseline td { background: #eceff1; } .note { color: #616161; font-style: italic; }
svg { max-width: 100%; height: auto; }
"""


def timed_batch(rows: list[dict[str, Any]]) -> int | None:
    """The batch size the latency columns were measured at, when a benchmark stage ran."""
    return next((row["latency_batch"] for row in rows if row["latency_batch"]), None)


def class_deltas(record: dict[str, Any]) -> tuple[list[str], list[list[float | None]]]:
    """Per-class top-1 change vs FP32 for every validated variant (from the run's ``validate`` stages)."""
    shown = [variant for variant in read_variants(record) if variant.status != "baseline" and variant.validation.per_class_delta]
    return [variant.name for variant in shown], [variant.validation.per_class_delta for variant in shown]


def pareto_variants(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the timed variants on the accuracy/latency Pareto front, fastest first."""
    timed = [row for row in rows if row["latency_p50_ms"] is not None]
    front = plots.pareto_front([(row["latency_p50_ms"], row["top1"]) for row in timed])
    return [timed[index]["variant"] for index in front]


def _variant_cells(row: dict[str, Any]) -> list[str]:
    timed = row["latency_p50_ms"] is not None
    return [
        row["variant"], row["kind"], f"{row['top1']:.2%}", f"{row['delta_top1'] * 100:+.2f} pt", f"{row['agreement']:.2%}",
        format_bytes(row["size_bytes"]), f"{row['latency_p50_ms']:.3f}" if timed else "-",
        f"{row['speedup_vs_baseline']:.2f}×" if timed else "-", row["status"],
    ]


def _variant_headers(rows: list[dict[str, Any]]) -> list[str]:
    batch = timed_batch(rows)
    return ["variant", "kind", "top-1", "Δ top-1", "agreement", "size", f"p50 ms @{batch}" if batch else "p50 ms", "speed-up", "status"]


def _stage_detail(stage: dict[str, Any]) -> str:
    if stage.get("reason"):
        return stage["reason"]
    return f"{stage['key'][:12]}…" if stage.get("key") else ""


def _html_table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None, numeric_from: int = 2) -> str:
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = []
    for index, cells in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes else ""
        tds = "".join(
            f'<td class="num">{html.escape(cell)}</td>' if position >= numeric_from and position < len(cells) - 1 else f"<td>{html.escape(cell)}</td>"
            for position, cell in enumerate(cells)
        )
        body.append(f"<tr{css}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _header_lines(record: dict[str, Any]) -> tuple[str, str]:
    title = f"{record['recipe']['name']} · run {record['run_id']}"
    seconds = "-" if record.get("seconds") is None else f"{record['seconds']:.1f} s"
    meta = (
        f"checkpoint {record['checkpoint']['path']} (sha256 {record['checkpoint']['sha256'][:12]}…) · "
        f"started {record['started_at']} · {seconds} · baseline {record.get('baseline', '-')}"
    )
    return title, meta


def html_report(record: dict[str, Any]) -> str:
    """The whole review page for one run, as one HTML document with inline SVG plots."""
    rows = variant_rows(record)
    title, meta = _header_lines(record)
    state_color = plots.STATE_COLORS["done" if record["state"] == "succeeded" else "failed" if record["state"] in ("failed", "crashed") else "running"]
    sections = [
        f"<h1>{html.escape(title)} <span class='state' style='background:{state_color}'>{html.escape(record['state'])}</span></h1>",
        f"<p class='meta'>{html.escape(meta)}</p>",
    ]
    if record.get("message"):
        sections.append(f"<p><strong>Problems:</strong> {html.escape(record['message'])}</p>")
    stages = {stage["name"]: stage for stage in record["stages"]}
    dag = record.get("dag") or {stage["name"]: [] for stage in record["stages"]}
    sections += ["<h2>Stages</h2>", plots.dag_svg(dag, stages)]
    stage_rows = [[s["name"], s["uses"], s["state"], f"{s['seconds']:.2f}", _stage_detail(s)] for s in record["stages"]]
    sections.append(_html_table(["stage", "uses", "state", "seconds", "artifact key / reason"], stage_rows, numeric_from=3))
    sections.append("<h2>Variants against the FP32 baseline</h2>")
    if not rows:
        sections.append("<p class='note'>No validate stage finished in this run, so there are no variants to compare.</p>")
        return _page(title, sections)
    sections.append(_html_table(_variant_headers(rows), [_variant_cells(row) for row in rows], [row["status"] for row in rows]))
    batch = timed_batch(rows)
    if batch:
        front = pareto_variants(rows)
        sections += [
            "<h2>Accuracy vs latency</h2>", plots.accuracy_latency_svg(rows, batch),
            f"<p>Pareto front (fastest first): <strong>{html.escape(' → '.join(front))}</strong></p>",
        ]
    else:
        sections.append("<p class='note'>No benchmark stage in this run: add one to plot accuracy against latency.</p>")
    sections += ["<h2>Size on disk</h2>", plots.size_bars_svg(rows)]
    names, deltas = class_deltas(record)
    if names:
        sections += ["<h2>Per-class accuracy change vs FP32</h2>", plots.class_delta_heatmap_svg(names, deltas)]
    return _page(title, sections)


def _page(title: str, sections: list[str]) -> str:
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
        front = pareto_variants(rows)
        if front:
            parts.append(f"Pareto front (accuracy vs latency, fastest first): **{' → '.join(front)}**")
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
