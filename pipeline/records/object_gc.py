"""Garbage collection of an object store's remote side (``pipeline.records.object_store``), by gc.py's rules.

Kept, as for a folder store: the artifacts of the newest ``keep`` producing runs and of running runs, every
artifact leased within ``grace_seconds``, and what damaged run records may still need. Ages are measured
against the SERVER's clock (a probe object's LastModified), the clock that stamped the leases and blobs.

Order, so a concurrent run is safe:

1. Unkept artifacts: the manifest (the commit point) is deleted, then the lease is checked again; a run that
   leased the key meanwhile gets the manifest back (a conditional create: one rebuilt meanwhile wins). A run
   leases before it looks a key up, so it either keeps the artifact or finds nothing and rebuilds it.
2. Blobs: listed first, then every remaining manifest is read for the blobs it names (a manifest that cannot
   be parsed protects every sha256 its text holds). A blob goes only when no manifest names it, it is older
   than the grace, and its LastModified is still old when checked again just before the delete. A writer
   re-uploads a blob it reuses once that blob is older than ``REFRESH_SECONDS`` and checks its blobs again
   after its manifest is created, so a blob a new manifest relies on is fresh, or put back.
3. ``tmp/`` objects, ``quarantine/`` manifests and leases of artifacts that are gone, once older than the grace;
   checkpoint snapshots no protected run read, older than the grace. Run records and logs are kept.

The local cache: cached copies of removed artifacts are deleted, and its tmp/ and quarantine/ are cleared as
for a folder store. ``dry_run`` only reports (ages then use this machine's clock).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from typing import Any

from pipeline.records.gc import ARTIFACT_KEY, GcReport, _collect_leftovers, _keys_named_in, _protected_runs, _referenced_keys
from pipeline.records.object_files import HEX64
from pipeline.records.object_fs import modified_at
from pipeline.records.object_store import MAX_MANIFEST_BYTES, ObjectStore
from pipeline.records.store import CHECKPOINTS_DIR, LEASES_DIR, MANIFEST_FILE, QUARANTINE_DIR


def server_now(store: ObjectStore, dry_run: bool) -> float:
    """The object store's current time: the LastModified of a probe written now (this clock for a dry run)."""
    if dry_run:
        return time.time()
    probe = store.remote("tmp", f"gc-clock-{uuid.uuid4().hex}")
    with store.reaching():
        store.fs.pipe_file(probe, b"")
        stamp = modified_at(store.fs.info(probe))
        store.fs.rm_file(probe)
    return stamp or time.time()


def artifact_keys(store: ObjectStore) -> dict[str, dict[str, Any]]:
    """Every remote artifact key with its manifest's details."""
    found = {}
    for info in store.listing("artifacts"):
        parts = store.relative(info).split("/")
        if len(parts) == 3 and parts[2] == MANIFEST_FILE and HEX64.match(parts[1]):
            found[parts[1]] = info
    return found


def manifest_text(store: ObjectStore, key: str) -> str | None:
    """The text of ``key``'s remote manifest (capped), None when it is gone."""
    try:
        return store.cat_capped(store.remote("artifacts", key, MANIFEST_FILE), MAX_MANIFEST_BYTES).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def blobs_named(text: str) -> set[str]:
    """The blobs a manifest's text names: its ``files`` digests, or every sha256 in it when it does not parse."""
    try:
        files = json.loads(text).get("files")
        if isinstance(files, dict):
            return {sha256 for sha256 in files.values() if isinstance(sha256, str)}
    except (json.JSONDecodeError, AttributeError):
        pass
    return set(ARTIFACT_KEY.findall(text))


def made_by(text: str | None) -> str | None:
    """The ``run_id`` a manifest's text names, when it parses."""
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    return value.get("run_id") if isinstance(value, dict) else None


def leased(store: ObjectStore, key: str, grace_seconds: float, now: float) -> bool:
    """Whether ``key`` was leased (remotely, by the server's clock, or in this cache) within the grace."""
    age = store.remote_lease_age(key, now)
    return (age is not None and age < grace_seconds) or super(ObjectStore, store).leased_within(key, grace_seconds)


