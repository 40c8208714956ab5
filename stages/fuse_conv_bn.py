"""Fold eval-mode BatchNorm into the Conv1d/2d/3d or Linear layer that feeds it.

The model is traced with ``torch.fx``; every BatchNorm whose only input is a Conv/Linear layer used by
nothing else is folded into that layer's weight and bias and removed from the graph. A model that fx
cannot trace (Python branches on tensor values, for instance) falls back to fusing neighbours inside
``nn.Sequential`` containers of the eager module (a keyword-called Hugging Face model, or an LSTM, has
no pairs there: with ``require_fusion: false`` it passes through unchanged). Either way the fused model must reproduce the
unfused one's predictions on real eval inputs (every named input, the prediction picked out of a tuple, dict or
``ModelOutput`` as ``model.output`` says), and it is saved as a whole pickled module (a traced model
becomes a ``torch.fx.GraphModule``, which no longer needs the original model class to load).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
from pydantic import Field
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.complexity import BATCHNORMS, count_params
from pipeline.torchkit.handles import ModelHandle, save_and_reload
from pipeline.torchkit.runners import TorchRunner


class Params(StageParams):
    """How closely the fused model must match the unfused one, and whether finding nothing is an error."""

    tolerance: float = Field(
        default=1e-4,
        gt=0,
        description="largest |fused - unfused| prediction difference allowed on the example batch, "
        "as a fraction of the largest |unfused output| (relative to the output's scale)",
    )
    require_fusion: bool = Field(
        default=False,
        description="fail when no Conv/Linear followed by BatchNorm was found to fuse",
    )


# Which layers may feed each BatchNorm kind: channels are dim 1 for conv outputs and BatchNorm alike.
LAYERS_FOR_BATCHNORM: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def can_fuse(layer: nn.Module, batchnorm: nn.Module) -> bool:
    """True when ``batchnorm`` (eval mode, with running statistics) can be folded into ``layer``."""
    kinds = next((layers for bn_kind, layers in LAYERS_FOR_BATCHNORM.items() if type(batchnorm) is bn_kind), ())
    if not isinstance(layer, kinds) or batchnorm.running_mean is None or batchnorm.running_var is None:
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return batchnorm.num_features == channels


def fused_layer(layer: nn.Module, batchnorm: nn.Module) -> nn.Module:
    """A new layer whose weight and bias include the BatchNorm's affine normalisation."""
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, batchnorm)
    return fuse_conv_bn_eval(layer, batchnorm)


def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path such as ``features.0.0``."""
    parent_name, _, attribute = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attribute, module)


def submodule_uses(graph: fx.Graph) -> Counter[str]:
    """How often the graph calls each submodule or reads one of its tensors (``get_attr``)."""
    uses: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] += 1
        elif node.op == "get_attr":
            uses[node.target.rpartition(".")[0]] += 1
    return uses


def fuse_traced(traced: fx.GraphModule) -> int:
    """Fold each BatchNorm of a traced model that is fed only by a Conv/Linear layer, in place."""
    modules = dict(traced.named_modules())
    uses = submodule_uses(traced.graph)
    fused_pairs = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORMS):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if uses[source.target] != 1 or uses[node.target] != 1:  # a shared layer is used elsewhere too
            continue
        layer, batchnorm = modules[source.target], modules[node.target]
        if not can_fuse(layer, batchnorm):
            continue
        set_submodule(traced, source.target, fused_layer(layer, batchnorm))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
        fused_pairs += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return fused_pairs


def fuse_sequential(model: nn.Module) -> int:
    """Fold BatchNorms into the Conv/Linear just before them inside nn.Sequential containers, in place."""
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    fused_pairs = 0
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container._modules.items())  # before replacing any of them
        for (first, layer), (second, batchnorm) in zip(children, children[1:]):
            if layer is None or batchnorm is None or uses[id(layer)] != 1 or uses[id(batchnorm)] != 1:
                continue
            if isinstance(batchnorm, BATCHNORMS) and can_fuse(layer, batchnorm):
                container._modules[first] = fused_layer(layer, batchnorm)
                container._modules[second] = nn.Identity()
                fused_pairs += 1
    return fused_pairs


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers still in the model."""
    return sum(isinstance(module, BATCHNORMS) for module in model.modules())


def check_outputs(reference: np.ndarray, fused: np.ndarray, tolerance: float) -> tuple[float, float]:
    """Largest absolute and relative output difference; StageError when over ``tolerance`` (relative)."""
    if reference.shape != fused.shape:
        raise StageError(f"fuse_conv_bn: the fused model's output shape {fused.shape} differs from the original's {reference.shape}")
    max_abs_diff = float(np.max(np.abs(reference - fused))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    relative_diff = max_abs_diff / max(scale, np.finfo(np.float32).tiny)
    if not relative_diff <= tolerance:  # also catches NaN
        raise StageError(
            f"fuse_conv_bn: fused outputs differ from the original by {max_abs_diff:.3g} "
            f"({relative_diff:.3g} of the largest output, tolerance {tolerance:g}); "
            "a BatchNorm may not act on the layer's output channels; raise 'tolerance' only if that is expected"
        )
    return max_abs_diff, relative_diff


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Fuse Conv/Linear + BatchNorm pairs, check the outputs on real eval inputs, and save the fused model."""
    model = only_input(inputs)[1].load()
    example = ctx.data.eval_set.example()
    reference = TorchRunner(model, ctx.io).predict(example)
    parameters_before = count_params(model)
    trace_error: str | None = None
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # fx cannot trace this forward() (e.g. `if` on a tensor); fall back to eager
        trace_error = one_line(error)
        fused, fused_pairs, method = model, fuse_sequential(model), "sequential"
    else:
        fused, fused_pairs, method = traced, fuse_traced(traced), "fx"
    if fused_pairs == 0:
        if params.require_fusion:
            raise StageError(
                f"fuse_conv_bn: found no Conv/Linear layer followed by a BatchNorm to fuse ({method} search, "
                f"{count_batchnorms(model)} BatchNorm layers); set require_fusion: false to pass the model through"
            )
        fused = model  # keep the original class rather than a traced copy with nothing changed
    product, reloaded = save_and_reload(fused, ctx.workdir, "fuse_conv_bn", "fused")
    max_abs_diff, relative_diff = check_outputs(reference, TorchRunner(reloaded, ctx.io).predict(example), params.tolerance)
    metrics = {
        "method": method,
        "fused_pairs": fused_pairs,
        "batchnorms_left": count_batchnorms(reloaded),
        "max_abs_diff": max_abs_diff,
        "relative_diff": relative_diff,
        "parameters_before": parameters_before,
        "parameters_after": count_params(reloaded),
        "trace_error": trace_error,
    }
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)
