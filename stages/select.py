"""Choose the variant to ship: the best by the objective, measured on the target runtime, within the accuracy budget.

Every input of the target's kind (``onnxruntime-cpu``: ONNX files, ``torch-cpu``: torch models on the CPU,
``tensorrt``: engines) is a candidate; the others are listed as not comparable. Each candidate's metric is
measured on the eval split against the FP32 baseline as ``validate`` measures it (the recipe's task and
metric, ``max_drop`` in the metric's units), and the baseline and every candidate are timed with the
benchmark's interleaved method (``pipeline.torchkit.timing``) at ``batch_size``. The Pareto front over
(objective, metric) is recorded; the chosen candidate is the best by the objective (lowest latency or
size, highest throughput) among those within every constraint, and every other candidate records why
it lost. When none is within budget the stage fails in one line naming the closest candidate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from pipeline.errors import StageError
from pipeline.records.reports import ModelValidation
from pipeline.records.selection import (
    TARGET_KINDS,
    Objective,
    SelectionBaseline,
    SelectionCandidate,
    SelectionConstraints,
    SelectionReport,
    Target,
    dominators,
    pareto_front,
)
from pipeline.review.units import is_fraction
from pipeline.run.contract import StageContext, StageOutput, declare_stage
from pipeline.torchkit import gpu
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, ReportFile
from pipeline.torchkit.runners import Runner, runner_for
from pipeline.torchkit.timing import BASELINE_KEY, TimingParams, time_interleaved
from stages import validate

REPORT_FILE = "selection.json"
MB = 1_000_000
OBJECTIVE_WORDS = {"latency": "slower", "size": "larger", "throughput": "lower throughput"}


class Params(validate.Params, TimingParams):
    """The target runtime, the budget (validate's, plus optional latency and size caps), the objective, and the timing knobs."""

    target: Target = Field(description="the runtime the variant will be served on: its candidates are the inputs of its kind "
                           "(onnxruntime-cpu: onnx, torch-cpu: torch, tensorrt: engine, openvino-cpu: openvino)")
    objective: Objective = Field(
        default="latency", description="what to optimize among candidates within budget: latency (median at batch_size), size on disk, "
        "or throughput (samples/s at batch_size)"
    )
    batch_size: int = Field(default=1, ge=1, description="the batch latency and throughput are timed at")
    max_latency_ms: float | None = Field(default=None, gt=0, description="largest median latency at batch_size, in ms; null: not checked")
    max_size_mb: float | None = Field(default=None, gt=0, description="largest size on disk, in MB (10^6 bytes); null: not checked")
    on_unavailable: Literal["skip", "fail"] = Field(
        default="skip",
        description="target tensorrt without a CUDA device or TensorRT: skip the stage (recorded with the reason) or fail the run",
    )


@dataclass(frozen=True)
class Miss:
    """One constraint a candidate does not meet: how the table and the no-candidate error say it."""

    constraint: str  # the constraint with its limit: "max_drop 0.50 pt on top1"
    found: str  # what the candidate measured: "lost 0.81 pt (0.31 pt over)"
    reason: str  # the candidate's reason in the table: "drop 0.81 pt over the 0.50 pt budget by 0.31 pt"
    fix: str  # what the user can change: "raise max_drop or add a fallback"
    over: float  # how far past the limit, in the limit's units (orders the closest candidate)
    accuracy: bool = False  # a miss of the accuracy budget (then the closest candidate is the one that lost least)


@dataclass(frozen=True)
class Measured:
    """A comparable candidate's figures: its metric against the baseline and its timing on the target."""

    handle: ModelHandle
    figures: ModelValidation
    p50_ms: float
    p95_ms: float
    throughput_per_s: float


def amount(metric: str, value: float) -> str:
    """An amount of the metric as the reasons state it: points for fractions (0.81 pt), else the number."""
    return f"{value * 100:.2f} pt" if is_fraction(metric) else f"{value:.4g}"


def times(ratio: float) -> str:
    """A ratio as '2.1×' (two decimals when it is close to 1)."""
    return f"{ratio:.1f}×" if ratio >= 1.1 else f"{ratio:.2f}×"


def comparable(handle: ModelHandle, target: str) -> bool:
    """Whether the model runs on the target: of its kind, and for torch-cpu a model made for the CPU."""
    return handle.kind == TARGET_KINDS[target] and (target != "torch-cpu" or handle.meta.get("device", "cpu") == "cpu")


def accuracy_miss(figures: ModelValidation, baseline: ModelValidation, params: Params) -> Miss | None:
    """The accuracy budget as ``validate`` judges it (``validate.verdict``), said as the selection says it."""
    rejected = validate.verdict(figures, baseline, params)
    if rejected is None:
        return None
    metric, drop = figures.metric, figures.drop()
    over = drop - params.max_drop
    if over > 0:
        budget = amount(metric, params.max_drop)
        return Miss(constraint=f"max_drop {budget} on {metric}", found=f"lost {amount(metric, drop)} ({amount(metric, over)} over)",
                    reason=f"drop {amount(metric, drop)} over the {budget} budget by {amount(metric, over)}",
                    fix="raise max_drop or add a fallback", over=over, accuracy=True)
    return Miss(constraint=f"the accuracy budget on {metric}", found=rejected, reason=rejected,
                fix="relax max_relative_drop or min_agreement, or add a fallback", over=drop, accuracy=True)


def cap_misses(measured: Measured, params: Params) -> list[Miss]:
    """The latency and size caps the candidate is over."""
    misses = []
    if params.max_latency_ms is not None and measured.p50_ms > params.max_latency_ms:
        over = measured.p50_ms - params.max_latency_ms
        misses.append(Miss(
            constraint=f"max_latency_ms {params.max_latency_ms:g} on {params.target} at batch {params.batch_size}",
            found=f"takes {measured.p50_ms:.3g} ms ({over:.3g} ms over)", reason=f"over max_latency_ms {params.max_latency_ms:g} "
            f"({measured.p50_ms:.3g} ms)", fix="raise max_latency_ms", over=over / params.max_latency_ms,
        ))
    size_mb = measured.handle.size_bytes / MB
    if params.max_size_mb is not None and size_mb > params.max_size_mb:
        over = size_mb - params.max_size_mb
        misses.append(Miss(
            constraint=f"max_size_mb {params.max_size_mb:g}", found=f"is {size_mb:.3g} MB ({over:.3g} MB over)",
            reason=f"over max_size_mb {params.max_size_mb:g} ({size_mb:.3g} MB)", fix="raise max_size_mb", over=over / params.max_size_mb,
        ))
    return misses


def cost(measured: Measured, objective: str) -> float:
    """The objective as a cost, lower is better: median latency, bytes, or negated throughput."""
    if objective == "size":
        return float(measured.handle.size_bytes)
    return -measured.throughput_per_s if objective == "throughput" else measured.p50_ms


def no_candidate_error(misses: dict[str, list[Miss]], measured: dict[str, Measured]) -> StageError:
    """One line naming the closest candidate: the least drop among those over the accuracy budget, unless some are
    within it (then the least overshoot of the cap they miss), and by how much it missed."""
    def closeness(name: str) -> tuple[bool, float]:
        first = misses[name][0]
        return first.accuracy, measured[name].figures.drop() if first.accuracy else first.over

    closest = min(misses, key=closeness)
    miss = misses[closest][0]
    return StageError(f"select: no candidate meets {miss.constraint}: the closest, {closest}, {miss.found}; {miss.fix}")


def loss_reason(name: str, chosen: str, measured: dict[str, Measured], objective: str, beaten_by: dict[str, str]) -> str:
    """Why a candidate within budget lost: dominated by another candidate within budget, else how far behind the chosen one it is."""
    if name in beaten_by:
        return f"dominated by {beaten_by[name]}"
    mine, best = measured[name], measured[chosen]
    if objective == "size":
        ratio = mine.handle.size_bytes / best.handle.size_bytes
    elif objective == "throughput":
        ratio = best.throughput_per_s / mine.throughput_per_s
    else:
        ratio = mine.p50_ms / best.p50_ms
    return f"{times(ratio)} {OBJECTIVE_WORDS[objective]} than the chosen, {chosen}"


def measure(ctx: StageContext, candidates: Mapping[str, ModelHandle],
            params: Params) -> tuple[ModelValidation, dict[str, float], dict[str, Measured]]:
    """The baseline's figures and timing, and every candidate's metric and timing on the target (timed interleaved)."""
    evaluation = ctx.data.eval_set
    runners: dict[str, Runner] = {BASELINE_KEY: runner_for(ctx.baseline, ctx.io)}
    runners.update({name: runner_for(handle, ctx.io) for name, handle in candidates.items()})
    reference = predict_all(runners[BASELINE_KEY], evaluation.inputs, description=f"select: {ctx.baseline_name}")
    targets = ctx.scoring.task.prepare_targets(evaluation.targets, reference)
    baseline = validate.figures_of(ctx.scoring, reference, reference, targets, ctx.baseline)
    figures = {
        name: validate.figures_of(ctx.scoring, reference, predict_all(runners[name], evaluation.inputs, description=f"select: {name}"),
                                  targets, handle)
        for name, handle in candidates.items()
    }
    timings = {name: batches[str(params.batch_size)] for name, batches in
               time_interleaved(runners, evaluation.inputs, [params.batch_size], params, stage="select").items()}
    measured = {
        name: Measured(handle, figures[name], timings[name].p50_ms, timings[name].p95_ms, timings[name].throughput_per_s)
        for name, handle in candidates.items()
    }
    base = timings[BASELINE_KEY]
    return baseline, {"p50_ms": base.p50_ms, "throughput_per_s": base.throughput_per_s}, measured


def choose(measured: dict[str, Measured], baseline: ModelValidation, params: Params) -> tuple[str, dict[str, str], list[str], list[str]]:
    """The chosen candidate, why each other one lost, the Pareto front (best by the objective first), and the candidates within budget."""
    names = list(measured)
    points = [(cost(measured[name], params.objective), measured[name].figures.value) for name in names]
    front = [names[index] for index in pareto_front(points, baseline.higher_is_better)]
    misses = {name: [miss for miss in [accuracy_miss(measured[name].figures, baseline, params)] if miss]
              + cap_misses(measured[name], params) for name in names}
    eligible = [name for name in names if not misses[name]]
    if not eligible:
        raise no_candidate_error(misses, measured)
    sign = 1.0 if baseline.higher_is_better else -1.0
    chosen = min(eligible, key=lambda name: (cost(measured[name], params.objective), -sign * measured[name].figures.value, name))
    beaten = dominators([points[names.index(name)] for name in eligible], baseline.higher_is_better)
    beaten_by = {eligible[index]: eligible[by] for index, by in beaten.items()}
    reasons = {name: misses[name][0].reason if misses[name] else loss_reason(name, chosen, measured, params.objective, beaten_by)
               for name in names if name != chosen}
    return chosen, reasons, front, eligible


def candidate_entry(measured: Measured, baseline_p50_ms: float, status: str, reason: str | None, on_front: bool,
                    meets: bool) -> SelectionCandidate:
    """A comparable candidate's row of the report."""
    figures = measured.figures
    return SelectionCandidate(
        kind=measured.handle.kind, status=status, reason=reason, size_bytes=measured.handle.size_bytes, value=figures.value,
        drop=figures.drop(), agreement=figures.agreement, latency_p50_ms=measured.p50_ms, latency_p95_ms=measured.p95_ms,
        throughput_per_s=measured.throughput_per_s, speedup_vs_baseline=baseline_p50_ms / measured.p50_ms, on_pareto_front=on_front,
        meets_budget=meets,
    )


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Measure every candidate of the target's kind against the baseline, and choose the best within budget."""
    if params.target == "tensorrt":
        gpu.require([gpu.cuda_status, gpu.tensorrt_status], stage="select", not_built="no candidate timed on TensorRT",
                    on_unavailable=params.on_unavailable)
    kind = TARGET_KINDS[params.target]
    candidates = {name: handle for name, handle in inputs.items() if comparable(handle, params.target)}
    if not candidates:
        given = ", ".join(f"{name} ({handle.kind})" for name, handle in inputs.items())
        raise StageError(f"select: target {params.target} compares {kind} models, and no input is one ({given}); "
                         f"add a {kind} variant to needs, or set target to the runtime of the inputs")
    baseline, base_timing, measured = measure(ctx, candidates, params)
    chosen, reasons, front, within = choose(measured, baseline, params)
    entries = {
        name: candidate_entry(measured[name], base_timing["p50_ms"], "chosen" if name == chosen else "lost", reasons.get(name),
                              name in front, name in within)
        for name in candidates
    }
    for name, handle in inputs.items():
        if name not in candidates:
            where = "made for CUDA" if handle.kind == kind else f"a {handle.kind} model"
            entries[name] = SelectionCandidate(kind=handle.kind, status="not_comparable", size_bytes=handle.size_bytes,
                                               reason=f"not comparable: {where}, target {params.target} runs {kind} models on its runtime")
    report = SelectionReport(
        target=params.target, objective=params.objective, metric=baseline.metric, higher_is_better=baseline.higher_is_better,
        batch_size=params.batch_size,
        constraints=SelectionConstraints(max_drop=params.max_drop, max_relative_drop=params.max_relative_drop,
                                         min_agreement=params.min_agreement, max_latency_ms=params.max_latency_ms,
                                         max_size_mb=params.max_size_mb),
        threads=torch.get_num_threads(), warmup=params.warmup, min_iterations=params.iterations, min_seconds=params.min_seconds,
        rounds=params.rounds,
        baseline=SelectionBaseline(stage=ctx.baseline_name or "", kind=ctx.baseline.kind, value=baseline.value,
                                   latency_p50_ms=base_timing["p50_ms"], throughput_per_s=base_timing["throughput_per_s"],
                                   size_bytes=ctx.baseline.size_bytes),
        candidates=entries, pareto_front=front, chosen=chosen,
    )
    metrics = report.model_dump(mode="json")
    path = ctx.workdir / REPORT_FILE
    path.write_text(json.dumps(metrics, indent=2))
    return StageOutput(product=ReportFile(path=path), metrics=metrics)


STAGE = declare_stage(
    takes=("torch", "onnx", "engine", "openvino"), makes="report", inputs="many", version=1, params=Params, run=run, runs_alone=True,
    capabilities={"eval_data"},
)
