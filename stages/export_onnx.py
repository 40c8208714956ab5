"""Export a torch model to one self-contained ONNX file with torch's dynamo exporter, and prove it runs.

The exporter (``torch.onnx.export(..., dynamo=True)``, the default in torch 2.13) captures the model
with ``torch.export``, translates it to ONNX and optimizes the graph; the model is kept in memory and
written once by this stage as ``model.onnx`` with its weights inside (no ``.onnx.data`` side file).
The file must pass ``onnx.checker``, optionally ``onnxsim``, and then match torch's outputs in
onnxruntime on real eval inputs, at two batch sizes when the batch axis is dynamic. An exporter failure
is reported as it is: the legacy TorchScript exporter is never tried behind the user's back.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping

import numpy as np
import onnx
import torch
from pydantic import Field
from torch.export import Dim

from pipeline.errors import ANSI_CODES, StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.evaluate import rows_of
from pipeline.torchkit.handles import ONNX_FILE, ModelHandle, OnnxModel
from pipeline.torchkit.runners import OnnxRunner, TorchRunner


class Params(StageParams):
    """Target opset, graph simplification, and how the exported file is checked."""

    opset: int = Field(
        default=18,
        ge=13,
        description="ONNX opset of the default domain; the exporter implements 18 and up and converts down "
        "only when the model allows it, and the stage fails if the file's opset is not this one",
    )
    simplify: bool = Field(default=True, description="simplify the exported graph with onnxsim (checked by onnxsim itself)")
    tolerance: float = Field(
        default=1e-4, gt=0, description="largest |onnxruntime - torch| output difference allowed (absolute)"
    )
    dynamic_batch: bool = Field(
        default=True, description="the file accepts any batch size; false fixes it to model.input_shape[0]"
    )


# torch 2.13's own pytree code trips its own deprecation warning on every export; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORT_STEP = re.compile(r"step (\d)/\d")
USER_CODE = re.compile(r'raised this error:\s*\n\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>.+)')
STEP_ADVICE: dict[str | None, str] = {
    "1": "torch.export could not capture the model: change that code (no Python branches or shapes taken "
    "from tensor values; torch.cond for branches)",
    "2": "decomposing the captured graph failed: change the op in the model",
    "3": "an op has no ONNX translation here: replace it in the model, or try another opset",
}


def exporter_failure(error: BaseException, opset: int) -> str:
    """One line naming the exporter step that failed, its root cause, the user's code line and a fix."""
    text = ANSI_CODES.sub("", str(error))
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    step = EXPORT_STEP.search(text)
    step_number = step.group(1) if step else None
    at_step = f" at step {step_number}/3" if step_number else ""
    where = USER_CODE.search(text)
    located = f" at {where['file'].rsplit('/', 1)[-1]}:{where['line']} `{where['code'].strip()}`" if where else ""
    advice = STEP_ADVICE.get(step_number, "change the model or the opset")
    return (
        f"export_onnx: the dynamo exporter failed{at_step} (opset {opset}): {one_line(root)[:400]}{located}; "
        f"{advice}. The legacy exporter is not tried instead"
    )


def export_model(module: torch.nn.Module, batch: torch.Tensor, params: Params) -> onnx.ModelProto:
    """Run the dynamo exporter and return the ONNX model in memory (nothing is written to disk)."""
    # The exporter warns on every first use that torchvision ops are skipped; this project has no torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            module,
            (batch,),
            None,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: Dim("batch")},) if params.dynamic_batch else None,
            opset_version=params.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,  # else it prints "[torch.onnx] Obtain model graph ..." progress to stdout
            report=False,
        )
    except Exception as error:  # any exporter failure becomes one clear line; the cause stays chained
        raise StageError(exporter_failure(error, params.opset)) from error
    return program.model_proto


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain."""
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def check_opset(model: onnx.ModelProto, requested: int) -> int:
    """The file's opset; StageError when the exporter could not convert to the requested one."""
    written = default_opset(model)
    if written != requested:
        raise StageError(
            f"export_onnx: opset {requested} was requested but the dynamo exporter wrote opset {written} "
            f"(it implements opset 18 and up and could not convert this model down); set opset: {written} or higher"
        )
    return written


