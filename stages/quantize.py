"""Quantize a torch model for CPU inference: INT8 (dynamic, static post-training, or quantization-aware
training) with torch's x86 backend, or a plain cast to FP16/BF16.

``dynamic`` stores Linear/LSTM/GRU weights in INT8 and quantizes activations on the fly
(``quantize_dynamic``); each ``nn.MultiheadAttention`` is first rebuilt with separate Q/K/V/output
``nn.Linear`` projections (``pipeline.torchkit.attention``, checked to give its outputs on the example
batch) so its projections are INT8 too, where torch alone would leave its packed ``in_proj_weight`` FP32. ``static`` and ``qat`` use torch's FX graph mode (``prepare_fx``/``prepare_qat_fx``
then ``convert_fx`` with the x86 per-channel qconfig), so models need no QuantStub/DeQuantStub: static
observes ``calibration_batches`` train batches, qat fine-tunes with fake quantization first. FX was
chosen over the export-based pt2e flow after measuring both on this CPU: FX's converted model runs real
INT8 kernels in eager mode, while pt2e (now only in torchao, not a dependency) runs reference
quantize/dequantize ops, slower than FP32 until ``torch.compile`` (which a saved artifact does not
keep), and its x86 quantizer refused ``resnet_small``'s residual blocks. FP16/BF16 casts are for
targets that compute in them: on this CPU FP16 convolutions ran 5-20x slower than FP32, BF16 about as fast.

The result is pickled whole, loaded back from disk and compared with the input model on the eval split,
scored by the recipe's task; ``fp32_layers`` lists every layer whose weight matrix stayed FP32, and why.

In static and qat mode layers can be kept FP32 by module path (``keep_fp32``: fnmatch patterns such as
``features.3.*``; their qconfig is set to None), or found automatically: with ``fallback: auto`` an INT8
model whose metric drops more than ``max_drop`` below the input's on the eval split has its Conv/Linear
layers ranked by how much leaving each alone FP32 recovers (static post-training trials, also for qat,
which would otherwise train once per layer; ``pipeline.torchkit.sensitivity``, as the ``sensitivity``
stage measures it), and the fewest most sensitive ones are kept FP32, one more at a time and each set
quantized in the stage's mode, until the drop is within budget; ``fallback`` in the metrics records them.
"""

from __future__ import annotations

import inspect
import itertools
import traceback
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase, RNNCellBase
from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule
from torch.ao.quantization import QConfigMapping, get_default_qat_qconfig_mapping, get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from pipeline.errors import StageError, one_line
from pipeline.progress import track
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.attention_split import split_attention
from pipeline.torchkit.channels import untraceable_forward
from pipeline.torchkit.data import DataBundle
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, save_and_reload
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.sensitivity import (
    Budget,
    Build,
    Layer,
    Scorer,
    matching_layers,
    numbered,
    ranked_by_recovery,
    search_fallback,
    within_budget,
)
from pipeline.torchkit.train import train_model

# The parameters only some modes use; given with another mode they are refused, not ignored.
GRAPH_PARAMETERS = {"keep_fp32", "fallback", "max_drop", "max_fallback_layers"}
MODE_PARAMETERS: dict[str, set[str]] = {"static": {"calibration_batches"} | GRAPH_PARAMETERS, "qat": {"epochs", "lr"} | GRAPH_PARAMETERS}


