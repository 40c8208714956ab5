"""Channel pruning on the groups ``pipeline.torchkit.channels`` finds: choose, remove, record and replay cuts.

``cut_channels`` removes the weakest channels of every prunable group: a channel's importance is the sum of its
producers' Ln weight norms (depthwise weights and BatchNorms do not vote), and returns each cut as a
``ChannelCut``: the kept channel indices and the layers that shrank with them. That history can be
replayed on a freshly built model (``replay_cuts``), so a pruned model is saved as its factory, its
pruning history and weights that load with ``torch.load(weights_only=True)``: no pickled module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import StageError
from pipeline.torchkit.channels import ChannelDependencies, ChannelGroup, traced_with_shapes
from pipeline.torchkit.model_io import ModelIO


def channel_importance(model: nn.Module, group: ChannelGroup, norm: int) -> torch.Tensor:
    """Each channel's importance: the sum of the Ln norms of its weights in every producer of the group.

    One producer gives its own norms; in a residual group every producer writing into the shared channels votes
    (a sum ranks as a mean would). Depthwise convs and BatchNorms only filter or scale the channels: they do not vote."""
    weights = [model.get_submodule(name).weight.detach() for name in group.producers]
    return sum(weight.flatten(1).norm(p=norm, dim=1) for weight in weights)


def channels_to_keep(importance: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices (ascending) of the channels to keep: all but the ``amount`` least important (at least one kept)."""
    channels = len(importance)
    removed = min(round(amount * channels), channels - 1)
    return importance.topk(channels - removed).indices.sort().values


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


def keep_depthwise(layer: nn.Module, kept: torch.Tensor) -> None:
    """Shrink a depthwise conv to the ``kept`` channels: its filters, and its inputs and groups with them."""
    keep_outputs(layer, kept)
    layer.in_channels = layer.groups = len(kept)


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
    """One recorded step of channel pruning: every producer of a channel group (one layer, or all the layers
    writing into a residual connection) kept only the ``kept`` output channels (of ``width_before``), and its
    depthwise convs, BatchNorms and readers shrank with them. JSON-ready through ``as_dict``."""

    producers: tuple[str, ...]
    width_before: int
    kept: tuple[int, ...]
    batchnorms: tuple[str, ...]
    consumers: dict[str, int]  # reader layer -> input features per channel
    depthwise: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        """The Conv/Linear layers whose output channels shrank."""
        return (*self.producers, *self.depthwise)

    def as_dict(self) -> dict[str, Any]:
        """The cut as plain JSON values (a model handle's ``pruning`` history holds these)."""
        return {"producers": list(self.producers), "depthwise": list(self.depthwise), "width_before": self.width_before,
                "kept": list(self.kept), "batchnorms": list(self.batchnorms), "consumers": dict(self.consumers)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ChannelCut":
        """The cut ``as_dict`` wrote (a history saved before joint pruning names its one ``producer``)."""
        producers = values["producers"] if "producers" in values else [values["producer"]]
        return cls(producers=tuple(producers), width_before=int(values["width_before"]), kept=tuple(values["kept"]),
                   batchnorms=tuple(values["batchnorms"]), consumers={name: int(size) for name, size in values["consumers"].items()},
                   depthwise=tuple(values.get("depthwise", ())))


def apply_cut(model: nn.Module, cut: ChannelCut) -> None:
    """Shrink the producers, depthwise convs, BatchNorms and readers of ``model`` as ``cut`` records, in place."""
    kept = torch.tensor(cut.kept, dtype=torch.long)
    for producer in cut.producers:
        keep_outputs(model.get_submodule(producer), kept)
    for depthwise in cut.depthwise:
        keep_depthwise(model.get_submodule(depthwise), kept)
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
    """Remove the weakest ``amount`` of every prunable channel group's channels, in place (``tensors``: example inputs by name).

    Returns the cuts made (every choice made on the unpruned weights) and the layers left whole, with why.
    """
    traced = traced_with_shapes(model, io, tensors)
    groups, skipped = ChannelDependencies(traced).groups()
    if not groups:
        reasons = "; ".join(f"{layer}: {reason}" for layer, reason in skipped.items()) or "it has no Conv/Linear layer"
        raise StageError(f"prune: no layer's output channels can be removed ({reasons}); try method: magnitude")
    cuts = [
        ChannelCut(
            producers=tuple(group.producers), width_before=group.width,
            kept=tuple(int(index) for index in channels_to_keep(channel_importance(model, group, norm), amount)),
            batchnorms=tuple(group.batchnorms), consumers=dict(group.consumers), depthwise=tuple(group.depthwise),
        )
        for group in groups
    ]
    for cut in cuts:
        apply_cut(model, cut)
    return cuts, skipped
