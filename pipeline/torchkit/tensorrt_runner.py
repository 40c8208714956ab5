"""Runs a serialized TensorRT engine on CUDA, with torch CUDA tensors as its I/O buffers.

TensorRT is imported only when a runner is made, on a machine that has it (``pipeline.torchkit.gpu``).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError
from pipeline.torchkit.evaluate import rows_of
from pipeline.torchkit.gpu import check_engine_compatible, cuda_status, tensorrt_status

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
            chunk = rows_of(chunk, self.min_batch)
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
