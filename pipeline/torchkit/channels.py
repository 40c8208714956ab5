"""Channel groups: which layers must shrink together when channels are removed, found on the model's fx graph.

``ChannelDependencies`` follows every tensor of the model's torch.fx graph and gives each one the channel
group its dim-1 channels belong to. A Conv/Linear layer starts a group with its output channels; activations,
pooling, dropout and flattening pass channels through; a BatchNorm normalises them; a depthwise convolution
(groups == in_channels == out_channels) filters each channel alone, so it joins the group of the layer feeding
it. An elementwise ``add``/``sub``/``mul`` of equally wide tensors (a residual connection, identity or 1x1
projection shortcut, a gate) merges its operands' groups into one: channel c of every producer in the group is
the same channel, and is kept or removed in all of them and in every layer reading the group.
A group that meets the model's input, reaches the model's output (a classifier's outputs), a concatenation or
an op prune cannot follow keeps its size, and its layers are listed with the reason.
Removing the channels is ``pipeline.torchkit.channel_cuts``.
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

from pipeline.errors import StageError, one_line
from pipeline.torchkit.complexity import BATCHNORMS, WEIGHTED_LAYERS
from pipeline.torchkit.model_io import ModelIO

# Ops that act on each channel separately and keep channels on dim 1: pruned channels pass through them.
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
PER_CHANNEL_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.dropout, F.adaptive_avg_pool2d,
}
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
# Elementwise ops of equally wide tensors: channel c of every operand is channel c of the result.
ELEMENTWISE = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, torch.add, torch.sub, torch.mul,
    "add", "add_", "sub", "sub_", "mul", "mul_",
}
CONCATS = {torch.cat, torch.concat, torch.stack}
OUTPUT_REASON = "its channels are the model's output (a classifier's outputs are never pruned)"


@dataclass
class ChannelGroup:
    """Channels pruned together: the layers producing them and the layers that must shrink with them.

    ``pinned`` says why the group keeps its size ('' when it can be pruned)."""

    width: int
    producers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)  # depthwise convs filtering the channels one by one
    batchnorms: list[str] = field(default_factory=list)
    # reader layer -> input features per channel (the spatial size when a feature map was flattened)
    consumers: dict[str, int] = field(default_factory=dict)
    pinned: str = ""

    @property
    def layers(self) -> list[str]:
        """The Conv/Linear layers whose output channels shrink: producers, then depthwise convs."""
        return [*self.producers, *self.depthwise]

    def absorb(self, other: "ChannelGroup") -> None:
        """Take ``other``'s layers (the two groups' channels met in an elementwise op); the first reason to pin wins."""
        self.producers += other.producers
        self.depthwise += other.depthwise
        self.batchnorms += other.batchnorms
        self.consumers |= other.consumers
        self.pinned = self.pinned or other.pinned


def output_width(layer: nn.Module) -> int:
    """Output channels of a Conv, output features of a Linear."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The tensor shape ShapeProp recorded for ``node`` (None for a non-tensor value or a constant argument)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution that filters each input channel alone into one output channel (groups == in == out)."""
    return not isinstance(layer, nn.Linear) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def op_name(node: fx.Node) -> str:
    """A readable name of the op a node calls."""
    return getattr(node.target, "__name__", str(node.target))


