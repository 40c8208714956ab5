"""Benchmark every variant on the runtime it belongs to, with the FP32 baseline measured in the same run.

For each input variant and the baseline: after warm-up, median and p95 latency at each batch size,
throughput, file size, and the process's peak resident memory while the model loaded and ran its
largest batch. Every figure is also given as a ratio to the baseline measured here, so runs on
different machines stay comparable. Each timed batch is cut from the eval split's feeds (every declared
input, in its declared dtype: real token ids and masks, not made-up values), repeating rows when the
split is smaller than the batch; the shapes timed are recorded per batch size (``input_shapes``).

Timing is interleaved (``pipeline.torchkit.timing``): each batch size is timed in ``rounds`` passes, and
every pass times the baseline and then each variant, so machine-load drift lands on every model alike.
The price: every model stays loaded until the stage ends, so it needs the memory of all of them at once.
Each batch size also records the spread of the rounds' medians; the report warns (``warnings``) when a spread is
over 25% or the 1-minute load average before or after timing was above the machine's CPUs.

With ``profile`` (the default), after timing each model whose runner can profile (``profile(feeds, trace_path)``:
torch and onnxruntime here) is profiled at ``profile_batch``: its costliest operator types in milliseconds per
call (``top_operators``) and a Chrome trace, ``trace-<model>.json`` in the artifact (``trace_file``); any other
runtime's entry says it has no profile (``profile_note``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from pipeline.progress import track
from pipeline.records.reports import BatchTiming, BenchmarkEntry, BenchmarkReport
from pipeline.run.contract import StageContext, StageOutput, declare_stage
from pipeline.run.measure import cpu_model, load_average
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.model_io import Feeds, cycled_rows
from pipeline.torchkit.profiling import top_operators
from pipeline.torchkit.runners import Runner
from pipeline.torchkit.timing import BASELINE_KEY, TimingParams, load_runner, time_interleaved

REPORT_FILE = "benchmark.json"
NO_PROFILE = "no profile for this runtime"
NOISY_SPREAD = 0.25  # rounds whose medians spread wider than this share of the median are flagged
RUNTIMES = {"torch": "torch eager (CPU)", "onnx": "onnxruntime (CPU)", "engine": "TensorRT (CUDA)", "openvino": "OpenVINO (CPU)"}
# torch artifacts that are not eager modules, by their handle's meta format
FORMAT_RUNTIMES = {"aoti": "AOTInductor (CPU)", "torchscript": "TorchScript (CPU)"}


def runtime_of(handle: ModelHandle) -> str:
    """What runs a model, as the report names it: by its format (AOTInductor, TorchScript), else by its kind."""
    return FORMAT_RUNTIMES.get(handle.meta.get("format", ""), RUNTIMES.get(handle.kind, handle.kind))


class Params(TimingParams):
    batch_sizes: list[int] = Field(default=[1, 32], min_length=1, description="batch sizes to time")
    profile: bool = Field(default=True, description="after timing, profile every model: its costliest operators and a Chrome trace")
    profile_batch: int = Field(default=1, ge=1, description="the batch size the profiles are taken at")

    @field_validator("batch_sizes")
    @classmethod
    def positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes must be at least 1")
        return sizes


def input_shapes(eval_inputs: Feeds, size: int) -> dict[str, list[int]]:
    """Each input's shape in a timed batch of ``size`` rows."""
    return {name: [size, *array.shape[1:]] for name, array in eval_inputs.items()}


def trace_files(labels: dict[str, str]) -> dict[str, str]:
    """A distinct, file-safe trace file name per model (``int8[amount=0.5]`` -> ``trace-int8_amount_0.5.json``)."""
    names: dict[str, str] = {}
    for key, label in labels.items():
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.") or "model"
        name, count = f"trace-{stem}.json", 1
        while name in names.values():
            count += 1
            name = f"trace-{stem}-{count}.json"
        names[key] = name
    return names


def profile_model(runner: Runner, feeds: Feeds, trace_path: Path) -> dict[str, Any]:
    """A model's profile fields: its top operators and trace file when its runner can profile, else why not."""
    if not hasattr(runner, "profile"):
        return {"profile_note": NO_PROFILE}
    return {"top_operators": top_operators(runner.profile(feeds, trace_path)), "trace_file": trace_path.name}


