"""What this machine offers for GPU stages (CUDA, TensorRT, torch-tensorrt), and runners that predict on it.

Feature detection happens once per process and answers with a reason instead of raising: ``None`` when a
feature is usable, else one line saying what is missing and how to get it. Stages check it when they
run (``require``), so a machine without a GPU fails or skips one stage with that line, never at import.
TensorRT and torch-tensorrt are imported only inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from pipeline.errors import StageError, StageUnavailable, one_line

INSTALL_HINT = "pip install 'optipipe[tensorrt]' on a machine with an NVIDIA driver"
MIN_TENSORRT_MAJOR = 10  # the runner and the builder use TensorRT 10's named-tensor API


@functools.cache
def cuda_status() -> str | None:
    """None when a CUDA device is usable, else why not (one line)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
    return f"no CUDA device: torch.cuda.is_available() is False{build}"


@functools.cache
def tensorrt_status() -> str | None:
    """None when TensorRT 10+ imports, else why not (the import error's first line and how to install it)."""
    try:
        import tensorrt
    except Exception as error:  # ImportError, or OSError/RuntimeError when libnvinfer or the driver is missing
        return f"TensorRT not installed ({one_line(error)}): {INSTALL_HINT}"
    major = str(tensorrt.__version__).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        return f"TensorRT {tensorrt.__version__} is too old (TensorRT {MIN_TENSORRT_MAJOR} or newer is needed): {INSTALL_HINT}"
    return None


@functools.cache
def torch_tensorrt_status() -> str | None:
    """None when torch-tensorrt imports, else why not (the import error's first line and how to install it)."""
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as error:  # it raises more than ImportError when TensorRT's libraries are absent
        return f"torch-tensorrt not installed ({one_line(error)}): {INSTALL_HINT}"
    return None


def require(checks: Iterable[Callable[[], str | None]], *, stage: str, not_built: str, on_unavailable: str) -> None:
    """Return when every check passes; else ``StageUnavailable`` (on_unavailable: skip) or ``StageError`` (fail).

    The first failing check's reason leads the message, followed by what was not built.
    """
    reason = next((found for check in checks if (found := check()) is not None), None)
    if reason is None:
        return
    if on_unavailable == "skip":
        raise StageUnavailable(f"{reason}: {not_built}")
    raise StageError(
        f"{stage}: {reason}: {not_built}; set on_unavailable: skip to skip this stage where it cannot run, "
        "or run it on a machine with an NVIDIA GPU"
    )


