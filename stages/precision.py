"""Cast a torch model to FP16 or BF16 for CUDA inference, and measure what the cast costs against FP32.

The cast model runs on the CUDA device against the FP32 model (on CPU) over the eval split; agreement
of their predicted classes and the largest logit difference are recorded, and NaN or inf outputs (an
FP16 overflow) fail the stage. ``compile: true`` also runs the cast model through ``torch.compile`` on
CUDA and records the same figures for it. The model is saved moved back to CPU in its new dtype, with
meta ``{"device": "cuda", "dtype": ...}`` telling runners where it is meant to run.

Without a CUDA device the stage is skipped with the reason (``on_unavailable: skip``) or fails (``fail``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit import gpu
from pipeline.torchkit.evaluate import all_finite, logit_parity, predict_all
from pipeline.torchkit.handles import ModelHandle, save_torch_module
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


def compare(reference: np.ndarray, logits: np.ndarray, what: str) -> dict[str, float]:
    """Agreement of predicted classes and largest |Δ logit| vs FP32; StageError on NaN or inf outputs."""
    if not all_finite(logits):
        raise StageError(f"precision: the {what} model produced NaN or inf outputs (FP16 overflow?); try dtype: bf16")
    agreement, max_abs_diff = logit_parity(reference, logits)
    return {"agreement": agreement, "max_abs_diff": max_abs_diff}


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Cast, run on CUDA against FP32, optionally under torch.compile, and save in the new dtype."""
    checks = [gpu.cuda_status] + ([bf16_status] if params.dtype == "bf16" else [])
    gpu.require(
        checks, stage="precision", not_built=f"{params.dtype.upper()} CUDA model not built", on_unavailable=params.on_unavailable
    )
    dtype = DTYPES[params.dtype]
    eval_inputs = ctx.data.eval_arrays[0]
    module = only_input(inputs)[1].load()
    reference = predict_all(TorchRunner(module), eval_inputs, description="precision: fp32")
    module = module.to(dtype=dtype)  # floating-point parameters and buffers only
    runner = TorchRunner(module, device="cuda", dtype=dtype)
    metrics = {"dtype": params.dtype, "samples": int(len(eval_inputs)), "gpu": torch.cuda.get_device_name()}
    metrics.update(compare(reference, predict_all(runner, eval_inputs, description=f"precision: {params.dtype}"), params.dtype))
    if params.compile:
        try:
            compiled = TorchRunner(torch.compile(runner.module), device="cuda", dtype=dtype)
            compiled_logits = predict_all(compiled, eval_inputs, description=f"precision: {params.dtype} compiled")
        except Exception as error:  # inductor/triton failures: one line, cause chained
            raise StageError(f"precision: torch.compile failed on the {params.dtype} CUDA model ({one_line(error)[:400]}); set compile: false") from error
        compiled_metrics = compare(reference, compiled_logits, f"{params.dtype} compiled")
        metrics.update({f"compiled_{name}": value for name, value in compiled_metrics.items()})
    product = save_torch_module(module.cpu(), ctx.workdir, device="cuda", dtype=params.dtype)
    metrics["model_bytes"] = product.path.stat().st_size
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"cuda", "eval_data"},
)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"cuda", "eval_data"},
)
