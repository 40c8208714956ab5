"""Runners: predict logits for a batch of inputs with any kind of model, on the device it was made for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.torchkit.handles import EngineModel, ModelHandle, OnnxModel, OpenVinoModel, TorchModel
from pipeline.torchkit.model_io import Feeds, ModelIO
from pipeline.torchkit.profiling import onnx_profile, torch_profile
from pipeline.torchkit.torch_formats import DEPLOYED_FORMATS, DeployedRunner


class Runner(Protocol):
    """Predicts for a batch of feeds (input name -> array), whatever runtime holds the model.

    A runner may also define ``profile(feeds, trace_path: Path) -> dict[str, float]``: operator type -> milliseconds per
    call on ``feeds``, summed over the ops of that type, writing a Chrome-trace JSON file at ``trace_path``; the
    benchmark profiles the runners that have it (``pipeline.torchkit.profiling``) and says so for the others.
    """

    def predict(self, feeds: Feeds) -> np.ndarray: ...


class TorchRunner:
    """Runs a torch module in eval mode under ``inference_mode``, on CPU or a CUDA device.

    Float inputs are cast to ``dtype`` (default: the dtype of the module's first floating-point parameter),
    other inputs keep their declared dtype; the prediction (``model.output``) comes back as a float32
    numpy array on the CPU.
    """

    def __init__(self, module: torch.nn.Module, io: ModelIO, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
        self.module = module.to(self.device).eval()
        self.io = io
        first_float = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.input_dtype = dtype or (first_float.dtype if first_float is not None else torch.float32)

    def predict(self, feeds: Feeds) -> np.ndarray:
        with torch.inference_mode():
            tensors = self.io.tensors(feeds, self.device, self.input_dtype)
            return self.io.predict(self.module, tensors).float().cpu().numpy()

    def profile(self, feeds: Feeds, trace_path: Path) -> dict[str, float]:
        """Milliseconds per call of each op the module called on ``feeds`` (torch.profiler), its Chrome trace at ``trace_path``."""
        return torch_profile(lambda: self.predict(feeds), trace_path, cuda=self.device.type == "cuda")


ORT_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


class OnnxRunner:
    """Runs an ONNX model in onnxruntime on the CPU execution provider; its first output is the prediction.

    Feeds go to the session's inputs by name, cast to each input's element type (a one-input file takes the
    one feed whatever its name). By default it uses as many threads as torch (``torch.get_num_threads()``),
    so eager and onnxruntime figures in one benchmark are taken with the same thread count; onnxruntime's own
    default (physical cores) differs from machine to machine.
    """

    def __init__(self, path: Path, intra_op_threads: int | None = None):
        self.path = path
        self.intra_op_threads = torch.get_num_threads() if intra_op_threads is None else intra_op_threads
        self.session = self.new_session()
        self.inputs = {entry.name: ORT_NUMPY_TYPES.get(entry.type, np.float32) for entry in self.session.get_inputs()}
        self.input_name = next(iter(self.inputs))

    def new_session(self, profile_prefix: Path | None = None) -> Any:
        """An onnxruntime session of the file on the CPU provider with the runner's threads; profiling into files
        named ``<profile_prefix>_<time>.json`` when a prefix is given."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.log_severity_level = 3
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def session_feeds(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The feeds by the session's input names and types; StageError naming a missing input."""
        if len(self.inputs) == 1 and len(feeds) == 1:
            (name, dtype), array = next(iter(self.inputs.items())), next(iter(feeds.values()))
            return {name: array.astype(dtype, copy=False)}
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise StageError(f"the ONNX model takes inputs {', '.join(self.inputs)} but has no feed for {', '.join(missing)}")
        return {name: feeds[name].astype(dtype, copy=False) for name, dtype in self.inputs.items()}

    def predict(self, feeds: Feeds) -> np.ndarray:
        return self.session.run(None, self.session_feeds(feeds))[0].astype(np.float32, copy=False)

    def profile(self, feeds: Feeds, trace_path: Path) -> dict[str, float]:
        """Milliseconds per call of each node op type on ``feeds``, from a profiling session of its own (the timed session
        stays unprofiled), its Chrome trace moved to ``trace_path``."""
        session = self.new_session(profile_prefix=trace_path.with_name(f"{trace_path.stem}.ort"))
        return onnx_profile(session, self.session_feeds(feeds), trace_path)


def runner_for(handle: ModelHandle, io: ModelIO) -> Any:
    """The runner for a handle, on the device the model was made for (CUDA for engines and GPU casts)."""
    if isinstance(handle, EngineModel):
        from pipeline.torchkit.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(handle.path, handle.meta)
    if isinstance(handle, TorchModel) and handle.meta.get("format") in DEPLOYED_FORMATS:
        return DeployedRunner.of(handle.path, handle.meta["format"], io)
    if isinstance(handle, TorchModel):
        return TorchRunner(handle.load(), io, device=handle.meta.get("device", "cpu"))
    if isinstance(handle, OnnxModel):
        return OnnxRunner(handle.path)
    if isinstance(handle, OpenVinoModel):
        from pipeline.torchkit.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(handle.path)
    raise StageError(f"no runner for a '{handle.kind}' model ({handle.path.name})")
