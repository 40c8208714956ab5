"""Runners: predict logits for a batch of inputs with any kind of model, on the device it was made for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.torchkit.handles import EngineModel, ModelHandle, OnnxModel, TorchModel


class Runner(Protocol):
    """Predicts logits for a batch of float32 inputs, whatever runtime holds the model."""

    def predict(self, inputs: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """Runs a torch module in eval mode under ``inference_mode``, on CPU or a CUDA device.

    Inputs are cast to ``dtype`` (default: the dtype of the module's first floating-point parameter) and
    logits come back as float32 numpy arrays on the CPU.
    """

    def __init__(self, module: torch.nn.Module, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
        self.module = module.to(self.device).eval()
        first_float = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.input_dtype = dtype or (first_float.dtype if first_float is not None else torch.float32)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device, self.input_dtype))
            return outputs.float().cpu().numpy()


class OnnxRunner:
    """Runs an ONNX model in onnxruntime on the CPU execution provider.

    By default it uses as many threads as torch (``torch.get_num_threads()``), so eager and onnxruntime
    figures in one benchmark are taken with the same thread count; onnxruntime's own default (physical
    cores) differs from machine to machine.
    """

    def __init__(self, path: Path, intra_op_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads() if intra_op_threads is None else intra_op_threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: inputs.astype(np.float32, copy=False)})[0]


def runner_for(handle: ModelHandle) -> Any:
    """The runner for a handle, on the device the model was made for (CUDA for engines and GPU casts)."""
    if isinstance(handle, EngineModel):
        from pipeline.torchkit.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(handle.path, handle.meta)
    if isinstance(handle, TorchModel):
        return TorchRunner(handle.load(), device=handle.meta.get("device", "cpu"))
    if isinstance(handle, OnnxModel):
        return OnnxRunner(handle.path)
    raise StageError(f"no runner for a '{handle.kind}' model ({handle.path.name})")
