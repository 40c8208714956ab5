"""The declared shapes of the ``validate`` and ``benchmark`` reports: a stage's metrics and its report file.

``stages/validate.py`` and ``stages/benchmark.py`` build these and dump them; every reader parses the
metrics back through them (``pipeline.records.variants``), so a renamed figure fails where it is read.
Fields may be added; none may be renamed. Torch-free.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.records.models import Record

ModelKind = Literal["torch", "onnx", "engine"]
Verdict = Literal["accepted", "rejected"]


class ModelValidation(Record):
    """One model's predictions on the eval split against the FP32 baseline's: the baseline's own entry holds
    exactly these (its deltas are 0), a variant's adds its verdict."""

    top1: float = Field(description="share of eval inputs whose top class is the label")
    delta_top1: float = Field(description="top1 minus the baseline's top1, as a fraction (-0.01 = one point lost)")
    agreement: float = Field(description="share of eval inputs on which the model predicts the baseline's class")
    max_abs_logit_diff: float = Field(description="largest |logit - baseline logit| over every input and class")
    mean_abs_logit_diff: float = Field(description="mean |logit - baseline logit| over every input and class")
    per_class_top1: list[float | None] = Field(description="top1 of each class; null for a class absent from the labels")
    per_class_delta: list[float | None] = Field(description="per_class_top1 minus the baseline's, class by class")
    samples: int = Field(description="eval inputs compared")
    kind: ModelKind = Field(description="the model's artifact kind")
    size_bytes: int = Field(description="size of the model's files on disk")


class VariantValidation(ModelValidation):
    """A variant's figures and whether it kept enough accuracy to be accepted."""

    status: Verdict = Field(description="rejected when it lost more than the stage's limits allow")


class ValidationReport(Record):
    """A ``validate`` stage's metrics and ``validation.json``: every input variant against the FP32 baseline."""

    baseline_stage: str = Field(description="the recipe's name for the FP32 baseline stage")
    baseline: ModelValidation = Field(description="the baseline against itself: its top1, size and kind")
    variants: dict[str, VariantValidation] = Field(description="input stage name -> its figures and verdict")
    rejected: dict[str, str] = Field(description="rejected input stage name -> why")


class BatchTiming(Record):
    """Latency and throughput of one model at one batch size, pooled over every interleaved round."""

    runs: int = Field(description="timed calls")
    timed_seconds: float = Field(description="time the timed calls took together")
    p50_ms: float = Field(description="median latency of one call, in milliseconds")
    p95_ms: float = Field(description="95th-percentile latency of one call, in milliseconds")
    throughput_per_s: float = Field(description="samples per second at the median latency")


class BenchmarkEntry(Record):
    """One model's timings, size and memory, and their ratios to the baseline timed in the same stage."""

    kind: ModelKind = Field(description="the model's artifact kind")
    runtime: str = Field(description="what ran it, e.g. 'onnxruntime (CPU)'")
    size_bytes: int = Field(description="size of the model's files on disk")
    peak_rss_bytes: int = Field(description="the process's peak resident memory while loading it and running its largest batch")
    batches: dict[str, BatchTiming] = Field(description="batch size (as a string) -> timings")
    speedup_vs_baseline: dict[str, float] = Field(description="batch size -> baseline p50 / this model's p50")
    size_ratio_vs_baseline: float = Field(description="size_bytes / the baseline's size_bytes")


class BenchmarkReport(Record):
    """A ``benchmark`` stage's metrics and ``benchmark.json``: the baseline and every input variant, timed interleaved."""

    baseline_stage: str = Field(description="the recipe's name for the FP32 baseline stage")
    threads: int = Field(description="torch intra-op threads during timing")
    cpu_model: str | None = Field(default=None, description="the CPU the timings were taken on (/proc/cpuinfo's model name)")
    load_average: list[float] | None = Field(
        default=None, description="the machine's 1, 5 and 15 minute load averages when timing ended (a busy machine skews figures)"
    )
    warmup: int = Field(description="untimed calls per model before timing each batch size")
    min_iterations: int = Field(description="fewest timed calls per model and batch size")
    min_seconds: float = Field(description="least time spent timing each model and batch size")
    rounds: int = Field(description="interleaved timing passes over every model")
    baseline: BenchmarkEntry = Field(description="the FP32 baseline, timed alongside the variants")
    variants: dict[str, BenchmarkEntry] = Field(description="input stage name -> its figures")
