"""Rebuild each ``nn.MultiheadAttention`` of a model with separate projections, checked on the layer's own calls.

torch's ``quantize_dynamic`` leaves MultiheadAttention's packed ``in_proj_weight`` in FP32; rebuilt as
``pipeline.torchkit.attention.SplitProjectionAttention`` its Q/K/V/output projections are plain ``nn.Linear``
layers that dynamic INT8 quantizes. Each rebuild must give the layer's outputs on the example batch; a layer that
cannot be rebuilt, or differs, stays as it was, with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import one_line
from pipeline.torchkit.attention import SplitProjectionAttention, unsupported
from pipeline.torchkit.model_io import ModelIO, flatten_outputs

SPLIT_TOLERANCE = 1e-5  # largest |split - packed| attention output, relative to the output's scale


def attention_calls(model: nn.Module, layers: dict[str, nn.Module], io: ModelIO, tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Each attention layer's first call on the example batch: (args, kwargs, outputs), by layer name.

    The hooks also keep nn.TransformerEncoderLayer off its fused fast path, which would not call the layer.
    """
    calls: dict[str, tuple] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
            calls.setdefault(name, (args, kwargs, outputs))
        return record

    hooks = [layer.register_forward_hook(recorder(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            io.call(model, tensors)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def split_difference(split: nn.Module, call: tuple) -> float:
    """Largest |split - packed| output of one recorded attention call, relative to the packed outputs' scale."""
    args, kwargs, expected = call
    with torch.no_grad():
        made = flatten_outputs(split(*args, **kwargs))
    wanted = flatten_outputs(expected)
    if [path for path, _ in made] != [path for path, _ in wanted]:
        return float("inf")
    difference = max((float((a - b).abs().max()) for (_, a), (_, b) in zip(made, wanted) if a.numel()), default=0.0)
    scale = max((float(b.abs().max()) for _, b in wanted if b.numel()), default=0.0)
    return difference / max(scale, 1.0)


def split_reason(name: str, attention: nn.MultiheadAttention, calls: dict[str, tuple]) -> tuple[nn.Module | None, str | None]:
    """The attention layer rebuilt with separate projections, or None and why it stays as it is."""
    reason = unsupported(attention)
    if reason is None and name not in calls:
        reason = "not called on the example batch, so its separate-projection rebuild could not be checked"
    if reason is not None:
        return None, reason
    split = SplitProjectionAttention(attention)
    try:
        difference = split_difference(split, calls[name])
    except Exception as error:  # a call the re-implementation does not take
        return None, f"its separate-projection rebuild failed on the example batch's call ({one_line(error)[:200]})"
    if not difference <= SPLIT_TOLERANCE:
        return None, (f"its separate-projection rebuild differs from it by {difference:.3g} on the example batch "
                      f"(tolerance {SPLIT_TOLERANCE:g})")
    return split, None


def split_attention(model: nn.Module, io: ModelIO, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Swap every nn.MultiheadAttention for its separate-projection rebuild, in place; the layers kept, with why."""
    layers = {name: module for name, module in model.named_modules() if type(module) is nn.MultiheadAttention}
    calls = attention_calls(model, layers, io, tensors) if layers else {}
    kept = {}
    for name, attention in layers.items():
        split, reason = split_reason(name, attention, calls)
        if split is None:
            kept[name] = f"MultiheadAttention left as it is: {reason}"
        else:
            model.set_submodule(name, split)
    return kept
