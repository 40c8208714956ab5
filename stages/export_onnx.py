"""Export a torch model to one self-contained ONNX file with torch's dynamo exporter, and prove it runs.

The exporter (``torch.onnx.export(..., dynamo=True)``, the default in torch 2.13) captures the model
with ``torch.export``, translates it to ONNX and optimizes the graph; the model is kept in memory and
written once by this stage as ``model.onnx`` with its weights inside (no ``.onnx.data`` side file).
The file takes every declared input (``model.inputs``) by name in its declared dtype, with one dynamic
axis per symbolic dimension (``batch``, ``seq``: shared by every input that names it), and gives the
prediction (``model.output``) as its first output, followed by the model's other output tensors by
their dotted paths when ``model.output.keep_others`` is set. The file must pass ``onnx.checker``,
optionally ``onnxsim``, and then match torch's outputs in onnxruntime on real eval inputs: the example
batch, one row when the batch is dynamic, and inputs of another length in every other dynamic
dimension, so a length frozen into the graph is caught here. An exporter failure is reported as it
is: the legacy TorchScript exporter is never tried behind the user's back.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn
from torch.export import Dim

from pipeline.errors import ANSI_CODES, StageError, one_line
from pipeline.progress import library_prints_discarded
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.handles import ONNX_FILE, ModelHandle, OnnxModel
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows, feed_rows, feeds_length, flatten_outputs
from pipeline.torchkit.runners import OnnxRunner


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
        default=True,
        description="the file accepts any batch size; false fixes the batch to model.input_shape[0] (or the inputs' fixed "
        "batch, else 1) while other named dimensions such as seq stay dynamic",
    )


# torch 2.13's own pytree code trips its own deprecation warning on every export; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
# One Dim shared by several inputs makes the exporter say each further use of the name "will not be used"; it is.
warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used", category=UserWarning)

EXAMPLE_ROWS = 8
EXPORT_STEP = re.compile(r"step (\d)/\d")
USER_CODE = re.compile(r'raised this error:\s*\n\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>.+)')
STEP_ADVICE: dict[str | None, str] = {
    "1": "torch.export could not capture the model: change that code (no Python branches or shapes taken "
    "from tensor values; torch.cond for branches), or declare a dimension the model fixes as a number in model.inputs",
    "2": "decomposing the captured graph failed: change the op in the model",
    "3": "an op has no ONNX translation here: replace it in the model, or try another opset",
}


class ExportedForward(nn.Module):
    """The user's module called with the declared inputs in order; returns the exported outputs as a flat tuple."""

    def __init__(self, module: nn.Module, model_io: ModelIO):
        super().__init__()
        self.module = module
        self.model_io = model_io

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model_io.call(self.module, dict(zip(self.model_io.names, inputs)))
        return tuple(tensor for _, tensor in exported_outputs(raw, self.model_io))


def exported_outputs(raw: Any, model_io: ModelIO) -> list[tuple[str, torch.Tensor]]:
    """The prediction under its name, then (``model.output.keep_others``) every other output tensor by its dotted path."""
    prediction = model_io.prediction(raw)
    outputs = [(model_io.prediction_name, prediction)]
    if model_io.output.keep_others:
        outputs += [(name, tensor) for name, tensor in flatten_outputs(raw) if tensor is not prediction]
    return outputs


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


def batch_dim(model_io: ModelIO) -> str | None:
    """The name of the batch dimension, or None when the inputs declare a fixed batch."""
    first = model_io.specs[0].shape[0]
    return first if isinstance(first, str) else None


def dynamic_dims(model_io: ModelIO, params: Params) -> list[str]:
    """The symbolic dimensions the file keeps dynamic: all of them, less the batch under ``dynamic_batch: false``."""
    return [dim for dim in model_io.symbolic_dims if params.dynamic_batch or dim != batch_dim(model_io)]


def dynamic_shapes(model_io: ModelIO, dims: list[str]) -> tuple[tuple[dict[int, Any], ...]] | None:
    """torch.export's dynamic shapes of the positional inputs: one ``Dim`` per dimension name, shared by every input."""
    if not dims:
        return None
    shared = {dim: Dim(dim) for dim in dims}
    per_input = tuple({axis: shared[dim] for axis, dim in enumerate(spec.shape) if dim in shared} for spec in model_io.specs)
    return (per_input,)  # the wrapper's forward takes *inputs: one entry holding every input's axes


