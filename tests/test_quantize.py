"""Tests of the quantize stage on briefly trained digits models, run directly (no Prefect)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized.dynamic as nnqd
from pydantic import ValidationError
from torch import fx, nn

from pipeline.errors import StageError
from pipeline.run.contract import StageContext, StageOutput
from pipeline.torchkit.handles import TORCH_MODULE_FILE, TorchModel
from pipeline.torchkit.model_io import Feeds, ModelIO
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn, mlp
from stages import fuse_conv_bn, quantize
from tests.conftest import REPO_ROOT, as_input, one_stage_recipe

MIN_AGREEMENT = 0.95
# torch.ao's own deprecation notices (see stages/quantize.py); pytest resets the stage's filters per test.
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings(r"ignore:torch\.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:TypedStorage is deprecated:UserWarning"),
]


def trained(factory, data, epochs: int) -> nn.Module:
    """``factory()`` trained for a few seeded epochs on the digits train split."""
    torch.manual_seed(0)
    model = factory()
    train_model(model, data.train, epochs=epochs, lr=3e-3)
    return model.eval()


@pytest.fixture(scope="module")
def trained_models(data) -> dict[str, nn.Module]:
    """digits_cnn and the MLP, each trained briefly (a few seconds) once for the whole module."""
    return {"digits_cnn": trained(digits_cnn, data, epochs=3), "mlp": trained(mlp, data, epochs=3)}


@pytest.fixture(scope="module")
def quantized(trained_models, data, tmp_path_factory):
    """Run the stage once per case; each test reads the (output, input model, workdir) it needs."""
    cache: dict[str, tuple[StageOutput, nn.Module, Path]] = {}

    def run(case: str, model_name: str, **params) -> tuple[StageOutput, nn.Module, Path]:
        if case not in cache:
            folder = tmp_path_factory.mktemp(case)
            workdir = folder / "work"
            workdir.mkdir()
            ctx = StageContext(name=case, workdir=workdir, recipe=one_stage_recipe(), checkpoint_path=None, load_data=lambda: data)
            model = trained_models[model_name]
            output = quantize.run(ctx, {"input": as_input(model, folder)}, quantize.Params(**params))
            cache[case] = (output, model, workdir)
        return cache[case]

    return run


CASES = {
    "dynamic": ("mlp", {"mode": "dynamic"}),
    "static": ("digits_cnn", {"mode": "static"}),
    "qat": ("digits_cnn", {"mode": "qat", "epochs": 1}),
    "fp16": ("digits_cnn", {"mode": "fp16"}),
    "bf16": ("digits_cnn", {"mode": "bf16"}),
}


def run_case(quantized, case: str) -> tuple[StageOutput, nn.Module, Path]:
    model_name, params = CASES[case]
    return quantized(case, model_name, **params)


def predictions(model: nn.Module, inputs: Feeds) -> np.ndarray:
    return TorchRunner(model, ModelIO.single()).predict(inputs).argmax(axis=1)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_model_agrees_with_fp32_and_reloads_from_its_file(quantized, data, case):
    output, model, workdir = run_case(quantized, case)
    metrics = output.metrics
    assert metrics["mode"] == CASES[case][1]["mode"] and metrics["eval_samples"] == len(data.eval_set.targets)
    assert metrics["agreement"] >= MIN_AGREEMENT
    assert abs(metrics["top1"] - metrics["top1_fp32"]) <= 0.03 and metrics["top1_fp32"] >= 0.9
    assert output.product.path == workdir / TORCH_MODULE_FILE
    assert sorted(path.name for path in workdir.iterdir()) == [TORCH_MODULE_FILE]
    assert metrics["size_after_bytes"] == output.product.path.stat().st_size
    assert metrics["size_ratio"] == pytest.approx(metrics["size_before_bytes"] / metrics["size_after_bytes"])
    assert metrics["metric"] == "top1" and metrics["value"] == metrics["top1"] and metrics["value_fp32"] == metrics["top1_fp32"]
    assert metrics["fp32_layers"] == {}
    inputs = data.eval_set.inputs
    reloaded = TorchModel(output.product.path, output.product.meta).load()
    agreement = float((predictions(reloaded, inputs) == predictions(model, inputs)).mean())
    assert agreement == pytest.approx(metrics["agreement"])  # the metrics describe the saved file


def test_dynamic_mlp_stores_int8_linear_weights_and_shrinks_the_file(quantized):
    output, _, _ = run_case(quantized, "dynamic")
    metrics = output.metrics
    assert metrics["backend"] == "x86" and metrics["calibration_batches"] == 0
    assert metrics["quantized_layers"] == {"Linear": 3}
    assert metrics["size_ratio"] >= 2.5
    linears = [module for module in output.product.load().modules() if isinstance(module, nnqd.Linear)]
    assert len(linears) == 3 and all(layer.weight().dtype == torch.qint8 for layer in linears)


def test_static_digits_cnn_is_calibrated_per_channel_with_real_int8_kernels(quantized):
    output, _, _ = run_case(quantized, "static")
    metrics = output.metrics
    assert metrics["backend"] == "x86" and metrics["calibration_batches"] == 16
    assert metrics["quantized_layers"] == {"ConvReLU2d": 3, "Linear": 1}  # BatchNorm folded, ReLU fused
    assert metrics["size_ratio"] >= 3.0
    reloaded = output.product.load()
    assert isinstance(reloaded, fx.GraphModule)
    convs = [module for module in reloaded.modules() if isinstance(module, nniq.ConvReLU2d)]
    assert len(convs) == 3
    for conv in convs:  # one scale per output channel, symmetric (zero points 0), INT8
        weight = conv.weight()
        assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
        assert len(weight.q_per_channel_scales()) == conv.out_channels and not weight.q_per_channel_zero_points().any()
    assert not any(isinstance(module, nn.BatchNorm2d) for module in reloaded.modules())


def test_qat_fine_tunes_with_fake_quantization_then_converts(quantized):
    output, _, _ = run_case(quantized, "qat")
    metrics = output.metrics
    assert metrics["epochs"] == 1 and metrics["lr"] == 1e-4 and 0 < metrics["final_train_loss"] < 0.5
    assert metrics["quantized_layers"] == {"ConvReLU2d": 3, "Linear": 1}  # conv-BN fused by prepare_qat_fx
    assert metrics["size_ratio"] >= 3.0


@pytest.mark.parametrize(("case", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_keeps_every_weight_in_the_new_dtype_at_half_the_size(quantized, case, dtype):
    output, _, _ = run_case(quantized, case)
    metrics = output.metrics
    assert metrics["quantized_layers"] == {"BatchNorm2d": 3, "Conv2d": 3, "Linear": 1}
    assert 1.8 <= metrics["size_ratio"] <= 2.0
    assert {parameter.dtype for parameter in output.product.load().parameters()} == {dtype}


def test_artifacts_reload_and_predict_the_same_in_a_fresh_process(quantized, data, tmp_path):
    paths = {case: run_case(quantized, case)[0].product.path for case in ("dynamic", "static", "qat", "bf16")}
    inputs = data.eval_set.inputs["input"][:64]
    np.save(tmp_path / "inputs.npy", inputs)
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from pathlib import Path
        from pipeline.torchkit.handles import TorchModel
        from pipeline.torchkit.model_io import ModelIO
        from pipeline.torchkit.runners import TorchRunner
        assert "stages.quantize" not in sys.modules
        inputs = {"input": np.load(sys.argv[1])}
        for path in sys.argv[2:]:
            np.save(Path(path).with_suffix(".npy"), TorchRunner(TorchModel(Path(path)).load(), ModelIO.single()).predict(inputs))
        """
    )
    command = [sys.executable, "-c", script, str(tmp_path / "inputs.npy"), *map(str, paths.values())]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    for case, path in paths.items():
        expected = TorchRunner(TorchModel(path).load(), ModelIO.single()).predict({"input": inputs})
        np.testing.assert_allclose(np.load(path.with_suffix(".npy")), expected, atol=1e-6, err_msg=case)


