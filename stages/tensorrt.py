"""Build a TensorRT engine for this machine's GPU from an ONNX file or a torch model, and check it against that model.

An ONNX input goes through TensorRT's ONNX parser; a torch input is captured with ``torch.export`` and
compiled by torch-tensorrt (which also writes ``model.ep``, an ExportedProgram that runs the engine from
torch). Either way ``model.engine`` is a plain serialized TensorRT engine taking every declared input
(``model.inputs``) with one optimization profile: the batch from ``min_batch`` to ``max_batch``, tuned
for ``opt_batch``, and every other named dimension (``seq``) at the eval data's size (min = opt = max:
the engine takes inputs of that length); its first output is the prediction. Its meta records the GPU
and TensorRT version it is tied to and which declared input feeds each engine input. Integer inputs
keep their type where TensorRT 10 has it (int64, int32, bool); the runner casts each feed to the type
the engine reports, so a parser that narrowed int64 to int32 is fed int32. ``fp16`` lets TensorRT
compute in half precision; ``int8`` uses the scales of a Q/DQ ONNX model, or calibrates a plain ONNX
model (entropy calibration on ``calibration_batches`` train batches, every input fed). The engine must
agree with the input model on at least 99% of the eval decisions (classes, labels, tokens), or, for
tasks without decisions (regression, custom), stay within 5% relative error of its outputs.

Without a CUDA device or TensorRT the stage is skipped with the reason (``on_unavailable: skip``) or fails
(``fail``). TensorRT and torch-tensorrt are imported only when the stage runs on a machine that has them.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.errors import StageError, one_line
from pipeline.recipe.schema import InputSpec
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit import gpu
from pipeline.torchkit.evaluate import all_finite, predict_all
from pipeline.torchkit.handles import EngineModel, ModelHandle, TorchModel
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows, feed_rows, feeds_length
from pipeline.torchkit.runners import runner_for
from pipeline.torchkit.tasks import output_closeness
from pipeline.torchkit.tensorrt_runner import TensorRTRunner, tensorrt_logger, torch_dtype_of


class Params(StageParams):
    """Precision, the batch range the engine accepts, INT8 calibration, and what to do on a machine without TensorRT."""

    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp16",
        description="fp32; fp16 (TensorRT may run layers in half precision); int8 (Q/DQ scales of the ONNX model, "
        "else entropy calibration on train batches; ONNX input only)",
    )
    workspace_gb: float = Field(default=4, gt=0, description="GPU memory TensorRT may use as scratch space while building, in GiB")
    min_batch: int = Field(default=1, ge=1, description="smallest batch the engine accepts")
    opt_batch: int = Field(default=8, ge=1, description="batch size TensorRT tunes its kernels for (and calibrates at)")
    max_batch: int = Field(default=64, ge=1, description="largest batch the engine accepts")
    calibration_batches: int = Field(
        default=16, ge=1, description="train batches INT8 calibration reads (int8 on an ONNX model without Q/DQ nodes)"
    )
    on_unavailable: Literal["skip", "fail"] = Field(
        default="skip",
        description="without a CUDA device or TensorRT: skip the stage (recorded with the reason) or fail the run",
    )

    @model_validator(mode="after")
    def batch_range_in_order(self) -> "Params":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"min_batch <= opt_batch <= max_batch must hold; got {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        return self


ENGINE_FILE = "model.engine"
PROGRAM_FILE = "model.ep"
MIN_AGREEMENT = 0.99
MAX_RELATIVE_ERROR = 0.05  # tasks without decisions: ||engine - input|| / ||input|| of the eval outputs
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
GIB = 1 << 30


def has_qdq_nodes(onnx_path: Path) -> bool:
    """True when the ONNX graph carries its own quantization (QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


def calibration_data(train_loader: Iterable[Any], model_io: ModelIO, count: int, rows: int) -> list[Feeds]:
    """The first ``count`` train batches (every input) re-cut into batches of ``rows`` (TensorRT calibrates at the opt shape)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in model_io.names}
    for batch in itertools.islice(train_loader, count):
        for name, array in model_io.to_feeds(model_io.split_batch(batch, "train")[0]).items():
            parts[name].append(array)
    if not parts[model_io.names[0]]:
        raise StageError("tensorrt: the train loader yielded no batches; INT8 calibration needs some")
    try:
        data = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    except ValueError as error:  # batches padded to different lengths
        raise StageError(f"tensorrt: the train batches differ in shape beyond the batch ({one_line(error)}); pad every train batch "
                         "to the eval data's length for INT8 calibration") from error
    if feeds_length(data) < rows:
        data = cycled_rows(data, rows)
    usable = feeds_length(data) // rows * rows
    return [feed_rows(data, slice(start, start + rows)) for start in range(0, usable, rows)]


def entropy_calibrator(batches: list[Feeds], dtypes: dict[str, torch.dtype]) -> Any:
    """A TensorRT ``IInt8EntropyCalibrator2`` that feeds ``batches`` (each input in its engine type) from CUDA memory, without a cache file."""
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.pending = iter(batches)
            self.device_batch: list[torch.Tensor] = []  # alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return feeds_length(batches[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.pending, None)
            if batch is None:
                return None
            self.device_batch = [torch.from_numpy(batch[name]).to("cuda", dtypes[name]) for name in names]
            return [int(tensor.data_ptr()) for tensor in self.device_batch]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return EntropyCalibrator()


def profile_shapes(spec: InputSpec, batch_range: list[int], sizes: Mapping[str, int], network_dims: list[int] | None = None) -> list[tuple[int, ...]]:
    """Min, opt and max shape of one input: the batch range first, then the network's fixed sizes, else the declared or eval ones."""
    dims = network_dims or [-1] * len(spec.shape)
    if len(dims) != len(spec.shape):
        raise StageError(f"tensorrt: the ONNX input {spec.name} has {len(dims)} dimensions {dims}, model.inputs declares {len(spec.shape)} {spec.shape}")
    rest = [size if size != -1 else (declared if isinstance(declared, int) else sizes[declared]) for size, declared in zip(dims[1:], spec.shape[1:])]
    return [(batch, *rest) for batch in batch_range]


def batch_range_of(params: Params, fixed_batch: int = -1) -> list[int]:
    """min, opt and max batch: the stage's range, or the file's fixed batch three times."""
    return [params.min_batch, params.opt_batch, params.max_batch] if fixed_batch == -1 else [fixed_batch] * 3


def check_calibration_sizes(batches: list[Feeds], model_io: ModelIO, sizes: Mapping[str, int]) -> None:
    """StageError unless the calibration batches have the profile's sizes in every named dimension but the batch."""
    found = model_io.check_feeds(batches[0], "tensorrt: the train data")
    differing = {dim: size for dim, size in found.items() if dim in sizes and sizes[dim] != size and dim != model_io.specs[0].shape[0]}
    if differing:
        dim, size = next(iter(differing.items()))
        raise StageError(f"tensorrt: the train batches have {dim}={size} but the engine is built for the eval data's {dim}={sizes[dim]}; "
                         "pad train and eval batches to one length for INT8 calibration")


def build_from_onnx(onnx_path: Path, engine_path: Path, params: Params, model_io: ModelIO, sizes: Mapping[str, int],
                    train_loader: Callable[[], Any]) -> dict[str, Any]:
    """Parse the ONNX file, build and serialize the engine with one profile over every input; returns what the build chose."""
    import tensorrt as trt

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise StageError(f"tensorrt: TensorRT's ONNX parser refused {onnx_path.name}: {errors[:500]}")
    tensors = {tensor.name: tensor for tensor in (network.get_input(index) for index in range(network.num_inputs))}
    if sorted(tensors) != sorted(model_io.names):
        raise StageError(f"tensorrt: {onnx_path.name} takes inputs {', '.join(tensors)} but model.inputs declares "
                         f"{', '.join(model_io.names)}; feed this stage an export of this recipe's model (export_onnx)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(params.workspace_gb * GIB))
    batch_range = batch_range_of(params, list(tensors[model_io.names[0]].shape)[0])
    shapes = {spec.name: profile_shapes(spec, batch_range, sizes, list(tensors[spec.name].shape)) for spec in model_io.specs}
    profile = None
    if any(-1 in tuple(tensor.shape) for tensor in tensors.values()):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    qdq = params.precision == "int8" and has_qdq_nodes(onnx_path)
    calibrator = None
    if params.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif params.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if not qdq:
            batches = calibration_data(train_loader(), model_io, params.calibration_batches, batch_range[1])
            check_calibration_sizes(batches, model_io, sizes)
            calibrator = entropy_calibrator(batches, {name: torch_dtype_of(tensor.dtype) for name, tensor in tensors.items()})
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError("tensorrt: TensorRT could not build the engine (its log above says why); try precision: fp32 or a larger workspace_gb")
    with open(engine_path, "wb") as file:
        file.write(serialized)
    return {"batch_range": batch_range, "shapes": shapes, "inputs": {name: name for name in model_io.names},
            "qdq": qdq, "calibrated": calibrator is not None, "side_files": []}


class EngineForward(nn.Module):
    """The user's module called with the declared inputs in order, returning the prediction in float32.

    With ``dtype`` the module and its float inputs run in it (fp16), so an explicitly typed engine computes in it.
    """

    def __init__(self, module: nn.Module, model_io: ModelIO, dtype: torch.dtype | None = None):
        super().__init__()
        self.module = module if dtype is None else module.to(dtype)
        self.model_io = model_io
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        tensors = {
            name: tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor
            for name, tensor in zip(self.model_io.names, inputs)
        }
        return self.model_io.predict(self.module, tensors).float()


def precision_options(compile_function: Callable[..., Any], precision: str) -> dict[str, Any]:
    """Keyword arguments that make torch-tensorrt honour ``precision`` in whichever 2.x version is installed."""
    accepted = inspect.signature(compile_function).parameters
    if "use_explicit_typing" in accepted:  # the graph's dtypes decide: LowerPrecision casts for fp16
        return {"use_explicit_typing": True}
    if "enabled_precisions" in accepted:  # older releases: weak typing, TensorRT picks among these
        return {"enabled_precisions": {torch.float32, torch.float16} if precision == "fp16" else {torch.float32}}
    return {}  # newest releases are always explicitly typed


def user_input_names(program: Any) -> list[str]:
    """The names torch.export gave the forward's inputs (``inputs_0``, ...), which become the engine's input names."""
    from torch.export.graph_signature import InputKind

    return [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]


def build_from_torch(source: TorchModel, engine_path: Path, params: Params, model_io: ModelIO, sizes: Mapping[str, int],
                     eval_inputs: Feeds) -> dict[str, Any]:
    """torch.export with a dynamic batch shared by every input, torch-tensorrt compile; writes ``model.ep`` and ``model.engine``."""
    import torch_tensorrt

    device = torch.device("cuda", torch.cuda.current_device())
    module = EngineForward(source.load(), model_io, torch.float16 if params.precision == "fp16" else None).to(device).eval()
    batch_range = batch_range_of(params)
    dynamic = params.min_batch < params.max_batch
    rows = max(params.opt_batch, 2) if dynamic else params.min_batch  # torch.export specializes a batch of 1
    example = model_io.tensors(cycled_rows(eval_inputs, rows), device)
    shapes = {spec.name: profile_shapes(spec, batch_range, sizes) for spec in model_io.specs}
    specs = [
        torch_tensorrt.Input(min_shape=low, opt_shape=opt, max_shape=high, dtype=example[name].dtype)
        for name, (low, opt, high) in shapes.items()
    ]
    batch = torch.export.Dim("batch", min=params.min_batch, max=params.max_batch)
    dynamic_shapes = (tuple({0: batch} for _ in model_io.specs),) if dynamic else None  # one entry: the forward's *inputs
    options = {"workspace_size": int(params.workspace_gb * GIB), "min_block_size": 1}
    options.update(precision_options(torch_tensorrt.dynamo.compile, params.precision))
    try:
        program = torch.export.export(module, tuple(example.values()), dynamic_shapes=dynamic_shapes)
    except Exception as error:  # any capture failure becomes one line; the cause stays chained
        raise StageError(
            f"tensorrt: torch.export could not capture the model ({one_line(error)[:400]}); "
            "change the model, or feed this stage the ONNX export (needs: [onnx])"
        ) from error
    try:
        compiled = torch_tensorrt.dynamo.compile(program, inputs=specs, **options)
        torch_tensorrt.save(compiled, str(engine_path.parent / PROGRAM_FILE), output_format="exported_program", inputs=list(example.values()))
        serialized = torch_tensorrt.convert_method_to_trt_engine(module, "forward", inputs=specs, ir="dynamo", **options)
    except Exception as error:  # converter gaps, build failures: one line, cause chained
        raise StageError(
            f"tensorrt: torch-tensorrt failed ({one_line(error)[:400]}); feed this stage the ONNX export instead (needs: [onnx])"
        ) from error
    engine_path.write_bytes(serialized)
    return {"batch_range": batch_range, "shapes": shapes, "inputs": dict(zip(user_input_names(program), model_io.names)),
            "qdq": False, "calibrated": False, "side_files": [PROGRAM_FILE]}


def compare(ctx: StageContext, reference: np.ndarray, predictions: np.ndarray, precision: str, calibrated: bool) -> dict[str, Any]:
    """Agreement (or, for tasks without decisions, relative error) and largest |Δ| of the engine vs the input model.

    StageError on NaN/inf, under 99% agreement, or over 5% relative error where the task has no agreement.
    """
    if predictions.shape != reference.shape:
        raise StageError(f"tensorrt: the engine gives outputs shaped {predictions.shape}, the input model {reference.shape}")
    if not all_finite(predictions):
        raise StageError(f"tensorrt: the {precision} engine produced NaN or inf outputs (overflow?); try precision: fp32")
    task = ctx.scoring.task
    agreement = task.agreement(reference, predictions, task.prepare_targets(ctx.data.eval_set.targets, reference))
    closeness = output_closeness(reference, predictions)
    hint = "more calibration_batches, a Q/DQ model, or precision: fp16" if calibrated else "a higher precision"
    if agreement is not None and agreement < MIN_AGREEMENT:
        raise StageError(
            f"tensorrt: the {precision} engine agrees with the input model on {agreement:.2%} of the decisions on {len(reference)} "
            f"eval inputs ({MIN_AGREEMENT:.0%} needed; max |Δ logit| {closeness['max_abs_logit_diff']:.3g}); try {hint}"
        )
    if agreement is None and not closeness["relative_error"] <= MAX_RELATIVE_ERROR:
        raise StageError(
            f"tensorrt: the {precision} engine's outputs differ from the input model's by {closeness['relative_error']:.2%} "
            f"(relative error) on {len(reference)} eval inputs (at most {MAX_RELATIVE_ERROR:.0%} allowed); try {hint}"
        )
    return {"agreement": agreement, "max_abs_diff": closeness["max_abs_logit_diff"], "relative_error": closeness["relative_error"]}


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Check the machine, build the engine, and compare it with the input model on the eval split."""
    _, source = only_input(inputs)
    if source.kind == "torch" and params.precision == "int8":
        raise StageError(
            "tensorrt: int8 from a torch model needs Q/DQ nodes (ModelOpt) that TensorRT can read; "
            "feed this stage the ONNX export (needs: [onnx]) to calibrate with TensorRT"
        )
    checks = [gpu.cuda_status, gpu.tensorrt_status] + ([gpu.torch_tensorrt_status] if source.kind == "torch" else [])
    gpu.require(checks, stage="tensorrt", not_built="TensorRT engine not built", on_unavailable=params.on_unavailable)

    eval_inputs = ctx.data.eval_set.inputs
    sizes = ctx.io.check_feeds(eval_inputs, "tensorrt: the eval data")  # the engine's size of every named dimension
    reference = predict_all(runner_for(source, ctx.io), eval_inputs, description="tensorrt: input model")
    engine_path = ctx.workdir / ENGINE_FILE
    started = time.perf_counter()
    if source.kind == "onnx":
        built = build_from_onnx(source.path, engine_path, params, ctx.io, sizes, lambda: ctx.data.train)
    else:
        built = build_from_torch(source, engine_path, params, ctx.io, sizes, eval_inputs)
    build_seconds = time.perf_counter() - started

    identity = gpu.gpu_identity()
    meta = {**identity, "precision": params.precision, "inputs": built["inputs"], "batch_range": built["batch_range"]}
    predictions = predict_all(TensorRTRunner(engine_path, meta), eval_inputs, description="tensorrt: engine")
    compared = compare(ctx, reference, predictions, params.precision, built["calibrated"])
    if built["side_files"]:
        meta["side_files"] = built["side_files"]
    metrics = {
        "source_kind": source.kind,
        "precision": params.precision,
        "build_seconds": round(build_seconds, 3),
        "engine_bytes": engine_path.stat().st_size,
        **compared,
        "samples": feeds_length(eval_inputs),
        "batch_range": built["batch_range"],
        "input_shapes": {name: {"min": list(low), "opt": list(opt), "max": list(high)} for name, (low, opt, high) in built["shapes"].items()},
        "int8_calibrated": built["calibrated"],
        "int8_qdq": built["qdq"],
        "gpu": identity["gpu_name"],
        "compute_capability": identity["compute_capability"],
        "tensorrt_version": identity["tensorrt_version"],
    }
    return StageOutput(product=EngineModel(path=engine_path, meta=meta), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx"), makes="engine", inputs="one", version=1, params=Params, run=run, capabilities={"cuda", "train_data", "eval_data"},
)
