"""Garbage collection of the artifact store: keep what recent, running, leased and damaged runs may need, remove the rest.

Kept: the artifacts of the newest ``keep`` runs that produced any (a run that failed before producing
anything does not count), of every run still in progress, every artifact leased within ``grace_seconds``
(a run is reusing it from the cache or has just made it), and for each damaged run record the keys its
text still names plus every artifact whose manifest says that run made it. Checkpoint snapshots
(``<store>/checkpoints/<sha256>``) are kept for the same runs, or when made within the grace period. gc never walks or removes
through a symbolic link in the store, and ``dry_run`` only reports.

An artifact is first renamed out of ``artifacts/`` and its lease checked again before it is deleted:
a run leases before it looks an artifact up, so either gc sees the lease and puts the artifact back, or
the run finds nothing and rebuilds it. No run is ever left holding a deleted artifact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.records.files import read_text_nofollow
from pipeline.records.run_records import process_alive
from pipeline.records.store import MANIFEST_FILE, QUARANTINE_DIR, ArtifactStore

DEFAULT_GRACE_SECONDS = 3600.0
PRODUCED = ("done", "cached")
ARTIFACT_KEY = re.compile(r"\b[0-9a-f]{64}\b")


@dataclass
class GcReport:
    """What a collection removed (or, dry, would remove) and kept, and the damaged records it worked around."""

    dry_run: bool = False
    removed_artifacts: list[str] = field(default_factory=list)
    kept_artifacts: int = 0
    kept_leased: list[str] = field(default_factory=list)
    kept_for_damaged: list[str] = field(default_factory=list)
    damaged_records: list[tuple[Path, str]] = field(default_factory=list)
    removed_work_folders: list[str] = field(default_factory=list)
    removed_snapshots: list[str] = field(default_factory=list)
    removed_quarantine: bool = False
    freed_bytes: int = 0


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself), never following a link."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, name)).st_size for name in names)
    return total


def _remove(path: Path) -> None:
    """Delete a file, a link (the link only) or a folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _produced_something(record: dict[str, Any]) -> bool:
    """Whether a run left at least one artifact (a stage done or reused from the cache)."""
    return any(stage.get("key") and stage.get("state") in PRODUCED for stage in record.get("stages", []))


def _protected_runs(runs: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The newest ``keep`` runs that produced any artifact, and every run still in progress."""
    producing = [record for record in runs if _produced_something(record)]
    return producing[:keep] + [record for record in runs if record["state"] == "running"]


def _referenced_keys(runs: list[dict[str, Any]], keep: int) -> set[str]:
    """Artifact keys used by the protected runs."""
    return {stage["key"] for record in _protected_runs(runs, keep) for stage in record.get("stages", []) if stage.get("key")}


def _keys_named_in(path: Path) -> set[str]:
    """Artifact keys still legible in a damaged record's text (nothing when it cannot be read)."""
    try:
        return set(ARTIFACT_KEY.findall(read_text_nofollow(path)))
    except OSError:
        return set()


def _made_by(folder: Path) -> str | None:
    """The ``run_id`` in an artifact folder's manifest, when it can be read."""
    try:
        manifest = json.loads(read_text_nofollow(folder / MANIFEST_FILE))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest.get("run_id") if isinstance(manifest, dict) else None


def _work_folder_owner(folder: Path) -> int | None:
    """The pid embedded in a work folder's name (``<stage>-<pid>-<random>``), if any."""
    parts = folder.name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _refuse_linked_folders(store: ArtifactStore) -> None:
    """Stop before anything is removed when a folder gc walks is a symbolic link (it may lead out of the store)."""
    for folder in (store.artifacts_dir, store.tmp_dir, store.leases_dir, store.checkpoints_dir, store.root / QUARANTINE_DIR):
        if folder.is_symlink():
            raise StoreError(f"gc removed nothing: {folder} is a symbolic link and gc never follows a link out of store {store.root}")


def _refuse_read_only(store: ArtifactStore) -> None:
    """Stop before anything is removed when the store's folders cannot be written."""
    for folder in (store.artifacts_dir, store.tmp_dir):
        if not folder.is_dir():
            continue
        try:
            descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".gc-probe-")
            os.close(descriptor)
            os.unlink(probe)
        except OSError as error:
            raise StoreError(f"gc removed nothing: store {store.root} is read-only ({error.strerror})") from None


