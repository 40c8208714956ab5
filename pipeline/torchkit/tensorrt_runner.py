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
from pipeline.torchkit.gpu import check_engine_compatible, cuda_status, tensorrt_status
from pipeline.torchkit.model_io import Feeds, cycled_rows, feed_rows, feeds_length

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
    """Runs a serialized TensorRT engine on CUDA with torch tensors as buffers; its first output is the prediction.

    Each engine input is fed by name: ``meta['inputs']`` maps engine input names to the declared inputs
    (torch-tensorrt names them ``inputs_0``, ...; an ONNX engine keeps the declared names), and a
    one-input engine takes the one feed whatever its name. Feeds are cast to the type the engine reports
    (int64 token ids become int32 where the engine takes int32). Batches larger than the profile's
    maximum are split; smaller than its minimum are padded with repeated rows and the padding dropped
    from the outputs.
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
        self.input_names = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self.output_names = [name for name in names if name not in self.input_names]
        if not self.input_names or not self.output_names:
            raise StageError(f"{path.name} has inputs {self.input_names} and outputs {self.output_names}; the runner needs inputs and an output")
        declared = (meta or {}).get("inputs") or {}
        self.sources = {name: declared.get(name, name) for name in self.input_names}  # engine input -> feed name
        self.input_dtypes = {name: torch_dtype_of(self.engine.get_tensor_dtype(name)) for name in self.input_names}
        self.input_shapes = {name: tuple(self.engine.get_tensor_shape(name)) for name in self.input_names}
        first = self.input_names[0]
        if self.input_shapes[first][0] == -1:  # dynamic batch: the range of optimization profile 0
            low, _, high = self.engine.get_tensor_profile_shape(first, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        else:
            self.min_batch = self.max_batch = int(self.input_shapes[first][0])
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()  # one execution context: one batch at a time

    def engine_feeds(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The feeds by engine input name; StageError naming a missing input or a shape the engine fixes otherwise."""
        if len(self.input_names) == 1 and len(feeds) == 1:
            arrays = {self.input_names[0]: next(iter(feeds.values()))}
        else:
            missing = [source for source in self.sources.values() if source not in feeds]
            if missing:
                raise StageError(f"the TensorRT engine takes inputs {', '.join(self.sources.values())} but has no feed for {', '.join(missing)}")
            arrays = {name: feeds[source] for name, source in self.sources.items()}
        for name, array in arrays.items():
            shape = self.input_shapes[name]
            if len(array.shape) != len(shape) or any(size not in (-1, got) for size, got in zip(shape[1:], array.shape[1:])):
                raise StageError(f"the engine takes input {self.sources[name]} shaped {shape}, got {tuple(array.shape)}")
        return arrays

    def predict(self, feeds: Feeds) -> np.ndarray:
        """The prediction (float32) for a batch of any size."""
        arrays = self.engine_feeds(feeds)
        rows = feeds_length(arrays)
        chunks = [feed_rows(arrays, slice(start, start + self.max_batch)) for start in range(0, rows, self.max_batch)]
        with self._lock:
            return np.concatenate([self._run(chunk) for chunk in chunks])

    def _run(self, chunk: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        rows = feeds_length(chunk)
        if rows < self.min_batch:
            chunk = cycled_rows(chunk, self.min_batch)
        with torch.cuda.stream(self.stream):
            buffers = []  # alive until the engine has run
            for name, array in chunk.items():
                tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.input_dtypes[name])
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                    raise StageError(
                        f"the engine refused input {self.sources[name]} shaped {tuple(tensor.shape)} (its profile takes "
                        f"{tuple(low)} to {tuple(high)}): rebuild it for these sizes"
                    )
                self.context.set_tensor_address(name, tensor.data_ptr())
                buffers.append(tensor)
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
            prediction = outputs[0][:rows].float().cpu()
        self.stream.synchronize()
        return prediction.numpy()
