"""Cast a torch model to FP16 or BF16 for CUDA inference, and measure what the cast costs against FP32.

The cast model runs on the CUDA device against the FP32 model (on CPU) over the eval split (every named
input; float inputs cast to the new dtype); the recipe's metric before and after (``metric``,
``value_fp32``, ``value``, ``delta``, ``figures``), the agreement of their decisions and the largest
output difference are recorded, and NaN or inf outputs (an FP16 overflow) fail the stage. ``compile: true``
also runs an in-place ``torch.compile``d copy of the cast model on CUDA and records the same figures for it. The model is saved moved back to CPU in its new dtype, with
meta ``{"device": "cuda", "dtype": ...}`` telling runners where it is meant to run.

Without a CUDA device the stage is skipped with the reason (``on_unavailable: skip``) or fails (``fail``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit import gpu
from pipeline.torchkit.evaluate import all_finite, predict_all
from pipeline.torchkit.handles import ModelHandle, save_torch_module
from pipeline.torchkit.model_io import feeds_length
from pipeline.torchkit.runners import TorchRunner


class Params(StageParams):
    """The target dtype, what to do without CUDA, and whether to check the model under torch.compile too."""

    dtype: Literal["fp16", "bf16"] = Field(
        default="fp16", description="fp16 (half precision) or bf16 (bfloat16: FP32's range, needs compute capability 8.0+)"
    )
    on_unavailable: Literal["skip", "fail"] = Field(
        default="skip", description="without a CUDA device: skip the stage (recorded with the reason) or fail the run"
    )
    compile: bool = Field(
        default=False, description="also run the cast model through torch.compile on CUDA and record its agreement with FP32"
    )


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def bf16_status() -> str | None:
    """None when the CUDA device computes in BF16, else why not."""
    if torch.cuda.is_bf16_supported():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm {major}.{minor}) has no BF16 support (compute capability 8.0+ needed)"


def compare(ctx: StageContext, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray, what: str) -> dict[str, Any]:
    """The recipe's metric, agreement of decisions and largest |Δ output| vs FP32; StageError on NaN or inf outputs."""
    if not all_finite(predictions):
        raise StageError(f"precision: the {what} model produced NaN or inf outputs (FP16 overflow?); try dtype: bf16")
    compared = ctx.scoring.compare(reference, predictions, targets)
    figures = {key: compared[key] for key in ("value", "delta", "figures", "agreement")}
    return figures | {"max_abs_diff": compared["max_abs_logit_diff"]}


def compiled_figures(
    ctx: StageContext, module: torch.nn.Module, params: Params, reference: np.ndarray, targets: np.ndarray
) -> dict[str, Any]:
    """The same figures for a ``torch.compile``d copy of the CUDA model (compiled in place, so it keeps its forward's signature)."""
    dtype = DTYPES[params.dtype]
    try:
        compiled = copy.deepcopy(module)
        compiled.compile()
        runner = TorchRunner(compiled, ctx.io, device="cuda", dtype=dtype)
        predictions = predict_all(runner, ctx.data.eval_set.inputs, description=f"precision: {params.dtype} compiled")
    except Exception as error:  # inductor/triton failures: one line, cause chained
        raise StageError(
            f"precision: torch.compile failed on the {params.dtype} CUDA model ({one_line(error)[:400]}); set compile: false"
        ) from error
    figures = compare(ctx, reference, predictions, targets, f"{params.dtype} compiled")
    return {f"compiled_{name}": value for name, value in figures.items()}


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Cast, run on CUDA against FP32, optionally under torch.compile, and save in the new dtype."""
    checks = [gpu.cuda_status] + ([bf16_status] if params.dtype == "bf16" else [])
    gpu.require(
        checks, stage="precision", not_built=f"{params.dtype.upper()} CUDA model not built", on_unavailable=params.on_unavailable
    )
    dtype = DTYPES[params.dtype]
    evaluation = ctx.data.eval_set
    module = only_input(inputs)[1].load()
    reference = predict_all(TorchRunner(module, ctx.io), evaluation.inputs, description="precision: fp32")
    targets = ctx.scoring.task.prepare_targets(evaluation.targets, reference)
    fp32_figures = ctx.scoring.task.figures(reference, targets)
    metric = ctx.scoring.metric(fp32_figures).name
    module = module.to(dtype=dtype)  # floating-point parameters and buffers only
    runner = TorchRunner(module, ctx.io, device="cuda", dtype=dtype)
    metrics = {
        "dtype": params.dtype, "samples": feeds_length(evaluation.inputs), "gpu": torch.cuda.get_device_name(),
        "metric": metric, "value_fp32": fp32_figures[metric],
    }
    predictions = predict_all(runner, evaluation.inputs, description=f"precision: {params.dtype}")
    metrics.update(compare(ctx, reference, predictions, targets, params.dtype))
    if params.compile:
        metrics.update(compiled_figures(ctx, runner.module, params, reference, targets))
    product = save_torch_module(module.cpu(), ctx.workdir, device="cuda", dtype=params.dtype)
    metrics["model_bytes"] = product.path.stat().st_size
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"cuda", "eval_data"},
)