def remove_unless_leased(store: ObjectStore, key: str, grace_seconds: float, now: float) -> bool:
    """Delete ``key``'s manifest; put it back when a run leased the key meanwhile. Whether it stayed deleted."""
    path = store.remote("artifacts", key, MANIFEST_FILE)
    with store.reaching():
        try:
            data = store.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            return True
        store.fs.rm_file(path)
        if not leased(store, key, grace_seconds, now):
            shutil.rmtree(store.artifact_path(key), ignore_errors=True)
            return True
        with contextlib.suppress(FileExistsError):  # a run rebuilt it meanwhile: that one stands
            store.fs.pipe_file(path, data, mode="create")
    return False


def collect_artifacts(store: ObjectStore, report: GcReport, keep: int, grace_seconds: float, now: float) -> None:
    """Sort every remote artifact into kept (referenced, leased, a damaged run's) or removed."""
    runs = store.list_runs()
    report.damaged_records = store.damaged_runs()
    referenced = _referenced_keys(runs, keep)
    damaged_ids = {path.stem for path, _ in report.damaged_records}
    named_by_damaged = set().union(*(_keys_named_in(path) for path, _ in report.damaged_records))
    for key, info in sorted(artifact_keys(store).items()):
        if key in referenced:
            report.kept_artifacts += 1
        elif leased(store, key, grace_seconds, now):
            report.kept_leased.append(key)
        elif key in named_by_damaged or (damaged_ids and made_by(manifest_text(store, key)) in damaged_ids):
            report.kept_for_damaged.append(key)
        elif report.dry_run or remove_unless_leased(store, key, grace_seconds, now):
            report.freed_bytes += int(info.get("size") or 0)
            report.removed_artifacts.append(key)
        else:
            report.kept_leased.append(key)


def collect_blobs(store: ObjectStore, report: GcReport, grace_seconds: float, now: float) -> None:
    """Blobs no remaining manifest names, older than the grace now and again just before each delete."""
    candidates = [info for info in store.listing("blobs") if now - modified_at(info) >= grace_seconds]
    if not candidates:
        return
    needed: set[str] = set()
    for key in artifact_keys(store):
        text = manifest_text(store, key)
        if text is not None:
            needed |= blobs_named(text)
    for info in candidates:
        if store.relative(info).removeprefix("blobs/") in needed:
            continue
        if report.dry_run or remove_if_still_old(store, info["name"], grace_seconds, now):
            report.freed_bytes += int(info.get("size") or 0)


def remove_if_still_old(store: ObjectStore, path: str, grace_seconds: float, now: float) -> bool:
    """Delete an object unless it was written again since it was listed (within the grace); whether it was deleted."""
    with store.reaching():
        try:
            if now - modified_at(store.fs.info(path)) < grace_seconds:
                return False
            store.fs.rm_file(path)
        except FileNotFoundError:
            return False
    return True


def collect_old(store: ObjectStore, report: GcReport, folder: str, grace_seconds: float, now: float,
                keep: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Objects under ``folder`` older than the grace whose first path part is not in ``keep``; the first parts removed."""
    removed = set()
    for info in store.listing(folder):
        first = store.relative(info).removeprefix(f"{folder}/").split("/")[0]
        if first in keep or now - modified_at(info) < grace_seconds:
            continue
        if report.dry_run or remove_if_still_old(store, info["name"], grace_seconds, now):
            report.freed_bytes += int(info.get("size") or 0)
            removed.add(first)
    return removed


def collect_remote(store: ObjectStore, keep: int, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """gc an object store: remote artifacts, blobs, snapshots, tmp, quarantine and stale leases; then the local cache."""
    report = GcReport(dry_run=dry_run)
    now = server_now(store, dry_run)
    collect_artifacts(store, report, keep, grace_seconds, now)
    collect_blobs(store, report, grace_seconds, now)
    needed = {record["checkpoint"]["sha256"] for record in _protected_runs(store.list_runs(), keep)}
    needed |= set().union(*(_keys_named_in(path) for path, _ in report.damaged_records))
    report.removed_snapshots = sorted(collect_old(store, report, CHECKPOINTS_DIR, grace_seconds, now, needed))
    collect_old(store, report, "tmp", grace_seconds, now)
    report.removed_quarantine = bool(collect_old(store, report, QUARANTINE_DIR, grace_seconds, now))
    collect_old(store, report, LEASES_DIR, grace_seconds, now, set(artifact_keys(store)))
    local = GcReport(dry_run=dry_run)
    if store.root.is_dir():
        _collect_leftovers(store, local, grace_seconds)
    report.removed_work_folders = local.removed_work_folders
    report.freed_bytes += local.freed_bytes
    return report
