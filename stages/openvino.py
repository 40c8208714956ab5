"""Convert an ONNX file or a torch model to an OpenVINO IR for the CPU, check it against that model, and
optionally quantize it to INT8 with NNCF.

An ONNX input is read by OpenVINO's ONNX frontend (``openvino.convert_model(path)``): an INT8 QDQ file
from ``quantize_onnx`` becomes an IR of ``FakeQuantize`` ops that OpenVINO runs as INT8 kernels. A torch
input is captured with ``torch.export`` (every named dimension dynamic, as ``export_onnx`` does) and that
ExportedProgram converted. Either way each input of ``model.inputs`` gets its declared name and shape,
with every named dimension (the batch, ``seq``) dynamic, and the first output is the prediction. The IR
is saved as ``model.xml`` with its weights in ``model.bin``, uncompressed (``compress_to_fp16=False``).

The converted model is checked like ``export_onnx`` checks its file: on a real eval batch of 8 and of 1,
its prediction must be within ``tolerance`` of the input model's (an INT8 QDQ input: within
``max_relative_error``, as OpenVINO's INT8 kernels round differently from onnxruntime's). ``quantize: nncf`` then runs NNCF's
post-training quantization (``nncf.quantize``) on ``subset_size`` train samples of the recipe's data
with ``preset`` and ``fast_bias_correction``. The saved IR is compared with the input model on the whole
eval split by the recipe's task: where the task makes decisions it must agree on at least
``min_agreement`` of them, else stay within ``max_relative_error`` of its outputs.

Without OpenVINO (or NNCF, for ``quantize: nncf``) the stage is skipped with the reason
(``on_unavailable: skip``) or fails (``fail``); both are imported only when the stage runs.
"""

from __future__ import annotations

import importlib.metadata
import itertools
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from pipeline.errors import StageError, StageUnavailable, one_line
from pipeline.progress import library_prints_discarded
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import OPENVINO_FILE, ModelHandle, OpenVinoModel, TorchModel
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows, feed_rows, feeds_length
from pipeline.torchkit.openvino_runner import OpenVinoRunner
from pipeline.torchkit.runners import runner_for
from stages.export_onnx import ExportedForward, dynamic_shapes


class Params(StageParams):
    """How the converted model is checked, optional NNCF INT8 quantization, and what to do without OpenVINO."""

    quantize: Literal["none", "nncf"] = Field(
        default="none", description="none: keep the input's precision (FP32, or the INT8 of a QDQ file); nncf: NNCF post-training INT8"
    )
    preset: Literal["performance", "mixed"] = Field(
        default="performance", description="NNCF's preset: performance (symmetric activations), mixed (asymmetric activations)"
    )
    fast_bias_correction: bool = Field(default=True, description="NNCF's faster bias correction (false: the slower, finer one)")
    subset_size: int = Field(default=300, ge=1, description="train samples NNCF calibrates on")
    tolerance: float = Field(
        default=1e-4, gt=0, description="largest |OpenVINO - input model| prediction difference of an FP32 conversion (absolute), "
        "on an eval batch of 8 and of 1"
    )
    min_agreement: float = Field(
        default=0.9, ge=0.0, le=1.0, description="tasks that make decisions: smallest share of eval decisions on which the saved "
        "IR must agree with the input model"
    )
    max_relative_error: float = Field(
        default=0.1, gt=0.0, description="largest relative error ||IR - input|| / ||input|| of the predictions: of an INT8 (QDQ) "
        "conversion on the eval batches of 8 and 1, and of the saved IR on the eval split for tasks without decisions"
    )
    on_unavailable: Literal["skip", "fail"] = Field(
        default="skip",
        description="without OpenVINO (or NNCF for quantize: nncf): skip the stage (recorded with the reason) or fail the run",
    )


WEIGHTS_FILE = "model.bin"
INSTALL_HINT = "pip install 'optipipe[openvino]'"
PARITY_ROWS = (8, 1)
INT8_OPS = frozenset({"FakeQuantize", "FakeConvert"})
INT8_TYPES = frozenset({"i8", "u8"})
PRESETS = {"performance": "PERFORMANCE", "mixed": "MIXED"}


