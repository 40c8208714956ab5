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
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError, one_line
from pipeline.records.files import folder_digest, json_problem, make_published, sha256_file
from pipeline.records.models import Manifest
from pipeline.records.parse import parse_record
from pipeline.records.store import CHECKPOINTS_DIR, LEASES_DIR, MANIFEST_FILE, QUARANTINE_DIR, Artifact, ArtifactStore, content_digest

CACHE_ENV = "OPTIPIPE_CACHE"
OPTIONS_ENV = "OPTIPIPE_STORAGE_OPTIONS"
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
MAX_MANIFEST_BYTES = 4 << 20
MAX_RECORD_BYTES = 16 << 20
MAX_MANIFEST_FILES = 10_000
REFRESH_SECONDS = 600.0  # a reused blob older than this is uploaded again; gc's grace must be longer
SAFE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")  # one path component: no separator, no control character
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RemoteUnreachable(StoreError):
    """The object store could not be reached (endpoint, bucket, credentials): never a reason to rebuild."""


def safe_name(name: Any) -> bool:
    """Whether ``name`` is one plain path component (no ``/`` or ``\\``, not ``.`` or ``..``, so never absolute)."""
    return isinstance(name, str) and bool(SAFE_NAME.fullmatch(name)) and name not in (".", "..")


def storage_options() -> dict[str, Any]:
    """The fsspec options in ``OPTIPIPE_STORAGE_OPTIONS`` (a JSON object), or ``{}``; one clear line when malformed."""
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    value, problem = json_problem(text)
    if problem is not None:
        raise StoreError(f"{OPTIONS_ENV} must be a JSON object of fsspec storage options; it is {problem}")
    return value


