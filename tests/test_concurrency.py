"""Stages run in concurrent threads: the executor serialises torch work with one lock and says how long each waited."""

from __future__ import annotations

import threading
import time

from pipeline.recipe import load_recipe
from pipeline.records.store import ArtifactStore
from pipeline.run.engine import in_threads, run_plan
from pipeline.run.executor import TORCH_LOCK

BRANCHES = """
name: branches
model: {factory: pipeline.zoo:resnet_small, input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
  onnx: {uses: export_onnx, needs: [load], with: {simplify: false}}
  int8: {uses: quantize, needs: [load], with: {mode: static, calibration_batches: 2}}
  onnx_int8: {uses: quantize_onnx, needs: [onnx], with: {calibration_batches: 2, min_agreement: 0}}
"""


def resnet_checkpoint(folder):
    import torch

    from pipeline.zoo import resnet_small

    torch.manual_seed(0)
    path = folder / "resnet_small.pt"
    torch.save(resnet_small().state_dict(), path)
    return path


def test_graph_captures_in_concurrent_branches_all_succeed(tmp_path, write_recipe):
    """fx tracing (fuse, static quantize) and torch.export (ONNX) in three threads at once: without the
    executor's lock one branch fails with 'module is not installed as a submodule' or a mode-stack error."""
    submit, close = in_threads(max_workers=3)
    try:
        record = run_plan(load_recipe(write_recipe(BRANCHES)), ArtifactStore(tmp_path / "store"), resnet_checkpoint(tmp_path), submit=submit)
    finally:
        close()
    assert record["state"] == "succeeded", record["message"]
    assert {stage["state"] for stage in record["stages"]} == {"done"}


def test_time_waiting_for_the_lock_is_recorded_apart_from_the_stage_seconds(tmp_path, write_recipe):
    recipe = write_recipe("name: one\nmodel: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}\n"
                          "stages:\n  load: {uses: load_checkpoint}\n")
    import torch

    from pipeline.zoo import digits_cnn

    checkpoint = tmp_path / "digits.pt"
    torch.save(digits_cnn().state_dict(), checkpoint)
    holding = threading.Event()

    def hold_the_lock() -> None:
        with TORCH_LOCK:
            holding.set()
            time.sleep(1.5)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait()
    record = run_plan(load_recipe(recipe), ArtifactStore(tmp_path / "store"), checkpoint)
    holder.join()
    load = record["stages"][0]
    assert load["state"] == "done"
    assert load["waited_seconds"] >= 1.0, load
    assert load["seconds"] < load["waited_seconds"], "the stage's own seconds must not include the wait"