def missing_package(module: str, distribution: str) -> str | None:
    """None when ``module`` imports, else one line saying it is missing and how to install it."""
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install raising on its native libraries
        return f"{distribution} not installed ({one_line(error)}): {INSTALL_HINT}"
    return None


def require_packages(params: Params) -> None:
    """Return when OpenVINO (and NNCF for ``quantize: nncf``) import; else StageUnavailable (skip) or StageError (fail)."""
    needed = [("openvino", "OpenVINO")] + ([("nncf", "NNCF")] if params.quantize == "nncf" else [])
    reason = next((found for module, name in needed if (found := missing_package(module, name)) is not None), None)
    if reason is None:
        return
    if params.on_unavailable == "skip":
        raise StageUnavailable(f"{reason}: OpenVINO IR not built")
    raise StageError(f"openvino: {reason}: OpenVINO IR not built; install it, or set on_unavailable: skip "
                     "to skip this stage where it cannot run")


def convert_torch(source: TorchModel, model_io: ModelIO, example: Feeds) -> Any:
    """torch.export with every named dimension dynamic, converted by OpenVINO's PyTorch frontend."""
    import openvino as ov

    wrapper = ExportedForward(source.load(), model_io).eval()
    rows = cycled_rows(example, max(feeds_length(example), 2))  # torch.export specializes a dimension of size 1
    try:
        dims = dynamic_shapes(model_io, model_io.symbolic_dims)
        program = torch.export.export(wrapper, tuple(model_io.tensors(rows).values()), dynamic_shapes=dims)
        return ov.convert_model(program)
    except Exception as error:  # capture or conversion failure: one line, the cause chained
        raise StageError(f"openvino: converting the torch model failed ({one_line(error)[:400]}); "
                         "feed this stage the ONNX export instead (needs: [onnx])") from error


def convert_onnx(path: Path) -> Any:
    """The ONNX file read by OpenVINO's ONNX frontend."""
    import openvino as ov

    try:
        return ov.convert_model(str(path))
    except Exception as error:  # an op the frontend lacks, a malformed file
        raise StageError(f"openvino: OpenVINO could not convert {path.name} ({one_line(error)[:400]}); "
                         "try another opset in export_onnx, or feed this stage the torch model") from error


def declare_inputs(model: Any, model_io: ModelIO) -> None:
    """Give the model's inputs the declared names and shapes, every named dimension dynamic; StageError if it cannot take them."""
    import openvino as ov

    if len(model.inputs) != len(model_io.specs):
        found = ", ".join(port.get_any_name() for port in model.inputs)
        raise StageError(f"openvino: the converted model takes {len(model.inputs)} inputs ({found}) but model.inputs declares "
                         f"{len(model_io.specs)} ({', '.join(model_io.names)}); feed this stage an export of this recipe's model")
    ports = {port.get_any_name(): port for port in model.inputs}
    shapes = {}
    for index, spec in enumerate(model_io.specs):
        port = ports.get(spec.name, model.inputs[index])  # an ONNX file keeps the declared names; torch.export numbers them
        port.get_tensor().set_names({spec.name})
        shapes[port] = ov.PartialShape([-1 if isinstance(dim, str) else dim for dim in spec.shape])
    try:
        model.reshape(shapes)
    except Exception as error:  # a size baked into the graph
        raise StageError(f"openvino: the model does not take the declared shapes with dynamic named dimensions ({one_line(error)[:300]}); "
                         "export it with dynamic_batch: true, or declare fixed sizes as numbers in model.inputs") from error


