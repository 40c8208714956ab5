"""Convert a torch model to a frozen, inference-optimised TorchScript module, ``model.torchscript.pt``, for serving
stacks that load TorchScript (``torch.jit.load`` in Python, or ``torch::jit::load`` in C++ libtorch).

``method: trace`` (default) records the ops the model runs on real eval inputs (``torch.jit.trace`` of the declared
inputs in order): a Python branch or a size taken from a tensor is frozen at the value the example gave, and
torch's TracerWarnings about that are recorded in the metrics. ``method: script`` compiles the model's own
``forward`` with ``torch.jit.script`` first, so its Python control flow is kept (the model must be scriptable).
Either way the module returns the prediction first, then (``model.output.keep_others``) the other outputs, and is
frozen (``torch.jit.freeze``: weights and attributes become constants, Conv+BatchNorm and similar folds applied) before
it is saved. ``torch.jit.optimize_for_inference`` (oneDNN weight layouts) is applied when the file is loaded to run,
by optipipe's runner and by a user alike: its oneDNN constants cannot be saved (torch 2.13's ``torch.jit.load`` of such
a file fails with "required keyword attribute 'value' is undefined"). The loaded, optimised module must match the
input model on real eval inputs at two batch sizes (the example and one row). The product stays a ``torch`` model
(meta ``format: torchscript``), loaded back with ``torch.jit.load``: a file this stage wrote into the digest-checked
store, never a user's file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.handles import ModelHandle, TorchModel
from pipeline.torchkit.model_io import Feeds, feeds_length
from pipeline.torchkit.torch_formats import EXAMPLE_ROWS, TORCHSCRIPT_FILE, TORCHSCRIPT_FORMAT, DeployedRunner, check_batches, check_parity
from stages.export_onnx import ExportedForward, torch_outputs


class Params(StageParams):
    """How the model becomes TorchScript, and how closely it must match."""

    method: Literal["trace", "script"] = Field(
        default="trace",
        description="trace: record the ops run on the eval example (Python branches frozen); script: torch.jit.script the "
        "model's forward first (control flow kept; the model must be scriptable)",
    )
    tolerance: float = Field(
        default=1e-4, gt=0, description="largest |TorchScript - input model| output difference allowed, as a fraction of the largest output"
    )


def to_torchscript(module: torch.nn.Module, ctx: StageContext, feeds: Feeds, method: str) -> tuple[torch.jit.ScriptModule, list[str]]:
    """The traced (optionally scripted first) and frozen module, and the tracer's warnings (first lines)."""
    try:
        body = torch.jit.script(module) if method == "script" else module
    except Exception as error:  # unsupported Python in forward(): one line, the cause chained
        raise StageError(
            f"torchscript: torch.jit.script could not compile the model ({one_line(error)[:400]}); use method: trace"
        ) from error
    wrapper = ExportedForward(body, ctx.io).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(wrapper, tuple(ctx.io.tensors(feeds).values()), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
        except Exception as error:  # ops the tracer or freezing cannot take: one line, the cause chained
            fix = "use method: script" if method == "trace" else "change the op it names"
            raise StageError(f"torchscript: torch.jit.{method} could not convert the model ({one_line(error)[:400]}); {fix}") from error
    tracer_warnings = sorted({str(entry.message).splitlines()[0] for entry in caught if entry.category is torch.jit.TracerWarning})
    return frozen, tracer_warnings


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Trace (or script), freeze and save the module, load and optimise it back and check it against the input model."""
    module = only_input(inputs)[1].load()
    export_feeds, batches = check_batches(ctx.data.eval_set.example(EXAMPLE_ROWS))
    expected = [torch_outputs(ExportedForward(module, ctx.io).eval(), feeds) for feeds in batches]
    frozen, tracer_warnings = to_torchscript(module, ctx, export_feeds, params.method)
    path = ctx.workdir / TORCHSCRIPT_FILE
    torch.jit.save(frozen, str(path))
    runner = DeployedRunner.of(path, TORCHSCRIPT_FORMAT, ctx.io)
    metrics = {
        "method": params.method,
        "max_relative_diff": check_parity("torchscript", TORCHSCRIPT_FORMAT, runner, batches, expected, params.tolerance),
        "batch_sizes_checked": [feeds_length(feeds) for feeds in batches],
        "tracer_warnings": tracer_warnings,
        "file_bytes": path.stat().st_size,
    }
    product = TorchModel(path=path, meta={"format": TORCHSCRIPT_FORMAT, "method": params.method, "torch": torch.__version__})
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)
