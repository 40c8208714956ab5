"""Tests of the GPU stages (tensorrt, precision) and of pipeline.torchkit.gpu.

Everywhere: without CUDA or TensorRT the stages skip or fail with the reason, parameters are checked,
TensorRT is never imported just by importing the modules, and a foreign engine is refused clearly.
On a machine with a CUDA device and TensorRT (``-m gpu``): engines are built from the digits demo
model (through ONNX) and from resnet_small (through torch-tensorrt), checked against FP32 and timed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.errors import StageError, StageUnavailable
from pipeline.recipe.schema import InputSpec
from pipeline.torchkit import gpu
from pipeline.torchkit.data import DataBundle
from pipeline.torchkit.handles import OnnxModel
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.tensorrt_runner import TensorRTRunner
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn, resnet_small
from stages import export_onnx, precision, tensorrt
from tests.conftest import DIGITS_INPUT_SHAPE, REPO_ROOT, as_input

INPUT_SHAPE = DIGITS_INPUT_SHAPE
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


def first_reason(*checks) -> str | None:
    return next((reason for check in checks if (reason := check()) is not None), None)


# --- everywhere: feature detection, gating, parameters ------------------------------------------------


def test_statuses_are_one_line_reasons_or_none():
    for status in (gpu.cuda_status, gpu.tensorrt_status, gpu.torch_tensorrt_status):
        reason = status()
        assert reason is None or (reason and "\n" not in reason)
        assert status() is reason  # detected once per process
    if not torch.cuda.is_available():
        assert gpu.cuda_status().startswith("no CUDA device: torch.cuda.is_available() is False")
    if gpu.tensorrt_status() is not None:
        assert gpu.tensorrt_status().startswith("TensorRT not installed (") or "too old" in gpu.tensorrt_status()
        assert "pip install 'optipipe[tensorrt]'" in gpu.tensorrt_status()


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_tensorrt_skips_with_the_reason_where_it_cannot_run(context, tmp_path, kind):
    checks = (gpu.cuda_status, gpu.tensorrt_status) + ((gpu.torch_tensorrt_status,) if kind == "torch" else ())
    reason = first_reason(*checks)
    if reason is None:
        pytest.skip("CUDA and TensorRT are usable here")
    source = as_input(digits_cnn(), tmp_path) if kind == "torch" else OnnxModel(path=tmp_path / "model.onnx")
    ctx = context("trt")
    with pytest.raises(StageUnavailable) as raised:
        tensorrt.run(ctx, {"input": source}, tensorrt.Params())
    assert str(raised.value) == f"{reason}: TensorRT engine not built"
    assert not any(ctx.workdir.iterdir())


def test_tensorrt_fails_with_the_reason_when_asked_to(context, tmp_path):
    reason = first_reason(gpu.cuda_status, gpu.tensorrt_status)
    if reason is None:
        pytest.skip("CUDA and TensorRT are usable here")
    with pytest.raises(StageError) as raised:
        tensorrt.run(context("trt"), {"input": OnnxModel(path=tmp_path / "model.onnx")}, tensorrt.Params(on_unavailable="fail"))
    message = str(raised.value)
    assert not isinstance(raised.value, StageUnavailable)
    assert message.startswith(f"tensorrt: {reason}: TensorRT engine not built")
    assert "on_unavailable: skip" in message and "NVIDIA GPU" in message


def test_missing_tensorrt_on_a_cuda_machine_names_tensorrt_and_the_install(context, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "cuda_status", lambda: None)
    monkeypatch.setattr(gpu, "tensorrt_status", lambda: "TensorRT not installed (ModuleNotFoundError: No module named 'tensorrt'): " + gpu.INSTALL_HINT)
    with pytest.raises(StageUnavailable, match=r"^TensorRT not installed \(.*optipipe\[tensorrt\].*: TensorRT engine not built$"):
        tensorrt.run(context("trt"), {"input": OnnxModel(path=tmp_path / "model.onnx")}, tensorrt.Params())


def test_torch_input_also_needs_torch_tensorrt(context, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "cuda_status", lambda: None)
    monkeypatch.setattr(gpu, "tensorrt_status", lambda: None)
    monkeypatch.setattr(gpu, "torch_tensorrt_status", lambda: "torch-tensorrt not installed (x)")
    with pytest.raises(StageUnavailable, match=r"^torch-tensorrt not installed \(x\): TensorRT engine not built$"):
        tensorrt.run(context("trt"), {"input": as_input(digits_cnn(), tmp_path)}, tensorrt.Params())


def test_int8_from_a_torch_model_is_refused_on_any_machine(context, tmp_path):
    with pytest.raises(StageError, match=r"int8 from a torch model needs Q/DQ nodes .*needs: \[onnx\]"):
        tensorrt.run(context("trt"), {"input": as_input(digits_cnn(), tmp_path)}, tensorrt.Params(precision="int8"))


def test_precision_skips_or_fails_without_cuda(context, tmp_path):
    reason = gpu.cuda_status()
    if reason is None:
        pytest.skip("a CUDA device is usable here")
    source = as_input(digits_cnn(), tmp_path)
    with pytest.raises(StageUnavailable) as raised:
        precision.run(context("fp16"), {"input": source}, precision.Params())
    assert str(raised.value) == f"{reason}: FP16 CUDA model not built"
    with pytest.raises(StageError) as raised:
        precision.run(context("bf16"), {"input": source}, precision.Params(dtype="bf16", on_unavailable="fail"))
    assert not isinstance(raised.value, StageUnavailable)
    assert str(raised.value).startswith(f"precision: {reason}: BF16 CUDA model not built; set on_unavailable: skip")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min_batch": 8, "opt_batch": 4}, r"min_batch <= opt_batch <= max_batch must hold; got 8, 4, 64"),
        ({"opt_batch": 128}, r"got 1, 128, 64"),
        ({"precision": "int4"}, r"precision"),
        ({"workspace_gb": 0}, r"workspace_gb"),
        ({"on_unavailable": "ignore"}, r"on_unavailable"),
        ({"batch": 8}, r"Extra inputs are not permitted"),
    ],
)
def test_tensorrt_params_are_checked(values, message):
    with pytest.raises(ValidationError, match=message):
        tensorrt.Params(**values)


def test_tensorrt_params_defaults_and_descriptions():
    params = tensorrt.Params()
    assert (params.precision, params.min_batch, params.opt_batch, params.max_batch) == ("fp16", 1, 8, 64)
    assert (params.workspace_gb, params.calibration_batches, params.on_unavailable) == (4, 16, "skip")
    assert all(field.description for field in tensorrt.Params.model_fields.values())
    assert all(field.description for field in precision.Params.model_fields.values())
    assert tensorrt.Params(min_batch=4, opt_batch=4, max_batch=4).max_batch == 4
    with pytest.raises(ValidationError, match="dtype"):
        precision.Params(dtype="fp8")
    engine, cast = tensorrt.STAGE, precision.STAGE
    assert (engine.takes, engine.inputs, engine.makes, engine.version) == (("torch", "onnx"), "one", "engine", 1)
    assert (cast.takes, cast.inputs, cast.makes, cast.version) == (("torch",), "one", "torch", 1)


def test_importing_the_gpu_modules_imports_no_tensorrt():
    code = (
        "import sys, pipeline.torchkit.gpu, stages.tensorrt, stages.precision\n"
        "pipeline.torchkit.gpu.cuda_status()\n"
        "print(sorted(name for name in ('tensorrt', 'torch_tensorrt') if name in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_calibration_data_recuts_train_batches_to_the_profile_batch(data):
    batches = tensorrt.calibration_data(data.train, data.io, count=3, rows=8)
    assert len(batches) == 3 * 64 // 8 and all(batch["input"].shape == (8, 1, 8, 8) for batch in batches)
    assert all(batch["input"].dtype == np.float32 and batch["input"].flags["C_CONTIGUOUS"] for batch in batches)
    assert [b["input"].shape for b in tensorrt.calibration_data(data.train, data.io, count=1, rows=100)] == [(100, 1, 8, 8)]
    with pytest.raises(StageError, match="yielded no batches"):
        tensorrt.calibration_data([], data.io, count=4, rows=8)


TOKENS = ModelIO([InputSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", vocab_size=50),
                  InputSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", range=(0, 2))])


def token_batches(count: int, rows: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Train batches of a two-input token model, as a loader yields them (dicts with labels)."""
    feeds = TOKENS.synthetic(rows * count, dims={"seq": seq})
    return [{**{name: torch.from_numpy(array[index * rows:(index + 1) * rows]) for name, array in feeds.items()},
             "labels": torch.zeros(rows, dtype=torch.long)} for index in range(count)]


