"""Model handles passed between stages, and how each kind is saved and loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

import pipeline.torchkit.quantized_pickle  # noqa: F401  (registers the pickling of quantized convs)
from pipeline.errors import RecipeError, StageError, one_line
from pipeline.imports import resolve_callable

TORCH_MODULE_FILE = "model.pt"
TORCH_WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # its weights: model.bin beside it (meta side_files)


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
    """A PyTorch module: a pickled ``nn.Module`` (``model.pt``), a weights-only state_dict plus its factory, or a
    deployment format (``format: torchscript`` or ``aoti``, see ``pipeline.torchkit.torch_formats``)."""

    kind: ClassVar[str] = "torch"

    def load(self) -> torch.nn.Module:
        """Rebuild the module in eval mode on CPU.

        Whole-module pickles and TorchScript files (``torch.jit.load`` runs the code they hold) are only ever files
        the artifact store wrote and digest-checked; user checkpoints never take this path (see stages/load_checkpoint.py).
        An AOTInductor package is no module: only its runner (``runner_for``) runs it.
        """
        if self.meta.get("format") == "aoti":
            raise StageError(
                f"{self.path.name} is an AOTInductor package (compile stage): validate, benchmark and select run it, but no "
                "stage can change it; put the stages that change the model before compile"
            )
        if self.meta.get("format") == "torchscript":
            return torch.jit.load(str(self.path), map_location="cpu").eval()
        if self.meta.get("format") == "state_dict":
            from pipeline.torchkit.channel_cuts import replay_cuts

            factory = resolve_callable(self.meta["factory"], "model.factory")
            module = replay_cuts(factory(**self.meta.get("kwargs", {})), self.meta.get("pruning", []))
            state_dict = torch.load(self.path, map_location="cpu", weights_only=True)
            module.load_state_dict(state_dict)
        else:
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


@dataclass(frozen=True)
class OpenVinoModel(ModelHandle):
    """An OpenVINO IR: ``model.xml`` (the graph) with its weights in ``model.bin``, run with OpenVINO on the CPU."""

    kind: ClassVar[str] = "openvino"


@dataclass(frozen=True)
class ReportFile(ModelHandle):
    """A JSON report a checking stage (validate, benchmark) writes instead of a model."""

    kind: ClassVar[str] = "report"


HANDLE_TYPES: dict[str, type[ModelHandle]] = {cls.kind: cls for cls in (TorchModel, OnnxModel, EngineModel, OpenVinoModel, ReportFile)}


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


# Every hook table of an nn.Module; tables filled by one registration (a forward hook with kwargs) share its id.
HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def renumber_hooks(module: torch.nn.Module) -> None:
    """Key every hook of ``module`` and its submodules 0, 1, 2, ... in module order, in place.

    torch keys a hook by a process-wide counter (``RemovableHandle.next_id``), and the keys are pickled
    with the module: FX quantization leaves ``_save_packed_weight``/``_load_packed_weight`` state-dict
    hooks on the converted model, so the same weights saved after another number of hook registrations
    in the process (earlier stages, or none in a resumed run's fresh process) gave other bytes. The hooks
    stay, in their order; only a ``RemovableHandle`` still held for one would no longer remove it.
    """
    new_ids: dict[int, int] = {}
    for submodule in module.modules():
        for table_name in HOOK_TABLES:
            table = submodule.__dict__.get(table_name)
            if not table:
                continue
            entries = list(table.items())
            table.clear()
            for old_id, hook in entries:
                table[new_ids.setdefault(old_id, len(new_ids))] = hook


def save_torch_module(module: torch.nn.Module, workdir: Path, **meta: Any) -> TorchModel:
    """Pickle a whole module (architecture may have changed: fused, pruned, quantized), byte-reproducibly.

    Nothing process-specific goes in (hook ids are renumbered), so the same module gives the same file
    in any process; torch's own ``.data/serialization_id`` record is derived from the record names and
    their CRC32s, so it follows the content.
    """
    drop_string_annotations(module)
    renumber_hooks(module)
    path = workdir / TORCH_MODULE_FILE
    torch.save(module, path)
    return TorchModel(path=path, meta={"format": "module", **meta})


def save_torch_weights(
    module: torch.nn.Module, workdir: Path, factory: str, kwargs: dict[str, Any], pruning: list[dict[str, Any]] | None = None
) -> TorchModel:
    """Save only the weights (loadable with ``weights_only=True``); the factory, then the recorded channel
    cuts (``pipeline.torchkit.channels``), rebuild the architecture they fit."""
    path = workdir / TORCH_WEIGHTS_FILE
    state_dict = {name: tensor.detach().clone().contiguous() for name, tensor in module.state_dict().items()}
    torch.save(state_dict, path)
    meta = {"format": "state_dict", "factory": factory, "kwargs": kwargs}
    if pruning:
        meta["pruning"] = list(pruning)
    return TorchModel(path=path, meta=meta)


def save_like(module: torch.nn.Module, workdir: Path, source: ModelHandle, pruning: list[dict[str, Any]] | None = None) -> TorchModel:
    """Save a model changed from ``source`` the way ``source`` was saved: as weights when ``source`` is weights
    plus a factory (adding ``pruning``'s channel cuts to its history), else as a whole pickled module."""
    if source.meta.get("format") == "state_dict":
        history = [*source.meta.get("pruning", []), *(pruning or [])]
        return save_torch_weights(module, workdir, source.meta["factory"], source.meta.get("kwargs", {}), history)
    return save_torch_module(module, workdir)


def save_and_reload(module: nn.Module, workdir: Path, stage: str, what: str) -> tuple[TorchModel, nn.Module]:
    """Pickle ``module`` whole and load it back exactly as the next stage will.

    Any failure (pickling a traced, quantized or user module can trip on an unpicklable attribute)
    becomes one StageError line: ``{stage}: the {what} model could not be saved and loaded back (...)``.
    """
    try:
        product = save_torch_module(module, workdir)
        return product, product.load()
    except Exception as error:  # unpicklable attributes, fx annotations, quantized tensors ...
        raise StageError(f"{stage}: the {what} model could not be saved and loaded back ({one_line(error)})") from error


FACTORY_RAISED = "{field} {call} raised {error}"
FACTORY_RETURNED = "{field} {call} returned a {kind}, not a torch.nn.Module"


def build_module(
    factory: str,
    kwargs: dict[str, Any],
    field: str,
    *,
    raised: str = FACTORY_RAISED,
    returned: str = FACTORY_RETURNED,
) -> nn.Module:
    """Call the ``factory`` reference ('module:callable') with ``kwargs``; RecipeError unless it gives an nn.Module.

    ``field`` names the recipe field (``model.factory``, ``distill: student.factory``) in every error.
    ``raised`` and ``returned`` word the two factory errors; their placeholders are ``field``, ``factory``,
    ``call`` (``factory(**kwargs)``), ``error`` (``Type: first line``), ``error_type`` and ``error_text``
    (the whole message) for ``raised``, and ``kind`` (the returned type's name) for ``returned``.
    """
    build = resolve_callable(factory, field)
    names = {"field": field, "factory": factory, "call": f"{factory}(**{kwargs})"}
    try:
        module = build(**kwargs)
    except Exception as error:  # the user's factory failed: say which one and why
        detail = {"error": one_line(error), "error_type": type(error).__name__, "error_text": str(error)}
        raise RecipeError(raised.format(**names, **detail)) from error
    if not isinstance(module, nn.Module):
        raise RecipeError(returned.format(**names, kind=type(module).__name__))
    return module
