"""The declared report and nightly-state shapes, and the one reader of variants that parses them (torch-free)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StoreError
from pipeline.nightly.checkpoints import CheckpointChoice
from pipeline.nightly.promotion import judge, read_state, record_night, state_path
from pipeline.recipe.schema import RegressionSpec
from pipeline.records.models import Manifest
from pipeline.records.reports import BenchmarkReport, ModelValidation, ValidationReport, VariantValidation
from pipeline.records.schemas import records_json_schema
from pipeline.records.store import ArtifactStore
from pipeline.records.variants import read_variants
from pipeline.review.compare import compare_runs
from pipeline.torchkit.tasks import Scoring

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = np.array([0, 1, 1, 0, 1, 0])  # class 2 never occurs: its per-class figures are null


def figures(logits: np.ndarray, kind: str = "onnx", size_bytes: int = 1000) -> ModelValidation:
    """Validation figures of ``logits`` against the fixed baseline logits, as validate computes them."""
    baseline = np.eye(3)[LABELS] * 2.0
    return ModelValidation(**Scoring.for_task("classification").compare(baseline, logits, LABELS), kind=kind, size_bytes=size_bytes)


def validation_report(top1_loss: int = 0) -> ValidationReport:
    """The baseline and one ``int8`` variant that mispredicts the first ``top1_loss`` inputs."""
    logits = np.eye(3)[LABELS] * 1.5 + 0.01
    logits[:top1_loss] = np.roll(logits[:top1_loss], 1, axis=1)
    int8 = figures(logits)
    return ValidationReport(
        baseline_stage="load", baseline=figures(np.eye(3)[LABELS] * 2.0, kind="torch", size_bytes=4000),
        variants={"int8": VariantValidation(**int8.model_dump(), status="accepted")}, rejected={},
    )


def benchmark_report() -> dict:
    """A benchmark stage's metrics for the baseline and ``int8`` at batch 1."""
    def entry(p50_ms: float) -> dict:
        return {"kind": "onnx", "runtime": "onnxruntime (CPU)", "size_bytes": 1000, "peak_rss_bytes": 10**8,
                "batches": {"1": {"runs": 20, "timed_seconds": 0.02 * p50_ms, "p50_ms": p50_ms, "p95_ms": 1.5 * p50_ms,
                                  "throughput_per_s": 1e3 / p50_ms}},
                "speedup_vs_baseline": {"1": 1.0 / p50_ms}, "size_ratio_vs_baseline": 0.25}
    report = {"baseline_stage": "load", "threads": 4, "warmup": 10, "min_iterations": 20, "min_seconds": 1.0, "rounds": 3,
              "baseline": entry(1.0), "variants": {"int8": entry(0.5)}}
    return BenchmarkReport.model_validate(report).model_dump(mode="json")


def run_record(run_id: str, top1_loss: int = 0) -> dict:
    """A finished run record, as the store reads it back, whose ``check`` validates ``int8`` and ``bench`` times it."""
    stages = [
        {"name": "load", "uses": "load_checkpoint", "state": "done", "seconds": 0.1, "metrics": {}},
        {"name": "int8", "uses": "quantize_onnx", "state": "done", "seconds": 0.1, "metrics": {}},
        {"name": "check", "uses": "validate", "state": "done", "seconds": 0.1,
         "metrics": validation_report(top1_loss).model_dump(mode="json")},
        {"name": "bench", "uses": "benchmark", "state": "done", "seconds": 0.1, "metrics": benchmark_report()},
    ]
    return json.loads(json.dumps({"run_id": run_id, "recipe": {"name": "demo", "path": "demo.yaml", "digest": "d"},
                                  "checkpoint": {"path": "m.pt", "sha256": "s"}, "state": "succeeded",
                                  "started_at": "2026-01-01T00:00:00+00:00", "stages": stages}))


def rename_value(record: dict) -> dict:
    """``record`` as if validate had renamed the metric's ``value`` to ``metric_value``."""
    renamed = copy.deepcopy(record)
    variant = renamed["stages"][2]["metrics"]["variants"]["int8"]
    variant["metric_value"] = variant.pop("value")
    return renamed


def rename_p50(record: dict) -> dict:
    """``record`` as if benchmark had renamed ``p50_ms`` to ``median_ms``."""
    renamed = copy.deepcopy(record)
    timing = renamed["stages"][3]["metrics"]["variants"]["int8"]["batches"]["1"]
    timing["median_ms"] = timing.pop("p50_ms")
    return renamed


