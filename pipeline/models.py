"""Model handles passed between stages, how each kind is saved and loaded, and runners that predict with any of them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.fx

import pipeline.quantized_pickle  # noqa: F401  (registers the pickling of quantized convs)
from pipeline.errors import StageError
from pipeline.imports import resolve_callable

TORCH_MODULE_FILE = "model.pt"
TORCH_WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"

# Graph capture in torch is process-global: torch.fx.symbolic_trace patches nn.Module.__call__ for every
# thread (a forward elsewhere then fails with "module is not installed as a submodule"), and torch.export
# keeps global mode stacks ("Trying to pop empty mode stack"). Stages run in concurrent threads, so every
# graph capture and every torch forward holds this lock; onnxruntime, onnxsim and file work still overlap.
TORCH_GRAPH_LOCK = threading.RLock()


@dataclass(frozen=True)
class ModelHandle:
    """A model file on disk plus what is needed to load it. ``kind`` is the value stages declare in takes/makes."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "model"

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the model file and any side files it names in ``meta['side_files']``."""
        extra = sum((self.path.parent / name).stat().st_size for name in self.meta.get("side_files", []))
        return self.path.stat().st_size + extra


@dataclass(frozen=True)
class TorchModel(ModelHandle):
    """A PyTorch module: a pickled ``nn.Module`` (``model.pt``) or a weights-only state_dict plus its factory."""

    kind: ClassVar[str] = "torch"

    def load(self) -> torch.nn.Module:
        """Rebuild the module in eval mode on CPU.

        Whole-module pickles are only ever files the artifact store wrote and digest-checked;
        user checkpoints never take this path (see stages/load_checkpoint.py).
        """
        if self.meta.get("format") == "state_dict":
            factory = resolve_callable(self.meta["factory"], "model.factory")
            module = factory(**self.meta.get("kwargs", {}))
            state_dict = torch.load(self.path, map_location="cpu", weights_only=True)
            module.load_state_dict(state_dict)
        else:
            with TORCH_GRAPH_LOCK:  # unpickling a torch.fx GraphModule re-traces it
                module = torch.load(self.path, map_location="cpu", weights_only=False)
        return module.eval()


@dataclass(frozen=True)
class OnnxModel(ModelHandle):
    """An ONNX model file, run with onnxruntime."""

    kind: ClassVar[str] = "onnx"


@dataclass(frozen=True)
class EngineModel(ModelHandle):
    """A serialized TensorRT engine; only loadable on the GPU and TensorRT version it was built with."""

    kind: ClassVar[str] = "engine"


HANDLE_TYPES: dict[str, type[ModelHandle]] = {cls.kind: cls for cls in (TorchModel, OnnxModel, EngineModel)}


def handle_from_record(folder: Path, model_file: str, kind: str, meta: dict[str, Any]) -> ModelHandle:
    """Recreate the handle an artifact's manifest describes."""
    return HANDLE_TYPES[kind](path=folder / model_file, meta=meta)


def drop_string_annotations(module: torch.nn.Module) -> None:
    """Make a torch.fx GraphModule picklable by forgetting type annotations fx recorded as strings.

    Under ``from __future__ import annotations`` a ``forward(self, x: torch.Tensor)`` annotation is the
    string ``'torch.Tensor'``; fx (torch 2.13) keeps it as a global of the generated code, and
    ``GraphModule.__reduce__`` then fails with "'str' object has no attribute '__name__'".
    """
    if not isinstance(module, torch.fx.GraphModule):
        return
    annotated = [node for node in module.graph.nodes if isinstance(node.type, str)]
    for node in annotated:
        node.type = None
    if annotated:
        module.recompile()


def save_torch_module(module: torch.nn.Module, workdir: Path, **meta: Any) -> TorchModel:
    """Pickle a whole module (architecture may have changed: fused, pruned, quantized)."""
    drop_string_annotations(module)
    path = workdir / TORCH_MODULE_FILE
    torch.save(module, path)
    return TorchModel(path=path, meta={"format": "module", **meta})


def save_torch_weights(module: torch.nn.Module, workdir: Path, factory: str, kwargs: dict[str, Any]) -> TorchModel:
    """Save only the weights (loadable with ``weights_only=True``); the factory rebuilds the architecture."""
    path = workdir / TORCH_WEIGHTS_FILE
    state_dict = {name: tensor.detach().clone().contiguous() for name, tensor in module.state_dict().items()}
    torch.save(state_dict, path)
    return TorchModel(path=path, meta={"format": "state_dict", "factory": factory, "kwargs": kwargs})


class Runner(Protocol):
    """Predicts logits for a batch of float32 inputs, whatever runtime holds the model."""

    def predict(self, inputs: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """Runs a torch module in eval mode under ``inference_mode`` on CPU."""

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()
        first_float = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.input_dtype = first_float.dtype if first_float is not None else torch.float32

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        with TORCH_GRAPH_LOCK, torch.inference_mode():
            outputs = self.module(torch.from_numpy(inputs).to(self.input_dtype))
        return outputs.float().numpy()


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


def runner_for(handle: ModelHandle) -> Runner:
    """The runner for a handle, on the device the model was made for (CUDA for engines and GPU casts)."""
    if isinstance(handle, EngineModel):
        from pipeline.gpu import TensorRTRunner

        return TensorRTRunner(handle.path, handle.meta)
    if isinstance(handle, TorchModel) and handle.meta.get("device") == "cuda":
        from pipeline.gpu import CudaTorchRunner

        return CudaTorchRunner(handle.load())
    if isinstance(handle, TorchModel):
        return TorchRunner(handle.load())
    if isinstance(handle, OnnxModel):
        return OnnxRunner(handle.path)
    raise StageError(f"no runner for a '{handle.kind}' model ({handle.path.name})")


@dataclass(frozen=True)
class ReportFile(ModelHandle):
    """A JSON report a checking stage (validate, benchmark) writes instead of a model."""

    kind: ClassVar[str] = "report"


HANDLE_TYPES[ReportFile.kind] = ReportFile
