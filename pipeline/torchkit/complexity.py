"""How big and how costly a torch model is: parameter counts, multiply-accumulates, weight sparsity.

MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix ops torch really
dispatches (convolutions, matmul, addmm, bmm, attention) whether a layer is a module or a functional
call; one multiply-accumulate is two of its FLOPs. Elementwise ops (activations, BatchNorm, adds) are
not counted, as is usual for MAC figures.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.torchkit.model_io import ModelIO

# The layers whose weights are pruned, counted for sparsity and whose output channels can be removed.
WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Every BatchNorm kind with per-channel statistics on dim 1 (fused into, or shrunk with, a weighted layer).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (weights and biases, not buffers such as BatchNorm statistics)."""
    return sum(parameter.numel() for parameter in module.parameters())


def count_macs(module: nn.Module, io: ModelIO, tensors: Mapping[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on ``tensors`` (every named input, the whole batch given)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        io.call(module, tensors)
    return counter.get_total_flops() // 2


def weighted_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The Conv1d/2d/3d and Linear layers of ``module`` by qualified name (each shared layer once)."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, WEIGHTED_LAYERS)}


def layer_sparsity(module: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero elements in each Conv/Linear weight, by layer name."""
    return {name: float((layer.weight == 0).float().mean()) for name, layer in weighted_layers(module).items()}


def overall_sparsity(module: nn.Module) -> float:
    """Fraction of exactly-zero elements over all Conv/Linear weights together (0.0 when there are none)."""
    weights = [layer.weight for layer in weighted_layers(module).values()]
    total = sum(weight.numel() for weight in weights)
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / total if total else 0.0
