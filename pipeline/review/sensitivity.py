"""The review page's section for a finished ``sensitivity`` stage: its layers, most costly first, as a table and a plot.

For ``pipeline.review.page``'s per-stage registry (``STAGE_SECTIONS``, keyed by ``uses``). Torch-free.
"""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from pipeline.records.parse import parse_record
from pipeline.records.sensitivity import LayerSensitivity, SensitivityReport
from pipeline.review.plots import REJECTED_COLOR, VARIANT_COLOR, svg_element
from pipeline.review.units import format_amount, format_figure, metric_label, plot_scale

HEADERS = ("#", "layer", "module path", "position", "op", "drop, INT8 alone", "agreement, INT8 alone", "recovery, FP32 alone",
           "rel. error, FP32 alone")


def layer_cells(rank: int, row: LayerSensitivity, metric: str) -> list[str]:
    """One table row's cells, escaped."""
    agreement = row.quantized_alone.agreement
    cells = [str(rank), row.name, row.module_path or "-", row.position, row.op_type,
             format_amount(metric, row.quantized_alone.drop), "-" if agreement is None else f"{agreement:.1%}",
             format_amount(metric, row.recovery), f"{row.fp32_alone.relative_error:.3g}"]
    return [html.escape(cell) for cell in cells]


def layers_table(report: SensitivityReport, max_rows: int) -> str:
    """The most costly ``max_rows`` layers as an HTML table."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in layer_cells(rank, row, report.metric)) + "</tr>"
                   for rank, row in enumerate(report.layers[:max_rows], start=1))
    return f'<table class="sensitivity"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def layers_svg(report: SensitivityReport, max_rows: int) -> str:
    """Bars per layer, most costly on top: the drop with it alone INT8 and what leaving it alone FP32 recovers."""
    rows = report.layers[:max_rows]
    scale = plot_scale(report.metric)
    figure = Figure(figsize=(7.5, 1.0 + 0.45 * max(len(rows), 1)))
    axes = figure.add_subplot()
    places = list(range(len(rows)))
    axes.barh([place - 0.2 for place in places], [row.quantized_alone.drop * scale for row in rows], height=0.4,
              color=REJECTED_COLOR, label="drop with only this layer INT8")
    axes.barh([place + 0.2 for place in places], [row.recovery * scale for row in rows], height=0.4,
              color=VARIANT_COLOR, label="recovered with only this layer FP32")
    axes.set_yticks(places, [f"{row.position} {row.module_path or row.name}" for row in rows])
    axes.invert_yaxis()
    unit = " (points)" if scale != 1.0 else ""
    axes.set_xlabel(f"{metric_label(report.metric)}{unit}")
    axes.set_title("INT8 sensitivity per layer")
    axes.legend(fontsize=8, loc="lower right")
    return svg_element(figure, "plot-sensitivity")


def sensitivity_section(record: dict[str, Any], stage: dict[str, Any], max_rows: int = 20) -> str:
    """The HTML of a finished sensitivity stage, for ``pipeline.review.page.STAGE_SECTIONS``.

    ``stage`` is the stage's entry of the run ``record`` (its ``metrics`` are a ``SensitivityReport`` dump); the
    section holds a summary line, a table of the ``max_rows`` most costly layers (most costly first) and a bar
    plot of the same layers, and names the layers left out by ``max_layers``.
    """
    report = parse_record(SensitivityReport, stage.get("metrics") or {},
                          f"run {record.get('run_id')}: stage '{stage.get('name')}' (sensitivity): metrics do not match the sensitivity report")
    label = metric_label(report.metric)
    summary = (f"{html.escape(label)} of the FP32 input {format_figure(report.metric, report.value_fp32)}, all layers INT8 "
               f"{format_figure(report.metric, report.int8.value)} on {report.eval_rows} eval rows "
               f"({report.calibration_batches} calibration batches).")
    left_out = ""
    if report.left_out:
        names = ", ".join(html.escape(layer.position) for layer in report.left_out)
        left_out = f"<p>Not measured (past max_layers): {names}.</p>"
    return (f'<section class="stage-section sensitivity"><h2>{html.escape(str(stage.get("name")))}: INT8 sensitivity</h2>'
            f"<p>{summary}</p>{layers_table(report, max_rows)}{layers_svg(report, max_rows)}{left_out}</section>")
