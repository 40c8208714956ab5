"""Prune a torch model: zero the smallest weights (``magnitude``) or remove whole channels (``channels``).

``magnitude`` masks the smallest-|w| elements of every Conv/Linear weight with ``torch.nn.utils.prune``
(per layer, or ranked across all layers with ``global: true``) and makes the zeros permanent with
``prune.remove``: the saved model has the same shapes, no masks and no hooks. ``channels`` traces the
model with ``torch.fx`` and builds its ``ChannelDependencies``: for each Conv/Linear layer, the BatchNorm
and the layers that read its output channels (through activations, pooling and flattening). The
channels with the smallest L1/L2 weight norm are cut from the layer, that BatchNorm and those readers,
so the saved model is really smaller. A layer whose channels meet others in a residual add or a
concatenation, reach the model's output or an op prune cannot follow is left whole and listed in
``skipped_layers`` with the reason. Either way the model can be fine-tuned on the recipe's train data
(masks stay in force meanwhile), and eval top-1 is recorded before, after pruning and after fine-tuning.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.complexity import (
    BATCHNORMS,
    WEIGHTED_LAYERS,
    count_macs,
    count_params,
    layer_sparsity,
    overall_sparsity,
    weighted_layers,
)
from pipeline.torchkit.evaluate import compare_logits, predict_all, top1
from pipeline.torchkit.handles import ModelHandle, save_torch_module
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_classifier


class Finetune(StageParams):
    """Training after pruning, on the recipe's train data (Adam, cross-entropy)."""

    epochs: int = Field(ge=1, description="passes over the train data")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")


class Params(StageParams):
    """What to prune, how much, and whether to fine-tune afterwards."""

    model_config = ConfigDict(serialize_by_alias=True)  # manifests show `global`, as recipes write it

    method: Literal["magnitude", "channels"] = Field(
        description="magnitude: zero the smallest weights (same shapes, sparse); "
        "channels: remove whole output channels and shrink every layer that reads them"
    )
    amount: float = Field(
        gt=0, lt=1, description="fraction of weights (magnitude) or of each prunable layer's output channels (channels) removed"
    )
    global_: bool = Field(
        default=False,
        alias="global",
        description="magnitude only: rank weights across all layers together instead of pruning each layer by amount",
    )
    norm: Literal[1, 2] = Field(default=1, description="channels only: rank channels by the L1 or L2 norm of their weights")
    finetune: Finetune | None = Field(default=None, description="train after pruning: {epochs, lr}; none by default")

    @model_validator(mode="after")
    def global_only_for_magnitude(self) -> "Params":
        """``global`` ranks single weights; channel pruning always removes ``amount`` of each layer's channels."""
        if self.global_ and self.method != "magnitude":
            raise ValueError("global: true applies to method: magnitude only; remove it for method: channels")
        return self


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


