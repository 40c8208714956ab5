"""The artifact store: immutable content-addressed artifacts, manifests, run records, atomic writes.

Layout under the store root::

    artifacts/<key>/manifest.json + model file(s)   one folder per stage result, never modified
    runs/<run_id>.json                              one record per run
    tmp/                                            work folders, renamed into artifacts/ when complete

Nothing here imports torch: listing and reading runs stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.records.models import Manifest

MANIFEST_FILE = "manifest.json"
QUARANTINE_DIR = "quarantine"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    """Hex sha256 of a string."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_observed_state(record: dict[str, Any]) -> dict[str, Any]:
    """A run record whose ``running`` state is shown as ``crashed`` when its process on this host is gone."""
    if record.get("state") == "running" and record.get("host") == socket.gethostname() and record.get("pid"):
        if not process_alive(int(record["pid"])):
            return {**record, "state": "crashed", "message": record.get("message") or f"process {record['pid']} ended without finishing the run"}
    return record


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


class ArtifactStore:
    """Content-addressed store rooted at a folder (default ``./artifacts``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.artifacts_dir = self.root / "artifacts"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"

    def ensure_writable(self) -> None:
        """Create the store folders, or explain why they cannot be."""
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
        # the pid in the name lets gc tell a crashed run's leftovers from work in progress
        return Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix=f"{label}-{os.getpid()}-"))

    @staticmethod
    def discard(workdir: Path) -> None:
        """Remove an unpublished work folder (a failed stage leaves nothing behind)."""
        shutil.rmtree(workdir, ignore_errors=True)

    def read(self, key: str) -> Artifact | None:
        """The published artifact for ``key`` without checking file digests, or None."""
        folder = self.artifact_path(key)
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StoreError(f"artifact {key[:12]}: manifest unreadable ({error}); run 'optipipe gc' or delete {folder}") from None
        return Artifact(key=key, path=folder, manifest=manifest)

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
        """A verified cached artifact for ``key``; a corrupted one is moved to quarantine and None returned."""
        artifact = self.read(key)
        if artifact is None:
            return None
        try:
            self.verify(artifact)
        except StoreError:
            self.quarantine(artifact)
            return None
        return artifact

    def quarantine(self, artifact: Artifact) -> Path:
        """Move a corrupted artifact out of the way so it is rebuilt, keeping it for inspection."""
        target = self.root / QUARANTINE_DIR / f"{artifact.key}-{os.getpid()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(artifact.path, target)
        except OSError:
            pass  # another process moved it first
        return target

    def publish(self, key: str, workdir: Path, model_file: str, manifest: dict[str, Any]) -> Artifact:
        """Digest the work folder's files, write its manifest and rename it into place atomically.

        If another process published the same key first, its artifact wins and ours is discarded:
        both are built from identical inputs.
        """
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
        target = self.artifact_path(key)
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

    # run records ---------------------------------------------------------------------------------

    def run_path(self, run_id: str) -> Path:
        """Where the record of ``run_id`` is stored."""
        return self.runs_dir / f"{run_id}.json"

    def write_run(self, record: dict[str, Any]) -> None:
        """Write (or replace) a run record atomically."""
        write_json_atomic(self.run_path(record["run_id"]), record)

    def read_run(self, run_id: str) -> dict[str, Any]:
        """The run record of ``run_id`` (``crashed`` if it says running but its process is gone)."""
        try:
            return with_observed_state(json.loads(self.run_path(run_id).read_text()))
        except FileNotFoundError:
            raise StoreError(f"no run '{run_id}' in store {self.root}; 'optipipe runs' lists them") from None

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run record, newest first."""
        if not self.runs_dir.is_dir():
            return []
        records = []
        for path in self.runs_dir.glob("*.json"):
            try:
                records.append(with_observed_state(json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError):
                continue  # a record being replaced right now; the next listing shows it
        return sorted(records, key=lambda record: (record.get("started_at", ""), record["run_id"]), reverse=True)

    def resolve_run(self, reference: str) -> dict[str, Any]:
        """A run record by id, unique id prefix, or ``latest``."""
        runs = self.list_runs()
        if not runs:
            raise StoreError(f"store {self.root} has no runs yet; start one with 'optipipe run RECIPE --checkpoint CKPT'")
        if reference == "latest":
            return runs[0]
        matches = [record for record in runs if record["run_id"].startswith(reference)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no run matches '{reference}' in store {self.root}; 'optipipe runs' lists them")
        raise StoreError(f"'{reference}' matches {len(matches)} runs; give more of the id")