def export_model(wrapper: ExportedForward, feeds: Feeds, dims: list[str], output_names: list[str], params: Params) -> onnx.ModelProto:
    """Run the dynamo exporter on the example feeds and return the ONNX model in memory (nothing is written to disk)."""
    # The exporter warns on every first use that torchvision ops are skipped; this project has no torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    model_io = wrapper.model_io
    try:
        program = torch.onnx.export(
            wrapper,
            tuple(model_io.tensors(feeds).values()),
            None,
            dynamo=True,
            external_data=False,
            dynamic_shapes=dynamic_shapes(model_io, dims),
            opset_version=params.opset,
            input_names=list(model_io.names),
            output_names=output_names,
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


def simplify_model(model: onnx.ModelProto, feeds: Feeds) -> onnx.ModelProto:
    """onnxsim's simplification, checked by onnxsim on the real example (every input); StageError if it fails or differs."""
    import onnxsim

    try:
        with library_prints_discarded():  # onnxsim prints "Checking 0/1..." per check
            simplified, check_ok = onnxsim.simplify(model, check_n=1, input_data=dict(feeds), certify=False)
    except Exception as error:  # onnxsim's own failure: say so and how to skip it
        raise StageError(f"export_onnx: onnxsim failed ({one_line(error)}); set simplify: false to keep the exporter's graph") from error
    if not check_ok:
        raise StageError("export_onnx: onnxsim's check found the simplified graph's outputs differ from the exported one; set simplify: false")
    keep_node_metadata(model, simplified)
    return simplified


KEPT_NODE_METADATA = ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")


def keep_node_metadata(exported: onnx.ModelProto, simplified: onnx.ModelProto) -> None:
    """Copy each node's metadata (the exporter records the torch module path there) onto the simplified node of the
    same name: onnxsim keeps node names but drops their metadata, and layers are named by module path downstream
    (quantize_onnx's ``nodes_to_exclude`` patterns and fallback, sensitivity). Only the scope entries are kept: the
    exporter's stack traces would put this machine's file paths into the artifact and grow it by a kilobyte a node."""
    metadata = {node.name: [entry for entry in node.metadata_props if entry.key in KEPT_NODE_METADATA]
                for node in exported.graph.node if node.name}
    for node in simplified.graph.node:
        if not node.metadata_props and metadata.get(node.name):
            node.metadata_props.extend(metadata[node.name])


def example_feeds(ctx: StageContext, dims: list[str]) -> tuple[Feeds, Feeds]:
    """The real eval example (first rows) and the feeds to export it with: the fixed batch, or at least 2 rows.

    torch.export specialises a dimension of size 0 or 1, so every dynamic dimension needs 2 or more in the example.
    """
    example = ctx.data.eval_set.example(EXAMPLE_ROWS)
    rows = max(feeds_length(example), 2) if batch_dim(ctx.io) in dims else ctx.recipe.model.fixed_batch
    export_feeds = cycled_rows(example, rows)
    sizes = ctx.io.check_feeds(export_feeds, "export_onnx: the eval example")
    short = {dim: size for dim, size in sizes.items() if dim in dims and dim != batch_dim(ctx.io) and size < 2}
    if short:
        dim, size = next(iter(short.items()))
        raise StageError(
            f"export_onnx: the eval inputs have {dim}={size}, and torch.export cannot keep a dimension of size 0 or 1 dynamic; "
            f"give eval inputs with {dim} of 2 or more, or declare {dim} as a fixed number in model.inputs"
        )
    return example, export_feeds


def other_length(size: int) -> int:
    """A different size for a dynamic dimension: one shorter, or 3 when it is 2 (torch.export's examples are at least 2)."""
    return size - 1 if size > 2 else size + 1


def parity_feeds(model_io: ModelIO, example: Feeds, export_feeds: Feeds, dims: list[str]) -> list[Feeds]:
    """What onnxruntime is checked on: the export example; one row (dynamic batch); other lengths in the other dims."""
    batches = [export_feeds]
    batch = batch_dim(model_io)
    if batch in dims:
        batches.append(feed_rows(example, slice(0, 1)))
    others = [dim for dim in dims if dim != batch]
    if others:
        sizes = model_io.check_feeds(export_feeds, "export_onnx")
        # synthetic: valid ids within the vocabulary and 0/1 masks, at lengths the example does not have
        batches.append(model_io.synthetic(feeds_length(export_feeds), dims={dim: other_length(sizes[dim]) for dim in others}))
    return batches


def torch_outputs(wrapper: ExportedForward, feeds: Feeds) -> list[np.ndarray]:
    """The wrapper's outputs (prediction first) for these feeds, as numpy arrays."""
    with torch.inference_mode():
        return [tensor.detach().cpu().numpy() for tensor in wrapper(*wrapper.model_io.tensors(feeds).values())]


def onnx_outputs(runner: OnnxRunner, feeds: Feeds) -> list[np.ndarray]:
    """Every output of the ONNX model for these feeds, in the file's order (prediction first)."""
    return runner.session.run(None, runner.session_feeds(feeds))


def described(model_io: ModelIO, feeds: Feeds) -> str:
    """``a batch of 8``, or ``a batch of 2 with seq=15`` when other dimensions are named."""
    sizes = model_io.check_feeds(feeds, "export_onnx")
    others = ", ".join(f"{dim}={size}" for dim, size in sizes.items() if dim != batch_dim(model_io))
    return f"a batch of {feeds_length(feeds)}" + (f" with {others}" if others else "")


def check_parity(ctx: StageContext, batches: list[Feeds], expected: list[list[np.ndarray]], names: list[str], tolerance: float) -> float:
    """Run ``model.onnx`` in onnxruntime on each batch; largest |Δ| of any output from torch, StageError over ``tolerance``."""
    try:
        runner = OnnxRunner(ctx.workdir / ONNX_FILE)
    except Exception as error:  # onnxruntime refused the file
        raise StageError(f"export_onnx: onnxruntime cannot load {ONNX_FILE} ({one_line(error)})") from error
    max_abs_diff = 0.0
    for feeds, references in zip(batches, expected):
        where = described(ctx.io, feeds)
        try:
            outputs = onnx_outputs(runner, feeds)
        except Exception as error:  # e.g. a shape baked into the graph for the export batch size or length
            raise StageError(
                f"export_onnx: onnxruntime failed on {where} ({one_line(error)}); if the model fixes that size, declare it "
                "as a number in model.inputs (for the batch: set dynamic_batch: false)"
            ) from error
        for name, output, reference in zip(names, outputs, references):
            if output.shape != reference.shape:
                raise StageError(f"export_onnx: on {where} onnxruntime gave output {name} shaped {output.shape}, torch {reference.shape}")
            diff = float(np.max(np.abs(output.astype(np.float64) - reference))) if reference.size else 0.0
            if not diff <= tolerance:  # also catches NaN
                raise StageError(
                    f"export_onnx: onnxruntime outputs differ from torch by {diff:.3g} on {where} (output {name}, "
                    f"tolerance {tolerance:g}); an op may be translated differently: check the model, or raise 'tolerance'"
                )
            max_abs_diff = max(max_abs_diff, diff)
    return max_abs_diff


def graph_inputs(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Each input of the file: its shape (names for dynamic axes) and element type."""
    return {
        entry.name: {
            "shape": [dim.dim_param or dim.dim_value for dim in entry.type.tensor_type.shape.dim],
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(entry.type.tensor_type.elem_type).name,
        }
        for entry in model.graph.input
    }


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Export, check, optionally simplify, save ``model.onnx`` and compare it with torch in onnxruntime."""
    wrapper = ExportedForward(only_input(inputs)[1].load(), ctx.io).eval()
    dims = dynamic_dims(ctx.io, params)
    example, export_feeds = example_feeds(ctx, dims)
    batches = parity_feeds(ctx.io, example, export_feeds, dims)
    with torch.inference_mode():
        raw = ctx.io.call(wrapper.module, ctx.io.tensors(export_feeds))
        names = [name for name, _ in exported_outputs(raw, ctx.io)]
    expected = [torch_outputs(wrapper, feeds) for feeds in batches]  # before the exporter touches the module
    model = export_model(wrapper, export_feeds, dims, names, params)
    opset = check_opset(model, params.opset)
    check_onnx(model, "exported")
    nodes_before_simplify = len(model.graph.node)
    if params.simplify:
        model = simplify_model(model, export_feeds)
        check_onnx(model, "simplified")
    path = ctx.workdir / ONNX_FILE
    try:
        onnx.save_model(model, path)  # weights inside the file: no .onnx.data side file
    except ValueError as error:  # protobuf's 2 GB limit
        raise StageError(f"export_onnx: {ONNX_FILE} could not be written as one file ({one_line(error)})") from error
    max_abs_diff = check_parity(ctx, batches, expected, names, params.tolerance)
    metrics = {
        "exporter": "dynamo",
        "opset": opset,
        "simplified": params.simplify,
        "nodes_before_simplify": nodes_before_simplify,
        "nodes": len(model.graph.node),
        "max_abs_diff": max_abs_diff,
        "batch_sizes_checked": [feeds_length(feeds) for feeds in batches],
        "dims_checked": [ctx.io.check_feeds(feeds, "export_onnx") for feeds in batches],
        "inputs": graph_inputs(model),
        "outputs": [entry.name for entry in model.graph.output],
        "dynamic_dims": dims,
        "onnx_bytes": path.stat().st_size,
    }
    return StageOutput(product=OnnxModel(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="onnx", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)
