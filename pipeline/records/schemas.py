"""JSON Schemas of every file optipipe writes to disk, from their pydantic models (torch-free)."""

from __future__ import annotations

from typing import Any

from pipeline.records.models import Manifest, Record, RunRecord, StageResult
from pipeline.records.nightly_state import NightlyState
from pipeline.records.reports import BenchmarkReport, ValidationReport

RECORD_MODELS: tuple[type[Record], ...] = (Manifest, RunRecord, StageResult, ValidationReport, BenchmarkReport, NightlyState)


def records_json_schema() -> dict[str, dict[str, Any]]:
    """Model name -> its JSON Schema (draft 2020-12): manifests, run records and their stage results, the
    validate and benchmark reports held in their metrics, and the nightly state file."""
    return {model.__name__: model.model_json_schema() for model in RECORD_MODELS}
