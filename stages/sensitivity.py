"""Measure what INT8 costs layer by layer, on a torch or an ONNX model, and report the most costly layers first.

Each quantizable layer (torch: the Conv/Linear modules FX static quantization covers; ONNX: Conv,
ConvTranspose, Gemm and MatMul nodes) is quantized alone with every other layer FP32, and left FP32 alone
with every other layer INT8. Every model is scored on the first ``eval_rows`` eval rows by the recipe's
metric, its agreement and its relative output error against the FP32 input. Torch models go through the
quantize stage's FX static flow (x86 qconfig, ``calibration_batches`` train batches; a layer is kept FP32
by setting its module's qconfig to None); ONNX models through quantize_onnx's pre-processing and
``quantize_static`` with ``nodes_to_quantize=[node]`` / ``nodes_to_exclude=[node]``. Every model of one
run is calibrated on the same batches. The first ``max_layers`` layers by position are measured; the
report lists the rest as left out. Layers are named by module path (torch) or node name, torch module
path (from the exporter's node metadata) and stable position such as ``Conv#3`` (ONNX): the names that
``keep_fp32`` / ``nodes_to_exclude`` take. The same ranking drives ``fallback: auto`` in quantize and
quantize_onnx (``pipeline.torchkit.sensitivity``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping

from pydantic import Field

from pipeline.errors import StageError
from pipeline.records.sensitivity import LayerSensitivity, SensitivityReport, TrialFigures
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.onnx_graph import graph_nodes
from pipeline.torchkit.runners import OnnxRunner, runner_for
from pipeline.torchkit.sensitivity import Layer, Scorer, measure_layers
from stages import quantize, quantize_onnx

REPORT_FILE = "sensitivity.json"
SCRATCH_FOLDER = "scratch"


class Params(StageParams):
    """How many eval rows score each trial, how many layers are measured, and the calibration data."""

    eval_rows: int = Field(default=512, ge=1, description="the first eval rows every partly quantized model is scored on")
    max_layers: int = Field(default=32, ge=1, description="most layers measured (the first by position); the rest are listed as left out")
    calibration_batches: int = Field(default=16, ge=1, description="train batches every model is calibrated on")


Measured = tuple[list[Layer], int, TrialFigures, list[LayerSensitivity]]


def torch_layers_measured(ctx: StageContext, source: ModelHandle, params: Params, scorer: Scorer) -> Measured:
    """Torch: the quantizable layers, the calibration batches used, the all-INT8 figures and the measured layers."""
    quantize.use_x86_engine()
    layers = quantize.graph_layers(source.load())
    calibration = quantize.calibration_set(ctx.data, params.calibration_batches)
    build = quantize.static_builder(ctx, source, quantize.Params(mode="static"), calibration, frozenset(), scorer)
    try:
        int8, rows = measure_layers(layers[:params.max_layers], build, scorer)
    except StageError as error:  # FX could not trace the model: quantize's own one-line error, named for this stage
        raise StageError(f"sensitivity: {str(error).removeprefix('quantize: ')}") from error
    return layers, len(calibration), int8, rows


def onnx_layers_measured(ctx: StageContext, source: ModelHandle, params: Params, scorer: Scorer) -> Measured:
    """ONNX: as ``torch_layers_measured``, on quantize_onnx's pre-processed model (whose node names its params take)."""
    settings = quantize_onnx.Params(calibration_batches=params.calibration_batches)
    scratch = ctx.workdir / SCRATCH_FOLDER
    scratch.mkdir()
    try:
        preprocessed = scratch / quantize_onnx.PREPROCESSED_FILE
        quantize_onnx.preprocess(source.path, preprocessed)
        layers = quantize_onnx.layers_of(graph_nodes(preprocessed), settings)
        calibration = quantize_onnx.calibration_set(ctx, settings)
        build = quantize_onnx.trial_builder(preprocessed, scratch, ctx, OnnxRunner(source.path), settings, calibration, [], scorer)
        int8, rows = measure_layers(layers[:params.max_layers], build, scorer)
    finally:
        shutil.rmtree(scratch)
    return layers, len(calibration), int8, rows


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Score the FP32 input, measure every layer quantized alone and left FP32 alone, write ``sensitivity.json``."""
    _, source = only_input(inputs)
    evaluation = ctx.data.eval_set
    reference = predict_all(runner_for(source, ctx.io), evaluation.inputs, description="sensitivity: fp32")
    scorer = Scorer.of(ctx.scoring, evaluation.inputs, evaluation.targets, reference, rows=params.eval_rows)
    measured = torch_layers_measured if source.kind == "torch" else onnx_layers_measured
    layers, calibration_batches, int8, rows = measured(ctx, source, params, scorer)
    if not layers:
        raise StageError(f"sensitivity: the {source.kind} model has no layer INT8 quantizes (Conv, Linear / Gemm, MatMul); "
                         "nothing to measure, remove the stage")
    metric = scorer.metric()
    report = SensitivityReport(
        kind=source.kind, metric=metric.name, higher_is_better=metric.higher_is_better,
        value_fp32=ctx.scoring.value(scorer.reference, scorer.targets), eval_rows=len(scorer.targets),
        calibration_batches=calibration_batches, int8=int8, layers=rows, left_out=[layer.ref() for layer in layers[params.max_layers:]],
    )
    metrics = report.model_dump(mode="json")
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx"), makes="report", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
