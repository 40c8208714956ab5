"""The openvino stage and runner on the trained digits model, exported and quantized by the real stages (no Prefect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import StageError, StageUnavailable
from pipeline.review.tables import variant_rows
from pipeline.run.contract import StageContext
from pipeline.torchkit.handles import OPENVINO_FILE, handle_from_record
from pipeline.torchkit.runners import OnnxRunner, TorchRunner, runner_for
from stages import benchmark, export_onnx, load_checkpoint, quantize_onnx, validate
from tests.conftest import one_stage_recipe, run_without_prefect

openvino = pytest.importorskip("openvino")  # the [openvino] extra; its absence is simulated below, not required
from pipeline.torchkit.openvino_runner import OpenVinoRunner  # noqa: E402
from stages import openvino as openvino_stage  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

INT8_TYPES = {"i8", "u8"}
TINY_TIMING = {"warmup": 1, "iterations": 3, "min_seconds": 0.0, "rounds": 1}


def make_context(workdir: Path, data, **fields) -> StageContext:
    """A StageContext on the digits recipe writing into ``workdir`` (created here)."""
    workdir.mkdir()
    return StageContext(name=workdir.name, workdir=workdir, recipe=one_stage_recipe(), checkpoint_path=None, load_data=lambda: data,
                        **fields)


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_checkpoint, data):
    """The trained digits_cnn as loaded (torch), exported (ONNX FP32) and quantized (ONNX INT8 QDQ) by the real stages."""
    folder = tmp_path_factory.mktemp("sources")
    load_ctx = make_context(folder / "load", data)
    load_ctx.checkpoint_path = demo_checkpoint
    torch_model = load_checkpoint.run(load_ctx, {}, load_checkpoint.Params()).product
    fp32 = export_onnx.run(make_context(folder / "onnx", data), {"input": torch_model}, export_onnx.Params()).product
    int8 = quantize_onnx.run(make_context(folder / "int8", data), {"input": fp32}, quantize_onnx.Params()).product
    return {"torch": torch_model, "onnx": fp32, "int8": int8}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, models, data):
    """The FP32 ONNX export converted by the openvino stage with its defaults."""
    ctx = make_context(tmp_path_factory.mktemp("ov") / "fp32", data)
    return openvino_stage.run(ctx, {"input": models["onnx"]}, openvino_stage.Params())


def assert_matches(ir_path: Path, reference, data, tolerance: float) -> None:
    """The IR's predictions at batch 8 and 1 within ``tolerance`` of ``reference``'s, recomputed here."""
    runner = OpenVinoRunner(ir_path)
    for rows in (8, 1):
        feeds = data.eval_set.example(rows)
        assert np.max(np.abs(runner.predict(feeds) - reference.predict(feeds))) <= tolerance


def test_fp32_from_onnx_matches_and_has_a_dynamic_batch(converted, models, data):
    product, metrics = converted.product, converted.metrics
    assert product.kind == "openvino" and product.path.name == OPENVINO_FILE
    assert sorted(path.name for path in product.path.parent.iterdir()) == ["model.bin", "model.xml"]
    assert product.size_bytes == product.path.stat().st_size + (product.path.parent / "model.bin").stat().st_size == metrics["bytes"]
    assert metrics["bin_bytes"] > 4 * 50_000  # uncompressed FP32 weights of digits_cnn's ~56k parameters
    assert_matches(product.path, OnnxRunner(models["onnx"].path), data, 1e-4)
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["batch_sizes_checked"] == [8, 1]
    assert metrics["agreement"] == 1.0 and metrics["eval_samples"] == len(data.eval_set.targets)
    assert metrics["inputs"] == {"input": {"shape": "[?,1,8,8]", "dtype": "f32"}}
    assert not metrics["int8"] and "FakeQuantize" not in metrics["op_counts"] and set(metrics["weight_precisions"]) <= {"f32", "i64"}
    assert metrics["runtime_precisions"].get("f32", 0) > 0 and not INT8_TYPES & set(metrics["runtime_precisions"])
    assert metrics["openvino_version"] == openvino.__version__ and metrics["source_kind"] == "onnx"
    batch = data.eval_set.example(64)
    assert OpenVinoRunner(product.path).predict(batch).shape == (64, 10)  # a batch the check did not try


def test_fp32_from_torch_matches(context, models, data):
    output = openvino_stage.run(context("from_torch"), {"input": models["torch"]}, openvino_stage.Params())
    assert output.metrics["source_kind"] == "torch" and output.metrics["inputs"]["input"]["shape"] == "[?,1,8,8]"
    assert_matches(output.product.path, TorchRunner(models["torch"].load(), context("io").io), data, 1e-4)


def test_int8_qdq_file_converts_and_runs_natively(context, models, data):
    output = openvino_stage.run(context("qdq"), {"input": models["int8"]}, openvino_stage.Params())
    metrics = output.metrics
    assert metrics["int8_input"] and metrics["int8"] and metrics["op_counts"]["FakeQuantize"] >= 4
    assert 0 < metrics["parity_relative_error"] <= 0.1 and "max_abs_diff" not in metrics
    assert INT8_TYPES & set(metrics["runtime_precisions"])  # INT8 kernels, not FP32 emulation
    assert metrics["agreement"] >= 0.98
    ort_int8 = OnnxRunner(models["int8"].path).predict(data.eval_set.inputs).argmax(1)
    assert (OpenVinoRunner(output.product.path).predict(data.eval_set.inputs).argmax(1) == ort_int8).mean() >= 0.98


@pytest.mark.parametrize(("source", "knob"), [("onnx", "tolerance"), ("int8", "max_relative_error")])
def test_parity_past_its_bound_fails_with_one_line(context, models, source, knob):
    pattern = rf"openvino: OpenVINO's prediction differs .* on a batch of 8 \({knob} 1e-09\); .*raise '{knob}'"
    with pytest.raises(StageError, match=pattern):
        openvino_stage.run(context("tight"), {"input": models[source]}, openvino_stage.Params(**{knob: 1e-9}))


def test_nncf_quantization_gives_int8_ops_that_agree(context, models, data, converted):
    output = openvino_stage.run(context("nncf"), {"input": models["onnx"]}, openvino_stage.Params(quantize="nncf", subset_size=64))
    metrics = output.metrics
    assert metrics["quantize"] == "nncf" and metrics["calibration_samples"] == 64 and metrics["nncf_version"]
    assert metrics["int8"] and metrics["op_counts"]["FakeQuantize"] >= 4 and metrics["weight_precisions"].get("i8", 0) > 50_000
    assert metrics["agreement"] >= 0.9
    assert metrics["bytes"] < converted.metrics["bytes"] / 2
    reference = OnnxRunner(models["onnx"].path).predict(data.eval_set.inputs).argmax(1)
    assert (OpenVinoRunner(output.product.path).predict(data.eval_set.inputs).argmax(1) == reference).mean() >= 0.9


def test_nncf_refuses_a_model_that_is_already_int8(context, models):
    with pytest.raises(StageError, match="already INT8 .*set quantize: none"):
        openvino_stage.run(context("twice"), {"input": models["int8"]}, openvino_stage.Params(quantize="nncf"))


def test_saved_ir_reloads_in_a_fresh_process_with_only_openvino(converted, data, tmp_path):
    feeds = data.eval_set.example(8)["input"]
    np.save(tmp_path / "feeds.npy", feeds)
    script = (
        "import sys, numpy as np, openvino as ov\n"
        "model = ov.Core().compile_model(sys.argv[1], 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})\n"
        "np.save(sys.argv[3], model(np.load(sys.argv[2]))[0])\n"
        "assert not [name for name in sys.modules if name.split('.')[0] in ('torch', 'pipeline', 'stages')]\n"
    )
    out = tmp_path / "out.npy"
    arguments = [str(converted.product.path), str(tmp_path / "feeds.npy"), str(out)]
    subprocess.run([sys.executable, "-c", script, *arguments], check=True, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(out), OpenVinoRunner(converted.product.path).predict({"input": feeds}))


def test_runner_profiles_layers_into_a_chrome_trace(converted, data, tmp_path):
    runner = runner_for(converted.product, context_io())
    assert isinstance(runner, OpenVinoRunner) and runner.hint == "LATENCY"
    by_type = runner.profile(data.eval_set.example(1), tmp_path / "trace.json")
    assert "Convolution" in by_type and all(ms >= 0 for ms in by_type.values()) and sum(by_type.values()) > 0
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert events and {event["ph"] for event in events} == {"X"} and {"Convolution"} <= {event["cat"] for event in events}
    throughput = OpenVinoRunner(converted.product.path, threads=1, hint="THROUGHPUT")
    np.testing.assert_allclose(throughput.predict(data.eval_set.example(8)), runner.predict(data.eval_set.example(8)), atol=1e-5)


def context_io():
    """The digits recipe's model IO."""
    from pipeline.torchkit.model_io import ModelIO

    return ModelIO.of(one_stage_recipe().model)