class Params(StageParams):
    """The quantization mode and the data it uses: calibration batches (static) or fine-tuning (qat)."""

    mode: Literal["dynamic", "static", "qat", "fp16", "bf16"] = Field(
        default="dynamic",
        description="dynamic: INT8 Linear/LSTM/GRU/MultiheadAttention weights; static: INT8 weights and activations calibrated on "
        "train data; qat: static after fake-quantized fine-tuning; fp16 / bf16: cast every float weight",
    )
    calibration_batches: int = Field(
        default=16, ge=1, description="static only: train batches observed to choose activation ranges"
    )
    epochs: int = Field(default=2, ge=1, description="qat only: fine-tuning passes over the train data")
    lr: float = Field(default=1e-4, gt=0, description="qat only: Adam learning rate of the fine-tuning")
    keep_fp32: list[str] = Field(
        default_factory=list, description="static / qat: fnmatch patterns of module paths (Conv/Linear layers) to keep FP32"
    )
    fallback: Literal["none", "auto"] = Field(
        default="none",
        description="static / qat: auto keeps the fewest most sensitive layers FP32 until the drop vs the input is within max_drop",
    )
    max_drop: float = Field(
        default=0.01, ge=0.0,
        description="fallback auto: largest drop of the recipe's metric vs the input model on the eval split, in the metric's units",
    )
    max_fallback_layers: int = Field(default=8, ge=1, description="fallback auto: most layers it may keep FP32")

    @model_validator(mode="after")
    def parameters_belong_to_the_mode(self) -> "Params":
        """A parameter another mode uses is refused rather than silently ignored."""
        unused = sorted(self.model_fields_set - {"mode"} - MODE_PARAMETERS.get(self.mode, set()))
        if unused:
            owners = " / ".join(mode for mode, names in MODE_PARAMETERS.items() if unused[0] in names)
            raise ValueError(f"{unused[0]} applies to mode: {owners} only (mode is {self.mode}); remove it")
        return self


BACKEND = "x86"
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
DYNAMIC_COVERS = "Linear/LSTM/GRU/MultiheadAttention"
QUANTIZED_LAYERS = (WeightedQuantizedModule, RNNBase, RNNCellBase)
# The layers static / qat keep_fp32 and fallback choose from: those the x86 qconfig gives INT8 weights.
GRAPH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# torch 2.13 deprecates torch.ao.quantization in favour of torchao, which is not a dependency here; the
# FX flow still works and was chosen on measurement (module docstring). These warnings fire on every
# call and on every quantized forward, and name nothing a user of this stage can change.
warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max to specify the range for observers", category=UserWarning)
# torch.load rebuilds quantized tensors through its own deprecated TypedStorage.
warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)


def use_x86_engine() -> None:
    """Select torch's x86 quantized engine, or say that this build or CPU lacks it."""
    engines = torch.backends.quantized.supported_engines
    if BACKEND not in engines:
        raise StageError(
            f"quantize: torch's '{BACKEND}' quantized engine is not available here (engines: {', '.join(engines)}); "
            "use export_onnx + quantize_onnx instead"
        )
    if torch.backends.quantized.engine != BACKEND:
        torch.backends.quantized.engine = BACKEND


def model_code_line(error: BaseException, model: nn.Module) -> str:
    """`` at file:line `code` `` of the innermost frame in the model's own code (its classes' files), or ''."""
    files = {inspect.getsourcefile(type(module)) for module in model.modules()} - {None}
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename in files and frame.line]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""


def graph_mode_failure(mode: str, step: str, error: BaseException, model: nn.Module) -> StageError:
    """One line naming the mode, the FX step that failed, its cause and the model's line or construct, with the two ways out."""
    return StageError(
        f"quantize: mode {mode} could not {step} the model with torch.fx ({one_line(error)[:300]})"
        f"{model_code_line(error, model) or untraceable_forward(model)}; use mode: dynamic, or export_onnx + quantize_onnx"
    )


