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
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from pydantic import Field, field_validator

from pipeline.progress import track
from pipeline.records.reports import BatchTiming, BenchmarkEntry, BenchmarkReport
from pipeline.run.contract import StageContext, StageOutput, declare_stage
from pipeline.run.measure import cpu_model, load_average
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.model_io import Feeds, cycled_rows
from pipeline.torchkit.timing import BASELINE_KEY, TimingParams, load_runner, time_interleaved

REPORT_FILE = "benchmark.json"
RUNTIMES = {"torch": "torch eager (CPU)", "onnx": "onnxruntime (CPU)", "engine": "TensorRT (CUDA)"}


class Params(TimingParams):
    batch_sizes: list[int] = Field(default=[1, 32], min_length=1, description="batch sizes to time")

    @field_validator("batch_sizes")
    @classmethod
    def positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes must be at least 1")
        return sizes


def input_shapes(eval_inputs: Feeds, size: int) -> dict[str, list[int]]:
    """Each input's shape in a timed batch of ``size`` rows."""
    return {name: [size, *array.shape[1:]] for name, array in eval_inputs.items()}


def benchmark_entry(handle: ModelHandle, peak_rss_bytes: int, batches: dict[str, BatchTiming], baseline: ModelHandle,
                    baseline_batches: dict[str, BatchTiming]) -> BenchmarkEntry:
    """One model's figures with its speed-up (baseline latency / its latency) per batch size and its size ratio to the baseline."""
    return BenchmarkEntry(
        kind=handle.kind,
        runtime=RUNTIMES.get(handle.kind, handle.kind),
        size_bytes=handle.size_bytes,
        peak_rss_bytes=peak_rss_bytes,
        batches=batches,
        speedup_vs_baseline={size: baseline_batches[size].p50_ms / timing.p50_ms for size, timing in batches.items()},
        size_ratio_vs_baseline=handle.size_bytes / baseline.size_bytes,
    )


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Time the baseline and every input variant, interleaved, on the same eval rows and thread count."""
    eval_inputs = ctx.data.eval_set.inputs
    handles = {BASELINE_KEY: ctx.baseline, **inputs}
    largest = cycled_rows(eval_inputs, max(params.batch_sizes))
    runners, peaks = {}, {}
    for name, handle in track(handles.items(), "benchmark: load"):
        runners[name], peaks[name] = load_runner(handle, ctx.io, largest)
    batches = time_interleaved(runners, eval_inputs, params.batch_sizes, params)
    entries = {
        name: benchmark_entry(handle, peaks[name], batches[name], ctx.baseline, batches[BASELINE_KEY]) for name, handle in handles.items()
    }
    baseline = entries.pop(BASELINE_KEY)
    report = BenchmarkReport(
        baseline_stage=ctx.baseline_name,
        threads=torch.get_num_threads(),
        cpu_model=cpu_model(),
        load_average=load_average(),
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
    takes=("torch", "onnx", "engine"), makes="report", inputs="many", version=3, params=Params, run=run, runs_alone=True, capabilities={"eval_data"},
)
