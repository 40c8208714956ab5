"""Tables of runs, stages and variants, built only from run records (no model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.records.models import StageResult
from pipeline.records.reports import BenchmarkEntry, BenchmarkReport, ValidationReport
from pipeline.records.variants import benchmark_reports, read_variants, run_stages, stage_report
from pipeline.review.stage_facts import stage_highlights
from pipeline.review.units import format_bytes, format_delta, format_figure, metric_label


def _stage_seconds(record: dict[str, Any], name: str) -> str:
    for stage in record["stages"]:
        if stage["name"] == name:
            return "cached" if stage["state"] == "cached" else f"{stage['seconds']:.2f}"
    return "-"


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


SLOWER_MARGIN = 0.05  # a variant is flagged slower than its source when under 0.95x its speed: closer is timing noise


def nearest_timed_upstream(dag: dict[str, list[str]], name: str, timed: set[str]) -> str | None:
    """The closest stage upstream of ``name`` in the run's DAG that is in ``timed`` (breadth first, in needs order)."""
    frontier, seen = list(dag.get(name, [])), {name}
    while frontier:
        found = next((need for need in frontier if need in timed), None)
        if found is not None:
            return found
        seen.update(frontier)
        frontier = [upstream for need in frontier for upstream in dag.get(need, []) if upstream not in seen]
    return None


def compared_batch(variant: BenchmarkEntry, source: BenchmarkEntry) -> str | None:
    """The batch size a variant and its source are compared at: 1 when both were timed at it, else the first they share."""
    shared = [size for size in variant.batches if size in source.batches]
    return "1" if "1" in shared else next(iter(shared), None)


def slower_than_source(record: dict[str, Any]) -> dict[str, str]:
    """Each timed model that is slower than the model it was made from (its nearest upstream stage timed in the same
    benchmark stage, so both come from the same interleaved rounds), e.g. ``{"int8": "slower than fused (0.77×)"}``;
    the first benchmark stage that timed a model decides."""
    dag = record.get("dag") or {}
    flags: dict[str, str] = {}
    judged: set[str] = set()
    for _, report in benchmark_reports(record):
        models = {report.baseline_stage: report.baseline, **report.variants}
        for name, entry in report.variants.items():
            source = nearest_timed_upstream(dag, name, set(models))
            if name in judged or source is None:
                continue
            judged.add(name)
            batch = compared_batch(entry, models[source])
            ratio = models[source].batches[batch].p50_ms / entry.batches[batch].p50_ms if batch else 1.0
            if ratio < 1 - SLOWER_MARGIN:
                flags[name] = f"slower than {source} ({ratio:.2f}×{'' if batch == '1' else f' at batch {batch}'})"
    return flags


def benchmark_warnings(record: dict[str, Any]) -> list[str]:
    """Every finished benchmark stage's warnings (a loaded machine, noisy rounds), each prefixed with the stage's name."""
    return [f"{stage}: {warning}" for stage, report in benchmark_reports(record) for warning in report.warnings]


def status_cell(row: dict[str, Any]) -> str:
    """A variant's status, with the flag of a variant slower than the model it was made from."""
    return f"{row['status']} · {row['slower_than']}" if row["slower_than"] else row["status"]


