"""The declared shape of the ``select`` report, and the Pareto front it and the review page's plots share.

``stages/select.py`` builds a ``SelectionReport`` and dumps it as its metrics and ``selection.json``;
``pipeline.records.variants.selection_reports`` parses it back. The report names the chosen candidate by
its stage name: the artifact key and model file come from the run record (each stage's ``key`` and
``artifact``). Fields may be added; none may be renamed. Torch-free.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from pipeline.records.models import Record
from pipeline.records.reports import ModelKind

Target = Literal["onnxruntime-cpu", "torch-cpu", "tensorrt", "openvino-cpu"]
Objective = Literal["latency", "size", "throughput"]
CandidateStatus = Literal["chosen", "lost", "not_comparable"]
# The runtime each target times its candidates on, by the model kind it runs.
TARGET_KINDS: dict[str, ModelKind] = {"onnxruntime-cpu": "onnx", "torch-cpu": "torch", "tensorrt": "engine", "openvino-cpu": "openvino"}


def dominators(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> dict[int, int]:
    """For each dominated (cost, metric) point, the index of a point that dominates it: as cheap or cheaper (lower
    cost) and as good or better (higher metric, or lower for a lower-is-better metric such as MSE), and not equal.
    Among several, the cheapest dominator is named."""
    sign = 1.0 if higher_is_better else -1.0
    scored = [(cost, sign * value) for cost, value in points]
    found: dict[int, int] = {}
    for index, (cost, score) in enumerate(scored):
        beating = [other for other, (other_cost, other_score) in enumerate(scored)
                   if other_cost <= cost and other_score >= score and (other_cost, other_score) != (cost, score)]
        if beating:
            found[index] = min(beating, key=lambda other: scored[other][0])
    return found


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the (cost, metric) points no other point dominates (``dominators``), cheapest first."""
    dominated = dominators(points, higher_is_better)
    return sorted((index for index in range(len(points)) if index not in dominated), key=lambda index: points[index][0])


class SelectionConstraints(Record):
    """The budget a candidate must meet to be chosen: the metric's loss vs FP32, and optional latency and size caps."""

    max_drop: float = Field(description="largest loss of the metric vs the FP32 baseline, in the metric's units")
    max_relative_drop: float | None = Field(default=None, description="largest loss as a fraction of the baseline's value")
    min_agreement: float = Field(default=0.0, description="smallest share of eval decisions equal to the baseline's")
    max_latency_ms: float | None = Field(default=None, description="largest median latency at batch_size, in ms")
    max_size_mb: float | None = Field(default=None, description="largest size on disk, in MB (10^6 bytes)")


class SelectionBaseline(Record):
    """The FP32 baseline's figures: the metric on the eval split and its timing (on its own runtime) at batch_size."""

    stage: str = Field(description="the recipe's name for the FP32 baseline stage")
    kind: ModelKind = Field(description="the baseline's artifact kind")
    value: float = Field(description="the metric's value")
    latency_p50_ms: float = Field(description="median latency at batch_size, in ms")
    throughput_per_s: float = Field(description="samples per second at batch_size")
    size_bytes: int = Field(description="size of the model's files on disk")


class SelectionCandidate(Record):
    """One input of the select stage: its figures where it was comparable, whether it was chosen, and why not."""

    kind: ModelKind = Field(description="the model's artifact kind")
    status: CandidateStatus = Field(description="chosen; lost (reason says why); not_comparable (not of the target's kind)")
    reason: str | None = Field(default=None, description="why it lost or was not comparable; null for the chosen one")
    size_bytes: int = Field(description="size of the model's files on disk")
    value: float | None = Field(default=None, description="the metric's value on the eval split (null when not comparable)")
    drop: float | None = Field(default=None, description="how much worse than the baseline, in the metric's units (positive: worse)")
    agreement: float | None = Field(default=None, description="share of eval decisions equal to the baseline's; null for regression")
    latency_p50_ms: float | None = Field(default=None, description="median latency at batch_size on the target, in ms")
    latency_p95_ms: float | None = Field(default=None, description="95th-percentile latency at batch_size on the target, in ms")
    throughput_per_s: float | None = Field(default=None, description="samples per second at batch_size on the target")
    speedup_vs_baseline: float | None = Field(default=None, description="the baseline's median latency / this one's")
    on_pareto_front: bool = Field(default=False, description="no comparable candidate is both as good by the objective and on the metric")
    meets_budget: bool = Field(default=False, description="within every constraint (the chosen one, and those that lost on the objective)")


class SelectionReport(Record):
    """A ``select`` stage's metrics and ``selection.json``: every candidate measured on the target, and the choice."""

    target: Target = Field(description="the runtime the candidates were measured on")
    objective: Objective = Field(description="what the choice minimizes (latency, size) or maximizes (throughput)")
    metric: str = Field(description="the figure the budget applies to (the recipe's metric): top1, mse, ...")
    higher_is_better: bool = Field(description="the metric's direction")
    batch_size: int = Field(description="the batch latency and throughput were timed at")
    constraints: SelectionConstraints
    threads: int = Field(description="torch intra-op threads during timing")
    warmup: int = Field(description="untimed calls per model before timing")
    min_iterations: int = Field(description="fewest timed calls per model")
    min_seconds: float = Field(description="least time spent timing each model")
    rounds: int = Field(description="interleaved timing passes over every model")
    baseline: SelectionBaseline
    candidates: dict[str, SelectionCandidate] = Field(description="input stage name -> its figures and verdict")
    pareto_front: list[str] = Field(
        description="comparable candidates on the (objective, metric) Pareto front, best by the objective first"
    )
    chosen: str = Field(description="the chosen candidate's stage name (its artifact: that stage's entry in the run record)")
