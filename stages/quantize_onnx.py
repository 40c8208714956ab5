"""Quantize an ONNX model to INT8 with ``onnxruntime.quantization``, and prove it still predicts like the input.

The input first goes through ORT's own pre-processing (``quant_pre_process``: symbolic shape inference
and graph optimization). ``mode: static`` then calibrates activation ranges on ``calibration_batches``
train batches and writes a QDQ (or QOperator) model; ``mode: dynamic`` quantizes weights only and
computes activation ranges at run time. The defaults are the fastest configuration measured on x86 with
VNNI: QDQ, uint8 activations, int8 per-channel symmetric weights, MinMax calibration, every op type
onnxruntime can quantize. onnxruntime turns that QDQ graph into NHWC ``QLinearConv``/``QLinearAdd``
chains when it loads it; the ops it runs are recorded (``runtime_op_counts``), but the portable QDQ file
is what is stored: storing the optimized graph measured no faster to run or load, and would tie the
artifact to this onnxruntime version and CPU. Calibration feeds every declared input (``model.inputs``:
token ids, masks, images) from the train batches, in the types the file takes. The result, one
self-contained ``model.onnx``, must load and run in onnxruntime and be compared with the input model on
the eval split by the recipe's ``task``: where the task makes decisions (classes, labels, tokens) they
must agree on at least ``min_agreement``; where it does not (regression, custom), no agreement exists,
so the outputs' relative error ``||int8 - input|| / ||input||`` must stay within ``max_relative_error``
(a bound on the raw outputs, which every task's figures derive from, rather than a budget on one figure:
that stays validate's ``max_drop``).

Layers can be kept FP32 by pattern (``nodes_to_exclude``: fnmatch patterns matched against node names, the
torch module paths the dynamo exporter records in node metadata, and stable positions such as ``Conv#3``,
the 4th Conv in topological order, which survive a re-export), or found automatically: with
``fallback: auto`` (static mode) a plain INT8 model whose metric drops more than ``max_drop`` below the
input's on the eval split has its layers ranked by how much leaving each alone FP32 recovers
(``pipeline.torchkit.sensitivity``, as the ``sensitivity`` stage measures it), and the fewest most
sensitive ones are kept FP32, one more at a time, until the drop is within budget; ``fallback`` in the
metrics records the layers, every set tried and whether the budget was met.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import Field, model_validator

from pipeline.errors import StageError, one_line
from pipeline.progress import library_prints_discarded, track
from pipeline.records.sensitivity import FallbackRecord
from pipeline.review.units import format_figure
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ONNX_FILE, ModelHandle, OnnxModel
from pipeline.torchkit.model_io import ModelIO, feeds_length
from pipeline.torchkit.onnx_graph import graph_nodes, op_counts
from pipeline.torchkit.runners import OnnxRunner
from pipeline.torchkit.sensitivity import Budget, Build, Layer, Scorer, matching_layers, ranked_by_recovery, search_fallback, within_budget


class Params(StageParams):
    """Static or dynamic INT8, calibration, data types, what to leave in FP32, and the agreement floor."""

    mode: Literal["static", "dynamic"] = Field(
        default="static",
        description="static: calibrate activation ranges on train data (fastest); dynamic: weights only, "
        "activation ranges computed at run time (no data needed, mostly for MatMul-heavy models)",
    )
    format: Literal["qdq", "qoperator"] = Field(
        default="qdq",
        description="static only: qdq (QuantizeLinear/DequantizeLinear pairs, fused by onnxruntime at load) "
        "or qoperator (QLinearConv-style quantized ops written into the file)",
    )
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax",
        description="static only: how activation ranges are chosen from the calibration data; entropy and "
        "percentile clip outliers but keep every intermediate tensor in memory while calibrating",
    )
    calibration_batches: int = Field(default=16, ge=1, description="static only: train batches fed to calibration")
    per_channel: bool = Field(default=True, description="one weight scale per output channel (more accurate, as fast)")
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8",
        description="static only: activation type; uint8 on x86 (int8 activations measured slower than FP32 there)",
    )
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8", description="weight type; int8 (uint8 weights measured 2.5x slower on x86 with VNNI)"
    )
    reduce_range: bool = Field(
        default=False, description="7-bit weights, against overflow on x86 CPUs without VNNI; costs accuracy"
    )
    op_types_to_quantize: list[str] = Field(
        default_factory=list, description="only quantize these op types (e.g. [Conv, Gemm]); empty: every supported type"
    )
    nodes_to_exclude: list[str] = Field(
        default_factory=list,
        description="nodes to keep in FP32, e.g. sensitive layers: fnmatch patterns matched against node names, the torch "
        "module paths the exporter recorded (features.3.*) and stable positions (Conv#3: the 4th Conv in topological order)",
    )
    fallback: Literal["none", "auto"] = Field(
        default="none",
        description="static only: auto keeps the fewest most sensitive layers FP32 until the drop vs the input is within max_drop",
    )
    max_drop: float = Field(
        default=0.01, ge=0.0,
        description="fallback auto: largest drop of the recipe's metric vs the input model on the eval split, in the metric's units",
    )
    max_fallback_layers: int = Field(default=8, ge=1, description="fallback auto: most layers it may keep FP32")
    preprocess: bool = Field(
        default=True, description="run onnxruntime's quant_pre_process (shape inference, graph optimization) first"
    )
    min_agreement: float = Field(
        default=0.9, ge=0.0, le=1.0,
        description="tasks that make decisions (classification, multilabel, token-classification): smallest share of "
        "eval decisions (classes, labels, tokens) on which the quantized model must agree with the input model",
    )
    max_relative_error: float = Field(
        default=0.1, gt=0.0,
        description="tasks without decisions (regression, custom), where agreement does not exist: largest relative "
        "error ||int8 - input|| / ||input|| of the eval outputs",
    )

    @model_validator(mode="after")
    def fallback_needs_static(self) -> "Params":
        """fallback: auto searches calibrated (static) models; dynamic mode has no activation ranges to blame."""
        if self.fallback == "auto" and self.mode != "static":
            raise ValueError("fallback: auto applies to mode: static only; set mode: static or fallback: none")
        return self


QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
PREPROCESSED_FILE = "preprocessed.onnx"
QUANTIZED_FILE = "quantized.onnx"
TRIAL_FILE = "trial.onnx"
# The op types counted as layers by sensitivity and fallback: those holding weights or mixing activations.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
OPTIMIZED_FILE = "optimized.onnx"
SCRATCH_FOLDER = "scratch"
# onnxruntime.quantization's failures, by what their message mentions, and the parameter that fixes each.
ADVICE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"activation_type|weight_type"), "choose another activation_type / weight_type pair (uint8 / int8 is the default)"),
    (re.compile(r"invalid dimensions", re.IGNORECASE),
     "the calibration batches do not fit the model's input; export it with dynamic_batch: true"),
    (re.compile(r"No data is collected"), "the train loader yielded no batches; calibration needs at least one"),
]
DEFAULT_ADVICE = "keep the failing node in FP32 with nodes_to_exclude, or narrow op_types_to_quantize"


class TrainBatchReader(CalibrationDataReader):
    """Feeds the first ``batch_limit`` train batches to every input of the model, in its input types, with a progress bar."""

    def __init__(self, train: Iterable[Any], model_io: ModelIO, runner: OnnxRunner, batch_limit: int):
        self.batches_read = 0
        self.samples_read = 0
        self.feeds = track(self._feeds(train, model_io, runner, batch_limit), "calibrate", total=batch_limit)

    def _feeds(self, train: Iterable[Any], model_io: ModelIO, runner: OnnxRunner, batch_limit: int) -> Iterator[dict[str, np.ndarray]]:
        for batch in itertools.islice(train, batch_limit):
            feeds = model_io.to_feeds(model_io.split_batch(batch, "train")[0])
            self.batches_read += 1
            self.samples_read += feeds_length(feeds)
            yield {name: np.ascontiguousarray(array) for name, array in runner.session_feeds(feeds).items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration feed, or None when done (the protocol onnxruntime's calibrators use)."""
        return next(self.feeds, None)