def variant_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per validated variant (baseline first), with latency where a ``benchmark`` stage timed it: the run's
    metric (``metric``, ``value``, ``delta``, ``higher_is_better``), agreement and relative error where measured, and
    for classification ``top1`` / ``delta_top1`` (None for other tasks); ``slower_than`` flags a variant slower than the
    model it was made from (``slower_than_source``)."""
    rows: list[dict[str, Any]] = []
    slower = slower_than_source(record)
    for variant in read_variants(record):
        figures, timing = variant.validation, variant.benchmark
        batch_size = next(iter(timing.batches)) if timing else None
        rows.append({
            "variant": variant.name,
            "kind": variant.kind,
            "metric": figures.metric,
            "higher_is_better": figures.higher_is_better,
            "value": float(f"{figures.value:.6g}"),
            "delta": float(f"{figures.delta:.6g}"),
            "top1": _rounded(figures.top1),
            "delta_top1": _rounded(figures.delta_top1),
            "agreement": _rounded(figures.agreement),
            "relative_error": None if figures.relative_error is None else float(f"{figures.relative_error:.3g}"),
            "max_abs_logit_diff": float(f"{figures.max_abs_logit_diff:.3g}"),
            "size_bytes": figures.size_bytes,
            "latency_batch": int(batch_size) if batch_size else None,
            "latency_p50_ms": round(timing.batches[batch_size].p50_ms, 4) if timing else None,
            "speedup_vs_baseline": round(timing.speedup_vs_baseline[batch_size], 3) if timing else None,
            "stage_seconds": _stage_seconds(record, variant.name),
            "status": variant.status,
            "slower_than": slower.get(variant.name),
        })
    return rows


def run_metric(rows: list[dict[str, Any]]) -> str:
    """The metric a run's variants are measured by (the baseline's), as its rows name it."""
    return rows[0]["metric"]


def closeness_header(rows: list[dict[str, Any]]) -> str:
    """The column that says how close a variant stays to FP32: agreement where decisions are compared, else relative error."""
    return "agreement" if any(row["agreement"] is not None for row in rows) else "rel. error"


def closeness_cell(row: dict[str, Any]) -> str:
    """A variant's agreement with FP32 (%), else its outputs' relative error, else '-'."""
    if row["agreement"] is not None:
        return f"{row['agreement']:.2%}"
    return "-" if row["relative_error"] is None else f"{row['relative_error']:.3g}"


def metric_cells(row: dict[str, Any]) -> list[str]:
    """A row's metric value, its change vs FP32 and its closeness, formatted by the metric's kind."""
    return [format_figure(row["metric"], row["value"]), format_delta(row["metric"], row["delta"]), closeness_cell(row)]


def output_diff_header(rows: list[dict[str, Any]]) -> str:
    """The largest output difference's header: logits for classification, outputs for other tasks."""
    return "max |Δ logit|" if rows[0]["top1"] is not None else "max |Δ output|"


def metric_headers(rows: list[dict[str, Any]]) -> list[str]:
    """Headers of ``metric_cells``: the metric's name (top-1, MSE, ...), its Δ and the closeness column."""
    label = metric_label(run_metric(rows))
    return [label, f"Δ {label}", closeness_header(rows)]


@dataclass(frozen=True)
class Column:
    """A table column: its header, a shorter one for narrow consoles, how readily it is dropped (0: never;
    higher: sooner), whether it is left-aligned text, and whether its cells may fold onto more lines (free
    text); figures and names never wrap, so none is cut."""

    header: str
    short: str
    drop_rank: int = 0
    left: bool = False
    folds: bool = False


FOLDED_WIDTH = 16  # what a folding column is counted at when fitting: it folds onto more lines below that
CELL_PADDING = 3  # a column's padding and its border in rich's default box


def table_width(columns: list[Column], cells: list[list[str]], short: bool) -> int:
    """The width a table of these columns (cells in rich markup) needs to show every figure whole."""
    total = 1
    for index, column in enumerate(columns):
        shown = [Text.from_markup(row[index]).cell_len for row in cells]
        widest = max([cell_len(column.short if short else column.header)] + shown)
        total += (min(widest, FOLDED_WIDTH) if column.folds else widest) + CELL_PADDING
    return total


def fitted_table(title: str, columns: list[Column], cells: list[list[str]], width: int | None, styles: list[str | None]) -> Table:
    """A table of ``cells`` that fits ``width`` (None: any width): short headers first, then the columns
    dropped by rank, so figures stay whole instead of ending in an ellipsis."""
    kept = list(range(len(columns)))
    short = False

    def needed() -> int:
        return table_width([columns[index] for index in kept], [[row[index] for index in kept] for row in cells], short)

    if width is not None and needed() > width:
        short = True
        for index in sorted((i for i in kept if columns[i].drop_rank), key=lambda i: -columns[i].drop_rank):
            if needed() <= width:
                break
            kept.remove(index)
    table = Table(title=title)
    for index in kept:
        column = columns[index]
        table.add_column(column.short if short else column.header, justify="left" if column.left else "right",
                         no_wrap=not column.folds, overflow="fold")
    for row, style in zip(cells, styles):
        table.add_row(*(row[index] for index in kept), style=style)
    return table