def positional_example(model: nn.Module, io: ModelIO, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The example inputs as the positional arguments FX prepare takes (inputs called by keyword bound to their places)."""
    args, kwargs = io.arguments(model, tensors)
    return tuple(inspect.signature(model.forward).bind(*args, **kwargs).args)


def graph_layers(model: nn.Module) -> list[Layer]:
    """The Conv/Linear layers static / qat quantize, in module order: module path, class and position (``Conv2d#1``)."""
    return numbered((name, type(module).__name__, name) for name, module in model.named_modules() if isinstance(module, GRAPH_LAYERS))


def qconfig_mapping(mode: str, fp32: frozenset[str]) -> QConfigMapping:
    """The default x86 qconfig mapping of ``mode``, with the ``fp32`` module paths left unquantized."""
    mapping = get_default_qat_qconfig_mapping(BACKEND) if mode == "qat" else get_default_qconfig_mapping(BACKEND)
    for name in sorted(fp32):
        mapping.set_module_name(name, None)
    return mapping


def prepare_graph(model: nn.Module, mode: str, io: ModelIO, tensors: dict[str, torch.Tensor], fp32: frozenset[str] = frozenset()) -> torch.fx.GraphModule:
    """Trace ``model`` with FX and insert observers (static) or fake quantizers (qat), except in the ``fp32`` modules."""
    try:
        example = positional_example(model, io, tensors)
        if mode == "qat":
            return prepare_qat_fx(model.train(), qconfig_mapping(mode, fp32), example)
        return prepare_fx(model.eval(), qconfig_mapping(mode, fp32), example)
    except Exception as error:  # fx TraceError (a keyword forward, Python control flow), or an op the patterns cannot handle
        raise graph_mode_failure(mode, "trace and prepare", error, model) from error


def calibration_set(data: DataBundle, batches: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The first ``batches`` train batches, kept so that every model quantized in one run is calibrated on the same ones."""
    return list(itertools.islice(data.train_batches(), batches))


def calibrate(prepared: nn.Module, calibration: list[tuple[dict[str, torch.Tensor], torch.Tensor]], io: ModelIO) -> int:
    """Run the calibration batches (every named input) through the observers; returns how many were used."""
    if not calibration:
        raise StageError("quantize: the train loader yielded no batches; static calibration needs at least one")
    for inputs, _ in track(calibration, "quantize: calibrate", total=len(calibration)):
        with torch.no_grad():
            io.call(prepared, inputs)
    return len(calibration)


def convert_graph(prepared: torch.fx.GraphModule, mode: str) -> torch.fx.GraphModule:
    """Swap observed layers for INT8 kernels (``save_torch_module`` makes the result picklable)."""
    try:
        converted = convert_fx(prepared.eval())
    except Exception as error:  # a pattern torch could observe but not lower to quantized ops
        raise graph_mode_failure(mode, "convert", error, prepared) from error
    return converted


def quantize_dynamic_int8(model: nn.Module, io: ModelIO, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, str]]:
    """INT8 weights for every Linear/LSTM/GRU and attention projection, and the attention layers kept FP32 with why.

    StageError when the model has none of those layers.
    """
    kept = split_attention(model.eval(), io, tensors)
    quantized = quantize_dynamic(model, set(DYNAMIC_LAYERS), dtype=torch.qint8)
    if not quantized_layer_counts(quantized, "dynamic"):
        found = sorted({type(module).__name__ for module in model.modules() if not list(module.children())})
        raise StageError(
            f"quantize: mode dynamic quantizes only {DYNAMIC_COVERS} layers and "
            f"the model has none (its layers: {', '.join(found) or 'none'}); use mode: static"
        )
    return quantized, kept


def quantized_layer_counts(model: nn.Module, mode: str) -> dict[str, int]:
    """Quantized layers by class name (``Linear``, ``ConvReLU2d``, ...); for casts, layers holding cast weights."""
    if mode in CAST_DTYPES:
        dtype = CAST_DTYPES[mode]
        layers = [m for m in model.modules() if any(p.dtype == dtype for p in m.parameters(recurse=False))]
    else:
        layers = [module for module in model.modules() if isinstance(module, QUANTIZED_LAYERS)]
    return dict(sorted(Counter(type(layer).__name__ for layer in layers).items()))


def fp32_reason(module: nn.Module, mode: str) -> str:
    """Why a weighted layer of a ``mode`` INT8 model is still FP32."""
    kind = type(module).__name__
    if mode == "dynamic":
        base = next((layer.__name__ for layer in DYNAMIC_LAYERS if isinstance(module, layer)), None)
        if base is not None:
            return f"{kind} subclasses {base}, and quantize_dynamic swaps exact nn.{base} layers only"
        return f"dynamic INT8 covers {DYNAMIC_COVERS} only"
    return f"torch.fx {mode} quantization with the default {BACKEND} qconfig mapping has no INT8 kernel for {kind} here"


def is_weight_matrix(name: str, parameter: torch.Tensor) -> bool:
    """A layer's weight matrix (``weight``, ``in_proj_weight``, ``weight_ih_l0``), not a bias, a scale or a free tensor."""
    return parameter.dim() >= 2 and (name == "weight" or name.endswith("_weight") or name.startswith("weight_"))


def fp32_layers(model: nn.Module, mode: str, kept: dict[str, str]) -> dict[str, str]:
    """Every layer whose weight matrix (Conv, Linear, Embedding, attention, ...) is still FP32 in an INT8 model, with why.

    Normalisation layers (1-d scales and shifts) and free parameters are not listed; a cast model has no FP32 weights left.
    """
    if mode in CAST_DTYPES:
        return {}
    left = {}
    for name, module in model.named_modules():
        if any(is_weight_matrix(key, p) and p.dtype == torch.float32 for key, p in module.named_parameters(recurse=False)):
            owner = next((why for layer, why in kept.items() if name == layer or name.startswith(f"{layer}.")), None)
            left[f"{name} ({type(module).__name__})"] = owner or fp32_reason(module, mode)
    return left


Calibration = list[tuple[dict[str, torch.Tensor], torch.Tensor]]


def graph_int8(ctx: StageContext, model: nn.Module, mode: str, params: Params, calibration: Calibration,
               fp32: frozenset[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` in FX static or qat INT8 but for the ``fp32`` modules, and the metrics of how it was made."""
    prepared = prepare_graph(model, mode, ctx.io, ctx.io.tensors(ctx.data.eval_set.example()), fp32)
    if mode == "static":
        used = calibrate(prepared, calibration, ctx.io)
        return convert_graph(prepared, mode), {"backend": BACKEND, "calibration_batches": used}
    _, final_loss = train_model(
        prepared, ctx.data.train, params.epochs, params.lr, description="quantize: qat", io=ctx.io, task=ctx.scoring.task
    )
    return convert_graph(prepared, mode), {"backend": BACKEND, "epochs": params.epochs, "lr": params.lr, "final_train_loss": final_loss}


def static_builder(ctx: StageContext, source: ModelHandle, params: Params, calibration: Calibration,
                   keep: frozenset[str], scorer: Scorer) -> Build:
    """Static INT8 of ``source`` with some layers kept FP32 (besides ``keep``) or one layer alone, predicting the scored rows."""
    every = frozenset(layer.name for layer in graph_layers(source.load()))

    def build(fp32: frozenset[str], alone: str | None) -> np.ndarray:
        model, _ = graph_int8(ctx, source.load(), "static", params, calibration, keep | (every - {alone} if alone else fp32))
        return predict_all(TorchRunner(model, ctx.io), scorer.feeds, description="sensitivity: predict")
    return build


def auto_fallback(ctx: StageContext, source: ModelHandle, params: Params, calibration: Calibration, keep: frozenset[str],
                  first_model: tuple[nn.Module, dict[str, Any]], reference: np.ndarray) -> tuple[tuple[nn.Module, dict[str, Any]], Any]:
    """``fallback: auto``: the fewest most sensitive layers kept FP32 until within ``max_drop``; (model, made) and the record."""
    evaluation = ctx.data.eval_set
    scorer = Scorer.of(ctx.scoring, evaluation.inputs, evaluation.targets, reference)

    def figures_of(model: nn.Module):
        return scorer.score(predict_all(TorchRunner(model, ctx.io), scorer.feeds, description="fallback: predict"))

    first, budget = figures_of(first_model[0]), Budget(params.max_drop, params.max_fallback_layers)
    if first.drop <= budget.max_drop + 1e-12:
        return first_model, within_budget(first, budget)
    build = static_builder(ctx, source, params, calibration, keep, scorer)
    static_first = first if params.mode == "static" else scorer.score(build(frozenset(), None))
    ranked = ranked_by_recovery([layer for layer in graph_layers(source.load()) if layer.name not in keep], build, scorer, static_first)

    def trial(fp32: frozenset[str]) -> tuple[tuple[nn.Module, dict[str, Any]], Any]:
        made = graph_int8(ctx, source.load(), params.mode, params, calibration, keep | fp32)
        return made, figures_of(made[0])

    return search_fallback(ranked, first, trial, budget, scorer.metric().name, "quantize")


def quantize_model(ctx: StageContext, source: ModelHandle, params: Params, reference: np.ndarray) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """The model in ``params.mode``, the metrics of how it was made, and the layers deliberately left FP32 with why."""
    model = source.load()
    if params.mode in CAST_DTYPES:
        return model.to(dtype=CAST_DTYPES[params.mode]), {"backend": "cpu"}, {}
    use_x86_engine()
    if params.mode == "dynamic":
        quantized, kept = quantize_dynamic_int8(model, ctx.io, ctx.io.tensors(ctx.data.eval_set.example()))
        return quantized, {"backend": BACKEND}, kept
    layers = graph_layers(model)
    kept = {layer.name: "kept FP32 by keep_fp32" for layer in
            matching_layers(params.keep_fp32, layers, "quantize", "keep_fp32", "a Conv/Linear module path of the model")}
    calibration = calibration_set(ctx.data, params.calibration_batches) if params.mode == "static" or params.fallback == "auto" else []
    quantized, made = graph_int8(ctx, model, params.mode, params, calibration, frozenset(kept))
    if params.fallback == "auto":
        (quantized, made), record = auto_fallback(ctx, source, params, calibration, frozenset(kept), (quantized, made), reference)
        made["fallback"] = record.model_dump(mode="json")
        kept |= {layer.name: "kept FP32 by fallback: auto" for layer in record.layers}
    return quantized, made, kept


def scored(ctx: StageContext, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """The quantized model's figures against FP32: the recipe's metric before and after, agreement, output closeness.

    ``top1_fp32``/``top1``/``delta_top1`` are there for classification only.
    """
    compared = ctx.scoring.compare(reference, predictions, targets)
    fp32_figures = ctx.scoring.task.figures(reference, targets)
    metrics = {
        "metric": compared["metric"],
        "value_fp32": fp32_figures[compared["metric"]],
        "value": compared["value"],
        "delta": compared["delta"],
        "figures": compared["figures"],
        "agreement": compared["agreement"],
        "max_abs_logit_diff": compared["max_abs_logit_diff"],
        "relative_error": compared["relative_error"],
        "eval_samples": compared["samples"],
    }
    if "top1" in compared:
        metrics |= {"top1_fp32": fp32_figures["top1"], "top1": compared["top1"], "delta_top1": compared["delta_top1"]}
    return metrics


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Quantize (or cast), save, reload, and compare with the input model on the eval split."""
    _, source = only_input(inputs)
    evaluation = ctx.data.eval_set
    reference = predict_all(TorchRunner(source.load(), ctx.io), evaluation.inputs, description="quantize: fp32")
    targets = ctx.scoring.task.prepare_targets(evaluation.targets, reference)
    quantized, made, kept = quantize_model(ctx, source, params, reference)
    product, reloaded = save_and_reload(quantized, ctx.workdir, "quantize", "quantized")
    predictions = predict_all(TorchRunner(reloaded, ctx.io), evaluation.inputs, description=f"quantize: {params.mode}")
    metrics = {
        "mode": params.mode,
        "calibration_batches": 0,
        "fallback": None,
        **made,
        "quantized_layers": quantized_layer_counts(reloaded, params.mode),
        "fp32_layers": fp32_layers(reloaded, params.mode, kept),
        "size_before_bytes": source.size_bytes,
        "size_after_bytes": product.size_bytes,
        "size_ratio": source.size_bytes / product.size_bytes,
        **scored(ctx, reference, predictions, targets),
    }
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
