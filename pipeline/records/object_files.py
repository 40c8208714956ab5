"""What an object store keeps besides artifacts: checkpoint snapshots, traceback logs, run records and the
nightly state, each mirrored between the URL and this machine's cache (see ``object_store.py``)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.records.files import folder_digest, make_published, sha256_file
from pipeline.records.object_fs import ObjectFileSystem, modified_at, safe_name
from pipeline.records.store import CHECKPOINTS_DIR

MAX_RECORD_BYTES = 16 << 20
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ObjectFiles(ObjectFileSystem):
    """Checkpoints, logs and records of an object store, through its cache."""

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


