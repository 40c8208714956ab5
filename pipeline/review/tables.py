"""Tables of runs, stages and variants, built only from run records (no model is loaded)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from pipeline.records.models import StageResult
from pipeline.records.reports import BenchmarkReport, ValidationReport
from pipeline.records.variants import read_variants, run_stages, stage_report


def format_bytes(size: int | None) -> str:
    """Human-readable size: 1.2 MB, 340.0 kB."""
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _stage_seconds(record: dict[str, Any], name: str) -> str:
    for stage in record["stages"]:
        if stage["name"] == name:
            return "cached" if stage["state"] == "cached" else f"{stage['seconds']:.2f}"
    return "-"


def variant_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per validated variant (baseline first), with latency where a ``benchmark`` stage timed it."""
    rows: list[dict[str, Any]] = []
    for variant in read_variants(record):
        figures, timing = variant.validation, variant.benchmark
        batch_size = next(iter(timing.batches)) if timing else None
        rows.append({
            "variant": variant.name,
            "kind": variant.kind,
            "top1": round(figures.top1, 4),
            "delta_top1": round(figures.delta_top1, 4),
            "agreement": round(figures.agreement, 4),
            "max_abs_logit_diff": float(f"{figures.max_abs_logit_diff:.3g}"),
            "size_bytes": figures.size_bytes,
            "latency_batch": int(batch_size) if batch_size else None,
            "latency_p50_ms": round(timing.batches[batch_size].p50_ms, 4) if timing else None,
            "speedup_vs_baseline": round(timing.speedup_vs_baseline[batch_size], 3) if timing else None,
            "stage_seconds": _stage_seconds(record, variant.name),
            "status": variant.status,
        })
    return rows


def variants_table(record: dict[str, Any]) -> Table:
    """The accuracy / size / time table of a run's variants against the FP32 baseline."""
    table = Table(title=f"{record['recipe']['name']} · run {record['run_id']} · {record['state']}")
    rows = variant_rows(record)
    batch = next((row["latency_batch"] for row in rows if row["latency_batch"]), None)
    latency_header = f"p50 ms @{batch}" if batch else "p50 ms"
    headers = ("variant", "kind", "top-1", "Δ top-1", "agreement", "max |Δ logit|", "size", latency_header, "speed-up", "stage s", "status")
    for header in headers:
        table.add_column(header, justify="left" if header in ("variant", "kind", "status") else "right")
    for row in rows:
        style = "red" if row["status"] == "rejected" else None
        timed = row["latency_p50_ms"] is not None
        table.add_row(
            row["variant"], row["kind"], f"{row['top1']:.2%}", f"{row['delta_top1'] * 100:+.2f} pt",
            f"{row['agreement']:.2%}", f"{row['max_abs_logit_diff']:.3g}", format_bytes(row["size_bytes"]),
            f"{row['latency_p50_ms']:.3f}" if timed else "-", f"{row['speedup_vs_baseline']:.2f}×" if timed else "-",
            row["stage_seconds"], row["status"], style=style,
        )
    return table


def _metrics_summary(run_id: str, stage: StageResult) -> str:
    """Validate: each variant's verdict; benchmark: each variant's speed-up at the first batch size; else scalars."""
    report = stage_report(run_id, stage)
    if isinstance(report, ValidationReport):
        return ", ".join(f"{name}: {figures.status}" for name, figures in report.variants.items())
    if isinstance(report, BenchmarkReport):
        return ", ".join(
            f"{name}: {next(iter(entry.speedup_vs_baseline.values())):.2f}× at batch {next(iter(entry.batches))}"
            for name, entry in report.variants.items()
        )
    shown = [f"{key}={value}" for key, value in (stage.metrics or {}).items() if isinstance(value, (int, float, str, bool))]
    return ", ".join(shown[:6])


def stages_table(record: dict[str, Any]) -> Table:
    """Each stage of a run: state, seconds, artifact path, headline metrics or the reason it did not finish."""
    table = Table(title=f"run {record['run_id']} · {record['recipe']['name']} · {record['state']}")
    for header in ("stage", "uses", "state", "seconds", "artifact", "metrics / reason"):
        table.add_column(header, overflow="fold")
    colors = {"done": "green", "cached": "cyan", "failed": "red", "rejected": "red", "skipped": "yellow"}
    run_id, stages = run_stages(record)
    for stage in stages:
        table.add_row(
            stage.name, stage.uses, f"[{colors.get(stage.state, 'white')}]{stage.state}[/]",
            f"{stage.seconds:.2f}", stage.artifact or "-", stage.reason or _metrics_summary(run_id, stage),
        )
    return table


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
