"""Validate every variant against the FP32 baseline on the eval split; reject those that lost too much.

What is measured follows the recipe's ``task`` (``pipeline.torchkit.tasks``): top-1 for classification,
MSE/MAE for regression, F1 for multilabel, per-token accuracy, or the user's ``metric.function``. The
budget (``max_drop``, and optionally ``max_relative_drop``) applies to the recipe's metric in its
direction: a top-1 that falls or an MSE that rises is a drop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from pydantic import AliasChoices, Field

from pipeline.recipe.schema import FRACTION_FIGURES
from pipeline.records.reports import ModelValidation, ValidationReport, VariantValidation
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.runners import runner_for
from pipeline.torchkit.tasks import Scoring

REPORT_FILE = "validation.json"


class Params(StageParams):
    max_drop: float = Field(
        default=0.01, ge=0.0, validation_alias=AliasChoices("max_drop", "max_accuracy_drop"),
        description="largest loss of the recipe's metric vs the FP32 baseline, in the metric's units (top-1 as a "
        "fraction: 0.01 = 1 point; MSE in squared target units); max_accuracy_drop is the older name",
    )
    max_relative_drop: float | None = Field(
        default=None, ge=0.0,
        description="largest loss as a fraction of the baseline's value (0.1: MSE may grow by 10%); null: not checked",
    )
    min_agreement: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="smallest share of eval decisions (classes, labels, tokens) equal to the baseline's",
    )


def figures_of(scoring: Scoring, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray, handle: ModelHandle) -> ModelValidation:
    """How one model's predictions compare with the baseline's, with the model's kind and size."""
    return ModelValidation(**scoring.compare(reference, predictions, targets), kind=handle.kind, size_bytes=handle.size_bytes)


def shown(metric: str, value: float) -> str:
    """A metric's value or drop as people read it: points for top-1-like fractions, else the number."""
    return f"{value * 100:.2f} points" if metric in FRACTION_FIGURES else f"{value:.4g}"


def verdict(figures: ModelValidation, baseline: ModelValidation, params: Params) -> str | None:
    """Why a variant is rejected, or None when it is within every budget."""
    drop = figures.drop()
    if drop > params.max_drop + 1e-12:
        return (f"{figures.metric} {'dropped' if figures.higher_is_better else 'rose'} {shown(figures.metric, drop)} vs FP32 "
                f"({baseline.value:.4g} -> {figures.value:.4g}; max_drop allows {shown(figures.metric, params.max_drop)})")
    if params.max_relative_drop is not None and abs(baseline.value) > 0 and drop / abs(baseline.value) > params.max_relative_drop + 1e-12:
        return (f"{figures.metric} is {drop / abs(baseline.value):.1%} worse than FP32 ({baseline.value:.4g} -> {figures.value:.4g}; "
                f"max_relative_drop allows {params.max_relative_drop:.1%})")
    if figures.agreement is not None and figures.agreement < params.min_agreement:
        return f"agrees with FP32 on {figures.agreement:.2%} of decisions (min_agreement {params.min_agreement:.2%})"
    return None


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Predict the eval split with the baseline and every input variant, and compare them."""
    evaluation = ctx.data.eval_set
    baseline_predictions = predict_all(runner_for(ctx.baseline, ctx.io), evaluation.inputs, description=f"validate {ctx.baseline_name}")
    targets = ctx.scoring.task.prepare_targets(evaluation.targets, baseline_predictions)
    baseline = figures_of(ctx.scoring, baseline_predictions, baseline_predictions, targets, ctx.baseline)
    variants, rejected = {}, {}
    for name, handle in inputs.items():
        predictions = predict_all(runner_for(handle, ctx.io), evaluation.inputs, description=f"validate {name}")
        figures = figures_of(ctx.scoring, baseline_predictions, predictions, targets, handle)
        reason = verdict(figures, baseline, params)
        if reason:
            rejected[name] = reason
        variants[name] = VariantValidation(**figures.model_dump(), status="rejected" if reason else "accepted")
    report = ValidationReport(baseline_stage=ctx.baseline_name, baseline=baseline, variants=variants, rejected=rejected)
    metrics = report.model_dump(mode="json")
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx", "engine", "openvino"), makes="report", inputs="many", version=1, params=Params, run=run, capabilities={"eval_data"},
)