def timing_warnings(before: list[float] | None, after: list[float] | None, cpus: int | None, labels: dict[str, str],
                    batches: dict[str, dict[str, BatchTiming]]) -> list[str]:
    """Why the figures may not be exact: a 1-minute load average above the CPUs, and every model and batch size whose
    rounds' medians spread wider than ``NOISY_SPREAD`` of the median."""
    warnings = []
    loads = [load[0] for load in (before, after) if load]
    if cpus and loads and max(loads) > cpus:
        shown = " / ".join(f"{load[0]:.2f}" if load else "-" for load in (before, after))
        warnings.append(f"the machine was loaded: 1-minute load average {shown} (before / after timing) above its {cpus} CPUs; "
                        "figures are slower and noisier than on a quiet machine")
    for key, sizes in batches.items():
        for size, timing in sizes.items():
            if timing.spread is not None and timing.spread > NOISY_SPREAD:
                rounds = len(timing.round_medians_ms or [])
                warnings.append(f"{labels[key]} at batch {size}: the rounds' medians spread {timing.spread:.0%} of the median "
                                f"({timing.round_p5_ms:.3f}-{timing.round_p95_ms:.3f} ms over {rounds} rounds); "
                                "rerun on a quieter machine or with more rounds")
    return warnings


def benchmark_entry(handle: ModelHandle, peak_rss_bytes: int, batches: dict[str, BatchTiming], baseline: ModelHandle,
                    baseline_batches: dict[str, BatchTiming], profiled: dict[str, Any]) -> BenchmarkEntry:
    """One model's figures with its speed-up (baseline latency / its latency) per batch size, its size ratio to the baseline
    and its profile fields (``profile_model``)."""
    return BenchmarkEntry(
        kind=handle.kind,
        runtime=runtime_of(handle),
        size_bytes=handle.size_bytes,
        peak_rss_bytes=peak_rss_bytes,
        batches=batches,
        speedup_vs_baseline={size: baseline_batches[size].p50_ms / timing.p50_ms for size, timing in batches.items()},
        size_ratio_vs_baseline=handle.size_bytes / baseline.size_bytes,
        **profiled,
    )


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Time the baseline and every input variant, interleaved, on the same eval rows and thread count."""
    eval_inputs = ctx.data.eval_set.inputs
    handles = {BASELINE_KEY: ctx.baseline, **inputs}
    largest = cycled_rows(eval_inputs, max(params.batch_sizes))
    runners, peaks = {}, {}
    for name, handle in track(handles.items(), "benchmark: load"):
        runners[name], peaks[name] = load_runner(handle, ctx.io, largest)
    load_before = load_average()
    batches = time_interleaved(runners, eval_inputs, params.batch_sizes, params)
    load_after = load_average()
    labels = {name: ctx.baseline_name if name == BASELINE_KEY else name for name in handles}
    profiled: dict[str, dict[str, Any]] = {name: {} for name in handles}
    if params.profile:
        feeds, files = cycled_rows(eval_inputs, params.profile_batch), trace_files(labels)
        for name, runner in track(runners.items(), "benchmark: profile"):
            profiled[name] = profile_model(runner, feeds, ctx.workdir / files[name])
    entries = {
        name: benchmark_entry(handle, peaks[name], batches[name], ctx.baseline, batches[BASELINE_KEY], profiled[name])
        for name, handle in handles.items()
    }
    baseline = entries.pop(BASELINE_KEY)
    report = BenchmarkReport(
        baseline_stage=ctx.baseline_name,
        threads=torch.get_num_threads(),
        cpu_model=cpu_model(),
        load_average=load_after,
        load_average_before=load_before,
        cpu_count=os.cpu_count(),
        profile_batch=params.profile_batch if params.profile else None,
        warnings=timing_warnings(load_before, load_after, os.cpu_count(), labels, batches),
        warmup=params.warmup,
        min_iterations=params.iterations,
        min_seconds=params.min_seconds,
        rounds=params.rounds,
        input_shapes={str(size): input_shapes(eval_inputs, size) for size in params.batch_sizes},
        baseline=baseline,
        variants=entries,
    )
    metrics = report.model_dump(mode="json")
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx", "engine", "openvino"), makes="report", inputs="many", version=3, params=Params, run=run, runs_alone=True, capabilities={"eval_data"},
)