def check_onnx(model: onnx.ModelProto, what: str) -> None:
    """Run onnx.checker with shape inference on ``model``."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # ValidationError, InferenceError, or ValueError for >2 GB models
        raise StageError(f"export_onnx: the {what} model fails onnx.checker ({one_line(error)})") from error


def simplify_model(model: onnx.ModelProto, batch: np.ndarray) -> onnx.ModelProto:
    """onnxsim's simplification, checked by onnxsim on the real batch; StageError if it fails or differs."""
    import onnxsim

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxsim prints "Checking 0/1..." per check
            simplified, check_ok = onnxsim.simplify(model, check_n=1, input_data={INPUT_NAME: batch}, certify=False)
    except Exception as error:  # onnxsim's own failure: say so and how to skip it
        raise StageError(f"export_onnx: onnxsim failed ({one_line(error)}); set simplify: false to keep the exporter's graph") from error
    if not check_ok:
        raise StageError("export_onnx: onnxsim's check found the simplified graph's outputs differ from the exported one; set simplify: false")
    return simplified


def check_parity(ctx: StageContext, batches: list[np.ndarray], expected: list[np.ndarray], tolerance: float) -> float:
    """Run ``model.onnx`` in onnxruntime on each batch; largest |Δ| from torch, StageError over ``tolerance``."""
    try:
        runner = OnnxRunner(ctx.workdir / ONNX_FILE)
    except Exception as error:  # onnxruntime refused the file
        raise StageError(f"export_onnx: onnxruntime cannot load {ONNX_FILE} ({one_line(error)})") from error
    max_abs_diff = 0.0
    for batch, reference in zip(batches, expected):
        try:
            outputs = runner.predict(batch)
        except Exception as error:  # e.g. a shape baked into the graph for the export batch size
            raise StageError(
                f"export_onnx: onnxruntime failed on a batch of {len(batch)} ({one_line(error)}); "
                "if the model fixes its batch size, set dynamic_batch: false"
            ) from error
        if outputs.shape != reference.shape:
            raise StageError(f"export_onnx: on a batch of {len(batch)} onnxruntime gave shape {outputs.shape}, torch {reference.shape}")
        diff = float(np.max(np.abs(outputs - reference))) if reference.size else 0.0
        if not diff <= tolerance:  # also catches NaN
            raise StageError(
                f"export_onnx: onnxruntime outputs differ from torch by {diff:.3g} on a batch of {len(batch)} "
                f"(tolerance {tolerance:g}); an op may be translated differently: check the model, or raise 'tolerance'"
            )
        max_abs_diff = max(max_abs_diff, diff)
    return max_abs_diff


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Export, check, optionally simplify, save ``model.onnx`` and compare it with torch in onnxruntime."""
    module = only_input(inputs)[1].load()
    example = ctx.data.example_batch().float()
    if params.dynamic_batch:
        export_batch = example
        batches = [example, rows_of(example, 1 if len(example) != 1 else 2)]
    else:
        export_batch = rows_of(example, ctx.recipe.model.input_shape[0])
        batches = [export_batch]
    arrays = [batch.numpy() for batch in batches]
    torch_runner = TorchRunner(module)
    expected = [torch_runner.predict(array) for array in arrays]  # before the exporter touches the module
    model = export_model(module, export_batch, params)
    opset = check_opset(model, params.opset)
    check_onnx(model, "exported")
    nodes_before_simplify = len(model.graph.node)
    if params.simplify:
        model = simplify_model(model, export_batch.numpy())
        check_onnx(model, "simplified")
    path = ctx.workdir / ONNX_FILE
    try:
        onnx.save_model(model, path)  # weights inside the file: no .onnx.data side file
    except ValueError as error:  # protobuf's 2 GB limit
        raise StageError(f"export_onnx: {ONNX_FILE} could not be written as one file ({one_line(error)})") from error
    max_abs_diff = check_parity(ctx, arrays, expected, params.tolerance)
    metrics = {
        "exporter": "dynamo",
        "opset": opset,
        "simplified": params.simplify,
        "nodes_before_simplify": nodes_before_simplify,
        "nodes": len(model.graph.node),
        "max_abs_diff": max_abs_diff,
        "batch_sizes_checked": [len(batch) for batch in batches],
        "onnx_bytes": path.stat().st_size,
    }
    return StageOutput(product=OnnxModel(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="onnx", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)


STAGE = declare_stage(
    takes=("torch",), makes="onnx", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)
