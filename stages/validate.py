"""Validate every variant against the FP32 baseline on the eval split; reject those that lost too much accuracy."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from pydantic import Field

from pipeline.errors import DataError
from pipeline.records.reports import ModelValidation, ValidationReport, VariantValidation
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage
from pipeline.torchkit.evaluate import compare_logits, predict_all
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.runners import runner_for

REPORT_FILE = "validation.json"


class Params(StageParams):
    max_accuracy_drop: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="largest top-1 drop vs the FP32 baseline a variant may show, as a fraction (0.01 = 1 point)",
    )
    min_agreement: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="smallest share of eval inputs on which a variant must predict the baseline's class",
    )


def _figures(baseline_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, handle: ModelHandle) -> ModelValidation:
    """How one model's logits compare with the baseline's, with the model's kind and size."""
    return ModelValidation(**compare_logits(baseline_logits, logits, labels), kind=handle.kind, size_bytes=handle.size_bytes)


def _verdict(figures: ModelValidation, params: Params) -> str | None:
    drop = -figures.delta_top1
    if drop > params.max_accuracy_drop:
        return f"top-1 dropped {drop * 100:.2f} points vs FP32 (max_accuracy_drop allows {params.max_accuracy_drop * 100:.2f})"
    if figures.agreement < params.min_agreement:
        return f"agrees with FP32 on {figures.agreement:.2%} of inputs (min_agreement {params.min_agreement:.2%})"
    return None


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Refuse eval labels outside the model's classes: top-1 against them would silently read 0%."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"eval labels range from {labels.min()} to {labels.max()} but the model predicts {num_classes} classes "
            f"(0..{num_classes - 1}); fix the data's labels or the model's number of classes"
        )


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Predict the eval split with the baseline and every input variant, and compare them."""
    eval_inputs, labels = ctx.data.eval_arrays
    baseline_logits = predict_all(runner_for(ctx.baseline), eval_inputs, description=f"validate {ctx.baseline_name}")
    check_labels(labels, baseline_logits.shape[1])
    baseline = _figures(baseline_logits, baseline_logits, labels, ctx.baseline)
    variants, rejected = {}, {}
    for name, handle in inputs.items():
        logits = predict_all(runner_for(handle), eval_inputs, description=f"validate {name}")
        figures = _figures(baseline_logits, logits, labels, handle)
        reason = _verdict(figures, params)
        if reason:
            rejected[name] = reason
        variants[name] = VariantValidation(**figures.model_dump(), status="rejected" if reason else "accepted")
    report = ValidationReport(baseline_stage=ctx.baseline_name, baseline=baseline, variants=variants, rejected=rejected)
    metrics = report.model_dump(mode="json")
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx", "engine"), makes="report", inputs="many", version=1, params=Params, run=run, capabilities={"eval_data"},
)
