"""The artifact store: immutable content-addressed artifacts, manifests, run records, atomic writes.

Layout under the store root::

    artifacts/<key>/manifest.json + model file(s)   one folder per stage result, never modified
    runs/<run_id>.json                              one record per run
    tmp/                                            work folders, renamed into artifacts/ when complete
    leases/<key>                                    empty file touched whenever a run reuses or makes an artifact

No write follows a symbolic link below the store root: a linked folder or file is refused with one line.
Modes follow the process umask, so another user (a deployer, a worker, a web server) can read what the umask
lets them: a published artifact's files are read-only (0444 & ~umask) and its folder 0755 & ~umask (the owner
keeps write permission on the folder only so ``gc`` and quarantine can rename and remove it: renaming a
folder and deleting its entries both need it); run records and other JSON files are 0644 & ~umask. Work
folders stay private (0700) until they are published.
A damaged run record (truncated, not an object, missing fields) is listed as damaged, never raised.
Nothing here imports torch: listing and reading runs stays fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.records.files import canonical_json, make_published, sha256_file, sha256_text, write_json_atomic
from pipeline.records.models import Manifest
from pipeline.records.run_records import RunRecords, declared_json_problem

MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
QUARANTINE_DIR = "quarantine"
LEASES_DIR = "leases"

@dataclass(frozen=True)
class Artifact:
    """A published, immutable stage result: its folder and its manifest."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        """Content digest over every file of the artifact (not the manifest itself)."""
        return self.manifest["digest"]

    @property
    def model_path(self) -> Path:
        """Path of the artifact's main file."""
        return self.path / self.manifest["model"]


def content_digest(files: dict[str, str]) -> str:
    """Digest of an artifact's content from its file-name -> sha256 map."""
    return sha256_text(canonical_json(sorted(files.items())))


