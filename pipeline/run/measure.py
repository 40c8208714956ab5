"""Measurements recorded for every stage: library versions and peak resident memory."""

from __future__ import annotations

import functools
import os
import platform
import socket
import sys
import threading
from importlib import metadata

TRACKED_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "numpy", "scikit-learn", "optipipe")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes stage outputs (part of every cache key)."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """Looked up once per process: the installed versions do not change under a running process."""
    versions = [("python", platform.python_version())]
    for name in TRACKED_LIBRARIES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, "absent"))
    return tuple(versions)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Samples this process's resident memory in a background thread; ``peak_bytes`` is the highest seen.

    The figure is for the whole process: stages running concurrently in threads share it; in a worker process
    running one stage at a time it is that stage's, on top of ``start_bytes`` (what the process held already).
    """

    def __init__(self, interval_seconds: float = 0.02):
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval_seconds)

    def __enter__(self) -> "PeakRSS":
        self.peak_bytes = self.start_bytes = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where the file or the field is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        return None
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system does not report them)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def worker_address() -> str:
    """Where the calling stage runs: its Dask worker's address inside a Dask worker, else ``host:pid``."""
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return distributed.get_worker().address
        except ValueError:  # distributed is imported, but this is not one of its workers
            pass
    return f"{socket.gethostname()}:{os.getpid()}"