def test_handle_round_trips_through_its_record(converted):
    handle = handle_from_record(converted.product.path.parent, OPENVINO_FILE, "openvino", converted.product.meta)
    assert handle == converted.product and handle.size_bytes == converted.metrics["bytes"]


@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_without_the_extra_the_stage_is_skipped_with_the_reason(context, models, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import openvino` now raises ImportError
    params = {"quantize": "nncf"} if missing == "nncf" else {}
    name = {"openvino": "OpenVINO", "nncf": "NNCF"}[missing]
    with pytest.raises(StageUnavailable, match=rf"{name} not installed .*optipipe\[openvino\].*: OpenVINO IR not built"):
        openvino_stage.run(context("absent"), {"input": models["onnx"]}, openvino_stage.Params(**params))
    with pytest.raises(StageError, match=rf"openvino: {name} not installed .*on_unavailable: skip"):
        openvino_stage.run(context("absent_fail"), {"input": models["onnx"]}, openvino_stage.Params(on_unavailable="fail", **params))


def test_validate_and_benchmark_take_the_ir(converted, models, data, tmp_path):
    fields = {"baseline": models["torch"], "baseline_name": "load"}
    checked = validate.run(make_context(tmp_path / "check", data, **fields), {"ov": converted.product}, validate.Params())
    assert checked.metrics["variants"]["ov"]["status"] == "accepted" and checked.metrics["variants"]["ov"]["agreement"] == 1.0
    timed = benchmark.run(make_context(tmp_path / "bench", data, **fields), {"ov": converted.product},
                          benchmark.Params(batch_sizes=[1], **TINY_TIMING))
    figures = timed.metrics["variants"]["ov"]
    assert figures["runtime"] == "OpenVINO (CPU)" and figures["batches"]["1"]["p50_ms"] > 0


RECIPE = """
name: ov
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
data: {source: digits, batch_size: 64}
stages:
  load: {uses: load_checkpoint}
  onnx: {uses: export_onnx, needs: [load]}
  ov: {uses: openvino, needs: [onnx]}
  check: {uses: validate, needs: [onnx, ov], with: {max_drop: 0.01}}
"""


def test_a_recipe_publishes_the_ir_and_validates_it(demo_checkpoint, write_recipe, tmp_path):
    record = run_without_prefect(write_recipe(RECIPE), demo_checkpoint, tmp_path / "store")
    assert record["state"] == "succeeded", record["message"]
    stages = {stage["name"]: stage for stage in record["stages"]}
    assert stages["ov"]["state"] == "done"
    manifest = json.loads((Path(stages["ov"]["artifact"]) / "manifest.json").read_text())
    assert manifest["kind"] == "openvino" and {"model.xml", "model.bin"} <= set(manifest["files"])
    assert {row["variant"]: row["kind"] for row in variant_rows(record)}["ov"] == "openvino"


def test_a_recipe_without_openvino_skips_the_stage_with_the_reason(demo_checkpoint, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    record = run_without_prefect(write_recipe(RECIPE), demo_checkpoint, tmp_path / "store")
    assert record["state"] == "succeeded", record["message"]
    stages = {stage["name"]: stage for stage in record["stages"]}
    assert stages["ov"]["state"] == "skipped" and "OpenVINO not installed" in stages["ov"]["reason"]
    assert stages["check"]["state"] == "done" and {row["variant"] for row in variant_rows(record)} == {"load", "onnx"}