def variants_table(record: dict[str, Any], width: int | None = None) -> Table:
    """The metric / size / time table of a run's variants against the FP32 baseline; on a console narrower
    than ``width`` needs, headers shorten and kind, stage seconds, logit and agreement columns go first. A variant slower
    than the model it was made from says so in its status."""
    rows = variant_rows(record)
    batch = next((row["latency_batch"] for row in rows if row["latency_batch"]), None)
    label, delta, closeness = metric_headers(rows)
    columns = [
        Column("variant", "variant", left=True), Column("kind", "kind", 4, left=True), Column(label, label),
        Column(delta, delta), Column(closeness, "agree" if closeness == "agreement" else "rel.err", 2),
        Column(output_diff_header(rows), "|Δ|", 3), Column("size", "size"),
        Column(f"p50 ms @{batch}" if batch else "p50 ms", f"p50@{batch}" if batch else "p50"),
        Column("speed-up", "×", 1), Column("stage s", "s", 5), Column("status", "status", left=True),
    ]
    cells = []
    for row in rows:
        timed = row["latency_p50_ms"] is not None
        cells.append([
            escape(row["variant"]), row["kind"], *metric_cells(row), f"{row['max_abs_logit_diff']:.3g}", format_bytes(row["size_bytes"]),
            f"{row['latency_p50_ms']:.3f}" if timed else "-", f"{row['speedup_vs_baseline']:.2f}×" if timed else "-",
            row["stage_seconds"], escape(status_cell(row)),
        ])
    styles = ["red" if row["status"] == "rejected" else None for row in rows]
    return fitted_table(f"{record['recipe']['name']} · run {record['run_id']} · {record['state']}", columns, cells, width, styles)


def _metrics_summary(run_id: str, stage: StageResult) -> str:
    """Validate: each variant's verdict; benchmark: each variant's speed-up at the first batch size and its warnings; else the
    stage's highlighted figures (``pipeline.review.stage_facts``), or its first scalars."""
    report = stage_report(run_id, stage)
    if isinstance(report, ValidationReport):
        return ", ".join(f"{name}: {figures.status}" for name, figures in report.variants.items())
    if isinstance(report, BenchmarkReport):
        warned = "".join(f" · warning: {warning}" for warning in report.warnings)
        return ", ".join(
            f"{name}: {next(iter(entry.speedup_vs_baseline.values())):.2f}× at batch {next(iter(entry.batches))}"
            for name, entry in report.variants.items()
        ) + warned
    highlights = stage_highlights(stage.model_dump(mode="json"))
    if highlights:  # the figures the review page shows for this kind of stage
        return ", ".join(f"{label} {value}" for label, value in highlights)
    shown = [f"{key}={_short(value)}" for key, value in (stage.metrics or {}).items() if isinstance(value, (int, float, str, bool))]
    return ", ".join(shown[:6])


def _short(value: int | float | str | bool) -> str:
    """A scalar as a table shows it: floats to 4 significant digits, so no figure is long enough to break."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SHORT_KEY = 12  # hex digits of an artifact key a table shows: unique in any store of a sane size


def stages_table(record: dict[str, Any], width: int | None = None) -> Table:
    """Each stage of a run: state, seconds, its artifact's short key (``show --json`` and the review page give the
    folder), headline metrics or the reason it did not finish; on a narrow console the key and uses columns go first."""
    columns = [Column("stage", "stage", left=True), Column("uses", "uses", 2, left=True), Column("state", "state", left=True),
               Column("seconds", "s"), Column("artifact", "key", 3, left=True),
               Column("metrics / reason", "metrics / reason", left=True, folds=True)]
    colors = {"done": "green", "cached": "cyan", "failed": "red", "rejected": "red", "skipped": "yellow"}
    run_id, stages = run_stages(record)
    cells = [[escape(stage.name), stage.uses, f"[{colors.get(stage.state, 'white')}]{stage.state}[/]", f"{stage.seconds:.2f}",
              (stage.key or "-")[:SHORT_KEY] if stage.artifact else "-", escape(stage.reason or _metrics_summary(run_id, stage))]
             for stage in stages]
    return fitted_table(f"run {record['run_id']} · {record['recipe']['name']} · {record['state']}", columns, cells, width,
                        [None] * len(cells))


def runs_table(records: list[dict[str, Any]]) -> Table:
    """One line per run, newest first."""
    table = Table(title="runs")
    for header in ("run", "recipe", "state", "started", "seconds", "stages (done/cached/other)", "checkpoint"):
        table.add_column(header, overflow="fold")
    for record in records:
        states = [stage["state"] for stage in record.get("stages", [])]
        done, cached = states.count("done"), states.count("cached")
        table.add_row(
            record["run_id"], record["recipe"]["name"], record["state"], record["started_at"],
            "-" if record.get("seconds") is None else f"{record['seconds']:.1f}",
            f"{done}/{cached}/{len(states) - done - cached}", record["checkpoint"]["path"],
        )
    return table
