"""Compile a torch model ahead of time with AOTInductor into one package, ``model.pt2``, loadable without optipipe.

The model is captured with ``torch.export`` (the declared inputs in order, one ``Dim`` per symbolic dimension
shared by every input that names it, as ``export_onnx`` does) and compiled by
``torch._inductor.aoti_compile_and_package`` into C++ kernels and a shared library, with the weights frozen
into it as constants (``freezing``). The package runs in any process with the same torch and a CPU with the
same instruction set: ``torch._inductor.aoti_load_package("model.pt2")(*inputs)`` returns the prediction first,
then (``model.output.keep_others``) the other outputs. Building needs a C++ compiler (g++, or ``CXX``);
loading and running the package does not. Without one the stage is skipped with the reason
(``on_unavailable: skip``) or fails (``fail``). The package must match the input model on real eval inputs at
two batch sizes (the capture example and one row). The product stays a ``torch`` model (meta ``format: aoti``),
so ``validate``, ``benchmark`` and ``select`` take it; stages that change a model cannot (put them before this one).
Measured on torch 2.13 CPU: the package calls aten's plain convolution for every conv (no oneDNN weight prepacking or
conv+pointwise fusion, which in-process ``torch.compile`` with freezing does), so a conv net runs at about eager speed;
a small model gains from the fused elementwise kernels and the absence of Python per op.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from pipeline.errors import StageError, StageUnavailable, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.handles import ModelHandle, TorchModel
from pipeline.torchkit.model_io import Feeds, feeds_length
from pipeline.torchkit.torch_formats import AOTI_FILE, AOTI_FORMAT, EXAMPLE_ROWS, DeployedRunner, check_batches, check_parity
from stages.export_onnx import STEP_ADVICE, USER_CODE, ExportedForward, dynamic_shapes, torch_outputs


class Params(StageParams):
    """Inductor's options, the thread count the kernels are made for, parity, and what to do without a C++ compiler."""

    freezing: bool = Field(default=True, description="fold the weights into the compiled code as constants (inductor's `freezing`)")
    max_autotune: bool = Field(
        default=False, description="benchmark alternative kernels while compiling (inductor's `max_autotune`): slower to build"
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="OpenMP threads the kernels are generated for (inductor's `cpp.threads`); default: torch's thread count "
        "when the stage runs. 1 makes kernels that never fork, which small models on a busy machine may prefer",
    )
    tolerance: float = Field(
        default=1e-4, gt=0, description="largest |package - input model| output difference allowed, as a fraction of the largest output"
    )
    on_unavailable: Literal["skip", "fail"] = Field(
        default="skip", description="without a C++ compiler to build the package: skip the stage (recorded with the reason) or fail"
    )


def compiler_status() -> str | None:
    """None when inductor finds a C++ compiler, else why not (one line)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # InvalidCxxCompiler when neither CXX nor g++ runs
        return f"no C++ compiler for AOTInductor ({one_line(error)[:200]}): install g++ or point CXX at one"
    return None


def require_compiler(on_unavailable: str) -> None:
    """Return when a C++ compiler is there; else StageUnavailable (skip) or StageError (fail)."""
    reason = compiler_status()
    if reason is None:
        return
    if on_unavailable == "skip":
        raise StageUnavailable(f"{reason}: AOTInductor package not built")
    raise StageError(f"compile: {reason}; set on_unavailable: skip to skip this stage where it cannot run")


def inductor_configs(params: Params) -> dict[str, Any]:
    """The inductor options the package is compiled with (recorded in the product's meta); every kernel is named to
    torch.profiler (``cpp.enable_kernel_profile``: a flag test per kernel while no profiler runs) for the benchmark's profile."""
    return {"freezing": params.freezing, "max_autotune": params.max_autotune, "cpp.threads": params.threads or torch.get_num_threads(),
            "cpp.enable_kernel_profile": True}


def capture_failure(error: BaseException) -> str:
    """One line: the root cause of a torch.export failure, the user's code line it names, and the fix."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    where = USER_CODE.search(str(error))
    located = f" at {where['file'].rsplit('/', 1)[-1]}:{where['line']} `{where['code'].strip()}`" if where else ""
    return f"compile: {STEP_ADVICE['1']} ({one_line(root)[:300]}{located}); the torchscript stage with method: script keeps Python branches"


def capture(wrapper: ExportedForward, feeds: Feeds) -> torch.export.ExportedProgram:
    """torch.export of the wrapper on these feeds, every symbolic dimension dynamic; StageError in one line on failure."""
    model_io = wrapper.model_io
    try:
        example = tuple(model_io.tensors(feeds).values())
        return torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes(model_io, model_io.symbolic_dims))
    except Exception as error:  # any capture failure becomes one clear line; the cause stays chained
        raise StageError(capture_failure(error)) from error


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Capture, compile and package the model, load the package back and check it against the input model."""
    require_compiler(params.on_unavailable)
    wrapper = ExportedForward(only_input(inputs)[1].load(), ctx.io).eval()
    export_feeds, batches = check_batches(ctx.data.eval_set.example(EXAMPLE_ROWS))
    expected = [torch_outputs(wrapper, feeds) for feeds in batches]  # before torch.export touches the module
    program = capture(wrapper, export_feeds)
    configs = inductor_configs(params)
    path = ctx.workdir / AOTI_FILE
    started = time.perf_counter()
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=dict(configs))
    except Exception as error:  # lowering or C++ build failures: one line, cause chained
        raise StageError(
            f"compile: AOTInductor could not compile the captured model ({one_line(error)[:400]}); change the op it names"
        ) from error
    compile_seconds = time.perf_counter() - started
    runner = DeployedRunner.of(path, AOTI_FORMAT, ctx.io)
    max_relative_diff = check_parity("compile", AOTI_FORMAT, runner, batches, expected, params.tolerance)
    metrics = {
        "compile_seconds": compile_seconds,
        "package_bytes": path.stat().st_size,
        "inductor_configs": configs,
        "max_relative_diff": max_relative_diff,
        "batch_sizes_checked": [feeds_length(feeds) for feeds in batches],
        "dynamic_dims": ctx.io.symbolic_dims,
        "torch": torch.__version__,
    }
    product = TorchModel(path=path, meta={"format": AOTI_FORMAT, "inductor_configs": configs, "torch": torch.__version__})
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, capabilities={"eval_data"},
)
