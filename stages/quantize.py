"""Quantize a torch model for CPU inference: INT8 (dynamic, static post-training, or quantization-aware
training) with torch's x86 backend, or a plain cast to FP16/BF16.

``dynamic`` stores Linear/LSTM/GRU weights in INT8 and quantizes activations on the fly
(``quantize_dynamic``). ``static`` and ``qat`` use torch's FX graph mode (``prepare_fx``/``prepare_qat_fx``
then ``convert_fx`` with the x86 per-channel qconfig), so models need no QuantStub/DeQuantStub: static
observes ``calibration_batches`` train batches, qat fine-tunes with fake quantization first. FX was
chosen over the export-based pt2e flow after measuring both on this CPU: FX's converted model runs real
INT8 kernels in eager mode, while pt2e (now only in torchao, not a dependency) runs reference
quantize/dequantize ops, slower than FP32 until ``torch.compile`` (which a saved artifact does not
keep), and its x86 quantizer refused ``resnet_small``'s residual blocks. FP16/BF16 casts are for
targets that compute in them: on this CPU FP16 convolutions ran 5-20x slower than FP32, BF16 about as fast.

The result is pickled whole, loaded back from disk and compared with the input model on the eval split.
"""

from __future__ import annotations

import itertools
import traceback
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase, RNNCellBase
from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from pipeline.errors import StageError, one_line
from pipeline.progress import track
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.data import split_batch
from pipeline.torchkit.evaluate import compare_logits, predict_all, top1
from pipeline.torchkit.handles import ModelHandle, save_and_reload
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model

# The parameters only some modes use; given with another mode they are refused, not ignored.
MODE_PARAMETERS: dict[str, set[str]] = {"static": {"calibration_batches"}, "qat": {"epochs", "lr"}}


class Params(StageParams):
    """The quantization mode and the data it uses: calibration batches (static) or fine-tuning (qat)."""

    mode: Literal["dynamic", "static", "qat", "fp16", "bf16"] = Field(
        default="dynamic",
        description="dynamic: INT8 Linear/LSTM/GRU weights; static: INT8 weights and activations calibrated on "
        "train data; qat: static after fake-quantized fine-tuning; fp16 / bf16: cast every float weight",
    )
    calibration_batches: int = Field(
        default=16, ge=1, description="static only: train batches observed to choose activation ranges"
    )
    epochs: int = Field(default=2, ge=1, description="qat only: fine-tuning passes over the train data")
    lr: float = Field(default=1e-4, gt=0, description="qat only: Adam learning rate of the fine-tuning")

    @model_validator(mode="after")
    def parameters_belong_to_the_mode(self) -> "Params":
        """A parameter another mode uses is refused rather than silently ignored."""
        unused = sorted(self.model_fields_set - {"mode"} - MODE_PARAMETERS.get(self.mode, set()))
        if unused:
            owner = next(mode for mode, names in MODE_PARAMETERS.items() if unused[0] in names)
            raise ValueError(f"{unused[0]} applies to mode: {owner} only (mode is {self.mode}); remove it")
        return self


BACKEND = "x86"
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
QUANTIZED_LAYERS = (WeightedQuantizedModule, RNNBase, RNNCellBase)
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


def model_code_line(error: BaseException) -> str:
    """`` at file:line `code` `` of the innermost frame outside torch and this stage (the model's own code), or ''."""
    torch_folder = str(Path(torch.__file__).parent)
    frames = [
        frame for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(torch_folder) and frame.filename != __file__ and frame.line
    ]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""


def graph_mode_failure(mode: str, step: str, error: BaseException) -> StageError:
    """One line naming the mode, the FX step that failed, its cause and the model's line, with the two ways out."""
    return StageError(
        f"quantize: mode {mode} could not {step} the model with torch.fx ({one_line(error)[:300]}){model_code_line(error)}; "
        "use mode: dynamic, or export_onnx + quantize_onnx"
    )


