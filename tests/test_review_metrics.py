"""The review layer shows the recipe's metric (MSE for regression, top-1 for classification) and judges it in its direction.

Run records are built by hand here (no model is run): a regression run measured by MSE (lower is better) and a
classification run stored in the format written before metrics were named (read as top-1).
"""

from __future__ import annotations

import copy
import json

from rich.console import Console

from pipeline.nightly.promotion import judge
from pipeline.recipe.schema import RegressionSpec
from pipeline.records.reports import ModelValidation, VariantValidation
from pipeline.review.compare import compare_runs, comparison_tables
from pipeline.review.page import html_report, markdown_report, pareto_variants
from pipeline.review.plots import pareto_front
from pipeline.review.prefect_view import variant_table
from pipeline.review.stage_facts import stage_highlights
from pipeline.review.tables import variant_rows, variants_table
from pipeline.review.trend import trend_report

BASELINE_MSE = 0.0391
# variant -> (MSE, p50 ms at batch 1, status); fused ties the baseline's MSE at lower latency, int8 is fastest and worst
REGRESSION_VARIANTS = {"fused": (0.0391, 0.8, "accepted"), "onnx": (0.0395, 0.5, "accepted"), "int8": (0.0514, 0.3, "rejected")}


def _stage(tmp_path, name: str, uses: str, metrics: dict | None = None, params: dict | None = None) -> dict:
    """A finished stage whose artifact folder holds a manifest with ``params``."""
    folder = tmp_path / "artifacts" / f"k-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"key": f"k-{name}", "stage": name, "params": params or {}}))
    return {"name": name, "uses": uses, "state": "done", "seconds": 0.1, "key": f"k-{name}", "artifact": str(folder),
            "metrics": metrics, "reason": None}


def regression_figures(mse: float, status: str | None = None) -> dict:
    """A validate entry of a regression model: MSE against the baseline's, no agreement (there are no decisions)."""
    figures = ModelValidation(
        metric="mse", higher_is_better=False, value=mse, delta=mse - BASELINE_MSE, figures={"mse": mse, "mae": mse * 4},
        figure_deltas={"mse": mse - BASELINE_MSE, "mae": (mse - BASELINE_MSE) * 4}, agreement=None,
        relative_error=(mse - BASELINE_MSE) * 10, cosine_similarity=0.999, max_abs_logit_diff=0.01, mean_abs_logit_diff=0.001,
        samples=200, kind="onnx", size_bytes=900,
    )
    if status is None:
        return figures.model_dump(mode="json")
    return VariantValidation(**figures.model_dump(), status=status).model_dump(mode="json")


def top1_figures(top1: float, status: str | None = None) -> dict:
    """A validate entry as stored before metrics were named: top-1 and agreement only."""
    entry = {"top1": top1, "delta_top1": top1 - 0.972, "agreement": 0.99, "max_abs_logit_diff": 1e-3, "mean_abs_logit_diff": 1e-4,
             "per_class_top1": [top1, top1], "per_class_delta": [top1 - 0.972] * 2, "samples": 500, "size_bytes": 900, "kind": "onnx"}
    return entry | ({"status": status} if status else {})


def _timing(ms: float) -> dict:
    timing = {"runs": 30, "timed_seconds": 30 * ms / 1e3, "p50_ms": ms, "p95_ms": ms * 2, "throughput_per_s": 1e3 / ms}
    return {"kind": "onnx", "runtime": "onnxruntime (CPU)", "size_bytes": 900, "peak_rss_bytes": 10**8, "batches": {"1": timing},
            "speedup_vs_baseline": {"1": 1.0 / ms}, "size_ratio_vs_baseline": 0.5}


