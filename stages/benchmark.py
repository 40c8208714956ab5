"""Benchmark every variant on the runtime it belongs to, with the FP32 baseline measured in the same run.

For each input variant and the baseline: after warm-up, median and p95 latency at each batch size,
throughput, file size and the peak resident memory while it ran. Every figure is also given as a ratio
to the baseline measured here, so runs on different machines stay comparable.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from pipeline.measure import PeakRSS
from pipeline.models import ModelHandle, ReportFile, Runner, runner_for
from pipeline.progress import track
from pipeline.stage import StageContext, StageOutput, StageParams

takes = ("torch", "onnx", "engine")
inputs = "many"
makes = "report"
version = 2
# Timings are only meaningful with nothing else running: the plan starts this stage after all others.
runs_alone = True

REPORT_FILE = "benchmark.json"
RUNTIMES = {"torch": "torch eager (CPU)", "onnx": "onnxruntime (CPU)", "engine": "TensorRT (CUDA)"}


class Params(StageParams):
    batch_sizes: list[int] = Field(default=[1, 32], min_length=1, description="batch sizes to time")
    warmup: int = Field(default=10, ge=0, description="untimed runs before timing each batch size")
    iterations: int = Field(default=20, ge=3, description="fewest timed runs per batch size (median and p95 over them)")
    min_seconds: float = Field(
        default=1.0, ge=0, description="keep timing each batch size until this much time is spent too (steadies sub-ms models)"
    )

    @field_validator("batch_sizes")
    @classmethod
    def positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes must be at least 1")
        return sizes


def batch_of(eval_inputs: np.ndarray, size: int) -> np.ndarray:
    """``size`` real eval rows (repeated when the split is smaller)."""
    return np.ascontiguousarray(eval_inputs[np.arange(size) % len(eval_inputs)])


def time_runner(runner: Runner, batch: np.ndarray, params: Params) -> dict[str, float]:
    """Median and p95 latency (ms) and throughput (samples/s) of ``runner`` on one batch."""
    for _ in range(params.warmup):
        runner.predict(batch)
    seconds: list[float] = []
    while len(seconds) < params.iterations or sum(seconds) < params.min_seconds:
        started = time.perf_counter()
        runner.predict(batch)
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "runs": len(seconds),
        "timed_seconds": sum(seconds),
        "p50_ms": median * 1e3,
        "p95_ms": float(np.percentile(seconds, 95)) * 1e3,
        "throughput_per_s": len(batch) / median,
    }


def measure(handle: ModelHandle, eval_inputs: np.ndarray, params: Params, label: str) -> dict[str, Any]:
    """Every batch size for one model, plus its size and the peak memory while it ran."""
    with PeakRSS() as memory:
        runner = runner_for(handle)
        batches = {str(size): time_runner(runner, batch_of(eval_inputs, size), params) for size in track(params.batch_sizes, f"benchmark {label}")}
    return {
        "kind": handle.kind,
        "runtime": RUNTIMES.get(handle.kind, handle.kind),
        "size_bytes": handle.size_bytes,
        "peak_rss_bytes": memory.peak_bytes,
        "batches": batches,
    }


def with_ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Add speed-up (baseline latency / variant latency) per batch size and the size ratio to the baseline."""
    result["speedup_vs_baseline"] = {
        size: baseline["batches"][size]["p50_ms"] / figures["p50_ms"] for size, figures in result["batches"].items()
    }
    result["size_ratio_vs_baseline"] = result["size_bytes"] / baseline["size_bytes"]
    return result


def run(ctx: StageContext, inputs: list[ModelHandle], params: Params) -> StageOutput:
    """Time the baseline, then every input variant, on the same eval rows and thread count."""
    eval_inputs = ctx.data.eval_arrays[0]
    baseline = measure(ctx.baseline, eval_inputs, params, ctx.baseline_name)
    variants = {name: with_ratios(measure(handle, eval_inputs, params, name), baseline) for name, handle in zip(ctx.input_names, inputs)}
    report = {
        "baseline_stage": ctx.baseline_name,
        "threads": torch.get_num_threads(),
        "warmup": params.warmup,
        "min_iterations": params.iterations,
        "min_seconds": params.min_seconds,
        "baseline": with_ratios(baseline, baseline),
        "variants": variants,
    }
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=report)