def quantization_failure(error: BaseException, params: Params) -> StageError:
    """One line: what onnxruntime.quantization said, in which mode, and the parameter to change."""
    message = one_line(error)
    advice = next((text for pattern, text in ADVICE if pattern.search(message)), DEFAULT_ADVICE)
    return StageError(f"quantize_onnx: onnxruntime.quantization failed in {params.mode} mode ({message[:400]}); {advice}")


def layers_of(nodes: list[Layer], params: Params) -> list[Layer]:
    """The nodes counted as layers (``LAYER_OPS``, narrowed by ``op_types_to_quantize``), in topological order."""
    wanted = set(params.op_types_to_quantize or LAYER_OPS) & set(LAYER_OPS)
    return [node for node in nodes if node.op_type in wanted]


def excluded_nodes(nodes: list[Layer], params: Params) -> list[str]:
    """The names of the nodes ``nodes_to_exclude`` matches; StageError for a pattern matching none."""
    return [node.name for node in matching_layers(params.nodes_to_exclude, nodes, "quantize_onnx", "nodes_to_exclude", "a node of the model")]


def check_names(path: Path, params: Params) -> list[Layer]:
    """The nodes of the model about to be quantized; StageError for a pattern matching none or an op type the quantizer would ignore."""
    nodes = graph_nodes(path)
    excluded_nodes(nodes, params)
    registries = (IntegerOpsRegistry,) if params.mode == "dynamic" else (QLinearOpsRegistry, QDQRegistry)
    supported = sorted(set().union(*registries))
    for op_type in params.op_types_to_quantize:
        if op_type not in supported:
            raise StageError(
                f"quantize_onnx: op_types_to_quantize has '{op_type}', which {params.mode} mode cannot quantize; "
                f"choose from {', '.join(supported)}"
            )
    return nodes


