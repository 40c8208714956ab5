"""The user's checkpoint, copied once into the store so a run loads exactly the bytes it hashed.

A run keys its source stages by the checkpoint's sha256 and loads the checkpoint later, in another
thread or process. Reading the user's path twice let a trainer that rewrites ``last.ckpt`` in place
(Lightning does, every epoch) slip new weights under the old file's digest. So ``run_plan`` copies the
file from one open descriptor into ``<store>/checkpoints/<sha256>/<file name>``, hashing the bytes as it
copies them, and every stage reads that snapshot. The copy is written under ``<store>/tmp`` (named like
a work folder, so ``optipipe gc`` clears a crashed copy) and renamed into place; a snapshot already
there is reused once its digest verifies. The file name is kept so messages still name the user's file.
The snapshot is read-only and as readable as the umask allows (0444 & ~umask), like a published artifact.

A Hugging Face ``save_pretrained`` folder is snapshotted the same way, file by file: every regular file
directly in it is copied from one open descriptor (opened without following links: a link inside is
refused) into ``<store>/checkpoints/<digest>/<folder name>/``, where the digest is the sha256 of the
canonical JSON list of ``[file name, file sha256]`` pairs, sorted by name. Subfolders (a Trainer's
``checkpoint-500/``) are left out: stages read only the snapshot, so nothing unhashed reaches them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import CheckpointError
from pipeline.records.files import PUBLISHED_FILE_MODE, folder_digest, make_published, sha256_file, umasked
from pipeline.records.store import ArtifactStore

BLOCK_BYTES = 1 << 20
FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket"}


def not_a_regular_file(checkpoint_path: Path, mode: int) -> CheckpointError:
    """The error for a checkpoint path that names a pipe, a device or a socket instead of a file."""
    kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
    return CheckpointError(f"checkpoint {checkpoint_path} is not a regular file ({kind}); give the checkpoint file itself")


def copy_and_hash(source: int, copy: BinaryIO) -> str:
    """Copy every byte from descriptor ``source`` into ``copy`` and flush it to disk; the sha256 of what was copied."""
    digest = hashlib.sha256()
    while block := os.read(source, BLOCK_BYTES):
        digest.update(block)
        copy.write(block)
    copy.flush()
    os.fsync(copy.fileno())
    return digest.hexdigest()


def unchanged_while_read(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file's size and modification time are the same after reading it as before."""
    return (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)


def open_checkpoint(checkpoint_path: Path) -> int:
    """A read-only descriptor of the checkpoint, opened non-blocking so a FIFO swapped in after the checks cannot hang."""
    try:
        return os.open(checkpoint_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise CheckpointError(f"checkpoint {checkpoint_path} cannot be read: {error.strerror or error}") from None


def copy_descriptor(source: int, folder: Path, checkpoint_path: Path) -> tuple[Path, str]:
    """Copy the open checkpoint ``source`` into a new temporary file in ``folder``; its path and sha256.

    A file rewritten in place during the copy is refused rather than snapshotted half old, half new.
    """
    before = os.fstat(source)
    if not stat.S_ISREG(before.st_mode):
        raise not_a_regular_file(checkpoint_path, before.st_mode)
    target, temporary = tempfile.mkstemp(dir=folder, prefix=f"checkpoint-{os.getpid()}-")
    try:
        with open(target, "wb") as copy:
            sha256 = copy_and_hash(source, copy)
        if not unchanged_while_read(before, os.fstat(source)):
            raise CheckpointError(f"checkpoint {checkpoint_path} changed while it was being read (is training still "
                                  "writing it?); run again once the file is complete")
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary), sha256


def copy_to_temporary(store: ArtifactStore, checkpoint_path: Path) -> tuple[Path, str]:
    """Copy the checkpoint from one open descriptor into a temporary file under ``<store>/tmp``; its path and sha256."""
    store.ensure_writable()
    source = open_checkpoint(checkpoint_path)
    try:
        return copy_descriptor(source, store.tmp_dir, checkpoint_path)
    finally:
        os.close(source)


