"""Prune a torch model: zero the smallest weights (``magnitude``) or remove whole channels (``channels``).

``magnitude`` masks the smallest-|w| elements of every Conv/Linear weight with ``torch.nn.utils.prune``
(per layer, or ranked across all layers with ``global: true``) and makes the zeros permanent with
``prune.remove``: the saved model has the same shapes, no masks and no hooks. ``channels`` traces the
model with ``torch.fx`` and builds its ``ChannelDependencies`` (``pipeline.torchkit.channels``): for each
Conv/Linear layer, the BatchNorm and the layers that read its output channels (through activations,
pooling and flattening). The channels with the smallest L1/L2 weight norm are cut from the layer, that BatchNorm and those readers,
so the saved model is really smaller. A layer whose channels meet others in a residual add or a
concatenation, reach the model's output or an op prune cannot follow is left whole and listed in
``skipped_layers`` with the reason. Either way the model can be fine-tuned on the recipe's train data
(masks stay in force meanwhile), and eval top-1 is recorded before, after pruning and after fine-tuning.
An input saved as weights and a factory (``strip_optimizer``'s) gives weights, the factory and the
pruning history (each cut's kept channel indices): it loads with ``weights_only=True``; any other input
gives a whole pickled module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.channels import ChannelCut, cut_channels
from pipeline.torchkit.complexity import count_macs, count_params, layer_sparsity, overall_sparsity, weighted_layers
from pipeline.torchkit.evaluate import compare_logits, predict_all, top1
from pipeline.torchkit.handles import ModelHandle, save_like
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model


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


def prune_channels(model: nn.Module, example: torch.Tensor, params: Params) -> tuple[list[ChannelCut], dict[str, object]]:
    """Remove the weakest output channels of every prunable layer, in place; the cuts and the channel metrics."""
    cuts, skipped = cut_channels(model, example, params.amount, params.norm)
    channels = {cut.producer: [cut.width_before, len(cut.kept)] for cut in cuts}
    pruned_layers = sum(after < before for before, after in channels.values())
    return cuts, {"pruned_layers": pruned_layers, "channels": channels, "skipped_layers": skipped}


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
    """Prune, optionally fine-tune, make the pruning permanent and save it (weights and history where the input was weights)."""
    _, source = only_input(inputs)
    model = source.load()
    example = ctx.data.example_batch()
    eval_inputs, eval_labels = ctx.data.eval_arrays
    reference = predict_all(TorchRunner(model), eval_inputs, description=f"{ctx.name}: eval before")
    params_before, macs_before = count_params(model), count_macs(model, example[:1])
    masked_layers: list[nn.Module] = []
    cuts: list[ChannelCut] = []
    if params.method == "channels":
        cuts, method_metrics = prune_channels(model, example, params)
    else:
        masked_layers, method_metrics = mask_by_magnitude(model, params), {}
    metrics = {"top1_before": top1(reference, eval_labels)}
    metrics |= eval_figures(model, ctx, reference, "after_prune")
    if params.finetune is not None:
        _, metrics["finetune_loss"] = train_model(
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
    product = save_like(model, ctx.workdir, source, [cut.as_dict() for cut in cuts])
    metrics["saved_as"] = "weights and pruning history" if product.meta.get("format") == "state_dict" else "whole module"
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