def preprocess(source: Path, target: Path) -> None:
    """ORT's quantization pre-processing: symbolic shape inference and graph optimization.

    ``auto_merge`` lets symbolic shape inference merge dims it cannot prove equal, such as a transformer's
    ``Min(max_position_embeddings, seq)`` against ``seq``; without it, inference stops on BERT-like graphs.
    """
    try:
        quant_pre_process(str(source), str(target), auto_merge=True)
    except Exception as error:  # symbolic shape inference or the optimizer refused the graph
        raise StageError(f"quantize_onnx: quant_pre_process failed ({one_line(error)[:400]}); set preprocess: false") from error


def calibration_set(ctx: StageContext, params: Params) -> list[Any]:
    """The first ``calibration_batches`` train batches, kept so that every model quantized in one run sees the same ones."""
    return list(itertools.islice(ctx.data.train, params.calibration_batches)) if params.mode == "static" else []


def quantize(
    source: Path, target: Path, ctx: StageContext, input_runner: OnnxRunner, params: Params,
    calibration: list[Any], exclude: list[str], only: list[str] | None = None,
) -> TrainBatchReader | None:
    """Write the model quantized but for the ``exclude`` nodes (or only the ``only`` nodes); the calibration reader (static mode)."""
    common = {
        "per_channel": params.per_channel,
        "reduce_range": params.reduce_range,
        "weight_type": QUANT_TYPES[params.weight_type],
        "op_types_to_quantize": params.op_types_to_quantize or None,
        "nodes_to_quantize": only,
        "nodes_to_exclude": exclude,
    }
    reader = TrainBatchReader(calibration, ctx.io, input_runner, params.calibration_batches) if params.mode == "static" else None
    try:
        if reader is None:
            quantize_dynamic(source, target, **common)
        else:  # onnxruntime's histogram calibrators print() their progress: the stage has its own bar
            with library_prints_discarded():
                quantize_static(
                    source, target, reader,
                    quant_format=QUANT_FORMATS[params.format],
                    activation_type=QUANT_TYPES[params.activation_type],
                    calibrate_method=CALIBRATE_METHODS[params.calibrate_method],
                    **common,
                )
    except StageError:
        raise
    except Exception as error:  # ValueError for refused arguments, onnxruntime errors while calibrating
        raise quantization_failure(error, params) from error
    return reader