def run_record(tmp_path, run_id: str, variants: dict, entry, budget: dict, baseline: float) -> dict:
    """A succeeded run whose ``check`` validates ``variants`` ({name: (figure, ms, status)}) and ``bench`` times them."""
    validation = {"baseline_stage": "load", "baseline": entry(baseline),
                  "variants": {name: entry(value, status) for name, (value, _, status) in variants.items()},
                  "rejected": {name: "too much" for name, (_, _, status) in variants.items() if status == "rejected"}}
    bench = {"baseline_stage": "load", "threads": 4, "warmup": 10, "min_iterations": 30, "min_seconds": 1.0, "rounds": 3,
             "baseline": _timing(1.0), "variants": {name: _timing(ms) for name, (_, ms, _) in variants.items()}}
    stages = [_stage(tmp_path, "load", "load_checkpoint", {"format": "state_dict"})]
    stages += [_stage(tmp_path, name, "export_onnx", {"opset": 18}) for name in variants]
    stages += [_stage(tmp_path, "check", "validate", validation, budget), _stage(tmp_path, "bench", "benchmark", bench)]
    dag = {"load": []} | {name: ["load"] for name in variants} | {"check": list(variants), "bench": list(variants)}
    return json.loads(json.dumps({
        "run_id": run_id, "recipe": {"name": "mlp", "path": "mlp.yaml", "digest": "d"}, "checkpoint": {"path": "m.pt", "sha256": "s" * 64},
        "state": "succeeded", "started_at": "2026-01-01T00:00:00+00:00", "seconds": 1.0, "baseline": "load", "dag": dag,
        "stages": stages, "store": str(tmp_path),
    }))


def regression_run(tmp_path, run_id: str = "reg-a", variants: dict | None = None) -> dict:
    """The MLP regression run: MSE, budget ``max_drop`` 0.005 in the validate manifest."""
    return run_record(tmp_path, run_id, variants or REGRESSION_VARIANTS, regression_figures, {"max_drop": 0.005}, BASELINE_MSE)


def classification_run(tmp_path, run_id: str = "cls-a") -> dict:
    """A classification run stored in the old format, its budget under the old name ``max_accuracy_drop``."""
    variants = {"fused": (0.972, 0.8, "accepted"), "onnx": (0.968, 0.5, "accepted")}
    return run_record(tmp_path, run_id, variants, top1_figures, {"max_accuracy_drop": 0.01}, 0.972)


def test_a_regression_run_shows_mse_and_no_top1_in_every_table(tmp_path):
    record = regression_run(tmp_path)
    rows = {row["variant"]: row for row in variant_rows(record)}
    assert rows["onnx"]["metric"] == "mse" and rows["onnx"]["top1"] is None and rows["onnx"]["agreement"] is None
    console = Console(record=True, width=200)
    console.print(variants_table(record))
    text = console.export_text()
    assert "MSE" in text and "Δ MSE" in text and "rel. error" in text and "top-1" not in text and "agreement" not in text
    assert "0.0395" in text and "+0.0004" in text
    page, markdown = html_report(record), markdown_report(record)
    for shown in (page, markdown):
        assert "MSE" in shown and "top-1" not in shown and "Δ MSE" in shown
    assert "<h2>MSE vs latency</h2>" in page and "MSE (lower is better)" in page
    assert "Per-class" not in page, "no per-class heatmap without classes"
    table = variant_table(record)
    assert list(table[0]) == ["variant", "kind", "MSE", "Δ MSE", "size", "p50 latency", "speed-up", "verdict"]
    assert table[2]["MSE"] == "0.0395" and table[2]["Δ MSE"] == "+0.0004"


def test_pareto_front_follows_the_metric_direction(tmp_path):
    points = [(1.0, 0.0391), (0.8, 0.0391), (0.5, 0.0395), (0.3, 0.0514)]
    assert pareto_front(points, higher_is_better=False) == [3, 2, 1]  # every step slower buys a lower MSE
    assert pareto_front(points, higher_is_better=True) == [3]  # as if a higher MSE were better: the worst one wins
    assert pareto_variants(variant_rows(regression_run(tmp_path))) == ["int8", "onnx", "fused"]


def test_budget_line_sits_above_the_baseline_for_a_lower_is_better_metric(tmp_path):
    page = html_report(regression_run(tmp_path))
    assert 'id="accuracy-budget"' in page and "MSE budget (+0.005 vs FP32)" in page
    classification = html_report(classification_run(tmp_path))
    assert "top-1 budget (−1 pt vs FP32)" in classification, "the old max_accuracy_drop still draws the line"


