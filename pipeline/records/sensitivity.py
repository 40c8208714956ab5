"""The per-layer INT8 sensitivity report (``sensitivity`` stage) and the ``fallback: auto`` record of the quantize stages.

Torch-free: the review page and scripts read these without importing torch or onnxruntime.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.records.models import Record


class LayerRef(Record):
    """One quantizable layer, by every name a user may give it."""

    name: str = Field(description="torch: the module path; ONNX: the node name")
    op_type: str = Field(description="torch: the module class (Conv2d); ONNX: the op type (Conv)")
    position: str = Field(description="stable position among the quantizable layers of its type, e.g. Conv#3 (the 4th)")
    module_path: str | None = Field(
        default=None, description="the torch module path (ONNX: from the exporter's node metadata; None when the file has none)"
    )


class TrialFigures(Record):
    """One partly quantized model against its FP32 input on the scored eval rows."""

    value: float = Field(description="the recipe metric's value")
    drop: float = Field(description="how much worse than the FP32 input, in the metric's units (positive: worse)")
    agreement: float | None = Field(default=None, description="share of decisions equal to the FP32 input's (tasks with decisions)")
    relative_error: float = Field(description="||model - fp32|| / ||fp32|| of the outputs")


class LayerSensitivity(LayerRef):
    """How much one layer costs in INT8: quantized alone, and left FP32 alone while the rest is INT8."""

    quantized_alone: TrialFigures = Field(description="only this layer INT8, every other layer FP32")
    fp32_alone: TrialFigures = Field(description="only this layer FP32, every other layer INT8")
    recovery: float = Field(description="drop of the all-INT8 model minus drop with only this layer FP32 (what keeping it FP32 wins)")
    error_recovery: float = Field(description="relative error of the all-INT8 model minus relative error with only this layer FP32")


class SensitivityReport(Record):
    """``sensitivity.json``: every measured layer, most costly first, and the layers past ``max_layers``."""

    kind: Literal["torch", "onnx"]
    metric: str
    higher_is_better: bool
    value_fp32: float = Field(description="the FP32 input's metric on the scored rows")
    eval_rows: int = Field(description="eval rows scored (the first of the eval split)")
    calibration_batches: int
    int8: TrialFigures = Field(description="every layer INT8")
    layers: list[LayerSensitivity] = Field(description="most costly first: by recovery, then drop quantized alone, then error recovery")
    left_out: list[LayerRef] = Field(default_factory=list, description="quantizable layers past max_layers, not measured")


class FallbackTrial(Record):
    """One set of layers kept FP32 by ``fallback: auto`` and what it reached."""

    layers: list[str] = Field(description="names of the layers kept FP32 (besides those the user named)")
    figures: TrialFigures


class FallbackRecord(Record):
    """``fallback`` in a quantize stage's metrics: the fewest most sensitive layers kept FP32 to meet ``max_drop``."""

    max_drop: float
    max_fallback_layers: int
    layers: list[LayerRef] = Field(default_factory=list, description="the layers kept FP32 by the search, most sensitive first")
    trials: list[FallbackTrial] = Field(default_factory=list, description="every set tried, the plain INT8 model first")
    met_budget: bool
