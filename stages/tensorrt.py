"""Build a TensorRT engine for this machine's GPU from an ONNX file or a torch model, and check it against that model.

An ONNX input goes through TensorRT's ONNX parser; a torch input is captured with ``torch.export`` and
compiled by torch-tensorrt (which also writes ``model.ep``, an ExportedProgram that runs the engine from
torch). Either way ``model.engine`` is a plain serialized TensorRT engine with a dynamic batch from
``min_batch`` to ``max_batch``, tuned for ``opt_batch``; its meta records the GPU and TensorRT version it
is tied to. ``fp16`` lets TensorRT compute in half precision; ``int8`` uses the scales of a Q/DQ ONNX
model, or calibrates a plain ONNX model (entropy calibration on ``calibration_batches`` train batches).
The engine must predict the input model's class on at least 99% of the eval inputs.

Without a CUDA device or TensorRT the stage is skipped with the reason (``on_unavailable: skip``) or fails
(``fail``). TensorRT and torch-tensorrt are imported only when the stage runs on a machine that has them.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit import gpu
from pipeline.torchkit.data import split_batch
from pipeline.torchkit.evaluate import all_finite, logit_parity, predict_all, rows_of
from pipeline.torchkit.handles import EngineModel, ModelHandle, TorchModel
from pipeline.torchkit.runners import runner_for
from pipeline.torchkit.tensorrt_runner import TensorRTRunner, tensorrt_logger


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
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
GIB = 1 << 30


def has_qdq_nodes(onnx_path: Path) -> bool:
    """True when the ONNX graph carries its own quantization (QuantizeLinear/DequantizeLinear nodes)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


def calibration_data(train_loader: Iterable[Any], count: int, rows: int) -> list[np.ndarray]:
    """The first ``count`` train batches re-cut into batches of ``rows`` (TensorRT calibrates at the profile's opt shape)."""
    arrays = []
    for index, batch in enumerate(train_loader):
        if index == count:
            break
        arrays.append(split_batch(batch, "train")[0].float().numpy())
    if not arrays:
        raise StageError("tensorrt: the train loader yielded no batches; INT8 calibration needs some")
    data = np.concatenate(arrays)
    if len(data) < rows:
        data = rows_of(data, rows)
    usable = len(data) // rows * rows
    return [np.ascontiguousarray(chunk) for chunk in data[:usable].reshape(-1, rows, *data.shape[1:])]


def entropy_calibrator(batches: list[np.ndarray]) -> Any:
    """A TensorRT ``IInt8EntropyCalibrator2`` that feeds ``batches`` from CUDA memory, without a cache file."""
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.pending = iter(batches)
            self.device_batch: torch.Tensor | None = None  # alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return len(batches[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.pending, None)
            if batch is None:
                return None
            self.device_batch = torch.from_numpy(batch).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return EntropyCalibrator()


def build_from_onnx(onnx_path: Path, engine_path: Path, params: Params, sample_shape: list[int], train_loader: Callable[[], Any]) -> dict[str, Any]:
    """Parse the ONNX file, build and serialize the engine; returns what the build chose."""
    import tensorrt as trt

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise StageError(f"tensorrt: TensorRT's ONNX parser refused {onnx_path.name}: {errors[:500]}")
    if network.num_inputs != 1:
        raise StageError(f"tensorrt: {onnx_path.name} has {network.num_inputs} inputs; this stage builds single-input models")
    tensor = network.get_input(0)
    dims = list(tensor.shape)
    if len(dims) != len(sample_shape) + 1:
        raise StageError(f"tensorrt: {onnx_path.name} takes a {len(dims)}-d input {dims}, model.input_shape is {len(sample_shape) + 1}-d")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(params.workspace_gb * GIB))
    batch_range = [params.min_batch, params.opt_batch, params.max_batch] if dims[0] == -1 else [dims[0]] * 3
    profile = None
    if -1 in dims:
        profile = builder.create_optimization_profile()
        fixed = [size if size != -1 else sample for size, sample in zip(dims[1:], sample_shape)]
        profile.set_shape(tensor.name, *[(batch, *fixed) for batch in batch_range])
        config.add_optimization_profile(profile)
    qdq = params.precision == "int8" and has_qdq_nodes(onnx_path)
    calibrator = None
    if params.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif params.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if not qdq:
            calibrator = entropy_calibrator(calibration_data(train_loader(), params.calibration_batches, batch_range[1]))
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError("tensorrt: TensorRT could not build the engine (its log above says why); try precision: fp32 or a larger workspace_gb")
    with open(engine_path, "wb") as file:
        file.write(serialized)
    return {"batch_range": batch_range, "qdq": qdq, "calibrated": calibrator is not None, "side_files": []}