class ArtifactStore(RunRecords):
    """Content-addressed store rooted at a folder (default ``./artifacts``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.artifacts_dir = self.root / "artifacts"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        self.leases_dir = self.root / LEASES_DIR
        self.checkpoints_dir = self.root / CHECKPOINTS_DIR  # snapshots of the checkpoints runs read, by sha256

    @property
    def location(self) -> str:
        """What a worker passes to ``open_store`` to reach this store: the root folder here, a URL for an object store."""
        return str(self.root)

    def share_checkpoint(self, snapshot: Path) -> str:
        """Make a checkpoint snapshot (under ``checkpoints_dir``) reachable by every worker of the store; returns
        its path relative to the store root, which is what a ``StageCall`` carries."""
        return snapshot.relative_to(self.root).as_posix()

    def checkpoint_file(self, relative: str) -> Path:
        """The local path of the snapshot ``share_checkpoint`` named ``relative`` (an absolute path, which only a
        local store accepts, is taken as it is); ``StoreError`` for a relative name outside ``checkpoints/``."""
        path = Path(relative)
        if path.is_absolute():
            return path
        if len(path.parts) < 3 or path.parts[0] != CHECKPOINTS_DIR or ".." in path.parts:
            raise StoreError(f"checkpoint snapshot '{relative}' is not a path inside {self.checkpoints_dir}")
        return self.root / path

    def keep_log(self, path: Path) -> str:
        """Keep a stage's traceback log (written under ``runs_dir``) where users of the store find it; its address."""
        return str(path)

    def pull(self, path: Path) -> Path:
        """Make the store's own copy of ``path`` (a file under the root, such as ``nightly/<recipe>.json``) the one at
        ``path`` before it is read; here it already is."""
        return path

    def refuse_links(self, path: Path) -> None:
        """Raise ``StoreError`` when ``path`` or a folder between it and the store root is a symbolic link."""
        for part in [path, *path.parents]:
            if part == self.root or self.root not in part.parents:
                return
            if part.is_symlink():
                raise StoreError(
                    f"{part} is a symbolic link; optipipe never writes or removes through a link in store {self.root} "
                    "(replace it with a real folder or file)"
                )

    def write_json(self, path: Path, value: Any) -> None:
        """``write_json_atomic`` into the store, refusing a linked folder on the way."""
        self.refuse_links(path)
        write_json_atomic(path, value)

    def ensure_writable(self) -> None:
        """Create the store folders, or explain why they cannot be."""
        for folder in (self.artifacts_dir, self.runs_dir, self.tmp_dir):
            self.refuse_links(folder)
        try:
            for folder in (self.artifacts_dir, self.runs_dir, self.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.tmp_dir, delete=True)
            probe.close()
        except OSError as error:
            raise StoreError(
                f"artifact store {self.root} is not writable ({error.strerror}); "
                "pass --store DIR or set OPTIPIPE_STORE to a writable folder"
            ) from None

    def artifact_path(self, key: str) -> Path:
        """Folder where the artifact with ``key`` lives (or would live)."""
        return self.artifacts_dir / key

    def new_workdir(self, label: str) -> Path:
        """A fresh private folder for a stage to write into before publishing."""
        self.ensure_writable()
        self.refuse_links(self.tmp_dir)
        # the pid in the name lets gc tell a crashed run's leftovers from work in progress
        return Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix=f"{label}-{os.getpid()}-"))

    @staticmethod
    def discard(workdir: Path) -> None:
        """Remove an unpublished work folder (a failed stage leaves nothing behind)."""
        shutil.rmtree(workdir, ignore_errors=True)

    def lease(self, key: str) -> None:
        """Mark artifact ``key`` as in use now: gc keeps an artifact leased within its grace period.

        Runs lease an artifact before they look it up, so gc either sees the lease or the run finds nothing.
        """
        self.refuse_links(self.leases_dir / key)
        self.leases_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.leases_dir / key, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.utime(descriptor)
        finally:
            os.close(descriptor)

    def leased_within(self, key: str, seconds: float) -> bool:
        """Whether artifact ``key`` was leased less than ``seconds`` ago."""
        try:
            leased_at = os.lstat(self.leases_dir / key).st_mtime
        except FileNotFoundError:
            return False
        return time.time() - leased_at < seconds

    def read(self, key: str) -> Artifact | None:
        """The published artifact for ``key`` without checking file digests, or None.

        A manifest that is unreadable, truncated, not an object or missing a declared field raises ``StoreError``.
        """
        folder = self.artifact_path(key)
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        manifest, problem = declared_json_problem(manifest_path, Manifest, "does not match the declared fields")
        if problem is not None:
            raise StoreError(f"artifact {key[:12]}: manifest {problem}; run 'optipipe gc' or delete {folder}")
        return Artifact(key=key, path=folder, manifest=manifest)

    def manifest_of(self, key: str) -> dict[str, Any] | None:
        """The manifest of the published artifact ``key``, or None (files not checked: a listing, not a load)."""
        artifact = self.read(key)
        return artifact.manifest if artifact is not None else None

    def verify(self, artifact: Artifact) -> None:
        """Check every file against the digest recorded at publication; raise ``StoreError`` naming the first mismatch."""
        for name, expected in artifact.manifest["files"].items():
            file_path = artifact.path / name
            if not file_path.is_file():
                raise StoreError(f"artifact {artifact.key[:12]} ({artifact.manifest['stage']}): file '{name}' is missing")
            if sha256_file(file_path) != expected:
                raise StoreError(
                    f"artifact {artifact.key[:12]} ({artifact.manifest['stage']}): file '{name}' does not match its "
                    "recorded sha256 (changed after it was written); it will not be loaded"
                )

    def find(self, key: str) -> Artifact | None:
        """A verified cached artifact for ``key``, leased for this run; a corrupted one (tampered files, a
        damaged manifest) is moved to quarantine and None returned, so the stage is rebuilt."""
        if not self.artifact_path(key).is_dir():
            return None
        self.lease(key)
        try:
            artifact = self.read(key)
            if artifact is None:
                raise StoreError(f"artifact {key[:12]}: manifest missing")
            self.verify(artifact)
        except StoreError:
            self.quarantine(key)
            return None
        return artifact

    def quarantine(self, key: str) -> Path:
        """Move a corrupted artifact out of the way so it is rebuilt, keeping it for inspection."""
        target = self.root / QUARANTINE_DIR / f"{key}-{os.getpid()}"
        self.refuse_links(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.artifact_path(key), target)
        except OSError:
            pass  # another process moved it first
        return target

    def publish(self, key: str, workdir: Path, model_file: str, manifest: dict[str, Any]) -> Artifact:
        """Digest the work folder's files, write its manifest, make its files read-only and rename it into place atomically.

        If another process published the same key first, its artifact wins and ours is discarded:
        both are built from identical inputs.
        """
        return self.place(key, workdir, self.seal(key, workdir, model_file, manifest))

    def seal(self, key: str, workdir: Path, model_file: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Digest the work folder's files, write its ``manifest.json`` and give it its published modes; the full manifest."""
        files = {
            path.name: sha256_file(path)
            for path in sorted(workdir.iterdir())
            if path.is_file() and path.name != MANIFEST_FILE
        }
        if model_file not in files:
            raise StoreError(f"stage wrote no '{model_file}' into its work folder; nothing to publish")
        full_manifest = Manifest.model_validate(
            {**manifest, "key": key, "model": model_file, "files": files, "digest": content_digest(files)}
        ).model_dump(mode="json")
        write_json_atomic(workdir / MANIFEST_FILE, full_manifest)
        make_published(workdir)  # before the rename: an artifact is never seen with its work-folder modes
        return full_manifest

    def place(self, key: str, workdir: Path, full_manifest: dict[str, Any]) -> Artifact:
        """Rename a sealed work folder into ``artifacts/<key>``; when one is there already, it wins and ours is discarded."""
        target = self.artifact_path(key)
        self.refuse_links(target)
        self.lease(key)  # until the run's record names it, only the lease keeps gc away
        try:
            os.rename(workdir, target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():
                self.discard(workdir)
                raise
            self.discard(workdir)
            existing = self.read(key)
            assert existing is not None
            return existing
        return Artifact(key=key, path=target, manifest=full_manifest)


def open_store(root: Path | str) -> ArtifactStore:
    """The store at ``root``: a folder (also as ``file://PATH``), or an object-store URL (``s3://bucket/prefix``,
    ``gs://…``) reached through fsspec (``pipeline.records.object_store``)."""
    scheme, separator, rest = str(root).partition("://")
    if not separator:
        return ArtifactStore(root)
    if scheme == "file":
        return ArtifactStore(rest)
    from pipeline.records.object_store import ObjectStore

    return ObjectStore(str(root))
