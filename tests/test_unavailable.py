"""Stages whose hardware is missing: skipped with the reason, the rest of the recipe completes (or fails clearly)."""

from __future__ import annotations

import pytest

from pipeline.cli.run import run_flow
from pipeline.review.tables import variant_rows
from pipeline.torchkit.gpu import cuda_status
from tests.conftest import REPO_ROOT, run_without_prefect

GPU_RECIPE = REPO_ROOT / "recipes" / "gpu-tensorrt.yaml"
needs_no_gpu = pytest.mark.skipif(cuda_status() is None, reason="a CUDA device is present: the TensorRT stages would run")


def run_session(checkpoint, store_root, overrides=()):
    return run_without_prefect(GPU_RECIPE, checkpoint, store_root, overrides)


@needs_no_gpu
def test_tensorrt_stages_are_skipped_with_the_reason_and_the_run_completes(demo_checkpoint, tmp_path):
    record = run_session(demo_checkpoint, tmp_path / "store")
    assert record["state"] == "succeeded", record["message"]
    stages = {stage["name"]: stage for stage in record["stages"]}
    for name in ("trt_fp16", "trt_int8"):
        assert stages[name]["state"] == "skipped" and stages[name]["artifact"] is None
        assert "TensorRT engine not built" in stages[name]["reason"]
    assert stages["check"]["state"] == "done"
    assert {row["variant"] for row in variant_rows(record)} == {"load", "onnx"}
    assert not list((tmp_path / "store" / "tmp").iterdir())


@needs_no_gpu
def test_on_unavailable_fail_ends_the_run_with_the_reason(demo_checkpoint, tmp_path):
    record = run_session(demo_checkpoint, tmp_path / "store", ["trt_fp16.on_unavailable=fail"])
    assert record["state"] == "failed"
    stages = {stage["name"]: stage for stage in record["stages"]}
    assert stages["trt_fp16"]["state"] == "failed"
    assert "TensorRT engine not built" in stages["trt_fp16"]["reason"] and "on_unavailable" in stages["trt_fp16"]["reason"]
    assert "trt_fp16" in record["message"]


@needs_no_gpu
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_gpu_recipe_through_prefect_shows_skipped_stages(demo_checkpoint, tmp_path):
    record = run_flow(str(GPU_RECIPE), str(demo_checkpoint), str(tmp_path / "store"), [])
    assert record["state"] == "succeeded"
    states = {stage["name"]: stage["state"] for stage in record["stages"]}
    assert states == {"load": "done", "fused": "done", "onnx": "done", "trt_fp16": "skipped", "trt_int8": "skipped", "check": "done", "bench": "done"}
