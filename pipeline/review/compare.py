"""Compare two run records: which stages changed, and which variants regressed.

Built only from run records (DESIGN.md "Contracts scripts rely on") and the artifact manifests
they point to; no model is loaded. Stages and variants are matched by name, so two runs of
different recipes can be compared. The metric (the recipe's: top-1, MSE, F1, ...) comes from ``validate`` stages, latency (batch 1
median) from ``benchmark`` stages, both read through ``pipeline.records.variants``: a report that does
not match its declared shape raises ``StoreError`` instead of comparing nothing.

Latency is judged relative to the FP32 baseline timed in the same benchmark run by default
(``latency_basis="baseline"``): a shared machine's speed drifts by tens of percent between two
runs minutes apart, and the ratio to a baseline timed alongside cancels that drift. ``"absolute"``
compares milliseconds, for quiet dedicated machines or when the baseline itself may change speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from pipeline.records.variants import Variant, read_variants
from pipeline.review.units import format_amount, format_bytes, format_delta, format_figure, is_fraction, metric_label

LATENCY_BATCH = "1"
LatencyBasis = Literal["baseline", "absolute"]


def _manifest_params(stage: dict[str, Any] | None) -> dict[str, Any]:
    """The ``params`` of a stage's artifact manifest, or ``{}`` when the folder or manifest is missing."""
    if not stage or not stage.get("artifact"):
        return {}
    manifest = Path(stage["artifact"]) / "manifest.json"
    try:
        return dict(json.loads(manifest.read_text()).get("params") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _stages_by_name(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run record's stages keyed by their recipe name."""
    return {stage["name"]: stage for stage in record.get("stages", [])}


def _changed_params(params_a: dict[str, Any], params_b: dict[str, Any]) -> dict[str, list[Any]]:
    """Params both manifests record with different values; one recorded on one side only (a default the other
    side's stage or code version does not have, or a missing manifest) is not a change anyone made."""
    return {
        param: [params_a[param], params_b[param]]
        for param in sorted(set(params_a) & set(params_b))
        if params_a[param] != params_b[param]
    }


def _only_in(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    """``"A"`` or ``"B"`` for a stage that only one of the runs has, else None."""
    if a is None:
        return "B"
    return "A" if b is None else None


def _compare_stage(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """One stage matched by name across the runs: its uses, states, whether the artifact is the same, changed params."""
    key_a, key_b = (a or {}).get("key"), (b or {}).get("key")
    only_in = _only_in(a, b)
    return {
        "name": name,
        "uses_a": (a or {}).get("uses"),
        "uses_b": (b or {}).get("uses"),
        "state_a": (a or {}).get("state"),
        "state_b": (b or {}).get("state"),
        # Keys are content-addressed: equal keys mean the same artifact.
        "same_artifact": bool(a and b and a.get("artifact") and b.get("artifact") and key_a and key_a == key_b),
        "only_in": only_in,
        "params_changed": {} if only_in else _changed_params(_manifest_params(a), _manifest_params(b)),
    }


def _validated(record: dict[str, Any]) -> dict[str, Variant]:
    """The run's validated variants by name, the FP32 baseline left out (it is what they are measured against)."""
    return {variant.name: variant for variant in read_variants(record) if variant.status != "baseline"}


@dataclass(frozen=True)
class Side:
    """One run's figures of a variant in a comparison; all None where that run did not validate (or time) it."""

    metric: str | None = None
    higher_is_better: bool = True
    value: float | None = None
    top1: float | None = None
    agreement: float | None = None
    relative_error: float | None = None
    status: str | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    latency_vs_baseline: float | None = None

    @classmethod
    def of(cls, variant: Variant | None) -> Side:
        """The figures of ``variant``: its metric, batch-1 p50 latency in ms, and as a fraction of the baseline's p50
        timed in the same stage (the inverse of the stage's own ``speedup_vs_baseline``) when batch 1 was timed."""
        if variant is None:
            return cls()
        figures, timing = variant.validation, variant.benchmark
        batch = timing.batches.get(LATENCY_BATCH) if timing else None
        speedup = timing.speedup_vs_baseline.get(LATENCY_BATCH) if timing else None
        timed = batch is not None and bool(speedup)
        return cls(
            metric=figures.metric, higher_is_better=figures.higher_is_better, value=figures.value, top1=figures.top1,
            agreement=figures.agreement, relative_error=figures.relative_error, status=variant.status, size_bytes=figures.size_bytes,
            latency_ms=batch.p50_ms if timed else None, latency_vs_baseline=1 / speedup if timed else None,
        )


def metric_change(a: Side, b: Side) -> float | None:
    """B's metric minus A's, when both runs measured the same metric."""
    return b.value - a.value if a.value is not None and b.value is not None and a.metric == b.metric else None


def _metric_drop(a: Side, b: Side, limit: float) -> str | None:
    """The regression line when B's metric is worse than A's by more than ``limit`` in the metric's direction, else None."""
    change = metric_change(a, b)
    if change is None:
        return None
    drop = -change if b.higher_is_better else change
    if drop <= limit + 1e-12:
        return None
    points = " points" if is_fraction(b.metric) else ""
    return (f"{metric_label(b.metric)} {'dropped' if b.higher_is_better else 'rose'} {format_amount(b.metric, drop)}{points} "
            f"({format_figure(b.metric, a.value)} -> {format_figure(b.metric, b.value)}), allowed {format_amount(b.metric, limit)}")


def _latency_growth(a: Side, b: Side, basis: LatencyBasis, limit: float) -> str | None:
    """The regression line when the latency grew more than ``limit`` on ``basis``, else None."""
    if a.latency_ms is None or b.latency_ms is None:
        return None
    growth = (b.latency_vs_baseline / a.latency_vs_baseline if basis == "baseline" else b.latency_ms / a.latency_ms) - 1
    if growth <= limit:
        return None
    measured = f"{a.latency_ms:.3f} ms -> {b.latency_ms:.3f} ms"
    if basis == "baseline":
        measured = f"{a.latency_vs_baseline:.3f}x -> {b.latency_vs_baseline:.3f}x the FP32 baseline's time in the same run; {measured}"
    return f"latency grew {growth:+.1%} ({measured}), allowed +{limit:.1%}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a and b is not None else None


def compare_runs(
    record_a: dict[str, Any],
    record_b: dict[str, Any],
    max_drop: float = 0.0,
    max_latency_increase: float | None = None,
    latency_basis: LatencyBasis = "baseline",
) -> dict[str, Any]:
    """Compare run A (reference) with run B; returns a JSON-serializable dict.

    Keys: ``runs`` (id and recipe name of each), ``stages`` (matched by name; ``only_in`` is ``"A"`` or ``"B"``
    for a stage one run lacks, with no params compared, and ``params_changed`` holds only params both
    manifests record with different values), ``variants`` (from
    validate / benchmark metrics) and ``regressions`` (one line each). A variant regresses when its
    metric (the recipe's: top-1, MSE, ...) got worse by more than ``max_drop`` in the metric's units and
    direction (a top-1 that fell, an MSE that rose), its batch-1 latency grew by more
    than ``max_latency_increase`` (fraction, on ``latency_basis``; only when both are known and the
    limit is set), or it was accepted in A and rejected in B.
    """
    stages_a, stages_b = _stages_by_name(record_a), _stages_by_name(record_b)
    names = list(stages_a) + [name for name in stages_b if name not in stages_a]
    stages = [_compare_stage(name, stages_a.get(name), stages_b.get(name)) for name in names]

    valid_a, valid_b = _validated(record_a), _validated(record_b)
    variant_names = list(valid_a) + [name for name in valid_b if name not in valid_a]
    variants, regressions = [], []
    for name in variant_names:
        a, b = Side.of(valid_a.get(name)), Side.of(valid_b.get(name))
        dropped = _metric_drop(a, b, max_drop)
        reasons: list[str] = [dropped] if dropped else []
        if max_latency_increase is not None:
            grew = _latency_growth(a, b, latency_basis, max_latency_increase)
            reasons += [grew] if grew else []
        if a.status == "accepted" and b.status == "rejected":
            reasons.append("accepted in A, rejected in B")
        regressions += [f"{name}: {reason}" for reason in reasons]
        variants.append({
            "variant": name,
            "metric": b.metric or a.metric,
            "higher_is_better": b.higher_is_better if b.metric else a.higher_is_better,
            "value_a": a.value,
            "value_b": b.value,
            "delta": metric_change(a, b),
            "top1_a": a.top1,
            "top1_b": b.top1,
            "delta_top1": b.top1 - a.top1 if a.top1 is not None and b.top1 is not None else None,
            "agreement_a": a.agreement,
            "agreement_b": b.agreement,
            "relative_error_a": a.relative_error,
            "relative_error_b": b.relative_error,
            "status_a": a.status,
            "status_b": b.status,
            "size_a": a.size_bytes,
            "size_b": b.size_bytes,
            "size_ratio": _ratio(a.size_bytes, b.size_bytes),
            "latency_ms_a": a.latency_ms,
            "latency_ms_b": b.latency_ms,
            "latency_ratio": _ratio(a.latency_ms, b.latency_ms),
            "latency_vs_baseline_a": a.latency_vs_baseline,
            "latency_vs_baseline_b": b.latency_vs_baseline,
            "regression": reasons,
        })

    def _run(record: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": record.get("run_id"), "recipe": (record.get("recipe") or {}).get("name")}

    return {"runs": {"a": _run(record_a), "b": _run(record_b)}, "stages": stages, "latency_basis": latency_basis,
            "variants": variants, "regressions": regressions}


def _pair(a: Any, b: Any, fmt=str) -> str:
    show = lambda value: "-" if value is None else fmt(value)  # noqa: E731
    return show(a) if a == b else f"{show(a)} → {show(b)}"


def comparison_tables(comparison: dict[str, Any]) -> list[Table]:
    """A stages table and a variants table for a ``compare_runs`` result; regressions are red."""
    runs = comparison["runs"]
    title = f"{runs['a']['run_id']} ({runs['a']['recipe']}) → {runs['b']['run_id']} ({runs['b']['recipe']})"
    stages = Table(title=f"stages · {title}")
    for header in ("stage", "uses", "state A → B", "identical", "changed params"):
        stages.add_column(header, overflow="fold")
    for stage in comparison["stages"]:
        changed = ", ".join(f"{key}: {a!r} → {b!r}" for key, (a, b) in stage["params_changed"].items())
        if stage["only_in"]:
            changed = f"only in {stage['only_in']}"
        stages.add_row(
            stage["name"], _pair(stage["uses_a"], stage["uses_b"]),
            f"{stage['state_a'] or '-'} → {stage['state_b'] or '-'}",
            "[green]yes[/]" if stage["same_artifact"] else "[yellow]no[/]", changed or "-",
        )

    variants = Table(title=f"variants · {title}")
    rows = comparison["variants"]
    label = metric_label(rows[0]["metric"]) if rows else "top-1"
    agreement = any(row["agreement_a"] is not None or row["agreement_b"] is not None for row in rows)
    headers = ("variant", f"{label} A", f"{label} B", f"Δ {label}", "agreement" if agreement else "rel. error", "size A → B",
               "p50 ms @1 A → B", "× FP32 time A → B", "regression")
    for header in headers:
        variants.add_column(header, justify="left" if header in ("variant", "regression") else "right", overflow="fold")
    pct = lambda value: f"{value:.2%}"  # noqa: E731
    for row in rows:
        closeness = (_pair(row["agreement_a"], row["agreement_b"], pct) if agreement else
                     _pair(row["relative_error_a"], row["relative_error_b"], lambda value: f"{value:.3g}"))
        variants.add_row(
            row["variant"], format_figure(row["metric"], row["value_a"]), format_figure(row["metric"], row["value_b"]),
            format_delta(row["metric"], row["delta"]), closeness,
            _pair(row["size_a"], row["size_b"], format_bytes),
            _pair(row["latency_ms_a"], row["latency_ms_b"], lambda value: f"{value:.3f}"),
            _pair(row["latency_vs_baseline_a"], row["latency_vs_baseline_b"], lambda value: f"{value:.3f}"),
            "REGRESSION: " + "; ".join(row["regression"]) if row["regression"] else "ok",
            style="red" if row["regression"] else None,
        )
    return [stages, variants]