class ChannelDependencies:
    """The channel group of every tensor of a model's fx graph (traced with shapes), merged at elementwise joins.

    Groups are merged with a union-find: ``self.parent[i]`` leads to the group that absorbed group ``i``."""

    def __init__(self, traced: fx.GraphModule):
        self.graph = traced.graph
        self.modules = dict(traced.named_modules())
        self.calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
        self.found: list[ChannelGroup] = []
        self.parent: list[int] = []
        self.owner: dict[str, int] = {}  # Conv/Linear layer -> the group its output channels belong to
        self.carried: dict[fx.Node, tuple[int, int]] = {}  # tensor -> (its channel group, input features per channel)
        for node in self.graph.nodes:
            self.visit(node)

    def groups(self) -> tuple[list[ChannelGroup], dict[str, str]]:
        """Every prunable group (in graph order), and every Conv/Linear layer left whole with the reason."""
        prunable, skipped, seen = [], {}, set()
        order = {node.target: position for position, node in enumerate(self.graph.nodes) if node.op == "call_module"}
        for node in self.graph.nodes:
            if node.op != "call_module" or node.target not in self.owner:
                continue
            index = self.root(self.owner[node.target])
            group = self.found[index]
            if group.pinned:
                skipped[node.target] = group.pinned
            elif index not in seen:
                seen.add(index)
                for members in (group.producers, group.depthwise, group.batchnorms):
                    members.sort(key=order.__getitem__)  # graph order, whichever operand of an add came first
                prunable.append(group)
        return prunable, skipped

    def root(self, index: int) -> int:
        """The group that absorbed group ``index`` (itself when none did)."""
        while self.parent[index] != index:
            index = self.parent[index]
        return index

    def group(self, node: fx.Node) -> ChannelGroup:
        """The channel group ``node``'s tensor carries."""
        return self.found[self.root(self.carried[node][0])]

    def start(self, node: fx.Node, width: int, pinned: str = "", producer: str | None = None) -> None:
        """A new channel group for ``node``'s tensor (``producer``: the layer making it)."""
        self.found.append(ChannelGroup(width=width, producers=[producer] if producer else [], pinned=pinned))
        self.parent.append(len(self.parent))
        self.carried[node] = (len(self.parent) - 1, 1)
        if producer:
            self.owner[producer] = len(self.parent) - 1

    def pin(self, node: fx.Node, reason: str) -> None:
        """Keep the size of the group ``node`` carries (a first reason stays)."""
        if node in self.carried:
            group = self.group(node)
            group.pinned = group.pinned or reason

    def merge(self, nodes: list[fx.Node]) -> int:
        """Merge the groups the ``nodes`` carry into the first one's; its index."""
        first = self.root(self.carried[nodes[0]][0])
        for node in nodes[1:]:
            other = self.root(self.carried[node][0])
            if other != first:
                self.found[first].absorb(self.found[other])
                self.parent[other] = first
        return first

    def visit(self, node: fx.Node) -> None:
        """Give ``node``'s tensor its channel group, or pin the groups reaching it when it ties channels to others."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            if len(shape_of(node) or ()) >= 2:
                self.start(node, shape_of(node)[1], f"its channels meet the model's input '{node.target}', which keeps its size")
        elif node.op == "get_attr":
            return  # a constant: an elementwise op with a constant of the channels' width pins them
        elif node.op == "output":
            for value in node.all_input_nodes:
                self.pin(value, OUTPUT_REASON)
        elif isinstance(module, WEIGHTED_LAYERS):
            self.visit_layer(node, module, source)
        elif isinstance(module, BATCHNORMS):
            self.visit_batchnorm(node, module, source)
        elif node.op == "call_method" and node.target == "size" and node.args[1:] == (0,):
            return  # the batch size, e.g. for x.view(x.size(0), -1)
        elif source in self.carried and self.is_flatten(node, source):
            group, per_channel = self.carried[source]
            self.carried[node] = (group, per_channel * math.prod(shape_of(source)[2:]))
        elif source in self.carried and self.is_per_channel(node, module):
            self.carried[node] = self.carried[source]
        elif node.target in ELEMENTWISE and node.op in ("call_function", "call_method"):
            self.visit_elementwise(node)
        else:
            self.block(node)

    def visit_layer(self, node: fx.Node, layer: nn.Module, source: fx.Node | None) -> None:
        """A Conv/Linear: a depthwise conv joins its input's group; any other layer reads one group and starts another."""
        if source in self.carried:
            _, per_channel = self.carried[source]
            if is_depthwise(layer) and per_channel == 1 and self.calls[node.target] == 1:
                self.group(source).depthwise.append(node.target)
                self.carried[node] = self.carried[source]
                self.owner[node.target] = self.carried[source][0]
                return
            problem = self.consumer_problem(node, layer, source, per_channel)
            if problem:
                self.pin(source, problem)
            else:
                self.group(source).consumers[node.target] = per_channel
        self.start(node, output_width(layer), self.producer_problem(node, layer), producer=node.target)

    def consumer_problem(self, node: fx.Node, layer: nn.Module, source: fx.Node, per_channel: int) -> str:
        """Why a layer reading the channels cannot lose inputs with them ('' when it can)."""
        if self.calls[node.target] != 1:
            return f"its channels feed '{node.target}', which is shared (called {self.calls[node.target]} times)"
        if isinstance(layer, nn.Linear) and len(shape_of(source) or ()) != 2:
            return f"its channels feed Linear '{node.target}' on a tensor whose last dim is not the channels"
        if not isinstance(layer, nn.Linear) and layer.groups != 1:
            return f"its channels feed grouped convolution '{node.target}' (groups={layer.groups}), whose groups tie channels together"
        if not isinstance(layer, nn.Linear) and per_channel != 1:
            return f"its channels feed convolution '{node.target}' after a flatten"
        return ""

    def producer_problem(self, node: fx.Node, layer: nn.Module) -> str:
        """Why a layer's output channels cannot be removed ('' when they can)."""
        if self.calls[node.target] != 1:
            return f"the layer is called {self.calls[node.target]} times"
        if getattr(layer, "groups", 1) != 1:
            return (
                f"grouped convolution (groups={layer.groups}, {layer.in_channels}->{layer.out_channels} channels): its channels are "
                "tied to its groups of inputs; only depthwise ones (groups == in == out) are pruned, with the layer feeding them"
            )
        if isinstance(layer, nn.Linear) and len(shape_of(node) or ()) != 2:
            return f"Linear on a {len(shape_of(node) or ())}-d tensor: only [batch, features] outputs are followed"
        return ""

    def visit_batchnorm(self, node: fx.Node, batchnorm: nn.Module, source: fx.Node | None) -> None:
        """A BatchNorm passes its input's channels on, and shrinks with them when it normalises exactly them."""
        if source not in self.carried:
            self.block(node)
            return
        self.carried[node] = self.carried[source]
        if self.calls[node.target] != 1 or self.carried[source][1] != 1 or batchnorm.num_features != self.group(source).width:
            self.pin(source, f"its channels feed BatchNorm '{node.target}', which is shared or normalises other features")
        else:
            self.group(source).batchnorms.append(node.target)

    def visit_elementwise(self, node: fx.Node) -> None:
        """``add``/``sub``/``mul``: operands as wide as the result merge their groups (a residual connection)."""
        shape = shape_of(node)
        if len(shape or ()) < 2:
            self.block(node)
            return
        aligned = [value for value in node.all_input_nodes if len(shape_of(value) or ()) == len(shape) and shape_of(value)[1] == shape[1]]
        name = f"'{op_name(node)}' ({node.name})"
        for value in node.all_input_nodes:
            if value not in aligned:
                self.pin(value, f"its channels are broadcast over other channels in {name}")
        joined = [value for value in aligned if value in self.carried]
        if not joined:
            return
        index = self.merge(joined)
        self.carried[node] = (index, self.carried[joined[0]][1])
        if len(joined) < len(aligned):
            self.pin(node, f"its channels meet a constant tensor in {name}")
        if len({self.carried[value][1] for value in joined}) > 1:
            self.pin(node, f"its channels meet tensors flattened differently in {name}")

    def block(self, node: fx.Node) -> None:
        """An op prune cannot follow: the groups reaching it keep their size, and so does its result's."""
        for value in node.all_input_nodes:
            self.pin(value, self.blocker(node))
        if len(shape_of(node) or ()) >= 2:
            self.start(node, shape_of(node)[1], f"its channels come from '{op_name(node)}' ({node.name}), which prune does not follow")

    def is_flatten(self, node: fx.Node, source: fx.Node) -> bool:
        """A flatten/view/reshape from [N, C, ...] to [N, C * ...]: channel c becomes a run of features."""
        if node.op not in ("call_function", "call_method", "call_module"):
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
        name = f"'{op_name(node)}' ({node.name})"
        if node.target in CONCATS:
            return f"its channels are concatenated with other tensors in {name}: concatenations are not pruned"
        return f"its channels reach {name}, an op prune cannot follow"


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
