"""Benchmark every variant on the runtime it belongs to, with the FP32 baseline measured in the same run.

For each input variant and the baseline: after warm-up, median and p95 latency at each batch size,
throughput, file size, and the process's peak resident memory while the model loaded and ran its
largest batch. Every figure is also given as a ratio to the baseline measured here, so runs on
different machines stay comparable. Each timed batch is cut from the eval split's feeds (every declared
input, in its declared dtype: real token ids and masks, not made-up values), repeating rows when the
split is smaller than the batch; the shapes timed are recorded per batch size (``input_shapes``).

Timing is interleaved: each batch size is timed in ``rounds`` passes, and every pass times the baseline
and then each variant. On a shared machine whose speed drifts by 10-20% over a minute, drift then lands
on every model alike instead of on whichever happened to be timed while the machine was busy, so the
ratios hold steadier than the absolute figures. The price: every model stays loaded until the stage
ends, so it needs the memory of all of them at once.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping

import numpy as np
import torch
from pydantic import Field, field_validator

from pipeline.progress import track
from pipeline.records.reports import BatchTiming, BenchmarkEntry, BenchmarkReport
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage
from pipeline.run.measure import PeakRSS, cpu_model, load_average
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows
from pipeline.torchkit.runners import Runner, runner_for

REPORT_FILE = "benchmark.json"
# The key the baseline is timed under: not a valid stage name, so no input variant can take it.
BASELINE_KEY = "<baseline>"
RUNTIMES = {"torch": "torch eager (CPU)", "onnx": "onnxruntime (CPU)", "engine": "TensorRT (CUDA)"}


class Params(StageParams):
    batch_sizes: list[int] = Field(default=[1, 32], min_length=1, description="batch sizes to time")
    warmup: int = Field(default=10, ge=0, description="untimed runs before timing each batch size")
    iterations: int = Field(default=20, ge=3, description="fewest timed runs per batch size (median and p95 over them)")
    min_seconds: float = Field(
        default=1.0, ge=0, description="keep timing each batch size until this much time is spent too (steadies sub-ms models)"
    )

    rounds: int = Field(
        default=3, ge=1, description="interleaved timing passes over the baseline and every variant; "
        "iterations and min_seconds are shared out among them"
    )

    @field_validator("batch_sizes")
    @classmethod
    def positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes must be at least 1")
        return sizes


def timed_calls(runner: Runner, batch: Feeds, calls: int, seconds: float) -> list[float]:
    """Seconds per call of ``calls`` or more timed calls, until ``seconds`` have passed too."""
    timings: list[float] = []
    while len(timings) < calls or sum(timings) < seconds:
        started = time.perf_counter()
        runner.predict(batch)
        timings.append(time.perf_counter() - started)
    return timings


def summarize(timings: list[float], batch_size: int) -> BatchTiming:
    """Median and p95 latency (ms) and throughput (samples/s) of the pooled timings of one batch size."""
    median = statistics.median(timings)
    return BatchTiming(
        runs=len(timings),
        timed_seconds=sum(timings),
        p50_ms=median * 1e3,
        p95_ms=float(np.percentile(timings, 95)) * 1e3,
        throughput_per_s=batch_size / median,
    )


def load_runner(handle: ModelHandle, model_io: ModelIO, largest_batch: Feeds) -> tuple[Runner, int]:
    """The model's runner and the process's peak memory while loading it and predicting the largest batch.

    The peak is process-wide: it also counts the data, earlier stages' leftovers and the models loaded
    before this one. Resident-memory growth per model was tried and is noise in one process (a 47 MB
    ResNet-18 showed 0 MiB, reusing memory freed earlier); a per-model figure needs a process per model.
    """
    with PeakRSS() as memory:
        runner = runner_for(handle, model_io)
        runner.predict(largest_batch)
    return runner, memory.peak_bytes


def time_interleaved(runners: dict[str, Runner], eval_inputs: Feeds, params: Params) -> dict[str, dict[str, BatchTiming]]:
    """Per model and batch size, timings pooled over ``rounds`` passes that each time every model in turn."""
    calls_per_round = -(-params.iterations // params.rounds)
    seconds_per_round = params.min_seconds / params.rounds
    figures: dict[str, dict[str, BatchTiming]] = {name: {} for name in runners}
    for size in params.batch_sizes:
        batch = cycled_rows(eval_inputs, size)
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():
            for _ in range(params.warmup):
                runner.predict(batch)
        for _ in track(range(params.rounds), f"benchmark batch {size}"):
            for name, runner in runners.items():
                runner.predict(batch)  # one untimed call: the model timed before this one had the caches
                timings[name] += timed_calls(runner, batch, calls_per_round, seconds_per_round)
        for name, pooled in timings.items():
            figures[name][str(size)] = summarize(pooled, size)
    return figures


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
    batches = time_interleaved(runners, eval_inputs, params)
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
