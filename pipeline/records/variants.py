"""The one reader of a run's variants: every validate, benchmark and select report of a run record, parsed and joined.

Tables, run-to-run diffs, review pages and the nightly verdict all read variants here, so a report whose
figures do not match ``pipeline.records.reports`` (a renamed ``value``) raises ``StoreError`` naming the
run, the stage and the field, instead of reading as "no figures" and passing. Only a record's run id and
stages are read. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pipeline.records.models import Record, RunRecord, StageResult
from pipeline.records.parse import parse_record
from pipeline.records.reports import BenchmarkEntry, BenchmarkReport, ModelValidation, ValidationReport
from pipeline.records.selection import SelectionReport

RunLike = RunRecord | Mapping[str, Any]
ReportT = TypeVar("ReportT", ValidationReport, BenchmarkReport, SelectionReport)
VariantStatus = Literal["baseline", "accepted", "rejected"]

# Stage implementation -> the report its metrics hold, and how an error names it.
REPORTS: dict[str, tuple[type[Record], str]] = {
    "validate": (ValidationReport, "the validation report"),
    "benchmark": (BenchmarkReport, "the benchmark report"),
    "select": (SelectionReport, "the selection report"),
}
FINISHED = ("done", "cached")


@dataclass(frozen=True)
class Variant:
    """One validated model of a run (the FP32 baseline or a variant), with its timings when a benchmark stage timed it."""

    name: str
    status: VariantStatus
    validation: ModelValidation
    benchmark: BenchmarkEntry | None

    @property
    def kind(self) -> str:
        """The model's artifact kind: torch, onnx, engine or openvino."""
        return self.validation.kind


def run_stages(record: RunLike) -> tuple[str, list[StageResult]]:
    """The run id and the parsed stage results of a run record (a dict as the store reads it, or a ``RunRecord``)."""
    if isinstance(record, RunRecord):
        return record.run_id, record.stages
    run_id = str(record.get("run_id"))
    stages = [
        parse_record(StageResult, stage, f"run {run_id}: stages[{index}]: does not match the stage result")
        for index, stage in enumerate(record.get("stages", []))
    ]
    return run_id, stages


def stage_report(run_id: str, stage: StageResult) -> ValidationReport | BenchmarkReport | SelectionReport | None:
    """The parsed report of a finished ``validate``, ``benchmark`` or ``select`` stage; None for any other stage."""
    if stage.uses not in REPORTS or stage.state not in FINISHED:
        return None
    model, described = REPORTS[stage.uses]
    return parse_record(model, stage.metrics, f"run {run_id}: stage '{stage.name}' ({stage.uses}): metrics do not match {described}")


def _reports(record: RunLike, model: type[ReportT]) -> list[tuple[str, ReportT]]:
    run_id, stages = run_stages(record)
    found = []
    for stage in stages:
        report = stage_report(run_id, stage)
        if isinstance(report, model):
            found.append((stage.name, report))
    return found


def validation_reports(record: RunLike) -> list[tuple[str, ValidationReport]]:
    """(stage name, report) of each finished ``validate`` stage, in the record's stage order."""
    return _reports(record, ValidationReport)


def benchmark_reports(record: RunLike) -> list[tuple[str, BenchmarkReport]]:
    """(stage name, report) of each finished ``benchmark`` stage, in the record's stage order."""
    return _reports(record, BenchmarkReport)


def selection_reports(record: RunLike) -> list[tuple[str, SelectionReport]]:
    """(stage name, report) of each finished ``select`` stage, in the record's stage order; a report's ``chosen``
    is a stage name, whose artifact is that stage's entry in the same record."""
    return _reports(record, SelectionReport)


def chosen_stage(record: RunLike) -> str | None:
    """The stage name the run's last finished ``select`` stage chose, or None when the run has no select stage."""
    reports = selection_reports(record)
    return reports[-1][1].chosen if reports else None


def _timings(record: RunLike) -> dict[str, BenchmarkEntry]:
    """Benchmark figures per model name, baseline included; the first benchmark stage that timed a model wins."""
    timings: dict[str, BenchmarkEntry] = {}
    for _, report in benchmark_reports(record):
        for name, entry in [(report.baseline_stage, report.baseline), *report.variants.items()]:
            timings.setdefault(name, entry)
    return timings


def read_variants(record: RunLike) -> list[Variant]:
    """Every validated model of a run, baseline first; the first validate stage that mentions a model wins."""
    timings = _timings(record)
    found: dict[str, Variant] = {}
    for _, report in validation_reports(record):
        entries: list[tuple[str, VariantStatus, ModelValidation]] = [(report.baseline_stage, "baseline", report.baseline)]
        entries += [(name, figures.status, figures) for name, figures in report.variants.items()]
        for name, status, figures in entries:
            if name not in found:
                found[name] = Variant(name=name, status=status, validation=figures, benchmark=timings.get(name))
    return list(found.values())
