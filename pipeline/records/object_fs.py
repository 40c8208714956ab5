"""The fsspec side of an object store: its URL, options and endpoint, its local cache folder, one-line errors.

``ObjectFileSystem`` is an ``ArtifactStore`` whose ``root`` is the cache folder of the URL; ``ObjectFiles``
(``object_files.py``) and ``ObjectStore`` (``object_store.py``) build on it. See ``object_store.py`` for the
layout and the guarantees.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError, one_line
from pipeline.records.files import json_problem
from pipeline.records.store import ArtifactStore

CACHE_ENV = "OPTIPIPE_CACHE"
OPTIONS_ENV = "OPTIPIPE_STORAGE_OPTIONS"
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SAFE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")  # one path component: no separator, no control character


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



class ObjectFileSystem(ArtifactStore):
    """An artifact store rooted at the local cache of an object-store URL, and the fsspec filesystem behind the URL."""

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

