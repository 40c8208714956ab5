"""compare_runs / comparison_tables on hand-built run records and fake artifact folders (no Prefect)."""

from __future__ import annotations

import copy
import json

from rich.console import Console

from pipeline.review.compare import compare_runs, comparison_tables


def _artifact(tmp_path, key, stage, params):
    folder = tmp_path / "artifacts" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"key": key, "stage": stage, "params": params}))
    return str(folder)


def _stage(tmp_path, name, uses, key, params=None, metrics=None, state="done"):
    return {"name": name, "uses": uses, "state": state, "seconds": 0.1, "key": key,
            "artifact": _artifact(tmp_path, key, name, params or {}), "metrics": metrics, "reason": None}


def _variant(top1, status="accepted", size=1000, baseline=0.972):
    return {"top1": top1, "delta_top1": top1 - baseline, "agreement": 0.99, "max_abs_logit_diff": 1e-3,
            "mean_abs_logit_diff": 1e-4, "per_class_top1": [top1, top1], "per_class_delta": [top1 - baseline] * 2,
            "samples": 500, "size_bytes": size, "kind": "onnx", "status": status}


def _validate_metrics(onnx_top1=0.972, onnx_status="accepted"):
    return {"baseline_stage": "load", "baseline": _variant(0.972, size=2000),
            "variants": {"fused": _variant(0.972), "onnx": _variant(onnx_top1, onnx_status, size=900)},
            "rejected": {} if onnx_status == "accepted" else {"onnx": "too much"}}


def _bench_metrics(onnx_ms=0.5, machine_slowdown=1.0):
    def entry(ms):
        ms *= machine_slowdown
        timing = {"runs": 30, "timed_seconds": 30 * ms / 1e3, "p50_ms": ms, "p95_ms": ms * 2, "throughput_per_s": 1e3 / ms}
        return {"kind": "onnx", "runtime": "onnxruntime (CPU)", "size_bytes": 1000, "peak_rss_bytes": 10**8,
                "batches": {"1": timing}, "speedup_vs_baseline": {"1": machine_slowdown / ms}, "size_ratio_vs_baseline": 0.5}
    return {"baseline_stage": "load", "threads": 4, "warmup": 10, "min_iterations": 30, "min_seconds": 1.0, "rounds": 3,
            "baseline": entry(1.0), "variants": {"fused": entry(0.8), "onnx": entry(onnx_ms)}}


def _record(tmp_path, run_id="run-a", recipe="demo", opset=18, onnx_top1=0.972, onnx_ms=0.5, bench=True, machine_slowdown=1.0):
    onnx_key = f"onnx-{opset}"
    stages = [
        _stage(tmp_path, "load", "load_checkpoint", "k-load", {"strict": True}),
        _stage(tmp_path, "fused", "fuse_conv_bn", "k-fused", {"method": "fx"}),
        _stage(tmp_path, "onnx", "export_onnx", onnx_key, {"opset": opset, "simplify": True}),
        _stage(tmp_path, "check", "validate", f"k-check-{onnx_key}-{onnx_top1}", {"max_accuracy_drop": 0.01},
               _validate_metrics(onnx_top1)),
    ]
    if bench:
        stages.append(_stage(tmp_path, "bench", "benchmark", f"k-bench-{onnx_ms}-{machine_slowdown}", {"iterations": 30},
                             _bench_metrics(onnx_ms, machine_slowdown)))
    return {"run_id": run_id, "recipe": {"name": recipe, "path": f"{recipe}.yaml", "digest": "d"},
            "checkpoint": {"path": "m.pt", "sha256": "s"}, "state": "succeeded", "stages": stages}


def test_identical_runs(tmp_path):
    a = _record(tmp_path)
    b = copy.deepcopy(a)
    b["run_id"] = "run-b"
    result = compare_runs(a, b)
    json.dumps(result)
    assert result["runs"] == {"a": {"run_id": "run-a", "recipe": "demo"}, "b": {"run_id": "run-b", "recipe": "demo"}}
    assert [s["name"] for s in result["stages"]] == ["load", "fused", "onnx", "check", "bench"]
    assert all(s["same_artifact"] and s["params_changed"] == {} for s in result["stages"])
    assert result["regressions"] == []
    onnx = next(v for v in result["variants"] if v["variant"] == "onnx")
    assert onnx["delta_top1"] == 0 and onnx["size_ratio"] == 1.0 and onnx["latency_ratio"] == 1.0
    assert onnx["latency_ms_a"] == 0.5 and onnx["regression"] == []


def test_changed_param(tmp_path):
    result = compare_runs(_record(tmp_path), _record(tmp_path, run_id="run-b", opset=17))
    stages = {s["name"]: s for s in result["stages"]}
    assert stages["onnx"]["params_changed"] == {"opset": [18, 17]}
    assert not stages["onnx"]["same_artifact"]
    assert stages["load"]["same_artifact"] and stages["load"]["params_changed"] == {}