def test_diff_flags_an_mse_rise_beyond_max_drop_and_not_one_within_it(tmp_path):
    reference = regression_run(tmp_path)
    worse = regression_run(tmp_path, "reg-b", REGRESSION_VARIANTS | {"onnx": (0.0514, 0.5, "accepted")})
    result = compare_runs(reference, worse, max_drop=0.01)
    assert result["regressions"] == ["onnx: MSE rose 0.0119 (0.0395 -> 0.0514), allowed 0.0100"]
    onnx = next(row for row in result["variants"] if row["variant"] == "onnx")
    assert onnx["metric"] == "mse" and onnx["value_a"] == 0.0395 and abs(onnx["delta"] - 0.0119) < 1e-9 and onnx["top1_a"] is None
    assert compare_runs(reference, worse, max_drop=0.02)["regressions"] == []
    better = regression_run(tmp_path, "reg-c", REGRESSION_VARIANTS | {"onnx": (0.0200, 0.5, "accepted")})
    assert compare_runs(reference, better)["regressions"] == [], "a lower MSE is an improvement, never a drop"
    console = Console(record=True, width=220)
    for table in comparison_tables(result):
        console.print(table)
    text = console.export_text()
    assert "MSE A" in text and "Δ MSE" in text and "+0.0119" in text and "top-1" not in text


def test_nightly_regression_limit_is_max_drop_on_the_metric_with_the_old_name_accepted(tmp_path):
    reference = regression_run(tmp_path)
    tonight = regression_run(tmp_path, "reg-b", REGRESSION_VARIANTS | {"onnx": (0.0514, 0.5, "accepted")})
    assert RegressionSpec.model_validate({"max_accuracy_drop": 0.02}).max_drop == 0.02
    assert judge(tonight, reference, RegressionSpec.model_validate({"max_accuracy_drop": 0.02}))["regressions"] == []
    flagged = judge(tonight, reference, RegressionSpec.model_validate({"max_drop": 0.01}))["regressions"]
    assert flagged == ["onnx: MSE rose 0.0119 (0.0395 -> 0.0514), allowed 0.0100"]


def test_old_format_classification_reports_still_render_as_top1(tmp_path):
    record = classification_run(tmp_path)
    page, markdown = html_report(record), markdown_report(record)
    assert "| variant | kind | top-1 | Δ top-1 | agreement | size | p50 ms @1 | speed-up | status |" in markdown
    assert "<th>top-1</th><th>Δ top-1</th><th>agreement</th>" in page and "MSE" not in page
    assert "96.80%" in page and "-0.40 pt" in page and "99.00%" in page and "Per-class accuracy change vs FP32" in page
    assert "top-1 (%; higher is better)" in page
    worse = copy.deepcopy(record)
    worse["run_id"] = "cls-b"
    worse["stages"][-2]["metrics"]["variants"]["onnx"]["top1"] = 0.958
    regressions = compare_runs(record, worse, max_drop=0.005)["regressions"]
    assert regressions == ["onnx: top-1 dropped 1.00 points (96.80% -> 95.80%), allowed 0.50"]


def test_stage_facts_name_the_metric_and_skip_what_a_stage_did_not_record():
    distill = {"uses": "distill", "metrics": {"metric": "mse", "teacher_value": 0.0391, "student_value": 0.0420, "epochs": 3}}
    assert stage_highlights(distill) == [("teacher MSE", "0.0391"), ("student MSE", "0.042"), ("epochs", "3")]
    old = {"uses": "distill", "metrics": {"student_top1": 0.97, "retention": 0.99}}
    assert stage_highlights(old) == [("student top-1", "97.00%"), ("retention", "99.0%")]
    quantize = {"uses": "quantize", "metrics": {"mode": "dynamic", "metric": "mse", "value": 0.0395, "delta": 0.0004}}
    assert stage_highlights(quantize) == [("mode", "dynamic"), ("MSE", "0.0395 (+0.0004 vs FP32)")]


def test_trend_page_plots_the_metric_change(tmp_path):
    nights = []
    for index in range(2):
        night = regression_run(tmp_path, f"reg-{index}")
        night["started_at"] = f"2026-01-0{index + 1}T00:00:00+00:00"
        night["nightly"] = {"checkpoint_choice": "newest", "reference_run": None, "regressions": []}
        nights.append(night)
    page = trend_report(nights, "mlp")
    assert "Δ MSE vs FP32" in page and "top-1" not in page
