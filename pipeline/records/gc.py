"""Garbage collection of the artifact store: keep what recent and running runs reference, remove the rest."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.records.store import QUARANTINE_DIR, ArtifactStore, process_alive


@dataclass
class GcReport:
    """What a collection removed and kept."""

    removed_artifacts: list[str] = field(default_factory=list)
    kept_artifacts: int = 0
    removed_work_folders: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _referenced_keys(store: ArtifactStore, keep: int) -> set[str]:
    """Artifact keys used by the newest ``keep`` runs and by every run still in progress."""
    runs = store.list_runs()
    protected = runs[:keep] + [record for record in runs[keep:] if record["state"] == "running"]
    return {stage["key"] for record in protected for stage in record.get("stages", []) if stage.get("key")}


def _work_folder_owner(folder: Path) -> int | None:
    """The pid embedded in a work folder's name (``<stage>-<pid>-<random>``), if any."""
    parts = folder.name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def collect(store: ArtifactStore, keep: int) -> GcReport:
    """Remove artifacts no kept or running run references, quarantined artifacts, and dead runs' work folders.

    An artifact a running run references is never removed, even when it is older than the kept runs.
    """
    report = GcReport()
    referenced = _referenced_keys(store, keep)
    if store.artifacts_dir.is_dir():
        for folder in sorted(store.artifacts_dir.iterdir()):
            if folder.name in referenced:
                report.kept_artifacts += 1
                continue
            report.freed_bytes += _folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            report.removed_artifacts.append(folder.name)
    quarantine = store.root / QUARANTINE_DIR
    if quarantine.is_dir():
        report.freed_bytes += _folder_bytes(quarantine)
        shutil.rmtree(quarantine, ignore_errors=True)
    if store.tmp_dir.is_dir():
        for folder in sorted(store.tmp_dir.iterdir()):
            owner = _work_folder_owner(folder)
            if owner is not None and owner != os.getpid() and process_alive(owner):
                continue
            report.freed_bytes += _folder_bytes(folder) if folder.is_dir() else folder.stat().st_size
            shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
            report.removed_work_folders.append(folder.name)
    return report