def check_parity(reference: Any, runner: OpenVinoRunner, example: Feeds, params: Params, int8: bool) -> float:
    """How far the prediction is from the input model's on eval batches of 8 and 1, StageError past the bound.

    An FP32 conversion must stay within ``tolerance`` (largest |Δ|); an INT8 one (a QDQ file) runs OpenVINO's INT8
    kernels, which round differently from onnxruntime's, so it must stay within ``max_relative_error`` (||Δ|| / ||input||).
    Returns the largest figure checked.
    """
    largest = 0.0
    for rows in PARITY_ROWS:
        feeds = feed_rows(example, slice(0, rows))
        expected = reference.predict(feeds).astype(np.float64)
        try:
            found = runner.predict(feeds)
        except Exception as error:  # a shape the graph cannot take
            raise StageError(f"openvino: the converted model fails on a batch of {rows} ({one_line(error)[:300]}); "
                             "declare sizes the model fixes as numbers in model.inputs") from error
        if found.shape != expected.shape:
            raise StageError(f"openvino: on a batch of {rows} OpenVINO gave a prediction shaped {list(found.shape)}, "
                             f"the input model {list(expected.shape)}")
        delta = found - expected
        if int8:
            figure = float(np.linalg.norm(delta) / max(np.linalg.norm(expected), 1e-12))
            what, name, bound = "relative error", "max_relative_error", params.max_relative_error
        else:
            figure = float(np.max(np.abs(delta))) if expected.size else 0.0
            what, name, bound = "largest |Δ|", "tolerance", params.tolerance
        if not figure <= bound:  # also catches NaN
            raise StageError(f"openvino: OpenVINO's prediction differs from the input model's by {figure:.3g} ({what}) on a batch of "
                             f"{rows} ({name} {bound:g}); an op may be converted differently: check the model, or raise '{name}'")
        largest = max(largest, figure)
    return largest


def calibration_rows(ctx: StageContext, count: int) -> list[Feeds]:
    """The first ``count`` train samples, one feed each (NNCF's ``subset_size`` counts dataset items)."""
    batches = (ctx.io.to_feeds(tensors) for tensors, _ in ctx.data.train_batches())
    rows = (feed_rows(feeds, slice(row, row + 1)) for feeds in batches for row in range(feeds_length(feeds)))
    samples = list(itertools.islice(rows, count))
    if not samples:
        raise StageError("openvino: the train loader yielded no batches; quantize: nncf calibrates on train data")
    return samples


def quantize_nncf(ctx: StageContext, model: Any, runner: OpenVinoRunner, params: Params) -> tuple[Any, int]:
    """NNCF post-training INT8 of the converted model on ``subset_size`` train samples; the model and the samples used."""
    import nncf

    if is_int8(model):
        raise StageError("openvino: quantize: nncf was asked for a model that is already INT8 (a QDQ file: FakeQuantize ops, "
                         "int8 weights); set quantize: none, or feed this stage the FP32 model")
    samples = calibration_rows(ctx, params.subset_size)
    dataset = nncf.Dataset(samples, runner.request_feeds)
    try:
        with library_prints_discarded():  # NNCF draws its own progress bars on stdout
            quantized = nncf.quantize(model, dataset, preset=getattr(nncf.QuantizationPreset, PRESETS[params.preset]),
                                      fast_bias_correction=params.fast_bias_correction, subset_size=len(samples))
    except Exception as error:  # an op NNCF cannot handle, a calibration failure
        raise StageError(f"openvino: nncf.quantize failed ({one_line(error)[:400]}); "
                         "try preset: mixed, or quantize with quantize_onnx") from error
    return quantized, len(samples)


def op_counts(model: Any) -> dict[str, int]:
    """How many ops of each type the model's graph holds."""
    return dict(Counter(op.get_type_name() for op in model.get_ordered_ops()))


def is_int8(model: Any) -> bool:
    """Whether the model is quantized: FakeQuantize/FakeConvert ops, or weights stored as int8/uint8."""
    return bool(INT8_OPS & set(op_counts(model))) or bool(INT8_TYPES & set(weight_precisions(model)))


def weight_precisions(model: Any) -> dict[str, int]:
    """How many weight elements the model stores in each element type (``f32``, ``i8``, ``u8`` ...)."""
    counts: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            counts[op.get_element_type().get_type_name()] += int(np.prod(op.get_output_shape(0)))
    return dict(counts)


def runtime_precisions(runner: OpenVinoRunner) -> dict[str, int]:
    """How many layers the CPU plugin runs in each precision (its execution graph's ``runtimePrecision``)."""
    layers = runner.compiled.get_runtime_model().get_ordered_ops()
    return dict(Counter(str(layer.get_rt_info()["runtimePrecision"].astype(str)) for layer in layers))