def test_calibration_data_feeds_every_input_in_its_declared_type():
    batches = tensorrt.calibration_data(token_batches(2, 6, 12), TOKENS, count=2, rows=4)
    assert len(batches) == 3 and all(set(batch) == {"input_ids", "attention_mask"} for batch in batches)
    assert all(array.shape == (4, 12) and array.dtype == np.int64 for batch in batches for array in batch.values())
    tensorrt.check_calibration_sizes(batches, TOKENS, {"batch": 4, "seq": 12})
    with pytest.raises(StageError, match=r"train batches have seq=12 but the engine is built for the eval data's seq=16; pad"):
        tensorrt.check_calibration_sizes(batches, TOKENS, {"batch": 4, "seq": 16})
    with pytest.raises(StageError, match="train batches differ in shape beyond the batch"):
        tensorrt.calibration_data(token_batches(1, 4, 12) + token_batches(1, 4, 9), TOKENS, count=2, rows=4)


def test_profile_shapes_give_the_batch_range_and_the_eval_sizes():
    ids = TOKENS.specs[0]
    assert tensorrt.profile_shapes(ids, [1, 8, 64], {"seq": 16}) == [(1, 16), (8, 16), (64, 16)]
    assert tensorrt.profile_shapes(ids, [1, 8, 64], {"seq": 16}, network_dims=[-1, 20]) == [(1, 20), (8, 20), (64, 20)]
    image = InputSpec(name="image", shape=["batch", 3, "height", 32])
    assert tensorrt.profile_shapes(image, [4, 4, 4], {"height": 24}) == [(4, 3, 24, 32)] * 3
    with pytest.raises(StageError, match=r"the ONNX input input_ids has 3 dimensions \[-1, -1, 4\], model.inputs declares 2"):
        tensorrt.profile_shapes(ids, [1, 8, 64], {"seq": 16}, network_dims=[-1, -1, 4])
    params = tensorrt.Params(min_batch=2, opt_batch=4, max_batch=16)
    assert tensorrt.batch_range_of(params) == [2, 4, 16] and tensorrt.batch_range_of(params, 8) == [8, 8, 8]


