"""The artifact store on an object store (``s3://bucket/prefix``, ``gs://…``) reached through fsspec.

The guarantees are the folder store's: content-addressed artifacts, an atomic publish that two workers
racing on one key make once, digests checked on read, quarantine, a gc that concurrent runs survive.
A worker needs only the package, the recipe and the store URL.

Local cache. ``ObjectStore.root`` is a private cache folder, ``$OPTIPIPE_CACHE/<sha256(url)[:16]>`` (default
``~/.cache/optipipe/stores/…``), laid out like a folder store, so work folders, ``tmp/``, local verification and
loading a model by path work unchanged. An artifact enters the cache only after every file's sha256 matched
its manifest, in a work folder renamed into place.

Remote layout under the URL::

    artifacts/<key>/manifest.json    THE commit point, written with a conditional create (If-None-Match: *)
    blobs/<sha256>                   an artifact file's bytes, uploaded before the manifest that names it
    runs/<run_id>.json               run records (overwritten as the run goes)
    nightly/<recipe>.json            nightly history and ``latest`` (``pull`` before reading)
    runs/<run_id>/<stage>.log        tracebacks of internal errors (``keep_log``)
    checkpoints/<digest>/<name>[/…]  checkpoint snapshots (a file, or the files of a save_pretrained folder)
    leases/<key>                     empty object; its LastModified is when a run last used the artifact
    quarantine/<key>-<unique>/manifest.json   manifests of artifacts found damaged
    tmp/                             reachability probes

Publish: seal the work folder locally (manifest with file -> sha256), lease the key, upload the blobs (one
already there with the same size is reused, unless it is older than ``REFRESH_SECONDS``: then it is uploaded
again so its LastModified renews and gc, which removes only blobs older than its grace, cannot take it),
then create the manifest conditionally. s3fs turns the server's ``412 PreconditionFailed`` into
``FileExistsError``: another writer won, ours is discarded and the winner's artifact is fetched and returned, so
both writers return the same manifest. After a won create every blob is checked to exist once more (one a
concurrent gc removed meanwhile is uploaded again). A crash leaves only unreferenced blobs, which gc removes
once older than its grace.

Read: a cached artifact (``find`` also checks that its remote manifest still exists: a cached copy of an
artifact that gc or another worker's quarantine removed is dropped, so no run record names a key other workers
cannot fetch), else the remote manifest (at most ``MAX_MANIFEST_BYTES``, parsed against ``Manifest``, its key and
digest checked, every file name one plain component: no ``/``, ``\\``, ``..`` or absolute names) and its blobs, each
checked before anything is placed. A damaged artifact's manifest is moved to ``quarantine/`` (only if the
manifest is still the one read, so a rebuilt one is never removed) and a blob whose bytes do not match its name
is deleted; ``find`` then answers None (the stage is rebuilt), ``read`` raises one line.

Endpoint and options: ``OPTIPIPE_STORAGE_OPTIONS`` (a JSON object) is passed to ``fsspec.core.url_to_fs``.
botocore honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` itself; the store still passes it as
``endpoint_url`` so fsspec's cache of filesystem instances keys on it (a process that changes the variable
gets a client for the new endpoint). Any failure to reach the store is one ``StoreError`` line naming the URL.

Clocks: remote ages (leases, blobs, tmp) are the server's LastModified. ``leased_within`` compares it with
this machine's clock; gc compares it with the server's (it writes a probe and reads its LastModified).
Run records are synced from ``runs/*.json`` into the cache's ``runs/`` (a record already there with the same
size and modification time is not fetched again; one over ``MAX_RECORD_BYTES`` is read truncated, so it
lists as damaged) and parsed by the folder store's code.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.records.files import json_problem, make_published, sha256_file
from pipeline.records.models import Manifest
from pipeline.records.object_files import HEX64, ObjectFiles
from pipeline.records.object_fs import RemoteUnreachable, modified_at, safe_name
from pipeline.records.parse import parse_record
from pipeline.records.store import LEASES_DIR, MANIFEST_FILE, QUARANTINE_DIR, Artifact, ArtifactStore, content_digest

MAX_MANIFEST_BYTES = 4 << 20
MAX_MANIFEST_FILES = 10_000
REFRESH_SECONDS = 600.0  # a reused blob older than this is uploaded again; gc's grace must be longer


class ObjectStore(ObjectFiles):
    """An artifact store whose truth is an object-store URL, with a verified local cache as its ``root``."""

    # leases and quarantine -----------------------------------------------------------------------

    def lease(self, key: str) -> None:
        """Lease ``key`` locally and remotely (the remote object's LastModified is the lease time)."""
        super().lease(key)
        with self.reaching():
            self.fs.pipe_file(self.remote(LEASES_DIR, key), b"")

    def remote_lease_age(self, key: str, now: float | None = None) -> float | None:
        """Seconds since ``key`` was leased remotely (None when never), against ``now`` (default: this clock)."""
        with self.reaching():
            try:
                info = self.fs.info(self.remote(LEASES_DIR, key))
            except FileNotFoundError:
                return None
        return (time.time() if now is None else now) - modified_at(info)

    def leased_within(self, key: str, seconds: float) -> bool:
        """Whether ``key`` was leased, here or by any worker, less than ``seconds`` ago."""
        if super().leased_within(key, seconds):
            return True
        age = self.remote_lease_age(key)
        return age is not None and age < seconds

    def quarantine(self, key: str, seen: bytes | None = None) -> Path:
        """Quarantine ``key`` in the cache and remotely (the remote manifest only if it is still ``seen``, when given)."""
        target = super().quarantine(key)
        self.quarantine_remote(key, seen)
        return target

    def quarantine_remote(self, key: str, seen: bytes | None = None) -> None:
        """Move ``artifacts/<key>/manifest.json`` to ``quarantine/<key>-<unique>/``; a manifest changed since ``seen`` stays."""
        manifest = self.remote("artifacts", key, MANIFEST_FILE)
        with self.reaching():
            try:
                current = self.fs.cat_file(manifest, start=0, end=MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:
                return  # another reader moved it first
            if seen is not None and current != seen:
                return  # rebuilt since we read it: the new one is not ours to judge
            self.fs.pipe_file(self.remote(QUARANTINE_DIR, f"{key}-{uuid.uuid4().hex[:12]}", MANIFEST_FILE), current)
            self.fs.rm_file(manifest)

    # publish -------------------------------------------------------------------------------------

    def upload_blob(self, local: Path, sha256: str) -> None:
        """Upload a file to ``blobs/<sha256>`` unless a fresh one of the same size is there."""
        path = self.remote("blobs", sha256)
        with self.reaching():
            try:
                info = self.fs.info(path)
                if info.get("size") == local.stat().st_size and time.time() - modified_at(info) < REFRESH_SECONDS:
                    return
            except FileNotFoundError:
                pass
            self.fs.put_file(str(local), path)

    def publish(self, key: str, workdir: Path, model_file: str, manifest: dict[str, Any]) -> Artifact:
        """Seal, upload the blobs, create the manifest conditionally; the winner's artifact either way (see module doc)."""
        full_manifest = self.seal(key, workdir, model_file, manifest)
        self.lease(key)  # until a run record names it, only the lease keeps gc away
        for name, sha256 in full_manifest["files"].items():
            self.upload_blob(workdir / name, sha256)
        try:
            with self.reaching():
                self.fs.pipe_file(self.remote("artifacts", key, MANIFEST_FILE), (workdir / MANIFEST_FILE).read_bytes(), mode="create")
        except FileExistsError:  # 412 PreconditionFailed: another writer published this key first
            self.discard(workdir)
            return self.winner(key)
        self.recheck_blobs(workdir, full_manifest)
        return self.place(key, workdir, full_manifest)

    def recheck_blobs(self, workdir: Path, full_manifest: dict[str, Any]) -> None:
        """Upload again any blob of a just-created manifest that a concurrent gc removed meanwhile."""
        for name, sha256 in full_manifest["files"].items():
            with self.reaching():
                if not self.fs.exists(self.remote("blobs", sha256)):
                    self.fs.put_file(str(workdir / name), self.remote("blobs", sha256))

    def winner(self, key: str) -> Artifact:
        """The artifact another writer published under ``key``, fetched into the cache (or the cached one)."""
        cached = ArtifactStore.read(self, key)
        if cached is not None:
            return cached
        artifact = self.fetch(key)
        if artifact is None:
            raise StoreError(f"artifact {key[:12]} in store {self.url} was published by another writer and removed since; re-run")
        return artifact

    # read ----------------------------------------------------------------------------------------

    def remote_manifest(self, key: str) -> tuple[dict[str, Any], bytes] | None:
        """The remote manifest of ``key`` and its bytes, checked (see ``manifest_problem``); None when there is none."""
        try:
            data = self.cat_capped(self.remote("artifacts", key, MANIFEST_FILE), MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return None
        if len(data) > MAX_MANIFEST_BYTES:
            self.quarantine_remote(key, None)
            raise StoreError(f"artifact {key[:12]}: manifest in store {self.url} is over {MAX_MANIFEST_BYTES} bytes; quarantined")
        value, problem = json_problem(data.decode("utf-8", errors="replace"))
        problem = problem or manifest_problem(key, value)
        if problem is not None:
            self.quarantine_remote(key, data)
            raise StoreError(f"artifact {key[:12]}: manifest in store {self.url} {problem}; quarantined, it will be rebuilt")
        return value, data

    def fetch(self, key: str) -> Artifact | None:
        """Download ``key``'s manifest and blobs into a work folder, check every file, then place it in the cache.

        None when the store has no such artifact; ``StoreError`` (after quarantining it) when it is damaged.
        """
        found = self.remote_manifest(key)
        if found is None:
            return None
        manifest, data = found
        workdir = self.new_workdir("fetch")
        try:
            for name, sha256 in manifest["files"].items():
                self.download_blob(key, manifest, name, sha256, workdir, data)
            (workdir / MANIFEST_FILE).write_bytes(data)
            make_published(workdir)
        except BaseException:
            self.discard(workdir)
            raise
        return self.place(key, workdir, manifest)

    def download_blob(self, key: str, manifest: dict[str, Any], name: str, sha256: str, workdir: Path, seen: bytes) -> None:
        """Fetch ``blobs/<sha256>`` as ``workdir/name`` and check it; a missing or wrong blob quarantines the artifact."""
        blob = self.remote("blobs", sha256)
        try:
            with self.reaching():
                self.fs.get_file(blob, str(workdir / name))
        except FileNotFoundError:
            self.quarantine_remote(key, seen)
            raise StoreError(f"artifact {key[:12]} ({manifest['stage']}): file '{name}' is missing from store {self.url}; "
                             "quarantined") from None
        if sha256_file(workdir / name) != sha256:
            self.quarantine_remote(key, seen)
            with self.reaching(), contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(blob)  # its bytes do not match its name: no manifest can use it
            raise StoreError(f"artifact {key[:12]} ({manifest['stage']}): file '{name}' in store {self.url} does not match its "
                             "recorded sha256 (changed after it was written); quarantined, it will not be loaded")

    def read(self, key: str) -> Artifact | None:
        """The cached artifact for ``key``, else the remote one fetched and checked; None when neither exists."""
        cached = ArtifactStore.read(self, key)
        if cached is not None:
            return cached
        return self.fetch(key)

    def manifest_of(self, key: str) -> dict[str, Any] | None:
        """The manifest of ``key``, cached or remote (checked as a fetch checks it), without downloading any blob."""
        cached = ArtifactStore.read(self, key)
        if cached is not None:
            return cached.manifest
        found = self.remote_manifest(key)
        return found[0] if found is not None else None

    def remote_has(self, key: str) -> bool:
        """Whether the object store still holds ``key``'s manifest (a cached copy of a removed one is stale)."""
        with self.reaching():
            return self.fs.exists(self.remote("artifacts", key, MANIFEST_FILE))

    def find(self, key: str) -> Artifact | None:
        """A verified artifact for ``key``, leased; a damaged one is quarantined and None returned (the stage is rebuilt).

        A cached copy counts only while the remote manifest exists (else it is dropped and None returned).

        An unreachable store raises ``StoreError``: that is no reason to rebuild.
        """
        self.lease(key)
        if self.artifact_path(key).is_dir():
            try:
                artifact = ArtifactStore.read(self, key)
                if artifact is not None and self.remote_has(key):  # gc or quarantine may have removed it remotely
                    self.verify(artifact)
                    return artifact
            except StoreError as error:
                if isinstance(error, RemoteUnreachable):
                    raise
            shutil.rmtree(self.artifact_path(key), ignore_errors=True)  # a damaged or stale cached copy
        try:
            return self.fetch(key)
        except RemoteUnreachable:
            raise
        except StoreError:
            return None

def manifest_problem(key: str, value: dict[str, Any]) -> str | None:
    """What is wrong with a downloaded manifest for ``key`` (None when nothing): fields, key, names, digest."""
    try:
        parse_record(Manifest, value, "does not match the declared fields")
    except StoreError as error:
        return str(error)
    files = value["files"]
    if value["key"] != key:
        return f"names key {str(value['key'])[:12]}, not {key[:12]}"
    if len(files) > MAX_MANIFEST_FILES:
        return f"lists over {MAX_MANIFEST_FILES} files"
    unsafe = [name for name in files if not safe_name(name) or name == MANIFEST_FILE]
    if unsafe:
        return f"names a file '{unsafe[0][:80]}' that is not a plain file name; refused"
    if any(not isinstance(sha256, str) or not HEX64.match(sha256) for sha256 in files.values()):
        return "holds a file digest that is not a sha256"
    if value["model"] not in files:
        return f"names a model file '{str(value['model'])[:80]}' it does not list"
    if value["digest"] != content_digest(files):
        return "has a digest that does not match its files"
    return None
