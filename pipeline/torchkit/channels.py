"""Channel dependencies: which layers must shrink when a Conv/Linear layer loses output channels.

``ChannelDependencies`` follows each Conv/Linear layer's output through the model's torch.fx graph
(activations, pooling, dropout and flattening pass channels through) to the BatchNorm that normalises
them and the layers that read them. A layer whose channels meet other tensors (a residual add, a
concatenation), reach the model's output, or pass an op it cannot follow is not prunable and says why.
``cut_channels`` removes the weakest channels of every prunable layer and returns each cut as a
``ChannelCut``: the kept channel indices and the layers that shrank with them. That history can be
replayed on a freshly built model (``replay_cuts``), so a pruned model is saved as its factory, its
pruning history and weights that load with ``torch.load(weights_only=True)``: no pickled module.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.torchkit.complexity import BATCHNORMS, WEIGHTED_LAYERS
from pipeline.torchkit.model_io import ModelIO

# Ops that act on each channel separately and keep channels on dim 1: pruned channels pass through them.
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
PER_CHANNEL_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.dropout, F.adaptive_avg_pool2d}
PER_CHANNEL_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
JOINS = {operator.add, operator.iadd, operator.mul, operator.sub, torch.add, torch.mul, torch.cat, torch.stack, "add", "mul", "sub"}


class NotPrunable(Exception):
    """Why a layer's output channels cannot be removed (recorded in ``skipped_layers``)."""


@dataclass
class ChannelGroup:
    """A layer whose output channels can be removed, and the layers that must shrink with it."""

    producer: str
    batchnorms: list[str] = field(default_factory=list)
    # reader layer -> input features per channel (the spatial size when a feature map was flattened)
    consumers: dict[str, int] = field(default_factory=dict)


def output_width(layer: nn.Module) -> int:
    """Output channels of a Conv, output features of a Linear."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The tensor shape ShapeProp recorded for ``node`` (None for a non-tensor value)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class ChannelDependencies:
    """Which layers read each Conv/Linear layer's output channels, found on the model's fx graph."""

    def __init__(self, traced: fx.GraphModule):
        self.graph = traced.graph
        self.modules = dict(traced.named_modules())
        self.calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")

    def groups(self) -> tuple[list[ChannelGroup], dict[str, str]]:
        """Every prunable layer's group, and every other Conv/Linear layer with the reason it is skipped."""
        found, skipped = [], {}
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], WEIGHTED_LAYERS):
                try:
                    found.append(self.group_of(node))
                except NotPrunable as reason:
                    skipped[node.target] = str(reason)
        return found, skipped

    def group_of(self, producer: fx.Node) -> ChannelGroup:
        """Follow ``producer``'s output to every layer reading its channels; NotPrunable when one cannot shrink."""
        layer = self.modules[producer.target]
        self.check_producer(producer, layer)
        group = ChannelGroup(producer.target)
        pending = [(user, producer, 1) for user in producer.users]
        visited: set[fx.Node] = set()
        while pending:
            node, source, per_channel = pending.pop()
            if node in visited:
                continue
            visited.add(node)
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, WEIGHTED_LAYERS):
                group.consumers[node.target] = self.checked_consumer(node, module, source, per_channel)
                continue
            if node.op == "call_method" and node.target == "size" and node.args[1:] == (0,):
                continue  # the batch size, e.g. for x.view(x.size(0), -1)
            if isinstance(module, BATCHNORMS):
                group.batchnorms.append(self.checked_batchnorm(node, module, output_width(layer), per_channel))
            elif self.is_flatten(node, source):
                per_channel *= math.prod(shape_of(source)[2:])
            elif not self.is_per_channel(node, module):
                raise NotPrunable(self.blocker(node))
            pending += [(user, node, per_channel) for user in node.users]
        return group

    def check_producer(self, node: fx.Node, layer: nn.Module) -> None:
        """Refuse layers whose output channels are tied to something else."""
        if self.calls[node.target] != 1:
            raise NotPrunable(f"the layer is called {self.calls[node.target]} times")
        if getattr(layer, "groups", 1) != 1:
            raise NotPrunable(f"grouped/depthwise convolution (groups={layer.groups}): its channels are tied to its inputs'")
        if isinstance(layer, nn.Linear) and len(shape_of(node) or ()) != 2:
            raise NotPrunable(f"Linear on a {len(shape_of(node) or ())}-d tensor: only [batch, features] outputs are followed")

    def checked_consumer(self, node: fx.Node, layer: nn.Module, source: fx.Node, per_channel: int) -> int:
        """Input features per channel of a layer that reads the channels; NotPrunable if it cannot shrink."""
        if node.args[:1] != (source,) or self.calls[node.target] != 1:
            raise NotPrunable(f"its channels feed '{node.target}', which is shared or takes them other than as its input")
        if isinstance(layer, nn.Linear) and len(shape_of(source) or ()) != 2:
            raise NotPrunable(f"its channels feed Linear '{node.target}' on a tensor whose last dim is not the channels")
        if not isinstance(layer, nn.Linear) and layer.groups != 1:
            raise NotPrunable(f"its channels feed grouped/depthwise convolution '{node.target}' (groups={layer.groups})")
        if not isinstance(layer, nn.Linear) and per_channel != 1:
            raise NotPrunable(f"its channels feed convolution '{node.target}' after a flatten")
        return per_channel

    def checked_batchnorm(self, node: fx.Node, batchnorm: nn.Module, channels: int, per_channel: int) -> str:
        """The name of a BatchNorm that normalises exactly these channels; NotPrunable otherwise."""
        if self.calls[node.target] != 1 or per_channel != 1 or batchnorm.num_features != channels:
            raise NotPrunable(f"its channels feed BatchNorm '{node.target}', which is shared or normalises other features")
        return node.target

    def is_flatten(self, node: fx.Node, source: fx.Node) -> bool:
        """A flatten/view/reshape from [N, C, ...] to [N, C * ...]: channel c becomes a run of features."""
        if node.op not in ("call_function", "call_method", "call_module") or node.args[:1] != (source,):
            return False
        is_reshape = isinstance(self.modules.get(node.target), nn.Flatten) if node.op == "call_module" else node.target in RESHAPES
        before, after = shape_of(source), shape_of(node)
        return is_reshape and before is not None and len(before) >= 2 and after == (before[0], math.prod(before[1:]))

    def is_per_channel(self, node: fx.Node, module: nn.Module | None) -> bool:
        """True for ops that act on each channel separately (activations, pooling, dropout)."""
        if node.op == "call_module":
            return isinstance(module, PER_CHANNEL_MODULES)
        if node.op == "call_method":
            return node.target in PER_CHANNEL_METHODS
        return node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS

    @staticmethod
    def blocker(node: fx.Node) -> str:
        """Why following the channels stops at ``node``."""
        if node.op == "output":
            return "its channels are the model's output (a classifier's outputs are never pruned)"
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in JOINS:
            return f"its channels meet other tensors in '{name}' ({node.name}): a residual add or concatenation, prunable only jointly"
        return f"its channels reach '{name}' ({node.name}), an op prune cannot follow"