class LowerPrecision(nn.Module):
    """Runs ``module`` in ``dtype`` behind float32 inputs and outputs, so an explicitly typed engine computes in it."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs.to(self.dtype)).float()


def precision_options(compile_function: Callable[..., Any], precision: str) -> dict[str, Any]:
    """Keyword arguments that make torch-tensorrt honour ``precision`` in whichever 2.x version is installed."""
    accepted = inspect.signature(compile_function).parameters
    if "use_explicit_typing" in accepted:  # the graph's dtypes decide: LowerPrecision casts for fp16
        return {"use_explicit_typing": True}
    if "enabled_precisions" in accepted:  # older releases: weak typing, TensorRT picks among these
        return {"enabled_precisions": {torch.float32, torch.float16} if precision == "fp16" else {torch.float32}}
    return {}  # newest releases are always explicitly typed


def build_from_torch(source: TorchModel, engine_path: Path, params: Params, sample_shape: list[int], eval_inputs: np.ndarray) -> dict[str, Any]:
    """torch.export with a dynamic batch, torch-tensorrt compile; writes ``model.ep`` and ``model.engine``."""
    import torch_tensorrt

    module = source.load()
    if params.precision == "fp16":
        module = LowerPrecision(module, torch.float16)
    device = torch.device("cuda", torch.cuda.current_device())
    module = module.to(device).eval()
    batch_range = [params.min_batch, params.opt_batch, params.max_batch]
    dynamic = params.min_batch < params.max_batch
    rows = max(params.opt_batch, 2) if dynamic else params.min_batch  # torch.export specializes a batch of 1
    example = torch.from_numpy(rows_of(eval_inputs, rows)).to(device)
    spec = torch_tensorrt.Input(
        min_shape=(params.min_batch, *sample_shape),
        opt_shape=(params.opt_batch, *sample_shape),
        max_shape=(params.max_batch, *sample_shape),
        dtype=torch.float32,
    )
    dynamic_shapes = ({0: torch.export.Dim("batch", min=params.min_batch, max=params.max_batch)},) if dynamic else None
    options = {"workspace_size": int(params.workspace_gb * GIB), "min_block_size": 1}
    options.update(precision_options(torch_tensorrt.dynamo.compile, params.precision))
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as error:  # any capture failure becomes one line; the cause stays chained
        raise StageError(
            f"tensorrt: torch.export could not capture the model ({one_line(error)[:400]}); "
            "change the model, or feed this stage the ONNX export (needs: [onnx])"
        ) from error
    try:
        compiled = torch_tensorrt.dynamo.compile(program, inputs=[spec], **options)
        torch_tensorrt.save(compiled, str(engine_path.parent / PROGRAM_FILE), output_format="exported_program", inputs=[example])
        serialized = torch_tensorrt.convert_method_to_trt_engine(module, "forward", inputs=[spec], ir="dynamo", **options)
    except Exception as error:  # converter gaps, build failures: one line, cause chained
        raise StageError(
            f"tensorrt: torch-tensorrt failed ({one_line(error)[:400]}); feed this stage the ONNX export instead (needs: [onnx])"
        ) from error
    engine_path.write_bytes(serialized)
    return {"batch_range": batch_range, "qdq": False, "calibrated": False, "side_files": [PROGRAM_FILE]}


def compare(reference: np.ndarray, logits: np.ndarray, precision: str, calibrated: bool) -> tuple[float, float]:
    """Argmax agreement and largest |Δ logit| of the engine vs the input model; StageError under 99% or on NaN/inf."""
    if logits.shape != reference.shape:
        raise StageError(f"tensorrt: the engine gives outputs shaped {logits.shape}, the input model {reference.shape}")
    if not all_finite(logits):
        raise StageError(f"tensorrt: the {precision} engine produced NaN or inf outputs (overflow?); try precision: fp32")
    agreement, max_abs_diff = logit_parity(reference, logits)
    if agreement < MIN_AGREEMENT:
        hint = "more calibration_batches, a Q/DQ model, or precision: fp16" if calibrated else "a higher precision"
        raise StageError(
            f"tensorrt: the {precision} engine predicts the input model's class on {agreement:.2%} of {len(reference)} "
            f"eval inputs ({MIN_AGREEMENT:.0%} needed; max |Δ logit| {max_abs_diff:.3g}); try {hint}"
        )
    return agreement, max_abs_diff


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

    sample_shape = list(ctx.recipe.model.input_shape[1:])
    eval_inputs = ctx.data.eval_arrays[0]
    if list(eval_inputs.shape[1:]) != sample_shape:
        raise StageError(f"tensorrt: eval inputs are shaped {list(eval_inputs.shape[1:])} per row, model.input_shape says {sample_shape}")
    reference = predict_all(runner_for(source), eval_inputs, description="tensorrt: input model")
    engine_path = ctx.workdir / ENGINE_FILE
    started = time.perf_counter()
    if source.kind == "onnx":
        built = build_from_onnx(source.path, engine_path, params, sample_shape, lambda: ctx.data.train)
    else:
        built = build_from_torch(source, engine_path, params, sample_shape, eval_inputs)
    build_seconds = time.perf_counter() - started

    identity = gpu.gpu_identity()
    runner = TensorRTRunner(engine_path, identity)
    logits = predict_all(runner, eval_inputs, description="tensorrt: engine")
    agreement, max_abs_diff = compare(reference, logits, params.precision, built["calibrated"])
    meta = {**identity, "precision": params.precision, "input_name": runner.input_name, "batch_range": built["batch_range"]}
    if built["side_files"]:
        meta["side_files"] = built["side_files"]
    metrics = {
        "source_kind": source.kind,
        "precision": params.precision,
        "build_seconds": round(build_seconds, 3),
        "engine_bytes": engine_path.stat().st_size,
        "agreement": agreement,
        "max_abs_diff": max_abs_diff,
        "samples": int(len(eval_inputs)),
        "batch_range": built["batch_range"],
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


STAGE = declare_stage(
    takes=("torch", "onnx"), makes="engine", inputs="one", version=1, params=Params, run=run, capabilities={"cuda", "train_data", "eval_data"},
)