def test_engine_forward_calls_the_model_through_its_declared_inputs():
    class TwoInputs(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": (input_ids * attention_mask).float().sum(1, keepdim=True), "other": input_ids}

    feeds = TOKENS.synthetic(3, dims={"seq": 5})
    tensors = TOKENS.tensors(feeds)
    prediction = tensorrt.EngineForward(TwoInputs(), TOKENS)(*tensors.values())
    assert prediction.dtype == torch.float32 and prediction.shape == (3, 1)
    torch.testing.assert_close(prediction, (tensors["input_ids"] * tensors["attention_mask"]).float().sum(1, keepdim=True))
    half = tensorrt.EngineForward(nn.Linear(4, 2), ModelIO.single(), torch.float16)
    assert half.module.weight.dtype == torch.float16 and half(torch.ones(2, 4)).dtype == torch.float32


H200 = {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}


def test_engine_from_another_gpu_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(gpu, "gpu_identity", lambda: {**H200, "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    with pytest.raises(
        StageError,
        match=r"^engine built for NVIDIA H200 \(sm 9\.0\) with TensorRT 10\.13\.0\.35; "
        r"this machine has NVIDIA A100-SXM4-80GB \(sm 8\.0\) with TensorRT 10\.13\.0\.35: rebuild it here$",
    ):
        gpu.check_engine_compatible({**H200, "precision": "fp16"})


def test_engine_from_another_tensorrt_or_on_a_cpu_machine_is_refused(monkeypatch):
    monkeypatch.setattr(gpu, "gpu_identity", lambda: {**H200, "tensorrt_version": "10.3.0.26"})
    with pytest.raises(StageError, match=r"with TensorRT 10\.13\.0\.35; this machine has NVIDIA H200 \(sm 9\.0\) with TensorRT 10\.3\.0\.26"):
        gpu.check_engine_compatible(H200)
    monkeypatch.setattr(gpu, "gpu_identity", lambda: {"gpu_name": None, "compute_capability": None, "tensorrt_version": None})
    with pytest.raises(StageError, match=r"this machine has no CUDA device with no TensorRT: rebuild it here"):
        gpu.check_engine_compatible(H200)


def test_engine_from_this_machine_or_without_a_record_passes(monkeypatch):
    monkeypatch.setattr(gpu, "gpu_identity", lambda: dict(H200, cuda_version="12.8"))
    gpu.check_engine_compatible({**H200, "precision": "fp16", "inputs": {"input": "input"}})
    gpu.check_engine_compatible({})


def test_gpu_identity_names_what_this_machine_has():
    identity = gpu.gpu_identity()
    assert set(identity) >= {"gpu_name", "compute_capability", "cuda_version", "tensorrt_version", "torch_tensorrt_version"}
    assert (identity["gpu_name"] is None) == (gpu.cuda_status() is not None)
    assert (identity["tensorrt_version"] is None) == (gpu.tensorrt_status() is not None)


def test_tensorrt_runner_without_gpu_is_a_stage_error(tmp_path):
    reason = first_reason(gpu.cuda_status, gpu.tensorrt_status)
    if reason is None:
        pytest.skip("CUDA and TensorRT are usable here")
    with pytest.raises(StageError, match="^cannot run TensorRT engine model\\.engine: " + re.escape(reason)):
        TensorRTRunner(tmp_path / "model.engine", {})


# --- on a CUDA machine with TensorRT ------------------------------------------------------------------


@pytest.fixture
def tensorrt_ready():
    """Skip with the machine's reason unless CUDA and TensorRT are usable."""
    reason = first_reason(gpu.cuda_status, gpu.tensorrt_status)
    if reason is not None:
        pytest.skip(reason)


def trained(factory, data: DataBundle, epochs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    train_model(model, data.train, epochs=epochs, lr=3e-3, description="train", io=data.io)
    return model.eval()


def median_ms(predict, batch: np.ndarray, repeats: int = 50) -> float:
    """Median wall time of ``predict(batch)`` (host arrays in and out, so copies count for both runtimes)."""
    for _ in range(5):
        predict(batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def report_latency(label: str, engine_path: Path, meta: dict, model: nn.Module, data: DataBundle) -> None:
    batch = {"input": np.ascontiguousarray(data.eval_set.inputs["input"][:64])}
    engine = TensorRTRunner(engine_path, meta)
    eager = TorchRunner(model.float(), data.io, device="cuda", dtype=torch.float32)
    engine_ms, eager_ms = median_ms(engine.predict, batch), median_ms(eager.predict, batch)
    print(f"\n{label} on {meta['gpu_name']}: batch 64, TensorRT {engine_ms:.3f} ms vs FP32 eager {eager_ms:.3f} ms ({eager_ms / engine_ms:.2f}x)")


@pytest.mark.gpu
def test_fp16_engine_from_onnx_of_the_digits_model(context, tmp_path, data, tensorrt_ready):
    model = trained(digits_cnn, data)
    onnx_output = export_onnx.run(context("onnx"), {"input": as_input(model, tmp_path)}, export_onnx.Params())
    ctx = context("trt")
    output = tensorrt.run(ctx, {"input": onnx_output.product}, tensorrt.Params(precision="fp16"))
    metrics, meta = output.metrics, output.product.meta
    assert output.product.kind == "engine" and output.product.path == ctx.workdir / "model.engine"
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.engine"]
    assert metrics["agreement"] >= 0.99 and metrics["precision"] == "fp16" and metrics["engine_bytes"] > 0
    assert meta["gpu_name"] == torch.cuda.get_device_name() and meta["tensorrt_version"] and meta["inputs"] == {"input": "input"}
    runner = TensorRTRunner(output.product.path, meta)
    for size in (1, 5, 64, 100):  # inside the profile, and past max_batch (split into chunks)
        assert runner.predict({"input": data.eval_set.inputs["input"][:size]}).shape == (size, 10)
    with pytest.raises(StageError, match="rebuild it here"):
        TensorRTRunner(output.product.path, {**meta, "tensorrt_version": "9.0.0"})
    report_latency("digits_cnn fp16 engine (ONNX)", output.product.path, meta, model, data)


@pytest.mark.gpu
def test_int8_engine_from_onnx_is_calibrated_on_train_batches(context, tmp_path, data, tensorrt_ready):
    model = trained(digits_cnn, data)
    onnx_output = export_onnx.run(context("onnx"), {"input": as_input(model, tmp_path)}, export_onnx.Params())
    output = tensorrt.run(context("trt"), {"input": onnx_output.product}, tensorrt.Params(precision="int8", calibration_batches=8))
    assert output.metrics["int8_calibrated"] is True and output.metrics["int8_qdq"] is False
    assert output.metrics["agreement"] >= 0.99


@pytest.mark.gpu
def test_fp16_engine_from_torch_resnet_small(context, tmp_path, data, tensorrt_ready):
    reason = gpu.torch_tensorrt_status()
    if reason is not None:
        pytest.skip(reason)
    model = trained(resnet_small, data, epochs=3)
    ctx = context("trt")
    output = tensorrt.run(ctx, {"input": as_input(model, tmp_path)}, tensorrt.Params(precision="fp16"))
    assert output.metrics["agreement"] >= 0.99 and output.metrics["source_kind"] == "torch"
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.engine", "model.ep"]
    assert output.product.meta["side_files"] == ["model.ep"]
    report_latency("resnet_small fp16 engine (torch-tensorrt)", output.product.path, output.product.meta, model, data)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_precision_casts_and_agrees_with_fp32_on_cuda(context, tmp_path, data, dtype):
    reason = gpu.cuda_status()
    if reason is not None:
        pytest.skip(reason)
    model = trained(digits_cnn, data)
    ctx = context(dtype)
    output = precision.run(ctx, {"input": as_input(model, tmp_path)}, precision.Params(dtype=dtype))
    assert output.metrics["agreement"] >= 0.99
    assert output.product.meta == {"format": "module", "device": "cuda", "dtype": dtype}
    loaded = output.product.load()
    assert next(loaded.parameters()).dtype == precision.DTYPES[dtype] and next(loaded.parameters()).device.type == "cpu"
