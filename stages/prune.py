"""Prune a torch model: zero the smallest weights (``magnitude``) or remove whole channels (``channels``).

``magnitude`` masks the smallest-|w| elements of every Conv/Linear weight with ``torch.nn.utils.prune``
(per layer, or ranked across all layers with ``global: true``) and makes the zeros permanent with
``prune.remove``: the saved model has the same shapes, no masks and no hooks. ``channels`` traces the
model with ``torch.fx`` and builds its ``ChannelDependencies`` (``pipeline.torchkit.channels``): channel groups,
each the Conv/Linear layers producing the same channels (one layer, or every layer writing into a residual
add, its shortcut's conv included), the depthwise convs and BatchNorms that filter them and the layers that
read them (through activations, pooling and flattening). The ``amount`` of each group's channels with the smallest
L1/L2 weight norm (summed over the group's producers) are cut from all of them, so the saved model is really smaller.
A group that meets the model's input, reaches its output (the classifier), a concatenation, a grouped (not
depthwise) convolution or an op prune cannot follow is left whole and its layers are listed in ``skipped_layers``
with the reason; ``joint_groups`` lists the groups of several layers, ``channels_removed_fraction`` the share of all
output channels removed, next to ``macs_ratio`` and ``params_ratio``. Either way the model can be fine-tuned on the
recipe's train data (masks stay in force meanwhile, the loss the recipe's task's), and the recipe's metric (``metric``, e.g. top-1 or
MSE) is recorded before, after pruning and after fine-tuning (``value_before``, ``value_after_prune``, ...; ``value``
and ``delta`` for the final model; ``top1_*`` keys too for classification).
An input saved as weights and a factory (``strip_optimizer``'s) gives weights, the factory and the
pruning history (each cut's kept channel indices): it loads with ``weights_only=True``; any other input
gives a whole pickled module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.channel_cuts import ChannelCut, cut_channels
from pipeline.torchkit.channels import output_width
from pipeline.torchkit.complexity import count_macs, count_params, layer_sparsity, overall_sparsity, weighted_layers
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, save_like
from pipeline.torchkit.model_io import Feeds, feed_rows, feeds_length
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model


class Finetune(StageParams):
    """Training after pruning, on the recipe's train data (Adam, the task's loss)."""

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


def prune_channels(ctx: StageContext, model: nn.Module, example: Feeds, params: Params) -> tuple[list[ChannelCut], dict[str, object]]:
    """Remove the weakest output channels of every prunable channel group, in place; the cuts and the channel metrics.

    ``channels_removed_fraction`` (of every Conv/Linear layer's output channels, skipped layers included) is the
    reduction reached against ``amount``; ``joint_groups`` lists the groups of several layers pruned together."""
    widths = [output_width(layer) for layer in weighted_layers(model).values()]
    cuts, skipped = cut_channels(model, ctx.io, ctx.io.tensors(example), params.amount, params.norm)
    channels = {layer: [cut.width_before, len(cut.kept)] for cut in cuts for layer in cut.layers}
    removed = sum(before - after for before, after in channels.values())
    joint_groups = [
        {"layers": list(cut.layers), "channels_before": cut.width_before, "channels_after": len(cut.kept)}
        for cut in cuts
        if len(cut.layers) > 1
    ]
    return cuts, {
        "pruned_layers": sum(after < before for before, after in channels.values()),
        "channels": channels,
        "channels_removed_fraction": removed / sum(widths),
        "joint_groups": joint_groups,
        "skipped_layers": skipped,
    }


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


def eval_figures(ctx: StageContext, model: nn.Module, reference: np.ndarray, targets: np.ndarray, when: str) -> dict[str, object]:
    """The recipe's metric and figures of ``model`` on the eval split, and its agreement with the unpruned model."""
    predictions = predict_all(TorchRunner(model, ctx.io), ctx.data.eval_set.inputs, description=f"{ctx.name}: eval {when}")
    compared = ctx.scoring.compare(reference, predictions, targets)
    figures = {f"value_{when}": compared["value"], f"figures_{when}": compared["figures"], f"agreement_{when}": compared["agreement"]}
    return figures | ({f"top1_{when}": compared["top1"]} if "top1" in compared else {})


def checked_output_shape(ctx: StageContext, model: nn.Module, example: Feeds, expected: tuple[int, ...]) -> None:
    """StageError when the pruned model fails on ``example`` or changes the prediction's shape."""
    try:
        shape = TorchRunner(model, ctx.io).predict(example).shape
    except Exception as error:  # e.g. a forward() that hard-codes a channel count in a view()
        raise StageError(f"prune: the pruned model fails on a real batch ({one_line(error)}); use method: magnitude") from error
    if shape != expected:
        raise StageError(f"prune: the pruned model's output shape {shape} differs from the original's {expected}")


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Prune, optionally fine-tune, make the pruning permanent and save it (weights and history where the input was weights)."""
    _, source = only_input(inputs)
    model = source.load()
    evaluation = ctx.data.eval_set
    example = evaluation.example()
    one_row = ctx.io.tensors(feed_rows(example, slice(0, 1)))
    reference = predict_all(TorchRunner(model, ctx.io), evaluation.inputs, description=f"{ctx.name}: eval before")
    targets = ctx.scoring.task.prepare_targets(evaluation.targets, reference)
    params_before, macs_before = count_params(model), count_macs(model, ctx.io, one_row)
    masked_layers: list[nn.Module] = []
    cuts: list[ChannelCut] = []
    if params.method == "channels":
        cuts, method_metrics = prune_channels(ctx, model, example, params)
    else:
        masked_layers, method_metrics = mask_by_magnitude(model, params), {}
    unpruned = ctx.scoring.task.figures(reference, targets)
    metric = ctx.scoring.metric(unpruned).name
    metrics: dict[str, object] = {"metric": metric, "value_before": unpruned[metric], "figures_before": unpruned}
    metrics |= eval_figures(ctx, model, reference, targets, "after_prune")
    if "top1_after_prune" in metrics:  # classification
        metrics["top1_before"] = unpruned["top1"]
    last = "after_prune"
    if params.finetune is not None:
        _, metrics["finetune_loss"] = train_model(
            model, ctx.data.train, params.finetune.epochs, params.finetune.lr, description=f"{ctx.name}: finetune",
            io=ctx.io, task=ctx.scoring.task,
        )
        metrics |= eval_figures(ctx, model, reference, targets, "after_finetune")
        last = "after_finetune"
    metrics |= {"value": metrics[f"value_{last}"], "delta": metrics[f"value_{last}"] - metrics["value_before"]}
    for layer in masked_layers:
        prune.remove(layer, "weight")  # the zeros move into the weight; mask and hook are dropped
    checked_output_shape(ctx, model, example, reference[: feeds_length(example)].shape)
    params_after, macs_after = count_params(model), count_macs(model, ctx.io, one_row)
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
    product = save_like(model, ctx.workdir, source, [cut.as_dict() for cut in cuts])
    metrics["saved_as"] = "weights and pruning history" if product.meta.get("format") == "state_dict" else "whole module"
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