def folder_entries(folder: Path, descriptor: int) -> list[str]:
    """The names of the regular files directly in the open folder, refusing links and special files; subfolders left out."""
    names = []
    for name in sorted(os.listdir(descriptor)):
        mode = os.stat(name, dir_fd=descriptor, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise CheckpointError(f"checkpoint folder {folder} holds a symbolic link, {name}; optipipe reads only regular "
                                  "files from a checkpoint: copy the file into the folder instead of linking it")
        if stat.S_ISREG(mode):
            names.append(name)
        elif not stat.S_ISDIR(mode):
            raise not_a_regular_file(folder / name, mode)
    return names


def copy_folder_file(descriptor: int, name: str, folder: Path, target: Path) -> str:
    """Copy file ``name`` of the open checkpoint folder into ``target/name``, never through a link; its sha256."""
    try:
        source = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=descriptor)
    except OSError as error:  # ELOOP: replaced by a link since the folder was listed
        raise CheckpointError(f"checkpoint folder {folder}: {name} cannot be read without following a link "
                              f"({error.strerror or error}); copy the file into the folder instead of linking it") from None
    try:
        temporary, sha256 = copy_descriptor(source, target, folder / name)
    finally:
        os.close(source)
    os.replace(temporary, target / name)
    return sha256


def copy_folder_to_temporary(store: ArtifactStore, folder: Path) -> tuple[Path, str]:
    """Copy the checkpoint folder's regular files into a new work folder under ``<store>/tmp``; its path and digest."""
    target = store.new_workdir("checkpoint")
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        shutil.rmtree(target)
        raise CheckpointError(f"checkpoint {folder} cannot be read: {error.strerror or error}") from None
    try:
        digests = {name: copy_folder_file(descriptor, name, folder, target) for name in folder_entries(folder, descriptor)}
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        os.close(descriptor)
    return target, folder_digest(digests)


def holds_snapshot(snapshot: Path, digest: str) -> bool:
    """Whether ``snapshot`` is a folder whose files still have ``digest``."""
    return snapshot.is_dir() and folder_digest({path.name: sha256_file(path) for path in snapshot.iterdir()}) == digest


def snapshot_folder(store: ArtifactStore, folder: Path) -> tuple[Path, str]:
    """The store's read-only snapshot of a checkpoint folder and its digest, reused when one already verifies."""
    temporary, digest = copy_folder_to_temporary(store, folder)
    snapshot = store.checkpoints_dir / digest / (Path(os.path.abspath(folder)).name or "checkpoint")
    try:
        if holds_snapshot(snapshot, digest):
            return snapshot, digest
        if snapshot.exists():  # damaged since it was made: replaced by the fresh copy
            shutil.rmtree(snapshot)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        make_published(temporary)
        try:
            os.replace(temporary, snapshot)
        except OSError:  # another run published the same folder meanwhile
            if not holds_snapshot(snapshot, digest):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return snapshot, digest


def snapshot_checkpoint(store: ArtifactStore, checkpoint_path: Path) -> tuple[Path, str]:
    """The store's read-only snapshot of ``checkpoint_path`` and the sha256 of its bytes (of a folder: its digest),
    copying them at most once."""
    if checkpoint_path.is_dir():
        return snapshot_folder(store, checkpoint_path)
    temporary, sha256 = copy_to_temporary(store, checkpoint_path)
    snapshot = store.checkpoints_dir / sha256 / checkpoint_path.name
    try:
        if snapshot.is_file() and sha256_file(snapshot) == sha256:
            return snapshot, sha256
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        temporary.chmod(umasked(PUBLISHED_FILE_MODE))  # readable as the umask allows, written by nobody
        os.replace(temporary, snapshot)
    finally:
        temporary.unlink(missing_ok=True)
    return snapshot, sha256


def checkpoint_digest(checkpoint_path: Path) -> str:
    """The digest a run would key the checkpoint by (a file's sha256, a folder's digest of its files), copying nothing."""
    if not checkpoint_path.is_dir():
        return sha256_file(checkpoint_path)
    return folder_digest({path.name: sha256_file(path) for path in checkpoint_path.iterdir() if path.is_file() and not path.is_symlink()})
