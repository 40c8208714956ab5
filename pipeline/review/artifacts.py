"""What the review page reads from a run's artifact folders: manifests, links to the files, the machine facts.

A page is written to ``<store>/reports/``; its links are relative to that folder, so they resolve to
``file://`` addresses wherever the store is, opened from there. A missing or unreadable manifest reads
as ``None`` (an old record, a collected artifact): the page then shows what the run record holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.records.reports import BenchmarkReport
from pipeline.records.variants import benchmark_reports

MANIFEST_FILE = "manifest.json"
REPORTS_DIR = "reports"


def read_manifest(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a stage's artifact folder, or None when the stage has no readable one."""
    if not stage.get("artifact"):
        return None
    try:
        manifest = json.loads((Path(stage["artifact"]) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def reports_dir(record: dict[str, Any]) -> Path | None:
    """The folder the run's page is written to by default: ``<store>/reports``."""
    return Path(record["store"]) / REPORTS_DIR if record.get("store") else None


def relative_href(target: Path, page_dir: Path | None) -> str:
    """``target`` as a link from a page in ``page_dir`` (a relative URL), or as an absolute ``file://`` URL."""
    if page_dir is None:
        return target.resolve().as_uri()
    relative = os.path.relpath(target, page_dir)
    return relative.replace(os.sep, "/") + ("/" if target.is_dir() else "")


def artifact_links(stage: dict[str, Any], page_dir: Path | None) -> list[tuple[str, str]]:
    """(label, href) for a stage's artifact folder, its main file and its manifest; empty without an artifact."""
    if not stage.get("artifact"):
        return []
    folder = Path(stage["artifact"])
    links = [("folder", relative_href(folder, page_dir))]
    manifest = read_manifest(stage)
    if manifest and manifest.get("model"):
        links.append((manifest["model"], relative_href(folder / manifest["model"], page_dir)))
    links.append(("manifest", relative_href(folder / MANIFEST_FILE, page_dir)))
    return links


BUDGET_PARAMS = ("max_drop", "max_accuracy_drop")  # the validate stage's budget, by its name and its older one


def metric_budget(record: dict[str, Any]) -> float | None:
    """The largest drop of the recipe's metric the run's first finished validate stage accepts, in the metric's
    units (its manifest's ``max_drop``, or ``max_accuracy_drop`` in manifests written before the rename)."""
    for stage in record.get("stages", []):
        if stage.get("uses") == "validate" and stage.get("state") in ("done", "cached"):
            params = (read_manifest(stage) or {}).get("params") or {}
            budget = next((params[name] for name in BUDGET_PARAMS if isinstance(params.get(name), (int, float))), None)
            if budget is not None:
                return float(budget)
    return None


def library_versions(record: dict[str, Any]) -> dict[str, str]:
    """The library versions the run's stages ran with (from their manifests), one value per library;
    a library two stages disagree on shows both values."""
    seen: dict[str, list[str]] = {}
    for stage in record.get("stages", []):
        for library, version in ((read_manifest(stage) or {}).get("versions") or {}).items():
            values = seen.setdefault(library, [])
            if version not in values:
                values.append(str(version))
    return {library: " / ".join(values) for library, values in sorted(seen.items())}


def first_benchmark(record: dict[str, Any]) -> BenchmarkReport | None:
    """The report of the run's first finished benchmark stage, if any."""
    reports = benchmark_reports(record)
    return reports[0][1] if reports else None


def machine_facts(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of where the timings were taken: host, CPU model and threads as the benchmark report
    records them (a report without a CPU model says so rather than guessing from this machine), and the load."""
    facts = [("host", record.get("host") or "-")]
    report = first_benchmark(record)
    if report is not None:
        facts.append(("CPU", report.cpu_model or "not recorded by the benchmark stage"))
        facts.append(("threads", str(report.threads)))
        if report.load_average is not None:
            facts.append(("load average", " / ".join(f"{value:.2f}" for value in report.load_average) + " (1 / 5 / 15 min, when timing ended)"))
        facts.append(("timing", (f"{report.warmup} warm-up calls, ≥{report.min_iterations} calls and ≥{report.min_seconds:g} s "
                                 f"per batch size, {report.rounds} interleaved rounds")))
    return facts
