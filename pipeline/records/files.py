"""Files of the store written and read safely: canonical JSON and digests, atomic writes, modes that follow
the umask, reads that never follow a symbolic link. Torch-free."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

PUBLISHED_FILE_MODE = 0o444  # before the umask: nobody writes a published file
PUBLISHED_FOLDER_MODE = 0o755  # before the umask: the owner may still rename and empty it (gc, quarantine)
RECORD_FILE_MODE = 0o644  # before the umask: run records, nightly state, reports


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    """Hex sha256 of a string."""
    return hashlib.sha256(text.encode()).hexdigest()


def folder_digest(file_digests: dict[str, str]) -> str:
    """The digest of a checkpoint folder: sha256 of the canonical JSON of its sorted ``[file name, file sha256]`` pairs."""
    return sha256_text(canonical_json(sorted([name, sha256] for name, sha256 in file_digests.items())))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where the system shows it, without changing it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere reading it means setting it: 077 keeps anything made meanwhile private
    os.umask(mask)
    return mask


def umasked(mode: int) -> int:
    """``mode`` with the bits the process umask withholds removed, as a newly created file would get."""
    return mode & ~current_umask()


def make_published(folder: Path) -> None:
    """Give a work folder its published modes: folders 0755 & ~umask, files 0444 & ~umask (links left alone)."""
    folder_mode, file_mode = umasked(PUBLISHED_FOLDER_MODE), umasked(PUBLISHED_FILE_MODE)
    for parent, _, file_names in os.walk(folder):
        os.chmod(parent, folder_mode)
        for name in file_names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place, 0644 & ~umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True, default=str)
            os.fchmod(handle.fileno(), umasked(RECORD_FILE_MODE))  # mkstemp made it 0600
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_text_nofollow(path: Path) -> str:
    """A file's text, refusing (``OSError`` ELOOP) when the file itself is a symbolic link."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def json_problem(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for JSON text that holds an object, else ``(None, what is wrong)``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"truncated or not JSON ({error})"
    if not isinstance(value, dict):
        return None, f"holds {type(value).__name__ if value is not None else 'null'}, not a JSON object"
    return value, None