def compare_on_eval(ctx: StageContext, reference: np.ndarray, runner: OpenVinoRunner, params: Params) -> dict[str, Any]:
    """The task's figures of the saved IR against the input model on the eval split; StageError past the floor."""
    evaluation = ctx.data.eval_set
    predictions = predict_all(runner, evaluation.inputs, description="openvino: predict")
    compared = ctx.scoring.compare(reference, predictions, ctx.scoring.task.prepare_targets(evaluation.targets, reference))
    agreement, error = compared["agreement"], compared["relative_error"]
    what = "NNCF INT8 IR" if params.quantize == "nncf" else "IR"
    advice = "try preset: mixed or a larger subset_size" if params.quantize == "nncf" else "check the conversion of the input model"
    if agreement is not None and not agreement >= params.min_agreement:
        raise StageError(f"openvino: the {what} agrees with the input model on only {agreement:.1%} of the decisions on "
                         f"{compared['samples']} eval inputs (min_agreement {params.min_agreement:.0%}); {advice}")
    if agreement is None and not error <= params.max_relative_error:  # also catches NaN
        raise StageError(f"openvino: the {what}'s outputs differ from the input model's by {error:.1%} (relative error) on "
                         f"{compared['samples']} eval inputs (max_relative_error {params.max_relative_error:.0%}); {advice}")
    return {
        "metric": compared["metric"], "value_input": compared["value"] - compared["delta"], "value": compared["value"],
        "figures": compared["figures"], "agreement": agreement, "relative_error": error,
        "max_abs_logit_diff": compared["max_abs_logit_diff"], "eval_samples": compared["samples"],
    }


def package_version(distribution: str) -> str | None:
    """An installed distribution's version, None when it is absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Convert, check the conversion, optionally quantize with NNCF, save the IR and compare it with the input model."""
    require_packages(params)
    import openvino as ov

    _, source = only_input(inputs)
    example = ctx.data.eval_set.example(max(PARITY_ROWS))
    model = convert_torch(source, ctx.io, example) if isinstance(source, TorchModel) else convert_onnx(source.path)
    declare_inputs(model, ctx.io)
    source_runner = runner_for(source, ctx.io)
    converted = OpenVinoRunner(model)
    int8_input = is_int8(model)
    parity = check_parity(source_runner, converted, example, params, int8_input)
    samples = 0
    if params.quantize == "nncf":
        model, samples = quantize_nncf(ctx, model, converted, params)
    path = ctx.workdir / OPENVINO_FILE
    ov.save_model(model, str(path), compress_to_fp16=False)
    product = OpenVinoModel(path=path, meta={"side_files": [WEIGHTS_FILE]})
    reference = predict_all(source_runner, ctx.data.eval_set.inputs, description="openvino: input model")
    saved = OpenVinoRunner(path)
    ops = op_counts(saved.model)
    metrics = {
        "source_kind": source.kind,
        "quantize": params.quantize,
        **({"preset": params.preset, "fast_bias_correction": params.fast_bias_correction, "calibration_samples": samples}
           if params.quantize == "nncf" else {}),
        "int8_input": int8_input,
        ("parity_relative_error" if int8_input else "max_abs_diff"): parity,
        "batch_sizes_checked": list(PARITY_ROWS),
        **compare_on_eval(ctx, reference, saved, params),
        "inputs": {port.get_any_name(): {"shape": str(port.get_partial_shape()), "dtype": port.get_element_type().get_type_name()}
                   for port in saved.model.inputs},
        "dynamic_dims": ctx.io.symbolic_dims,
        "int8": is_int8(saved.model),
        "op_counts": ops,
        "weight_precisions": weight_precisions(saved.model),
        "runtime_precisions": runtime_precisions(saved),
        "xml_bytes": path.stat().st_size,
        "bin_bytes": (ctx.workdir / WEIGHTS_FILE).stat().st_size,
        "bytes": product.size_bytes,
        "size_ratio": source.size_bytes / product.size_bytes,
        "openvino_version": ov.__version__,
        "nncf_version": package_version("nncf"),
    }
    return StageOutput(product=product, metrics=metrics)


STAGE = declare_stage(
    takes=("onnx", "torch"), makes="openvino", inputs="one", version=1, params=Params, run=run, capabilities={"train_data", "eval_data"},
)