def trial_builder(source: Path, scratch: Path, ctx: StageContext, input_runner: OnnxRunner, params: Params,
                  calibration: list[Any], exclude: list[str], scorer: Scorer) -> Build:
    """Quantize ``source`` with some nodes kept FP32 (besides ``exclude``) or one node alone, and predict the scored rows."""
    def build(fp32: frozenset[str], alone: str | None) -> np.ndarray:
        target = scratch / TRIAL_FILE
        quantize(source, target, ctx, input_runner, params, calibration, exclude + sorted(fp32), [alone] if alone else None)
        return predict_all(OnnxRunner(target), scorer.feeds, description="sensitivity: predict")
    return build


def auto_fallback(source: Path, scratch: Path, ctx: StageContext, input_runner: OnnxRunner, params: Params,
                  calibration: list[Any], exclude: list[str], nodes: list[Layer]) -> FallbackRecord:
    """``fallback: auto``: keep the fewest most sensitive layers FP32 until ``scratch/quantized.onnx`` is within ``max_drop``."""
    evaluation = ctx.data.eval_set
    reference = predict_all(input_runner, evaluation.inputs, description="predict fp32")
    scorer = Scorer.of(ctx.scoring, evaluation.inputs, evaluation.targets, reference)
    first = scorer.score(predict_all(OnnxRunner(scratch / QUANTIZED_FILE), scorer.feeds, description="predict int8"))
    budget = Budget(params.max_drop, params.max_fallback_layers)
    if first.drop <= budget.max_drop + 1e-12:
        return within_budget(first, budget)
    build = trial_builder(source, scratch, ctx, input_runner, params, calibration, exclude, scorer)
    ranked = ranked_by_recovery([node for node in layers_of(nodes, params) if node.name not in exclude], build, scorer, first)

    def trial(fp32: frozenset[str]) -> tuple[None, Any]:
        quantize(source, scratch / QUANTIZED_FILE, ctx, input_runner, params, calibration, exclude + sorted(fp32))
        return None, scorer.score(predict_all(OnnxRunner(scratch / QUANTIZED_FILE), scorer.feeds, description="fallback: predict"))

    _, record = search_fallback(ranked, first, trial, budget, scorer.metric().name, "quantize_onnx")
    return record