@pytest.mark.parametrize(("rename", "stage", "field"), [
    (rename_value, "stage 'check' (validate): metrics do not match the validation report", "variants.int8.value: field required"),
    (rename_p50, "stage 'bench' (benchmark): metrics do not match the benchmark report", "variants.int8.batches.1.p50_ms: field required"),
])
def test_a_renamed_figure_is_an_error_naming_the_stage_and_field(rename, stage, field):
    assert [variant.name for variant in read_variants(run_record("night-1"))] == ["load", "int8"]
    with pytest.raises(StoreError) as raised:
        read_variants(rename(run_record("night-2")))
    assert str(raised.value) == f"run night-2: {stage}: {field}"


def test_a_renamed_value_fails_the_comparison_and_the_nightly_verdict_instead_of_passing():
    reference, tonight = run_record("night-1"), run_record("night-2", top1_loss=2)
    assert judge(tonight, reference, RegressionSpec())["regressions"][0].startswith("int8: top-1 dropped 33.33 points")
    with pytest.raises(StoreError, match=r"run night-2: stage 'check' \(validate\).*variants\.int8\.value: field required"):
        compare_runs(reference, rename_value(tonight), max_drop=0.005)
    with pytest.raises(StoreError, match=r"run night-2: stage 'check' \(validate\).*variants\.int8\.value: field required"):
        judge(rename_value(tonight), reference, RegressionSpec())


def test_a_validation_report_of_real_figures_dumps_and_parses_to_the_same_values():
    report = validation_report(top1_loss=1)
    assert report.variants["int8"].per_class_top1[2] is None and 0 < report.variants["int8"].top1 < 1
    stored = json.loads(json.dumps(report.model_dump(mode="json")))
    assert ValidationReport.model_validate(stored) == report
    record = run_record("run-1", top1_loss=1)
    variants = {variant.name: variant for variant in read_variants(record)}
    assert variants["int8"].validation == report.variants["int8"] and variants["int8"].status == "accepted"
    assert variants["load"].status == "baseline" and variants["load"].validation == report.baseline
    assert variants["int8"].benchmark.batches["1"].p50_ms == 0.5 and variants["int8"].kind == "onnx"


def test_nightly_state_is_written_and_read_through_its_model(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = tmp_path / "artifacts" / "k-int8"
    artifact.mkdir(parents=True)
    (artifact / "manifest.json").write_text(Manifest(
        key="k-int8", stage="int8", uses="quantize_onnx", kind="onnx", model="model.onnx", files={}, digest="d", seconds=0.1,
        peak_rss_bytes=1, versions={}, cache_payload={}, run_id="night-1", created_at="2026-01-01T00:00:00+00:00",
    ).model_dump_json())
    record = run_record("night-1")
    record["stages"][1].update(artifact=str(artifact), key="k-int8")
    verdict = {"reference_run": None, "regressions": []}
    assert record_night(store, record, CheckpointChoice(path=Path("ckpt/epoch-1.pt"), reason="highest epoch 1"), verdict)
    state = read_state(store, "demo")
    assert set(state["runs"][0]) == {"run_id", "checkpoint", "choice", "state", "reference_run", "regressions", "promoted", "at"}
    assert state["latest"]["variants"] == {"int8": str(artifact / "model.onnx")} and state["latest"]["run_id"] == "night-1"
    stored = json.loads(state_path(store, "demo").read_text())
    del stored["runs"][0]["promoted"]
    state_path(store, "demo").write_text(json.dumps(stored))
    with pytest.raises(StoreError, match=r"demo\.json: does not match the nightly state: runs\.0\.promoted: field required"):
        read_state(store, "demo")


def test_records_json_schema_has_every_model_as_an_object_with_properties():
    schemas = records_json_schema()
    assert set(schemas) == {"Manifest", "RunRecord", "StageResult", "ValidationReport", "BenchmarkReport", "NightlyState"}
    for name, schema in schemas.items():
        assert schema["type"] == "object" and schema["properties"], name
    assert {"metric", "value", "delta"} <= set(schemas["ValidationReport"]["$defs"]["VariantValidation"]["required"])
    json.dumps(schemas)


def test_the_reader_and_the_review_modules_do_not_import_torch():
    modules = ("pipeline.records.variants", "pipeline.records.reports", "pipeline.records.nightly_state",
               "pipeline.records.schemas", "pipeline.review.compare", "pipeline.review.tables")
    code = f"import sys\nimport {', '.join(modules)}\nprint(sorted(name for name in sys.modules if name.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
