"""Tests of the fuse_conv_bn and export_onnx stages, run directly on real digits inputs (no Prefect)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import fx, nn

from pipeline.errors import StageError
from pipeline.torchkit.data import DataBundle
from pipeline.torchkit.handles import ONNX_FILE, TorchModel
from pipeline.torchkit.runners import OnnxRunner
from pipeline.zoo import digits_cnn, mlp, resnet_small
from stages import export_onnx, fuse_conv_bn
from tests.conftest import DIGITS_INPUT_SHAPE, as_input

INPUT_SHAPE = DIGITS_INPUT_SHAPE
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# torch 2.13's exporter trips its own pytree deprecation (copyreg.py:105); nothing this project can change.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


class Branchy(nn.Module):
    """fx cannot trace it (a Python `if` on a tensor value) and torch.export cannot capture it either."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.body(x)
        else:
            x = -self.body(x)
        return self.head(x.mean((2, 3)))


class SharedConvOutput(nn.Module):
    """A conv whose output feeds its BatchNorm and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


class SingularValues(nn.Module):
    """Uses torch.linalg.svdvals, which torch 2.13's ONNX exporter has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x[:, 0])


def with_batchnorm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, far from the identity, so a wrong fold shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCHNORMS):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.3)
    return model.eval()


def outputs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def fuse(context, tmp_path: Path, model: nn.Module, name: str = "fused", **params):
    """Run fuse_conv_bn on ``model`` in a workdir named after ``name``; returns (StageOutput, ctx)."""
    ctx = context(name)
    return fuse_conv_bn.run(ctx, {"input": as_input(model, tmp_path)}, fuse_conv_bn.Params(**params)), ctx


@pytest.mark.parametrize(
    ("factory", "pairs"),
    [(digits_cnn, 3), (resnet_small, 9), (mlp, 2)],
    ids=["digits_cnn", "resnet_small", "mlp"],
)
def test_fx_fusion_folds_every_batchnorm_and_keeps_outputs(context, tmp_path, data, factory, pairs):
    model = with_batchnorm_statistics(factory())
    output, ctx = fuse(context, tmp_path, model, require_fusion=True)
    metrics = output.metrics
    assert metrics["method"] == "fx" and metrics["trace_error"] is None
    assert metrics["fused_pairs"] == pairs and metrics["batchnorms_left"] == 0
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert metrics["max_abs_diff"] < 1e-4
    assert output.product.path.parent == ctx.workdir and sorted(p.name for p in ctx.workdir.iterdir()) == ["model.pt"]
    fused = torch.load(output.product.path, weights_only=False)  # a GraphModule reloads from its pickle
    assert isinstance(fused, fx.GraphModule)
    batch = torch.from_numpy(data.eval_set.inputs["input"][:32])
    torch.testing.assert_close(outputs(fused.eval(), batch), outputs(model, batch), rtol=1e-4, atol=1e-5)


def test_untraceable_model_falls_back_to_sequential_pairs(context, tmp_path, data):
    model = with_batchnorm_statistics(Branchy())
    output, _ = fuse(context, tmp_path, model)
    metrics = output.metrics
    assert metrics["method"] == "sequential"
    assert "TraceError" in metrics["trace_error"]
    assert metrics["fused_pairs"] == 2 and metrics["batchnorms_left"] == 0
    fused = output.product.load()
    assert isinstance(fused, Branchy) and isinstance(fused.body[1], nn.Identity) and fused.body[3].bias is not None
    batch = torch.from_numpy(data.eval_set.inputs["input"][:32])
    torch.testing.assert_close(outputs(fused, batch), outputs(model, batch), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs(fused, -batch), outputs(model, -batch), rtol=1e-4, atol=1e-5)


def test_batchnorm_whose_conv_output_is_also_used_elsewhere_is_left_alone(context, tmp_path):
    output, _ = fuse(context, tmp_path, with_batchnorm_statistics(SharedConvOutput()))
    assert output.metrics["fused_pairs"] == 0 and output.metrics["batchnorms_left"] == 1
    assert output.metrics["max_abs_diff"] == 0.0
    assert isinstance(output.product.load(), SharedConvOutput)  # nothing fused: the original class is kept