def optimize_for_runtime(source: Path, target: Path) -> None:
    """Save the graph as onnxruntime optimizes it at load (ORT_ENABLE_ALL), so the ops it runs can be counted."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # the quantizer wrote a graph onnxruntime cannot load
        raise StageError(f"quantize_onnx: onnxruntime cannot load the quantized model ({one_line(error)[:400]}); {DEFAULT_ADVICE}") from error


def compare_on_eval(ctx: StageContext, input_runner: OnnxRunner, path: Path, params: Params) -> dict[str, Any]:
    """The task's figures of both models on the eval split and how closely they agree; StageError past the floor.

    The floor is ``min_agreement`` where the task makes decisions, else ``max_relative_error`` of the outputs.
    """
    evaluation = ctx.data.eval_set
    try:
        quantized = predict_all(OnnxRunner(path), evaluation.inputs, description="predict int8")
    except Exception as error:  # loads, but a kernel fails on real data
        raise StageError(f"quantize_onnx: the quantized model fails in onnxruntime ({one_line(error)[:400]}); {DEFAULT_ADVICE}") from error
    reference = predict_all(input_runner, evaluation.inputs, description="predict fp32")
    comparison = ctx.scoring.compare(reference, quantized, ctx.scoring.task.prepare_targets(evaluation.targets, reference))
    top1 = comparison.get("top1")
    figures = {
        "metric": comparison["metric"],
        "value_input": comparison["value"] - comparison["delta"],
        "value_quantized": comparison["value"],
        "figures": comparison["figures"],
        "top1_input": None if top1 is None else top1 - comparison["delta_top1"],
        "top1_quantized": top1,
        "agreement": comparison["agreement"],
        "relative_error": comparison["relative_error"],
        "cosine_similarity": comparison["cosine_similarity"],
        "max_abs_logit_diff": comparison["max_abs_logit_diff"],
        "eval_samples": comparison["samples"],
    }
    metric = figures["metric"]
    change = f"{metric} {format_figure(metric, figures['value_input'])} -> {format_figure(metric, figures['value_quantized'])}"
    advice = ("try calibrate_method: percentile, " if params.mode == "static" else "try mode: static, ") + (
        "more calibration_batches, or keep sensitive nodes in FP32 with nodes_to_exclude or fallback: auto")
    if figures["agreement"] is not None and not figures["agreement"] >= params.min_agreement:
        raise StageError(
            f"quantize_onnx: the INT8 model agrees with the input model on only {figures['agreement']:.1%} of the decisions "
            f"on {figures['eval_samples']} eval inputs (min_agreement {params.min_agreement:.0%}; {change}); {advice}"
        )
    if figures["agreement"] is None and not figures["relative_error"] <= params.max_relative_error:  # also catches NaN
        raise StageError(
            f"quantize_onnx: the INT8 model's outputs differ from the input model's by {figures['relative_error']:.1%} "
            f"(relative error) on {figures['eval_samples']} eval inputs (max_relative_error {params.max_relative_error:.0%}; "
            f"{change}); {advice}"
        )
    return figures


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Pre-process, quantize, record the ops onnxruntime runs, and compare with the input on eval data."""
    _, source = only_input(inputs)
    input_runner = OnnxRunner(source.path)
    scratch = ctx.workdir / SCRATCH_FOLDER
    scratch.mkdir()
    try:
        to_quantize = source.path
        if params.preprocess:
            to_quantize = scratch / PREPROCESSED_FILE
            preprocess(source.path, to_quantize)
        nodes = check_names(to_quantize, params)
        exclude, calibration = excluded_nodes(nodes, params), calibration_set(ctx, params)
        reader = quantize(to_quantize, scratch / QUANTIZED_FILE, ctx, input_runner, params, calibration, exclude)
        fallback = None
        if params.fallback == "auto":
            fallback = auto_fallback(to_quantize, scratch, ctx, input_runner, params, calibration, exclude, nodes)
        optimize_for_runtime(scratch / QUANTIZED_FILE, scratch / OPTIMIZED_FILE)
        runtime_ops = op_counts(scratch / OPTIMIZED_FILE)
        path = ctx.workdir / ONNX_FILE
        shutil.move(scratch / QUANTIZED_FILE, path)
    finally:
        shutil.rmtree(scratch)
    figures = compare_on_eval(ctx, input_runner, path, params)
    static = params.mode == "static"
    metrics = {
        "mode": params.mode,
        "format": params.format if static else None,
        "calibrate_method": params.calibrate_method if static else None,
        "calibration_batches": reader.batches_read if reader is not None else 0,
        "calibration_samples": reader.samples_read if reader is not None else 0,
        "per_channel": params.per_channel,
        "activation_type": params.activation_type if static else "uint8",
        "weight_type": params.weight_type,
        "excluded_nodes": exclude,
        "fallback": None if fallback is None else fallback.model_dump(mode="json"),
        "bytes_before": source.size_bytes,
        "bytes_after": path.stat().st_size,
        "size_ratio": source.size_bytes / path.stat().st_size,
        **figures,
        "op_counts": op_counts(path),
        "runtime_op_counts": runtime_ops,
        "onnxruntime_version": ort.__version__,
    }
    return StageOutput(product=OnnxModel(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("onnx",), makes="onnx", inputs="one", version=1, params=Params, run=run, exclusive=False, capabilities={"train_data", "eval_data"},
)
