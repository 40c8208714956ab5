"""Progress bars for loops over data: rich bars on a terminal, silent otherwise or under ``--quiet``.

Every step of ``track`` first checks for a cancelled run (``pipeline.run.cancel``), so Ctrl-C stops a loop
at its next iteration. Every loop also reports how far it is in ``active_loops()`` (with a note such as
the last epoch's loss), which the live view of a run (``pipeline.cli.live``) draws as bars with an ETA.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.run.cancel import raise_if_cancelled

Item = TypeVar("Item")
QUIET_ENV = "OPTIPIPE_QUIET"


@dataclass
class LoopProgress:
    """How far one running loop is: items done of ``total`` (None when unknown), since when, and a note."""

    description: str
    total: int | None
    done: int = 0
    started: float = 0.0
    note: str = ""

    def eta_seconds(self) -> float | None:
        """Seconds left at the pace so far (None before the first item or without a total)."""
        if not self.total or not self.done:
            return None
        return (time.monotonic() - self.started) / self.done * (self.total - self.done)


_active: dict[int, list[LoopProgress]] = {}  # thread id -> its loops, innermost last
_active_lock = threading.Lock()


def active_loops() -> list[LoopProgress]:
    """Every loop running now, in any thread (the innermost of each thread last)."""
    with _active_lock:
        return [loop for loops in _active.values() for loop in loops]


def note(text: str) -> None:
    """Attach ``text`` (e.g. ``loss 0.1234``) to this thread's innermost running loop."""
    with _active_lock:
        loops = _active.get(threading.get_ident())
        if loops:
            loops[-1].note = text


def _register(loop: LoopProgress) -> None:
    with _active_lock:
        _active.setdefault(threading.get_ident(), []).append(loop)


def _unregister(loop: LoopProgress) -> None:
    with _active_lock:
        loops = _active.get(threading.get_ident(), [])
        if loop in loops:
            loops.remove(loop)
        if not loops:
            _active.pop(threading.get_ident(), None)


def progress_enabled() -> bool:
    """Bars show only on an interactive terminal and when not silenced (``--quiet`` sets OPTIPIPE_QUIET=1)."""
    return sys.stderr.isatty() and os.environ.get(QUIET_ENV, "") not in ("1", "true")


def track(items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
    """Iterate ``items`` with a progress bar labelled ``description`` when bars are enabled; raises
    ``Cancelled`` before the next item once the run is cancelled."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    loop = LoopProgress(description, total, started=time.monotonic())
    _register(loop)
    try:
        if not progress_enabled():
            for item in items:
                raise_if_cancelled()
                yield item
                loop.done += 1
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            task_id = progress.add_task(description, total=total)
            for item in items:
                raise_if_cancelled()
                yield item
                loop.done += 1
                progress.advance(task_id)
    finally:
        _unregister(loop)


_stdout_lock = threading.Lock()


@contextlib.contextmanager
def library_prints_discarded() -> Iterator[None]:
    """Discard what a library ``print()``s inside the block (onnxsim's checks, onnxruntime's calibrators): stages
    show their own progress.

    ``contextlib.redirect_stdout`` swaps the process-wide ``sys.stdout`` and puts back what it found, so two
    overlapping redirects in concurrent stages could leave a discarding buffer in place for good (every later
    print lost); the lock keeps them one at a time.
    """
    with _stdout_lock, contextlib.redirect_stdout(io.StringIO()):
        yield
