"""The declared shapes of the ``validate`` and ``benchmark`` reports: a stage's metrics and its report file.

``stages/validate.py`` and ``stages/benchmark.py`` build these and dump them; every reader parses the
metrics back through them (``pipeline.records.variants``), so a renamed figure fails where it is read.
Fields may be added; none may be renamed. Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.records.models import Record

ModelKind = Literal["torch", "onnx", "engine", "openvino"]
Verdict = Literal["accepted", "rejected"]


class ModelValidation(Record):
    """One model's predictions on the eval split against the FP32 baseline's: the baseline's own entry holds
    exactly these (its deltas are 0), a variant's adds its verdict.

    ``metric`` / ``value`` / ``delta`` are the figure the budget applies to (the recipe's ``task`` and
    ``metric``); the classification fields (``top1``, per-class) are null for other tasks. Reports written
    before tasks existed are read as classification by top-1.
    """

    metric: str = Field(description="the figure budgets apply to: top1, mse, f1_micro, token_accuracy, or a metric function's")
    higher_is_better: bool = Field(description="the metric's direction")
    value: float = Field(description="the metric's value")
    delta: float = Field(description="value minus the baseline's value (a loss for higher-is-better figures when negative)")
    figures: dict[str, float] = Field(description="every figure the task measures (top1, top5 / mse, mae, max_abs_error, r2 / ...)")
    figure_deltas: dict[str, float] = Field(description="each figure minus the baseline's")
    top1: float | None = Field(default=None, description="classification: share of eval inputs whose top class is the label")
    delta_top1: float | None = Field(default=None, description="classification: top1 minus the baseline's top1, as a fraction (-0.01 = one point lost)")
    agreement: float | None = Field(
        description="share of eval decisions equal to the baseline's (classes, label decisions, token classes); null for regression"
    )
    relative_error: float | None = Field(default=None, description="|outputs - baseline outputs| / |baseline outputs| (L2)")
    cosine_similarity: float | None = Field(default=None, description="cosine similarity of the outputs with the baseline's")
    max_abs_logit_diff: float = Field(description="largest |output - baseline output| over every input and output value")
    mean_abs_logit_diff: float = Field(description="mean |output - baseline output| over every input and output value")
    per_class_top1: list[float | None] = Field(default_factory=list, description="classification: top1 of each class; null for a class absent from the labels")
    per_class_delta: list[float | None] = Field(default_factory=list, description="per_class_top1 minus the baseline's, class by class")
    samples: int = Field(description="eval inputs compared")
    kind: ModelKind = Field(description="the model's artifact kind")
    size_bytes: int = Field(description="size of the model's files on disk")

    @model_validator(mode="before")
    @classmethod
    def classification_by_top1(cls, data: Any) -> Any:
        """A report from before tasks existed: its metric is top-1."""
        if isinstance(data, dict) and "metric" not in data and "top1" in data:
            data = {**data, "metric": "top1", "higher_is_better": True, "value": data["top1"], "delta": data.get("delta_top1"),
                    "figures": {"top1": data["top1"]}, "figure_deltas": {"top1": data.get("delta_top1")}}
        return data

    def drop(self) -> float:
        """How much worse than the baseline the metric is (positive: worse), in the metric's units."""
        return -self.delta if self.higher_is_better else self.delta


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
    round_medians_ms: list[float] | None = Field(
        default=None, description="median latency of each interleaved round, in order (older reports: none)"
    )
    round_p5_ms: float | None = Field(
        default=None, description="5th percentile of the per-round medians (their minimum when fewer than 5 rounds)"
    )
    round_p95_ms: float | None = Field(
        default=None, description="95th percentile of the per-round medians (their maximum when fewer than 5 rounds)"
    )
    spread: float | None = Field(
        default=None, description="(round_p95_ms - round_p5_ms) / p50_ms: how far the rounds disagree (over 0.25 is flagged as noisy)"
    )


class BenchmarkEntry(Record):
    """One model's timings, size and memory, and their ratios to the baseline timed in the same stage."""

    kind: ModelKind = Field(description="the model's artifact kind")
    runtime: str = Field(description="what ran it, e.g. 'onnxruntime (CPU)'")
    size_bytes: int = Field(description="size of the model's files on disk")
    peak_rss_bytes: int = Field(description="the process's peak resident memory while loading it and running its largest batch")
    batches: dict[str, BatchTiming] = Field(description="batch size (as a string) -> timings")
    speedup_vs_baseline: dict[str, float] = Field(description="batch size -> baseline p50 / this model's p50")
    size_ratio_vs_baseline: float = Field(description="size_bytes / the baseline's size_bytes")
    top_operators: dict[str, float] | None = Field(
        default=None, description="operator type -> milliseconds per call at the profiled batch size, the 10 costliest and 'other' "
        "(torch: the ops the model called, e.g. aten::conv2d; ONNX Runtime: node op types, e.g. Conv); none when not profiled"
    )
    trace_file: str | None = Field(default=None, description="the Chrome trace of the profiled calls, a file of the benchmark's artifact")
    profile_note: str | None = Field(default=None, description="why there is no profile (e.g. 'no profile for this runtime')")


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
    input_shapes: dict[str, dict[str, list[int]]] | None = Field(
        default=None, description="batch size (as a string) -> input name -> the shape every model was timed on (older reports: none)"
    )
    load_average_before: list[float] | None = Field(default=None, description="the 1, 5 and 15 minute load averages when timing began")
    cpu_count: int | None = Field(default=None, description="logical CPUs of the machine (what the load average is compared with)")
    profile_batch: int | None = Field(default=None, description="the batch size the operator profiles were taken at (none: not profiled)")
    warnings: list[str] = Field(
        default_factory=list, description="why the figures may not be exact: a loaded machine (1-minute load above the CPUs) or rounds "
        "spread over 25%"
    )
    baseline: BenchmarkEntry = Field(description="the FP32 baseline, timed alongside the variants")
    variants: dict[str, BenchmarkEntry] = Field(description="input stage name -> its figures")