def prepare_graph(model: nn.Module, mode: str, example: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``model`` with FX and insert observers (static) or fake quantizers (qat)."""
    try:
        if mode == "qat":
            return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(BACKEND), (example,))
        return prepare_fx(model.eval(), get_default_qconfig_mapping(BACKEND), (example,))
    except Exception as error:  # fx TraceError, or an op the quantization patterns cannot handle
        raise graph_mode_failure(mode, "trace and prepare", error) from error


def calibrate(prepared: nn.Module, train_loader: Iterable, batches: int) -> int:
    """Run up to ``batches`` train batches through the observers; returns how many were used."""
    used = 0
    for batch in track(itertools.islice(train_loader, batches), "quantize: calibrate", total=batches):
        inputs, _ = split_batch(batch, "train")
        with torch.no_grad():
            prepared(inputs)
        used += 1
    if used == 0:
        raise StageError("quantize: the train loader yielded no batches; static calibration needs at least one")
    return used


def convert_graph(prepared: torch.fx.GraphModule, mode: str) -> torch.fx.GraphModule:
    """Swap observed layers for INT8 kernels (``save_torch_module`` makes the result picklable)."""
    try:
        converted = convert_fx(prepared.eval())
    except Exception as error:  # a pattern torch could observe but not lower to quantized ops
        raise graph_mode_failure(mode, "convert", error) from error
    return converted


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """INT8 weights for every Linear/LSTM/GRU; StageError when the model has none of them."""
    quantized = quantize_dynamic(model.eval(), set(DYNAMIC_LAYERS), dtype=torch.qint8)
    if not quantized_layer_counts(quantized, "dynamic"):
        found = sorted({type(module).__name__ for module in model.modules() if not list(module.children())})
        raise StageError(
            f"quantize: mode dynamic quantizes only {'/'.join(cls.__name__ for cls in DYNAMIC_LAYERS)} layers and "
            f"the model has none (its layers: {', '.join(found) or 'none'}); use mode: static"
        )
    return quantized


def quantized_layer_counts(model: nn.Module, mode: str) -> dict[str, int]:
    """Quantized layers by class name (``Linear``, ``ConvReLU2d``, ...); for casts, layers holding cast weights."""
    if mode in CAST_DTYPES:
        dtype = CAST_DTYPES[mode]
        layers = [m for m in model.modules() if any(p.dtype == dtype for p in m.parameters(recurse=False))]
    else:
        layers = [module for module in model.modules() if isinstance(module, QUANTIZED_LAYERS)]
    return dict(sorted(Counter(type(layer).__name__ for layer in layers).items()))


def quantize_model(ctx: StageContext, model: nn.Module, params: Params) -> tuple[nn.Module, dict[str, Any]]:
    """The model in ``params.mode``, and the metrics of how it was made."""
    if params.mode in CAST_DTYPES:
        return model.to(dtype=CAST_DTYPES[params.mode]), {"backend": "cpu"}
    use_x86_engine()
    if params.mode == "dynamic":
        return quantize_dynamic_int8(model), {"backend": BACKEND}
    prepared = prepare_graph(model, params.mode, ctx.data.example_batch())
    if params.mode == "static":
        used = calibrate(prepared, ctx.data.train, params.calibration_batches)
        return convert_graph(prepared, params.mode), {"backend": BACKEND, "calibration_batches": used}
    _, final_loss = train_model(prepared, ctx.data.train, params.epochs, params.lr, description="quantize: qat")
    made = {"backend": BACKEND, "epochs": params.epochs, "lr": params.lr, "final_train_loss": final_loss}
    return convert_graph(prepared, params.mode), made


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Quantize (or cast), save, reload, and compare with the input model on the eval split."""
    _, source = only_input(inputs)
    eval_inputs, eval_labels = ctx.data.eval_arrays
    reference = predict_all(TorchRunner(source.load()), eval_inputs, description="quantize: fp32")
    quantized, made = quantize_model(ctx, source.load(), params)
    product, reloaded = save_and_reload(quantized, ctx.workdir, "quantize", "quantized")
    logits = predict_all(TorchRunner(reloaded), eval_inputs, description=f"quantize: {params.mode}")
    comparison = compare_logits(reference, logits, eval_labels)
    metrics = {
        "mode": params.mode,
        "calibration_batches": 0,
        **made,
        "quantized_layers": quantized_layer_counts(reloaded, params.mode),
        "size_before_bytes": source.size_bytes,
        "size_after_bytes": product.size_bytes,
        "size_ratio": source.size_bytes / product.size_bytes,
        "top1_fp32": top1(reference, eval_labels),
        "top1": comparison["top1"],
        "delta_top1": comparison["delta_top1"],
        "agreement": comparison["agreement"],
        "max_abs_logit_diff": comparison["max_abs_logit_diff"],
        "eval_samples": comparison["samples"],
    }
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