def test_require_fusion_fails_when_nothing_can_be_fused(context, tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(StageError, match="found no Conv/Linear layer followed by a BatchNorm"):
        fuse(context, tmp_path, model, require_fusion=True)
    output, _ = fuse(context, tmp_path, model, name="pass-through")
    assert output.metrics["fused_pairs"] == 0


def test_fused_outputs_over_tolerance_fail(context, tmp_path, monkeypatch):
    real_fused_layer = fuse_conv_bn.fused_layer

    def off_by_a_little(layer, batchnorm):
        fused = real_fused_layer(layer, batchnorm)
        with torch.no_grad():
            fused.bias.add_(0.05)
        return fused

    monkeypatch.setattr(fuse_conv_bn, "fused_layer", off_by_a_little)
    with pytest.raises(StageError, match=r"fused outputs differ from the original by .* tolerance 0\.0001"):
        fuse(context, tmp_path, with_batchnorm_statistics(digits_cnn()))


def export(context, tmp_path: Path, model: nn.Module | TorchModel, **params):
    """Run export_onnx on ``model``; returns (StageOutput, ctx)."""
    ctx = context("onnx")
    handle = model if isinstance(model, TorchModel) else as_input(model, tmp_path)
    return export_onnx.run(ctx, {"input": handle}, export_onnx.Params(**params)), ctx


def assert_runs_like_torch(path: Path, model: nn.Module, data: DataBundle, batch_sizes=(1, 5)) -> None:
    runner = OnnxRunner(path)
    for size in batch_sizes:
        batch = data.eval_set.inputs["input"][10:10 + size]
        np.testing.assert_allclose(runner.predict({"input": batch}), outputs(model, torch.from_numpy(batch)).numpy(), atol=1e-4)


@pytest.mark.parametrize("simplify", [True, False], ids=["simplified", "not-simplified"])
def test_export_digits_cnn_passes_checker_and_matches_torch_at_any_batch(context, tmp_path, data, capfd, simplify):
    model = with_batchnorm_statistics(digits_cnn())
    output, ctx = export(context, tmp_path, model, simplify=simplify)
    printed = capfd.readouterr()
    assert "[torch.onnx]" not in printed.out and "Checking" not in printed.out  # exporter and onnxsim progress
    assert "torchvision is not installed" not in printed.err
    metrics = output.metrics
    assert output.product.kind == "onnx" and output.product.path == ctx.workdir / ONNX_FILE
    assert sorted(p.name for p in ctx.workdir.iterdir()) == [ONNX_FILE]  # no .onnx.data, no report
    assert metrics["exporter"] == "dynamo" and metrics["opset"] == 18 and metrics["simplified"] is simplify
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["batch_sizes_checked"] == [8, 1]
    assert metrics["dims_checked"] == [{"batch": 8}, {"batch": 1}] and metrics["dynamic_dims"] == ["batch"]
    assert metrics["inputs"] == {"input": {"shape": ["batch", 1, 8, 8], "dtype": "float32"}} and metrics["outputs"] == ["logits"]
    assert metrics["onnx_bytes"] == output.product.path.stat().st_size
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(output.product.path).graph.node}
    if not simplify:
        assert metrics["nodes"] == metrics["nodes_before_simplify"]
    onnx_model = onnx.load(output.product.path)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert [i.name for i in onnx_model.graph.input] == ["input"] and [o.name for o in onnx_model.graph.output] == ["logits"]
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    assert_runs_like_torch(output.product.path, model, data)


def test_export_of_fused_resnet_small_matches_torch(context, tmp_path, data):
    model = with_batchnorm_statistics(resnet_small())
    fused, _ = fuse(context, tmp_path, model)  # the exporter takes the fused fx GraphModule
    output, ctx = export(context, tmp_path, fused.product)
    assert output.metrics["max_abs_diff"] <= 1e-4 and output.metrics["simplified"] is True
    assert sorted(p.name for p in ctx.workdir.iterdir()) == [ONNX_FILE]
    assert_runs_like_torch(output.product.path, model, data)


def test_static_batch_export_fixes_the_batch_to_the_recipe_shape(context, tmp_path, data):
    output, _ = export(context, tmp_path, with_batchnorm_statistics(mlp()), dynamic_batch=False)
    assert output.metrics["batch_sizes_checked"] == [INPUT_SHAPE[0]]
    batch_axis = onnx.load(output.product.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_value == INPUT_SHAPE[0] and not batch_axis.dim_param


def test_onnxruntime_outputs_over_tolerance_fail(context, tmp_path, monkeypatch):
    onnx_outputs = export_onnx.onnx_outputs
    monkeypatch.setattr(export_onnx, "onnx_outputs", lambda runner, feeds: [output + 1e-3 for output in onnx_outputs(runner, feeds)])
    with pytest.raises(StageError, match=r"onnxruntime outputs differ from torch by 0\.001 on a batch of 8 \(output logits, tolerance 0\.0001\)"):
        export(context, tmp_path, digits_cnn())


def test_failed_simplifier_check_fails_the_stage(context, tmp_path, monkeypatch):
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda model, **options: (model, False))
    with pytest.raises(StageError, match="onnxsim's check found the simplified graph's outputs differ"):
        export(context, tmp_path, digits_cnn())


def test_opset_below_18_works_when_the_exporter_can_convert_the_model(context, tmp_path, data):
    model = with_batchnorm_statistics(mlp())
    output, _ = export(context, tmp_path, model, opset=17)
    assert output.metrics["opset"] == 17 == export_onnx.default_opset(onnx.load(output.product.path))
    assert_runs_like_torch(output.product.path, model, data)


def test_opset_the_exporter_cannot_convert_to_is_an_error(context, tmp_path):
    with pytest.raises(StageError, match="opset 13 was requested but the dynamo exporter wrote opset 18"):
        export(context, tmp_path, digits_cnn(), opset=13)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (Branchy(), r"step 1/3 .*GuardOnDataDependentSymNode: Could not guard on data-dependent .*test_fuse_export\.py:\d+ `if x\.sum\(\) > 0:`"),
        (SingularValues(), r"step 3/3 .*DispatchError: No ONNX function found for .*_linalg_svd.*replace it in the model"),
    ],
    ids=["data-dependent-branch", "op-without-onnx-function"],
)
def test_exporter_failure_is_one_clear_stage_error(context, tmp_path, model, expected):
    with pytest.raises(StageError, match=expected) as raised:
        export(context, tmp_path, model)
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message and "legacy exporter is not tried" in message
    assert raised.value.__cause__ is not None  # the exporter's own error stays chained for --debug
    assert not any((tmp_path / "work-onnx").iterdir())