def test_missing_artifact_folder_gives_no_params(tmp_path):
    a = _record(tmp_path)
    b = copy.deepcopy(a)
    b["stages"][2]["artifact"] = str(tmp_path / "gone")
    b["stages"][2]["key"] = "other"
    stage = next(s for s in compare_runs(a, b)["stages"] if s["name"] == "onnx")
    assert stage["params_changed"] == {}  # params B's manifest cannot show are not changes
    assert not stage["same_artifact"] and stage["only_in"] is None


def test_accuracy_drop_regression(tmp_path):
    a, b = _record(tmp_path), _record(tmp_path, run_id="run-b", onnx_top1=0.958)
    result = compare_runs(a, b, max_drop=0.005)
    assert result["regressions"] == ["onnx: top-1 dropped 1.40 points (97.20% -> 95.80%), allowed 0.50"]
    onnx = next(v for v in result["variants"] if v["variant"] == "onnx")
    assert abs(onnx["delta_top1"] + 0.014) < 1e-9 and onnx["regression"]
    # Within the allowance: no regression.
    assert compare_runs(a, b, max_drop=0.02)["regressions"] == []


def test_latency_regression(tmp_path):
    a, b = _record(tmp_path), _record(tmp_path, run_id="run-b", onnx_ms=0.6)
    assert compare_runs(a, b)["regressions"] == []  # no latency limit given
    result = compare_runs(a, b, max_latency_increase=0.1)
    assert len(result["regressions"]) == 1 and result["regressions"][0].startswith("onnx: latency grew")
    assert compare_runs(a, b, max_latency_increase=0.25)["regressions"] == []
    # Unknown latency on one side is never a regression.
    no_bench = _record(tmp_path, run_id="run-c", onnx_ms=0.6, bench=False)
    result = compare_runs(a, no_bench, max_latency_increase=0.0)
    assert result["regressions"] == []
    assert next(v for v in result["variants"] if v["variant"] == "onnx")["latency_ms_b"] is None


def test_machine_drift_is_no_regression_relative_to_the_baseline_timed_alongside(tmp_path):
    # run B ran on a busier machine: every model, the FP32 baseline included, took 1.6x as long
    a, b = _record(tmp_path), _record(tmp_path, run_id="run-b", machine_slowdown=1.6)
    assert compare_runs(a, b, max_latency_increase=0.5)["regressions"] == []
    onnx = next(v for v in compare_runs(a, b)["variants"] if v["variant"] == "onnx")
    assert onnx["latency_ms_b"] == 0.8 and onnx["latency_vs_baseline_a"] == onnx["latency_vs_baseline_b"] == 0.5
    absolute = compare_runs(a, b, max_latency_increase=0.5, latency_basis="absolute")["regressions"]
    assert absolute == [
        "fused: latency grew +60.0% (0.800 ms -> 1.280 ms), allowed +50.0%",
        "onnx: latency grew +60.0% (0.500 ms -> 0.800 ms), allowed +50.0%",
    ]
    # a variant that really slowed, on the same drifting machine, is still caught
    slower = _record(tmp_path, run_id="run-c", onnx_ms=1.0, machine_slowdown=1.6)
    assert compare_runs(a, slower, max_latency_increase=0.5)["regressions"] == [
        "onnx: latency grew +100.0% (0.500x -> 1.000x the FP32 baseline's time in the same run; 0.500 ms -> 1.600 ms), "
        "allowed +50.0%"
    ]


def test_accepted_then_rejected_is_regression(tmp_path):
    a = _record(tmp_path)
    b = copy.deepcopy(a)
    b["stages"][3]["metrics"]["variants"]["onnx"]["status"] = "rejected"
    result = compare_runs(a, b, max_drop=1.0)
    assert result["regressions"] == ["onnx: accepted in A, rejected in B"]


def test_stages_matched_by_name_across_recipes(tmp_path):
    a = _record(tmp_path, recipe="demo", bench=False)
    b = _record(tmp_path, run_id="run-b", recipe="other")
    result = compare_runs(a, b)
    assert result["runs"]["b"]["recipe"] == "other"
    bench = next(s for s in result["stages"] if s["name"] == "bench")
    assert bench["state_a"] is None and bench["uses_a"] is None
    assert bench["state_b"] == "done" and bench["uses_b"] == "benchmark"
    assert not bench["same_artifact"]
    assert all(s["same_artifact"] for s in result["stages"] if s["name"] != "bench")


def test_tables_render(tmp_path):
    a, b = _record(tmp_path), _record(tmp_path, run_id="run-b", opset=17, onnx_top1=0.958)
    tables = comparison_tables(compare_runs(a, b, max_drop=0.005))
    assert len(tables) == 2
    console = Console(record=True, width=200)
    for table in tables:
        console.print(table)
    text = console.export_text()
    for expected in ("fused", "onnx", "load", "check", "REGRESSION", "top-1 dropped 1.40", "opset: 18 → 17"):
        assert expected in text, expected


def test_no_torch_import():
    import pipeline.review.compare as module
    assert "import torch" not in open(module.__file__).read()
