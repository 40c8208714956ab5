"""Tables of runs, stages and variants, built only from run records (no model is loaded)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


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
    """One row per validated variant (baseline first), from every ``validate`` stage of a run record."""
    rows: list[dict[str, Any]] = []
    for stage in record["stages"]:
        if stage["uses"] != "validate" or not stage.get("metrics"):
            continue
        metrics = stage["metrics"]
        entries = [(metrics["baseline_stage"], metrics["baseline"], "baseline")]
        entries += [(name, values, values["status"]) for name, values in metrics["variants"].items()]
        for name, values, status in entries:
            if any(row["variant"] == name for row in rows):
                continue
            rows.append({
                "variant": name,
                "kind": values["kind"],
                "top1": round(values["top1"], 4),
                "delta_top1": round(values["delta_top1"], 4),
                "agreement": round(values["agreement"], 4),
                "max_abs_logit_diff": float(f"{values['max_abs_logit_diff']:.3g}"),
                "size_bytes": values["size_bytes"],
                "stage_seconds": _stage_seconds(record, name),
                "status": status,
            })
    return rows


def variants_table(record: dict[str, Any]) -> Table:
    """The accuracy / size / time table of a run's variants against the FP32 baseline."""
    table = Table(title=f"{record['recipe']['name']} · run {record['run_id']} · {record['state']}")
    for header in ("variant", "kind", "top-1", "Δ top-1", "agreement", "max |Δ logit|", "size", "stage s", "status"):
        table.add_column(header, justify="left" if header in ("variant", "kind", "status") else "right")
    for row in variant_rows(record):
        style = "red" if row["status"] == "rejected" else None
        table.add_row(
            row["variant"], row["kind"], f"{row['top1']:.2%}", f"{row['delta_top1'] * 100:+.2f} pt",
            f"{row['agreement']:.2%}", f"{row['max_abs_logit_diff']:.3g}", format_bytes(row["size_bytes"]),
            row["stage_seconds"], row["status"], style=style,
        )
    return table


def _metrics_summary(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    if "variants" in metrics:
        return ", ".join(f"{name}: {values['status']}" for name, values in metrics["variants"].items())
    shown = [f"{key}={value}" for key, value in metrics.items() if isinstance(value, (int, float, str, bool))]
    return ", ".join(shown[:6])


def stages_table(record: dict[str, Any]) -> Table:
    """Each stage of a run: state, seconds, artifact path, headline metrics or the reason it did not finish."""
    table = Table(title=f"run {record['run_id']} · {record['recipe']['name']} · {record['state']}")
    for header in ("stage", "uses", "state", "seconds", "artifact", "metrics / reason"):
        table.add_column(header, overflow="fold")
    colors = {"done": "green", "cached": "cyan", "failed": "red", "rejected": "red", "skipped": "yellow"}
    for stage in record["stages"]:
        table.add_row(
            stage["name"], stage["uses"], f"[{colors.get(stage['state'], 'white')}]{stage['state']}[/]",
            f"{stage['seconds']:.2f}", stage.get("artifact") or "-",
            stage.get("reason") or _metrics_summary(stage.get("metrics")),
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