def test_static_takes_fuse_conv_bn_graph_module_as_in_the_cpu_int8_recipe(trained_models, context, tmp_path):
    fused = fuse_conv_bn.run(context("fused"), {"input": as_input(trained_models["digits_cnn"], tmp_path)}, fuse_conv_bn.Params())
    assert fused.metrics["method"] == "fx" and fused.metrics["fused_pairs"] == 3
    output = quantize.run(context("int8"), {"input": fused.product}, quantize.Params(mode="static", calibration_batches=4))
    assert output.metrics["calibration_batches"] == 4
    assert output.metrics["quantized_layers"] == {"ConvReLU2d": 3, "Linear": 1}
    assert output.metrics["agreement"] >= MIN_AGREEMENT


class ConvOnly(nn.Module):
    """No Linear, LSTM or GRU: nothing for dynamic quantization to act on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class Branchy(nn.Module):
    """torch.fx cannot trace it: a Python `if` on a tensor value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


def test_dynamic_on_a_conv_only_model_names_the_supported_layers_and_static(context, tmp_path):
    message = r"mode dynamic quantizes only Linear/LSTM/GRU/MultiheadAttention layers and the model has none \(its layers: Conv2d\); use mode: static"
    with pytest.raises(StageError, match=message):
        quantize.run(context("conv-only"), {"input": as_input(ConvOnly(), tmp_path)}, quantize.Params(mode="dynamic"))


@pytest.mark.parametrize("mode", ["static", "qat"])
def test_untraceable_model_is_one_line_naming_the_mode_and_the_ways_out(context, tmp_path, mode):
    with pytest.raises(StageError) as caught:
        quantize.run(context(mode), {"input": as_input(Branchy(), tmp_path)}, quantize.Params(mode=mode))
    message = str(caught.value)
    assert "\n" not in message
    assert f"mode {mode} could not trace and prepare the model with torch.fx (TraceError: " in message
    assert "at test_quantize.py:" in message and "`if x.sum() > 0:`" in message
    assert message.endswith("use mode: dynamic, or export_onnx + quantize_onnx")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"mode": "dynamic", "calibration_batches": 4}, "calibration_batches applies to mode: static only"),
        ({"mode": "static", "epochs": 3}, "epochs applies to mode: qat only"),
        ({"mode": "int8"}, "Input should be 'dynamic', 'static', 'qat', 'fp16' or 'bf16'"),
        ({"mode": "static", "calibration_batches": 0}, "greater than or equal to 1"),
    ],
)
def test_params_refuse_what_the_mode_does_not_use(params, expected):
    with pytest.raises(ValidationError, match=expected):
        quantize.Params(**params)
