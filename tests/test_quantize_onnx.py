"""Tests of the quantize_onnx stage on the trained digits model, exported by the real stages (no Prefect)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from pipeline.errors import StageError
from pipeline.run.contract import StageContext
from pipeline.torchkit.handles import ONNX_FILE, OnnxModel
from pipeline.torchkit.onnx_graph import op_counts
from pipeline.torchkit.runners import OnnxRunner
from stages import export_onnx, load_checkpoint, quantize_onnx
from tests.conftest import one_stage_recipe

# torch 2.13's exporter trips its own pytree deprecation (copyreg.py:105); nothing this project can change.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

# digits_cnn has 56k weights; INT8 stores them in a quarter of the bytes, but per-channel scales and zero
# points, int32 biases and the graph itself are overhead that a model this small cannot amortise: 3.2x
# (static, per-channel) and 3.5x (dynamic) were measured, so 3.0x is asserted.
MIN_SIZE_RATIO = 3.0
MIN_AGREEMENT = 0.95


def make_context(workdir: Path, data) -> StageContext:
    """A StageContext on the digits recipe writing into ``workdir`` (created here)."""
    workdir.mkdir()
    return StageContext(name=workdir.name, workdir=workdir, recipe=one_stage_recipe(), checkpoint_path=None, load_data=lambda: data)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, demo_checkpoint, data) -> OnnxModel:
    """The trained digits_cnn, loaded and exported to ONNX by the load_checkpoint and export_onnx stages."""
    folder = tmp_path_factory.mktemp("fp32")
    load_ctx = make_context(folder / "load", data)
    load_ctx.checkpoint_path = demo_checkpoint
    loaded = load_checkpoint.run(load_ctx, {}, load_checkpoint.Params())
    return export_onnx.run(make_context(folder / "onnx", data), {"input": loaded.product}, export_onnx.Params()).product


def quantize(context, fp32_onnx: OnnxModel, **params):
    """Run quantize_onnx with ``params`` in a fresh workdir; returns (StageOutput, ctx)."""
    ctx = context("int8")
    return quantize_onnx.run(ctx, {"input": fp32_onnx}, quantize_onnx.Params(**params)), ctx


def assert_agrees_with_fp32(path: Path, fp32_onnx: OnnxModel, data, min_agreement: float = MIN_AGREEMENT) -> None:
    """Recompute the agreement on the eval split here, independently of the stage's own figures."""
    eval_inputs = data.eval_set.inputs
    reference = OnnxRunner(fp32_onnx.path).predict(eval_inputs).argmax(1)
    quantized = OnnxRunner(path).predict(eval_inputs).argmax(1)
    assert (quantized == reference).mean() >= min_agreement


def test_static_qdq_default_is_small_and_agrees_with_fp32(context, fp32_onnx, data):
    output, ctx = quantize(context, fp32_onnx)
    metrics = output.metrics
    assert sorted(p.name for p in ctx.workdir.iterdir()) == [ONNX_FILE]  # scratch files removed, no side files
    model = onnx.load(output.product.path)
    onnx.checker.check_model(model)
    ops = metrics["op_counts"]
    assert ops == op_counts(output.product.path)
    assert ops["Conv"] == 3 and ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert metrics["runtime_op_counts"]["QLinearConv"] == 3  # onnxruntime fuses every Q-DQ-Conv into an INT8 conv
    assert "Conv" not in metrics["runtime_op_counts"] and metrics["onnxruntime_version"] == onnxruntime.__version__
    assert metrics["calibration_batches"] == 16 and metrics["calibration_samples"] == 16 * 64
    assert (metrics["mode"], metrics["format"], metrics["calibrate_method"]) == ("static", "qdq", "minmax")
    assert metrics["bytes_after"] == output.product.path.stat().st_size == output.product.size_bytes
    assert metrics["size_ratio"] == pytest.approx(fp32_onnx.size_bytes / metrics["bytes_after"])
    assert metrics["size_ratio"] >= MIN_SIZE_RATIO
    assert metrics["agreement"] >= MIN_AGREEMENT and metrics["eval_samples"] == len(data.eval_set.targets)
    assert metrics["top1_quantized"] >= metrics["top1_input"] - 0.02 and metrics["top1_input"] > 0.8
    assert (metrics["metric"], metrics["value_input"], metrics["value_quantized"]) == ("top1", metrics["top1_input"], metrics["top1_quantized"])
    assert set(metrics["figures"]) == {"top1", "top5"} and metrics["relative_error"] < 0.2
    assert_agrees_with_fp32(output.product.path, fp32_onnx, data)