def _delete_unless_leased(store: ArtifactStore, folder: Path, grace_seconds: float) -> int | None:
    """Delete an artifact folder unless a run leased it meanwhile; the bytes freed, or None when it was put back."""
    trash = store.tmp_dir / f"gc-{os.getpid()}-{folder.name}"
    os.rename(folder, trash)
    if store.leased_within(folder.name, grace_seconds):
        try:
            os.rename(trash, folder)
            return None
        except OSError as error:  # the run already rebuilt it: ours is a duplicate
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    freed = _tree_bytes(trash)
    _remove(trash)
    return freed


def _collect_artifacts(store: ArtifactStore, report: GcReport, keep: int, grace_seconds: float) -> None:
    """Sort every artifact into kept (referenced, leased, maybe a damaged run's) or removed."""
    runs = store.list_runs()
    report.damaged_records = store.damaged_runs()
    referenced = _referenced_keys(runs, keep)
    damaged_ids = {path.stem for path, _ in report.damaged_records}
    named_by_damaged = set().union(*(_keys_named_in(path) for path, _ in report.damaged_records))
    for folder in sorted(store.artifacts_dir.iterdir()):
        key = folder.name
        if key in referenced:
            report.kept_artifacts += 1
        elif store.leased_within(key, grace_seconds):
            report.kept_leased.append(key)
        elif key in named_by_damaged or (damaged_ids and _made_by(folder) in damaged_ids):
            report.kept_for_damaged.append(key)
        elif report.dry_run:
            report.freed_bytes += _tree_bytes(folder)
            report.removed_artifacts.append(key)
        else:
            freed = _delete_unless_leased(store, folder, grace_seconds)
            if freed is None:
                report.kept_leased.append(key)
            else:
                report.freed_bytes += freed
                report.removed_artifacts.append(key)


def _collect_leftovers(store: ArtifactStore, report: GcReport, grace_seconds: float) -> None:
    """Quarantined artifacts, dead runs' work folders, and stale leases of artifacts that are gone."""
    quarantine = store.root / QUARANTINE_DIR
    if quarantine.is_dir():
        report.freed_bytes += _tree_bytes(quarantine)
        report.removed_quarantine = True
        if not report.dry_run:
            _remove(quarantine)
    if store.tmp_dir.is_dir():
        for entry in sorted(store.tmp_dir.iterdir()):
            owner = _work_folder_owner(entry)
            if owner is not None and owner != os.getpid() and process_alive(owner):
                continue
            report.freed_bytes += _tree_bytes(entry)
            report.removed_work_folders.append(entry.name)
            if not report.dry_run:
                _remove(entry)
    if store.leases_dir.is_dir() and not report.dry_run:
        for lease in store.leases_dir.iterdir():
            if not store.artifact_path(lease.name).exists() and not store.leased_within(lease.name, grace_seconds):
                lease.unlink(missing_ok=True)


def _collect_snapshots(store: ArtifactStore, report: GcReport, keep: int, grace_seconds: float) -> None:
    """Checkpoint snapshots no protected run read, none a damaged record names, none made within the grace period."""
    if not store.checkpoints_dir.is_dir():
        return
    runs = store.list_runs()
    needed = {record["checkpoint"]["sha256"] for record in _protected_runs(runs, keep)}
    needed |= set().union(*(_keys_named_in(path) for path, _ in report.damaged_records))
    for folder in sorted(store.checkpoints_dir.iterdir()):
        if folder.name in needed or time.time() - folder.lstat().st_mtime < grace_seconds:
            continue
        report.freed_bytes += _tree_bytes(folder)
        report.removed_snapshots.append(folder.name)
        if not report.dry_run:
            _remove(folder)


def collect(store: ArtifactStore, keep: int, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False) -> GcReport:
    """Remove what no kept, running, leased or damaged run may need; with ``dry_run`` only say what that would be.

    Refuses with ``StoreError`` (removing nothing) when a folder it walks is a symbolic link or the store is read-only.
    An ``ObjectStore`` is collected by ``pipeline.records.object_gc``.
    """
    if store.location != str(store.root):  # an object store (its root is only a local cache): gc its remote side
        from pipeline.records.object_gc import collect_remote

        return collect_remote(store, keep, grace_seconds, dry_run)
    report = GcReport(dry_run=dry_run)
    _refuse_linked_folders(store)
    if not dry_run:
        _refuse_read_only(store)
    if store.artifacts_dir.is_dir():
        if not dry_run:
            store.tmp_dir.mkdir(exist_ok=True)
        _collect_artifacts(store, report, keep, grace_seconds)
    _collect_snapshots(store, report, keep, grace_seconds)
    _collect_leftovers(store, report, grace_seconds)
    return report
