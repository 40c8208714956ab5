"""Tests of the sensitivity stage and fallback: auto in quantize / quantize_onnx, on a digits CNN with a weight outlier.

The model (``pipeline.zoo.add_weight_outlier``) is digits_cnn trained briefly, then changed so that its FP32
outputs stay the same but the third conv's per-channel INT8 weights are ruined: plain INT8 loses most of its
top-1, and keeping that one layer (``features.3.0``, ``Conv#2`` once exported) FP32 recovers it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pipeline.errors import StageError
from pipeline.records.sensitivity import SensitivityReport
from pipeline.review.sensitivity import sensitivity_section
from pipeline.torchkit.onnx_graph import graph_nodes
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model
from pipeline.zoo import add_weight_outlier, digits_cnn
from stages import export_onnx, quantize, quantize_onnx, sensitivity
from tests.conftest import as_input, digits_data

BUDGET = 0.05  # the plain INT8 outlier model drops far more; with the outlier layer FP32 it drops ~2 points
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings(r"ignore:torch\.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def outlier_model(data) -> nn.Module:
    """digits_cnn trained for 3 seeded epochs, with the weight outlier added; its FP32 predictions are unchanged."""
    torch.manual_seed(0)
    model = digits_cnn()
    train_model(model, digits_data().train, epochs=3, lr=3e-3)  # fresh shuffling: the same model whatever ran before
    before = TorchRunner(model.eval(), quantize.ModelIO.single()).predict(data.eval_set.inputs)
    add_weight_outlier(model)
    after = TorchRunner(model, quantize.ModelIO.single()).predict(data.eval_set.inputs)
    assert (before.argmax(1) == after.argmax(1)).all() and np.allclose(before, after, rtol=1e-3, atol=1e-3)
    return model


@pytest.fixture(scope="module")
def torch_input(outlier_model, tmp_path_factory):
    return as_input(outlier_model, tmp_path_factory.mktemp("torch-input"))


def exported(model: nn.Module, folder, data, simplify: bool = False):
    """``model`` exported by export_onnx (onnxsim drops node metadata; export_onnx copies the module paths back)."""
    from pipeline.run.contract import StageContext
    from tests.conftest import one_stage_recipe

    workdir = folder / "onnx"
    workdir.mkdir()
    ctx = StageContext(name="onnx", workdir=workdir, recipe=one_stage_recipe(), checkpoint_path=None, load_data=lambda: data)
    return export_onnx.run(ctx, {"input": as_input(model, folder)}, export_onnx.Params(simplify=simplify)).product


@pytest.fixture(scope="module")
def onnx_input(outlier_model, tmp_path_factory, data):
    return exported(outlier_model, tmp_path_factory.mktemp("onnx-input"), data)


def test_torch_sensitivity_ranks_the_outlier_layer_first_and_lists_those_left_out(context, torch_input):
    output = sensitivity.run(context("sens", load_data=digits_data), {"input": torch_input}, sensitivity.Params(eval_rows=200, calibration_batches=2, max_layers=3))
    report = SensitivityReport.model_validate(json.loads(output.product.path.read_text()))
    assert output.metrics == report.model_dump(mode="json") and report.kind == "torch" and report.eval_rows == 200
    top = report.layers[0]
    assert (top.name, top.module_path, top.position, top.op_type) == ("features.3.0", "features.3.0", "Conv2d#2", "Conv2d")
    assert report.int8.drop > 0.3 and top.recovery > 0.3 and top.quantized_alone.drop > 0.3
    assert all(row.recovery < 0.1 and row.quantized_alone.drop < 0.1 for row in report.layers[1:])
    assert [row.name for row in report.left_out] == ["classifier"] and len(report.layers) == 3
    section = sensitivity_section({"run_id": "r"}, {"name": "sens", "uses": "sensitivity", "state": "done", "metrics": output.metrics})
    table = section[section.index("<table"):section.index("</table>")]
    assert table.index("features.3.0") < table.index("features.0.0") and table.count("<tr>") == 4  # header + 3 layers
    assert '<svg id="plot-sensitivity"' in section and "Not measured (past max_layers): Linear#0" in section


def test_onnx_sensitivity_ranks_the_outlier_node_first_by_name_module_path_and_position(context, onnx_input):
    output = sensitivity.run(context("sens", load_data=digits_data), {"input": onnx_input}, sensitivity.Params(eval_rows=200, calibration_batches=2))
    report = SensitivityReport.model_validate(output.metrics)
    top = report.layers[0]
    assert (report.kind, top.op_type, top.position) == ("onnx", "Conv", "Conv#2") and top.name.startswith("node_Conv")
    assert top.module_path.startswith("features.3.")  # the exporter folds features.3.1 (BatchNorm) into the conv and keeps its scope
    assert report.int8.drop > 0.3 and top.recovery > 0.3 and [row.position for row in report.layers[1:]] != []
    assert sorted(row.position for row in report.layers) == ["Conv#0", "Conv#1", "Conv#2", "Gemm#0"] and report.left_out == []


def test_torch_fallback_auto_keeps_only_the_outlier_layer_fp32(context, torch_input):
    params = quantize.Params(mode="static", calibration_batches=2, fallback="auto", max_drop=BUDGET)
    metrics = quantize.run(context("int8", load_data=digits_data), {"input": torch_input}, params).metrics
    fallback = metrics["fallback"]
    assert fallback["met_budget"] and [(layer["module_path"], layer["position"]) for layer in fallback["layers"]] == [("features.3.0", "Conv2d#2")]
    drops = [trial["figures"]["drop"] for trial in fallback["trials"]]
    assert drops[0] > BUDGET >= drops[-1] and len(drops) == 2 and -metrics["delta"] <= BUDGET
    assert metrics["fp32_layers"] == {"features.3.0.0 (Conv2d)": "kept FP32 by fallback: auto"}  # inside the fused FP32 ConvReLU2d


def test_onnx_fallback_auto_keeps_only_the_outlier_node_fp32(context, onnx_input):
    params = quantize_onnx.Params(calibration_batches=2, fallback="auto", max_drop=BUDGET)
    metrics = quantize_onnx.run(context("int8", load_data=digits_data), {"input": onnx_input}, params).metrics
    fallback = metrics["fallback"]
    assert fallback["met_budget"] and [layer["position"] for layer in fallback["layers"]] == ["Conv#2"]
    assert fallback["layers"][0]["module_path"].startswith("features.3.")
    drops = [trial["figures"]["drop"] for trial in fallback["trials"]]
    assert drops[0] > BUDGET >= drops[-1] and len(drops) == 2
    assert metrics["runtime_op_counts"]["QLinearConv"] == 2 and metrics["value_input"] - metrics["value_quantized"] <= BUDGET


def test_exclusions_by_position_and_module_path_resolve_to_the_same_node_after_a_re_export(outlier_model, tmp_path_factory, data):
    resolved = []
    for copy, simplify in (("simplified", True), ("as-exported", False)):
        path = exported(outlier_model, tmp_path_factory.mktemp(copy), data, simplify).path
        nodes = graph_nodes(path)
        weights = {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}
        graph = {node.name: node for node in onnx.load(path).graph.node}
        for pattern in ("Conv#2", "features.3.1"):
            params = quantize_onnx.Params(nodes_to_exclude=[pattern])
            [name] = quantize_onnx.excluded_nodes(nodes, params)
            resolved.append((pattern, weights[graph[name].input[1]]))
    by_pattern = {}
    for pattern, weight in resolved:
        by_pattern.setdefault(pattern, []).append(weight)
    assert all(np.array_equal(first, second) for first, second in by_pattern.values())
    assert np.array_equal(by_pattern["Conv#2"][0], by_pattern["features.3.1"][0])  # position and module path name one node


def test_patterns_that_match_nothing_are_one_line_errors_with_a_candidate(context, torch_input, onnx_input):
    with pytest.raises(StageError, match=r"^quantize: keep_fp32 names 'features\.9\.\*', which is not a Conv/Linear module path of the model; did you mean 'features\..*'\?$"):
        quantize.run(context("int8", load_data=digits_data), {"input": torch_input}, quantize.Params(mode="static", calibration_batches=1, keep_fp32=["features.9.*"]))
    with pytest.raises(StageError, match=r"^quantize_onnx: nodes_to_exclude names 'Conv#7', which is not a node of the model; did you mean 'Conv#\d'\?$"):
        quantize_onnx.run(context("onnx-int8", load_data=digits_data), {"input": onnx_input}, quantize_onnx.Params(calibration_batches=1, nodes_to_exclude=["Conv#7"]))


def test_keep_fp32_pattern_keeps_the_layer_fp32_with_why(context, torch_input):
    metrics = quantize.run(context("int8", load_data=digits_data), {"input": torch_input}, quantize.Params(mode="static", calibration_batches=2, keep_fp32=["features.3.*"])).metrics
    assert metrics["fp32_layers"] == {"features.3.0.0 (Conv2d)": "kept FP32 by keep_fp32"} and -metrics["delta"] <= BUDGET


def test_too_few_fallback_layers_fail_in_one_line_naming_the_best_reached(context, torch_input):
    params = quantize.Params(mode="static", calibration_batches=2, fallback="auto", max_drop=0.0, max_fallback_layers=1)
    with pytest.raises(StageError, match=r"^quantize: fallback: auto could not meet max_drop 0 keeping up to 1 of 4 layers FP32: the best reached "
                                         r"is top1 drop 0\.\d+ with \[features\.3\.0\] FP32; raise max_fallback_layers or max_drop") as raised:
        quantize.run(context("int8", load_data=digits_data), {"input": torch_input}, params)
    assert "\n" not in str(raised.value)


def test_a_fused_graph_module_exported_simplified_keeps_its_module_paths(outlier_model, tmp_path_factory, data, context):
    from stages import fuse_conv_bn

    folder = tmp_path_factory.mktemp("fused")
    fused = fuse_conv_bn.run(context("fused", load_data=digits_data), {"input": as_input(outlier_model, folder)}, fuse_conv_bn.Params()).product.load()
    path = exported(fused, folder, data, simplify=True).path
    convs = [layer for layer in graph_nodes(path) if layer.op_type == "Conv"]
    assert [layer.module_path for layer in convs] == ["features.0.0", "features.1.0", "features.3.0"]
