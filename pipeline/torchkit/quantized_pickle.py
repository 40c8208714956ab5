"""Make torch's quantized convolutions picklable, so a quantized model saves and loads like any module.

torch's quantized convs cannot be pickled whole (pytorch/pytorch#25137, still open): their tuple
``__setstate__`` runs on a Module never initialised, so the loaded conv has no ``_modules`` and a
quantized GraphModule fails to unpickle. Importing this module registers a ``copyreg`` reducer that
pickles them through their own state instead; ``pipeline.torchkit.handles`` imports it, so every module the
store saves and loads goes through it.
"""

from __future__ import annotations

import copyreg
from typing import Any, Iterable

import torch.ao.nn.intrinsic.quantized  # noqa: F401  (defines the fused quantized conv classes registered below)
from torch import nn
from torch.ao.nn.quantized.modules.conv import _ConvNd as QuantizedConv


def rebuild_quantized_conv(cls: type[QuantizedConv], state: tuple) -> QuantizedConv:
    """Unpickle a quantized conv the way its own ``__deepcopy__`` builds one: Module init, then its state."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


def reduce_quantized_conv(module: QuantizedConv) -> tuple[Any, tuple]:
    """Pickle a quantized conv as its class and ``__getstate__`` tuple (weights, scale, zero point, shape)."""
    return rebuild_quantized_conv, (type(module), module.__getstate__())


def subclasses(cls: type) -> Iterable[type]:
    """Every subclass of ``cls``, at any depth."""
    for subclass in cls.__subclasses__():
        yield subclass
        yield from subclasses(subclass)


for quantized_conv_class in (QuantizedConv, *subclasses(QuantizedConv)):
    copyreg.pickle(quantized_conv_class, reduce_quantized_conv)