def with_endpoint(scheme: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the S3 endpoint from the environment made explicit (when the options name none)."""
    if scheme not in ("s3", "s3a") or "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {}):
        return options
    endpoint = next((os.environ[name] for name in ENDPOINT_ENVS if os.environ.get(name)), None)
    return {**options, "endpoint_url": endpoint} if endpoint else options


def cache_folder(url: str) -> Path:
    """The local cache folder of the store at ``url``."""
    base = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path.home() / ".cache" / "optipipe" / "stores"
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def modified_at(info: dict[str, Any]) -> float:
    """An object's LastModified (or mtime) as a POSIX time; 0.0 when the backend gives none."""
    value = info.get("LastModified", info.get("mtime", info.get("updated")))
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return value.timestamp()


class ObjectStore(ArtifactStore):
    """An artifact store whose truth is an object-store URL, with a verified local cache as its ``root``."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        super().__init__(cache_folder(self.url))
        scheme = self.url.partition("://")[0]
        try:
            self.fs, self.prefix = fsspec.core.url_to_fs(self.url, **with_endpoint(scheme, storage_options()))
        except (ImportError, ValueError) as error:
            raise StoreError(f"store {self.url} cannot be opened ({one_line(error)}); "
                             f"install the fsspec backend for '{scheme}://'") from None
        self.prefix = self.prefix.rstrip("/")
        self._probed = False

    # plumbing ------------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The store URL: what a worker passes to ``open_store``."""
        return self.url

    def remote(self, *parts: str) -> str:
        """The fsspec path of ``parts`` under the store prefix."""
        return "/".join([self.prefix, *parts])

    def address(self, *parts: str) -> str:
        """The URL of ``parts`` under the store URL (what users are shown)."""
        return "/".join([self.url, *parts])

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """Turn a failure to talk to the object store into one ``RemoteUnreachable`` line naming the URL."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, StoreError):
            raise
        except Exception as error:  # noqa: BLE001 - botocore, aiohttp and gcsfs raise many types; all are one line here
            raise RemoteUnreachable(
                f"store {self.url} is not reachable ({one_line(error)}); check the bucket, AWS_ENDPOINT_URL_S3 and credentials"
            ) from None

    def named(self, error: StoreError) -> StoreError:
        """``error`` with the cache folder replaced by the store URL in its text."""
        return type(error)(str(error).replace(str(self.root), self.url))

    def cat_capped(self, path: str, cap: int) -> bytes:
        """At most ``cap + 1`` bytes of a remote object (so an oversized one shows as such); FileNotFoundError if absent."""
        with self.reaching():
            return self.fs.cat_file(path, start=0, end=cap + 1)

    def listing(self, folder: str) -> list[dict[str, Any]]:
        """Every object below ``folder`` (recursively) with its details; empty when there is none."""
        with self.reaching():
            try:
                return list(self.fs.find(self.remote(folder), detail=True).values())
            except FileNotFoundError:
                return []

    def relative(self, info: dict[str, Any]) -> str:
        """An object's path relative to the store prefix."""
        return info["name"].removeprefix(self.prefix + "/")

    def ensure_writable(self) -> None:
        """The cache folders, and once per store object a remote probe: write then delete ``tmp/probe-<uuid>``."""
        super().ensure_writable()
        if self._probed:
            return
        probe = self.remote("tmp", f"probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as error:  # noqa: BLE001 - botocore, aiohttp and gcsfs raise many types; all are one line here
            raise RemoteUnreachable(
                f"store {self.url} is not reachable ({one_line(error)}); check the bucket, AWS_ENDPOINT_URL_S3 and credentials"
            ) from None
        self._probed = True

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

    # checkpoints and logs ------------------------------------------------------------------------

    def share_checkpoint(self, snapshot: Path) -> str:
        """Upload a checkpoint snapshot (a file or a folder of files) to ``checkpoints/<digest>/…``; its relative path."""
        relative = snapshot.relative_to(self.root).as_posix()
        files = sorted(path for path in snapshot.iterdir() if path.is_file()) if snapshot.is_dir() else [snapshot]
        for path in files:
            target = self.remote(path.relative_to(self.root).as_posix())
            with self.reaching():
                try:
                    if self.fs.info(target).get("size") == path.stat().st_size:
                        continue
                except FileNotFoundError:
                    pass
                with contextlib.suppress(FileExistsError):  # another run shared it meanwhile
                    self.fs.put_file(str(path), target, mode="create")
        return relative

    def checkpoint_file(self, relative: str) -> Path:
        """The cached snapshot ``share_checkpoint`` named ``relative``, downloaded and checked first when missing."""
        path = Path(relative)
        if path.is_absolute():
            raise StoreError(f"checkpoint snapshot '{relative}' is an absolute path; an object store's workers share no local "
                             f"paths (store {self.url})")
        parts = path.parts
        if len(parts) != 3 or parts[0] != CHECKPOINTS_DIR or not HEX64.match(parts[1]) or not safe_name(parts[2]):
            raise StoreError(f"checkpoint snapshot '{relative}' is not a path inside {self.address(CHECKPOINTS_DIR)}")
        local = self.root / path
        if not local.exists():
            self.download_checkpoint(parts[1], parts[2], local)
        return local

    def download_checkpoint(self, digest: str, name: str, local: Path) -> None:
        """Download ``checkpoints/<digest>/<name>`` (a file, or a folder's files) to ``local`` once its digest checks."""
        remote = self.remote(CHECKPOINTS_DIR, digest, name)
        entries = [info for info in self.listing(f"{CHECKPOINTS_DIR}/{digest}/{name}") if info["name"] != remote]
        workdir = self.new_workdir("checkpoint")
        try:
            if entries:
                downloaded = self.download_checkpoint_folder(remote, entries, workdir / name)
                actual = folder_digest({path.name: sha256_file(path) for path in downloaded})
            else:
                with self.reaching():
                    try:
                        self.fs.get_file(remote, str(workdir / name))
                    except FileNotFoundError:
                        raise StoreError(f"checkpoint snapshot {self.address(CHECKPOINTS_DIR, digest, name)} is missing; re-run") from None
                actual = sha256_file(workdir / name)
            if actual != digest:
                raise StoreError(f"checkpoint snapshot {self.address(CHECKPOINTS_DIR, digest, name)} does not match its digest; "
                                 "it will not be loaded (delete it and re-run)")
            make_published(workdir)
            local.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # another stage placed it meanwhile
                os.rename(workdir / name, local)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def download_checkpoint_folder(self, remote: str, entries: list[dict[str, Any]], folder: Path) -> list[Path]:
        """Download a checkpoint folder's files (plain names only, no subfolders) into ``folder``."""
        folder.mkdir()
        downloaded = []
        for info in entries:
            name = info["name"].removeprefix(remote + "/")
            if not safe_name(name):
                raise StoreError(f"checkpoint snapshot {self.url}/{self.relative(info)} is not a plain file name; refused")
            with self.reaching():
                self.fs.get_file(info["name"], str(folder / name))
            downloaded.append(folder / name)
        return downloaded

    def keep_log(self, path: Path) -> str:
        """Upload a stage's traceback log to ``runs/<run_id>/<stage>.log``; its URL (the local path if that fails)."""
        try:
            relative = path.relative_to(self.runs_dir).as_posix()
            self.fs.put_file(str(path), self.remote("runs", relative))
        except Exception:  # noqa: BLE001 - a failure path must not fail: the local log is still there
            return str(path)
        return self.address("runs", relative)

    # run records ---------------------------------------------------------------------------------

    def write_json(self, path: Path, value: Any) -> None:
        """Write a JSON file of the store (a run record, ``nightly/<recipe>.json``) into the cache and to the same
        path under the URL (overwriting: only the run's driver, or the nightly's, writes it)."""
        super().write_json(path, value)
        with self.reaching():
            self.fs.pipe_file(self.remote(path.relative_to(self.root).as_posix()), path.read_bytes())

    def pull(self, path: Path) -> Path:
        """Replace the cached copy of ``path`` (a file under the cache root) with the store's (at most
        ``MAX_RECORD_BYTES``); a file the store does not hold is removed from the cache."""
        try:
            data = self.cat_capped(self.remote(path.relative_to(self.root).as_posix()), MAX_RECORD_BYTES)[:MAX_RECORD_BYTES]
        except FileNotFoundError:
            path.unlink(missing_ok=True)
            return path
        self.refuse_links(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return path

    def sync_record(self, info: dict[str, Any]) -> None:
        """Bring one remote run record into the cache unless the cached copy has its size and time."""
        local = self.runs_dir / info["name"].rsplit("/", 1)[-1]
        stamp = modified_at(info)
        if local.is_file() and not local.is_symlink():
            status = local.stat()
            if status.st_size == info.get("size") and status.st_mtime == stamp:
                return
        try:
            data = self.cat_capped(info["name"], MAX_RECORD_BYTES)[:MAX_RECORD_BYTES]
        except FileNotFoundError:
            return
        self.refuse_links(local)
        temporary = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_bytes(data)
        os.utime(temporary, (stamp, stamp))
        os.replace(temporary, local)

    def sync_runs(self) -> None:
        """Mirror ``runs/*.json`` into the cache's ``runs/`` (records the store no longer has are dropped)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with self.reaching():
            try:
                entries = self.fs.ls(self.remote("runs"), detail=True)
            except FileNotFoundError:
                entries = []
        names = set()
        for info in entries:
            name = info["name"].rsplit("/", 1)[-1]
            if info.get("type") == "file" and name.endswith(".json") and safe_name(name):
                names.add(name)
                self.sync_record(info)
        for local in self.runs_dir.glob("*.json"):
            if local.name not in names:
                local.unlink(missing_ok=True)

    def _scan_runs(self) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
        """The store's run records (synced from the remote first), parsed as a folder store parses them."""
        self.sync_runs()
        return super()._scan_runs()

    def read_run(self, run_id: str) -> dict[str, Any]:
        """The remote record of ``run_id`` (fetched into the cache), parsed as a folder store parses it."""
        if safe_name(f"{run_id}.json"):
            with self.reaching():
                try:
                    info = self.fs.info(self.remote("runs", f"{run_id}.json"))
                    self.sync_record({**info, "name": self.remote("runs", f"{run_id}.json")})
                except FileNotFoundError:
                    self.run_path(run_id).unlink(missing_ok=True)
        try:
            return super().read_run(run_id)
        except StoreError as error:
            raise self.named(error) from None

    def resolve_run(self, reference: str) -> dict[str, Any]:
        """A run record by id, unique id prefix or ``latest``, errors naming the store URL."""
        try:
            return super().resolve_run(reference)
        except StoreError as error:
            raise self.named(error) from None

    def has_run(self, run_id: str) -> bool:
        """Whether the object store holds a record of ``run_id``."""
        if not safe_name(f"{run_id}.json"):
            return False
        with self.reaching():
            return self.fs.exists(self.remote("runs", f"{run_id}.json"))


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