def traced_with_shapes(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model traced by torch.fx with each node's tensor shape on ``example``; StageError if untraceable."""
    try:
        traced = fx.symbolic_trace(model)
        ShapeProp(traced).propagate(example)
    except Exception as error:  # fx cannot trace this forward() (Python control flow on tensor values, ...)
        raise StageError(
            f"prune: method: channels needs a torch.fx trace of the model to find which layers read each layer's "
            f"channels, and tracing failed ({one_line(error)}); make forward() traceable or use method: magnitude"
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


def prune_channels(model: nn.Module, example: torch.Tensor, params: Params) -> dict[str, object]:
    """Remove the weakest output channels of every prunable layer, in place; the channel metrics."""
    traced = traced_with_shapes(model, example)
    groups, skipped = ChannelDependencies(traced).groups()
    if not groups:
        reasons = "; ".join(f"{layer}: {reason}" for layer, reason in skipped.items()) or "it has no Conv/Linear layer"
        raise StageError(f"prune: no layer's output channels can be removed ({reasons}); try method: magnitude")
    modules = dict(traced.named_modules())  # the model's own layers: traced shares them
    kept_by_layer = {group.producer: channels_to_keep(modules[group.producer].weight, params.amount, params.norm) for group in groups}
    channels = {}
    for group in groups:  # every choice above was made on the unpruned weights
        kept = kept_by_layer[group.producer]
        channels[group.producer] = [output_width(modules[group.producer]), len(kept)]
        keep_outputs(modules[group.producer], kept)
        for batchnorm in group.batchnorms:
            keep_batchnorm(modules[batchnorm], kept)
        for consumer, per_channel in group.consumers.items():
            keep_inputs(modules[consumer], kept, per_channel)
    pruned_layers = sum(after < before for before, after in channels.values())
    return {"pruned_layers": pruned_layers, "channels": channels, "skipped_layers": skipped}


def mask_by_magnitude(model: nn.Module, params: Params) -> list[nn.Module]:
    """Mask the smallest-|w| weights of every Conv/Linear layer (masks stay until ``prune.remove``)."""
    layers = list(weighted_layers(model).values())
    if not layers:
        raise StageError("prune: the model has no Conv1d/2d/3d or Linear layer, so there is nothing to prune")
    if params.global_:
        prune.global_unstructured([(layer, "weight") for layer in layers], prune.L1Unstructured, amount=params.amount)
    else:
        for layer in layers:
            prune.l1_unstructured(layer, "weight", amount=params.amount)
    return layers


def eval_figures(model: nn.Module, ctx: StageContext, reference: np.ndarray, when: str) -> dict[str, float]:
    """Eval top-1 of ``model`` and its agreement with the unpruned model's predictions."""
    eval_inputs, eval_labels = ctx.data.eval_arrays
    logits = predict_all(TorchRunner(model), eval_inputs, description=f"{ctx.name}: eval {when}")
    compared = compare_logits(reference, logits, eval_labels)
    return {f"top1_{when}": compared["top1"], f"agreement_{when}": compared["agreement"]}


def checked_output_shape(model: nn.Module, example: torch.Tensor, expected: tuple[int, ...]) -> None:
    """StageError when the pruned model fails on ``example`` or changes the output shape."""
    try:
        shape = TorchRunner(model).predict(example.numpy()).shape
    except Exception as error:  # e.g. a forward() that hard-codes a channel count in a view()
        raise StageError(f"prune: the pruned model fails on a real batch ({one_line(error)}); use method: magnitude") from error
    if shape != expected:
        raise StageError(f"prune: the pruned model's output shape {shape} differs from the original's {expected}")


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Prune, optionally fine-tune, make the pruning permanent and save the whole pruned module."""
    model = only_input(inputs)[1].load()
    example = ctx.data.example_batch()
    eval_inputs, eval_labels = ctx.data.eval_arrays
    reference = predict_all(TorchRunner(model), eval_inputs, description=f"{ctx.name}: eval before")
    params_before, macs_before = count_params(model), count_macs(model, example[:1])
    masked_layers: list[nn.Module] = []
    if params.method == "channels":
        method_metrics = prune_channels(model, example, params)
    else:
        masked_layers, method_metrics = mask_by_magnitude(model, params), {}
    metrics = {"top1_before": top1(reference, eval_labels)}
    metrics |= eval_figures(model, ctx, reference, "after_prune")
    if params.finetune is not None:
        _, metrics["finetune_loss"] = train_classifier(
            model, ctx.data.train, params.finetune.epochs, params.finetune.lr, description=f"{ctx.name}: finetune"
        )
        metrics |= eval_figures(model, ctx, reference, "after_finetune")
    for layer in masked_layers:
        prune.remove(layer, "weight")  # the zeros move into the weight; mask and hook are dropped
    checked_output_shape(model, example, reference[: len(example)].shape)
    params_after, macs_after = count_params(model), count_macs(model, example[:1])
    metrics |= {
        "method": params.method,
        "amount": params.amount,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_ratio": macs_after / macs_before if macs_before else None,
        "sparsity": overall_sparsity(model),
        "layer_sparsity": layer_sparsity(model),
        **method_metrics,
    }
    return StageOutput(product=save_torch_module(model, ctx.workdir), metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