def _package_version(module_name: str, distribution: str) -> str | None:
    """A package's version without importing it (its module's ``__version__`` when it is already imported)."""
    module = sys.modules.get(module_name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_identity() -> dict[str, Any]:
    """What a TensorRT engine is tied to: GPU name, compute capability ("9.0"), CUDA and TensorRT versions.

    Values are None where the machine lacks the thing (no CUDA device, no TensorRT).
    """
    import torch

    identity: dict[str, Any] = {
        "gpu_name": None,
        "compute_capability": None,
        "cuda_version": torch.version.cuda,
        "tensorrt_version": None,
        "torch_tensorrt_version": None,
    }
    if cuda_status() is None:
        major, minor = torch.cuda.get_device_capability()
        identity.update(gpu_name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    if tensorrt_status() is None:
        import tensorrt

        identity["tensorrt_version"] = str(tensorrt.__version__)
    identity["torch_tensorrt_version"] = _package_version("torch_tensorrt", "torch-tensorrt")
    return identity


def _describe(identity: dict[str, Any]) -> str:
    """``NVIDIA H200 (sm 9.0) with TensorRT 10.13.0.35``, or what is missing."""
    gpu = f"{identity['gpu_name']} (sm {identity['compute_capability']})" if identity.get("gpu_name") else "no CUDA device"
    tensorrt = f"TensorRT {identity['tensorrt_version']}" if identity.get("tensorrt_version") else "no TensorRT"
    return f"{gpu} with {tensorrt}"


def check_engine_compatible(meta: dict[str, Any]) -> None:
    """StageError unless this machine has the GPU, compute capability and TensorRT version the engine was built with.

    A serialized engine holds kernels chosen for one GPU and one TensorRT release; loading it elsewhere
    fails inside TensorRT or runs untuned kernels. Keys the meta lacks are not compared.
    """
    here = gpu_identity()
    keys = ("gpu_name", "compute_capability", "tensorrt_version")
    if all(meta.get(key) is None or meta.get(key) == here.get(key) for key in keys):
        return
    built = {key: meta.get(key) or "?" for key in keys}
    raise StageError(f"engine built for {_describe(built)}; this machine has {_describe(here)}: rebuild it here")


# TensorRT and torch name these tensor types alike; looked up by name since older TensorRT lacks some.
SHARED_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool", "uint8")


def torch_dtype_of(tensorrt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT tensor dtype (I/O buffers are torch CUDA tensors)."""
    import tensorrt as trt
    import torch

    for name in SHARED_DTYPE_NAMES:
        if getattr(trt, name, None) == tensorrt_dtype:
            return getattr(torch, name)
    raise StageError(f"TensorRT tensor type {tensorrt_dtype} has no torch equivalent here")


@functools.cache
def tensorrt_logger() -> Any:
    """One TensorRT logger for the process (TensorRT warns when builders and runtimes get different ones)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


class TensorRTRunner:
    """Runs a serialized TensorRT engine (one input, first output as logits) on CUDA with torch tensors as buffers.

    Batches larger than the engine's profile maximum are split; smaller than its minimum are padded
    with repeated rows and the padding dropped from the outputs.
    """

    def __init__(self, path: Path, meta: dict[str, Any] | None = None):
        for status in (cuda_status, tensorrt_status):
            if (reason := status()) is not None:
                raise StageError(f"cannot run TensorRT engine {path.name}: {reason}")
        check_engine_compatible(meta or {})
        import tensorrt as trt
        import torch

        self.runtime = trt.Runtime(tensorrt_logger())
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise StageError(f"TensorRT could not deserialize {path.name} (see TensorRT's log above): rebuild it here")
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        inputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self.output_names = [name for name in names if name not in inputs]
        if len(inputs) != 1 or not self.output_names:
            raise StageError(f"{path.name} has inputs {inputs} and outputs {self.output_names}; the runner needs one input and an output")
        self.input_name = inputs[0]
        self.input_dtype = torch_dtype_of(self.engine.get_tensor_dtype(self.input_name))
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if self.input_shape[0] == -1:  # dynamic batch: the range of optimization profile 0
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        else:
            self.min_batch = self.max_batch = int(self.input_shape[0])
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()  # one execution context: one batch at a time

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Logits (float32) for a batch of any size."""
        if tuple(inputs.shape[1:]) != tuple(self.input_shape[1:]) and -1 not in self.input_shape[1:]:
            raise StageError(f"the engine takes inputs shaped {self.input_shape}, got {tuple(inputs.shape)}")
        chunks = [inputs[start : start + self.max_batch] for start in range(0, len(inputs), self.max_batch)]
        with self._lock:
            return np.concatenate([self._run(chunk) for chunk in chunks])

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        import torch

        rows = len(chunk)
        if rows < self.min_batch:
            chunk = chunk[np.arange(self.min_batch) % rows]
        with torch.cuda.stream(self.stream):
            batch = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device, self.input_dtype)
            if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
                raise StageError(f"the engine refused input shape {tuple(batch.shape)} (its batch range is {self.min_batch}..{self.max_batch})")
            self.context.set_tensor_address(self.input_name, batch.data_ptr())
            outputs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(size < 0 for size in shape):
                    raise StageError(f"output '{name}' has a data-dependent shape {shape}; the runner needs static output shapes")
                output = torch.empty(shape, dtype=torch_dtype_of(self.engine.get_tensor_dtype(name)), device=self.device)
                self.context.set_tensor_address(name, output.data_ptr())
                outputs.append(output)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise StageError("TensorRT failed to run the engine (see TensorRT's log above)")
            logits = outputs[0][:rows].float().cpu()
        self.stream.synchronize()
        return logits.numpy()


class CudaTorchRunner:
    """Runs a torch module on the CUDA device in a given dtype: inputs cast to it, logits returned as float32."""

    def __init__(self, module: Any, dtype: Any = None):
        import torch

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.module = module.to(self.device).eval()
        first_float = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.dtype = dtype or (first_float.dtype if first_float is not None else torch.float32)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        from pipeline.models import TORCH_GRAPH_LOCK

        with TORCH_GRAPH_LOCK, torch.inference_mode():
            outputs = self.module(torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device, self.dtype))
            return outputs.float().cpu().numpy()
