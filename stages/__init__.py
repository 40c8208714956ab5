"""The stage registry: recipe ``uses`` names mapped to the module that implements each stage.

Modules are imported on first use, so listing stage names costs nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_MODULES: dict[str, str] = {
    "load_checkpoint": "stages.load_checkpoint",
    "strip_optimizer": "stages.strip_optimizer",
    "fuse_conv_bn": "stages.fuse_conv_bn",
    "export_onnx": "stages.export_onnx",
    "validate": "stages.validate",
    "benchmark": "stages.benchmark",
    "tensorrt": "stages.tensorrt",
    "precision": "stages.precision",
    "prune": "stages.prune",
    "distill": "stages.distill",
    "quantize_onnx": "stages.quantize_onnx",
    "quantize": "stages.quantize",
}


def stage_names() -> list[str]:
    """Every name a recipe's ``uses`` may take."""
    return sorted(STAGE_MODULES)


def load_stage(uses: str) -> ModuleType:
    """The module implementing ``uses`` (callers check the name with ``stage_names`` first)."""
    return importlib.import_module(STAGE_MODULES[uses])
