"""The shipped compression recipes, end to end through `optipipe run` (Prefect) on the demo checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import REPO_ROOT, optipipe_stderr

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
QUICK_BENCHMARK = ["bench.batch_sizes=[1]", "bench.min_seconds=0.1", "bench.iterations=5"]
EXPECTED_VARIANTS = {
    "cpu-fastest": {"onnx", "onnx_int8", "ov", "ov_int8", "ov_nncf", "aoti", "ts"},
    "cpu-int8": {"torch_dyn", "torch_static", "onnx", "onnx_int8"},
    "edge-small": {"distilled", "int8", "onnx", "onnx_int8"},
    "qat": {"ptq", "qat"},
}


def run_recipe(name: str, checkpoint, store, capsys) -> dict:
    args = ["--quiet", "run", str(REPO_ROOT / "recipes" / f"{name}.yaml"), "--checkpoint", str(checkpoint), "--store", str(store)]
    for override in QUICK_BENCHMARK:
        args += ["--set", override]
    code = main(args)
    assert code == 0, optipipe_stderr(capsys.readouterr().err)
    capsys.readouterr()
    assert main(["show", "latest", "--store", str(store), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(EXPECTED_VARIANTS))
def test_recipe_validates_every_variant_against_fp32(name, demo_checkpoint, tmp_path, capsys):
    record = run_recipe(name, demo_checkpoint, tmp_path / "store", capsys)
    stages = {stage["name"]: stage for stage in record["stages"]}
    check = stages["check"]["metrics"]
    assert set(check["variants"]) == EXPECTED_VARIANTS[name]
    for variant, metrics in check["variants"].items():
        assert metrics["status"] == "accepted", f"{variant}: {metrics}"
        assert metrics["agreement"] >= 0.95 and metrics["delta_top1"] >= -0.01
    assert set(stages["bench"]["metrics"]["variants"]) == EXPECTED_VARIANTS[name]
    if name == "edge-small":
        pruned = stages["pruned"]["metrics"]
        assert pruned["params_ratio"] < 0.35 and pruned["macs_ratio"] < 0.35
        assert check["variants"]["onnx_int8"]["size_bytes"] < check["baseline"]["size_bytes"] / 8
    if name == "cpu-fastest":  # every runtime profiled, with its trace in the benchmark's artifact
        timings = stages["bench"]["metrics"]["variants"]
        assert {timings[variant]["runtime"] for variant in timings} == {
            "onnxruntime (CPU)", "OpenVINO (CPU)", "AOTInductor (CPU)", "TorchScript (CPU)"}
        for variant, entry in timings.items():
            assert entry["top_operators"] and entry["trace_file"], variant
            assert (Path(stages["bench"]["artifact"]) / entry["trace_file"]).is_file(), variant
    if name == "cpu-int8":
        assert check["variants"]["onnx_int8"]["size_bytes"] < check["variants"]["onnx"]["size_bytes"] / 3


def test_search_recipe_picks_the_fastest_candidate_within_budget_and_reports_why_others_lost(demo_checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["--quiet", "run", str(REPO_ROOT / "recipes" / "search-int8.yaml"), "--checkpoint", str(demo_checkpoint), "--store", str(store),
            "--set", "distilled.epochs=8", "--set", "pick.min_seconds=0.05", "--set", "pick.iterations=5", "--set", "pick.rounds=2"]
    assert main(args) == 0, optipipe_stderr(capsys.readouterr().err)
    capsys.readouterr()
    assert main(["show", "latest", "--store", str(store), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    stages = {stage["name"]: stage for stage in record["stages"]}
    assert {"int8[calibrate_method=minmax,per_channel=true]", "int8[calibrate_method=percentile,per_channel=true]",
            "pd_int8[amount=0.25]", "pd_int8[amount=0.5]"} <= set(stages)
    assert "int8[calibrate_method=percentile,per_channel=false]" not in stages  # excluded
    pick = stages["pick"]["metrics"]
    chosen = pick["candidates"][pick["chosen"]]
    assert chosen["status"] == "chosen" and chosen["meets_budget"] and chosen["drop"] <= 0.005
    within = [figures for figures in pick["candidates"].values() if figures["meets_budget"]]
    assert chosen["latency_p50_ms"] == min(figures["latency_p50_ms"] for figures in within)  # the fastest measured within budget
    assert all(figures["reason"] for name, figures in pick["candidates"].items() if name != pick["chosen"])
    assert stages["sens"]["metrics"]["layers"], "the sensitivity table has rows"
    assert main(["report", "latest", "--store", str(store), "--html", str(tmp_path / "search.html")]) == 0
    page = (tmp_path / "search.html").read_text()
    assert "Selection: pick" in page and "INT8 sensitivity" in page and pick["chosen"] in page