def test_dynamic_mode_uses_integer_ops(context, fp32_onnx, data):
    output, ctx = quantize(context, fp32_onnx, mode="dynamic")
    metrics = output.metrics
    assert metrics["op_counts"]["ConvInteger"] == 3 and metrics["op_counts"]["DynamicQuantizeLinear"] >= 3
    assert "QuantizeLinear" not in metrics["op_counts"]
    assert (metrics["format"], metrics["calibrate_method"], metrics["calibration_batches"]) == (None, None, 0)
    assert metrics["size_ratio"] >= MIN_SIZE_RATIO and metrics["agreement"] >= MIN_AGREEMENT
    assert_agrees_with_fp32(output.product.path, fp32_onnx, data)


@pytest.mark.parametrize("calibrate_method", ["entropy", "percentile"])
def test_histogram_calibration_methods_work(context, fp32_onnx, data, calibrate_method):
    output, _ = quantize(context, fp32_onnx, calibrate_method=calibrate_method, calibration_batches=4)
    assert output.metrics["calibrate_method"] == calibrate_method and output.metrics["calibration_batches"] == 4
    assert output.metrics["runtime_op_counts"]["QLinearConv"] == 3
    assert_agrees_with_fp32(output.product.path, fp32_onnx, data)


def test_qoperator_format_writes_quantized_ops(context, fp32_onnx, data):
    output, _ = quantize(context, fp32_onnx, format="qoperator", calibration_batches=4)
    assert output.metrics["op_counts"]["QLinearConv"] == 3 and "Conv" not in output.metrics["op_counts"]
    assert output.metrics["agreement"] >= MIN_AGREEMENT


def test_excluded_node_stays_fp32(context, fp32_onnx):
    first_conv = next(node.name for node in onnx.load(fp32_onnx.path).graph.node if node.op_type == "Conv")
    output, _ = quantize(context, fp32_onnx, nodes_to_exclude=[first_conv], calibration_batches=4)
    assert output.metrics["runtime_op_counts"]["QLinearConv"] == 2
    assert any(node.op_type == "Conv" and node.name == first_conv for node in onnx.load(output.product.path).graph.node)


def test_agreement_under_min_agreement_fails_with_figures_and_advice(context, fp32_onnx, monkeypatch):
    class ShuffledRunner(OnnxRunner):
        """Predicts the logits of the next input row: a broken model that still runs."""

        def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
            return np.roll(super().predict(feeds), 1, axis=0)

    fp32_runner = quantize_onnx.OnnxRunner
    monkeypatch.setattr(quantize_onnx, "OnnxRunner", lambda path: fp32_runner(path) if path == fp32_onnx.path else ShuffledRunner(path))
    with pytest.raises(StageError, match=r"agrees with the input model on only \d+\.\d% of the decisions on \d+ eval inputs \(min_agreement 90%; top1 \d.*% -> .*calibrate_method: percentile"):
        quantize(context, fp32_onnx, calibration_batches=2)


def test_fixed_batch_model_fails_calibration_with_export_advice(tmp_path_factory, context, demo_checkpoint, data):
    folder = tmp_path_factory.mktemp("fixed-batch")
    load_ctx = make_context(folder / "load", data)
    load_ctx.checkpoint_path = demo_checkpoint
    loaded = load_checkpoint.run(load_ctx, {}, load_checkpoint.Params())
    fixed = export_onnx.run(make_context(folder / "onnx", data), {"input": loaded.product}, export_onnx.Params(dynamic_batch=False)).product
    with pytest.raises(StageError, match=r"failed in static mode \(.*invalid dimensions.*export it with dynamic_batch: true$"):
        quantize(context, fixed, calibration_batches=1)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"activation_type": "int8", "weight_type": "uint8"}, r"failed in static mode \(ValueError: .*activation_type.*; choose another activation_type / weight_type pair"),
        ({"nodes_to_exclude": ["node_conv_58"]}, r"nodes_to_exclude names 'node_conv_58', which is not a node of the model; did you mean 'node_Conv_\d+'\?$"),
        ({"op_types_to_quantize": ["Gemm"], "mode": "dynamic"}, r"'Gemm', which dynamic mode cannot quantize; choose from .*Conv"),
    ],
    ids=["unsupported-type-pair", "unknown-node", "op-type-not-in-mode"],
)
def test_bad_params_give_one_line_errors_naming_the_param(context, fp32_onnx, params, expected):
    with pytest.raises(StageError, match=expected) as raised:
        quantize(context, fp32_onnx, calibration_batches=1, **params)
    assert "\n" not in str(raised.value)