def untraceable_forward(model: nn.Module) -> str:
    """A clause naming a forward() construct torch.fx's symbolic tracing cannot follow, or '' when none is seen.

    A decorated forward (Hugging Face models wrap theirs, e.g. ``can_return_tuple``) hides its real arguments from fx.
    """
    forward = type(model).forward
    if hasattr(forward, "__wrapped__"):
        code = forward.__code__
        decorator = f"{code.co_name} in {Path(code.co_filename).name}"
        return f": {type(model).__name__}.forward() is wrapped by a decorator ({decorator}), which torch.fx cannot trace through"
    return ""


def placeholder_values(model: nn.Module, traced: fx.GraphModule, io: ModelIO, tensors: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    """The traced graph's placeholders filled from the named inputs, as ``model`` is called (by keyword or in order)."""
    args, kwargs = io.arguments(model, tensors)
    bound = inspect.signature(traced.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args)


def traced_with_shapes(model: nn.Module, io: ModelIO, tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """The model traced by torch.fx with each node's tensor shape on the example inputs; StageError if untraceable."""
    try:
        traced = fx.symbolic_trace(model)
        ShapeProp(traced).propagate(*placeholder_values(model, traced, io, tensors))
    except Exception as error:  # fx cannot trace this forward() (control flow on tensor values, a keyword-only HF forward, ...)
        raise StageError(
            f"prune: method: channels needs a torch.fx trace of the model to find which layers read each layer's "
            f"channels, and tracing failed ({one_line(error)[:300]}){untraceable_forward(model)}; "
            "make forward() traceable or use method: magnitude"
        ) from error
    return traced


def channels_to_keep(weight: torch.Tensor, amount: float, norm: int) -> torch.Tensor:
    """Indices of the output channels to keep: all but the ``amount`` with the smallest Ln norm (at least one kept)."""
    channels = weight.shape[0]
    removed = min(round(amount * channels), channels - 1)
    mask = prune.LnStructured(amount=removed, n=norm, dim=0).compute_mask(weight, torch.ones_like(weight))
    return mask.flatten(1).any(dim=1).nonzero().flatten()


def slice_parameter(owner: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` along ``dim`` of a parameter or buffer (a missing bias is left alone)."""
    tensor = getattr(owner, name)
    if tensor is None:
        return
    kept = tensor.detach().index_select(dim, index).clone()
    setattr(owner, name, nn.Parameter(kept, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else kept)


def keep_outputs(layer: nn.Module, kept: torch.Tensor) -> None:
    """Shrink a Conv/Linear to the ``kept`` output channels."""
    slice_parameter(layer, "weight", kept, 0)
    slice_parameter(layer, "bias", kept, 0)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(kept)
    else:
        layer.out_channels = len(kept)


def keep_inputs(layer: nn.Module, kept: torch.Tensor, per_channel: int) -> None:
    """Shrink a Conv/Linear to the inputs of the ``kept`` channels (``per_channel`` features each)."""
    features = (kept[:, None] * per_channel + torch.arange(per_channel)).flatten()
    slice_parameter(layer, "weight", features, 1)
    if isinstance(layer, nn.Linear):
        layer.in_features = len(features)
    else:
        layer.in_channels = len(features)


def keep_batchnorm(batchnorm: nn.Module, kept: torch.Tensor) -> None:
    """Shrink a BatchNorm to the ``kept`` channels, statistics included."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        slice_parameter(batchnorm, name, kept, 0)
    batchnorm.num_features = len(kept)


@dataclass(frozen=True)
class ChannelCut:
    """One recorded step of channel pruning: ``producer`` kept only the ``kept`` output channels (of
    ``width_before``), and its BatchNorms and readers shrank with it. JSON-ready through ``as_dict``."""

    producer: str
    width_before: int
    kept: tuple[int, ...]
    batchnorms: tuple[str, ...]
    consumers: dict[str, int]  # reader layer -> input features per channel

    def as_dict(self) -> dict[str, Any]:
        """The cut as plain JSON values (a model handle's ``pruning`` history holds these)."""
        return {"producer": self.producer, "width_before": self.width_before, "kept": list(self.kept),
                "batchnorms": list(self.batchnorms), "consumers": dict(self.consumers)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ChannelCut":
        """The cut ``as_dict`` wrote."""
        return cls(producer=values["producer"], width_before=int(values["width_before"]), kept=tuple(values["kept"]),
                   batchnorms=tuple(values["batchnorms"]), consumers={name: int(size) for name, size in values["consumers"].items()})


def apply_cut(model: nn.Module, cut: ChannelCut) -> None:
    """Shrink the producer, its BatchNorms and its readers of ``model`` as ``cut`` records, in place."""
    kept = torch.tensor(cut.kept, dtype=torch.long)
    keep_outputs(model.get_submodule(cut.producer), kept)
    for batchnorm in cut.batchnorms:
        keep_batchnorm(model.get_submodule(batchnorm), kept)
    for consumer, per_channel in cut.consumers.items():
        keep_inputs(model.get_submodule(consumer), kept, per_channel)


def replay_cuts(model: nn.Module, history: list[dict[str, Any]]) -> nn.Module:
    """Apply a recorded pruning history to a freshly built model, so its pruned weights load into it."""
    for values in history:
        apply_cut(model, ChannelCut.from_dict(values))
    return model


def cut_channels(
    model: nn.Module, io: ModelIO, tensors: Mapping[str, torch.Tensor], amount: float, norm: int
) -> tuple[list[ChannelCut], dict[str, str]]:
    """Remove the weakest ``amount`` of every prunable layer's output channels, in place (``tensors``: example inputs by name).

    Returns the cuts made (every choice made on the unpruned weights) and the layers left whole, with why.
    """
    traced = traced_with_shapes(model, io, tensors)
    groups, skipped = ChannelDependencies(traced).groups()
    if not groups:
        reasons = "; ".join(f"{layer}: {reason}" for layer, reason in skipped.items()) or "it has no Conv/Linear layer"
        raise StageError(f"prune: no layer's output channels can be removed ({reasons}); try method: magnitude")
    cuts = [
        ChannelCut(
            producer=group.producer, width_before=output_width(model.get_submodule(group.producer)),
            kept=tuple(int(index) for index in channels_to_keep(model.get_submodule(group.producer).weight, amount, norm)),
            batchnorms=tuple(group.batchnorms), consumers=dict(group.consumers),
        )
        for group in groups
    ]
    for cut in cuts:
        apply_cut(model, cut)
    return cuts, skipped
