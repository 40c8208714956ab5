"""Progress bars for loops over data: rich bars on a terminal, silent otherwise or under ``--quiet``.

Every step of ``track`` first checks for a cancelled run (``pipeline.run.cancel``), so Ctrl-C stops a loop
at its next iteration.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.run.cancel import raise_if_cancelled

Item = TypeVar("Item")
QUIET_ENV = "OPTIPIPE_QUIET"


def progress_enabled() -> bool:
    """Bars show only on an interactive terminal and when not silenced (``--quiet`` sets OPTIPIPE_QUIET=1)."""
    return sys.stderr.isatty() and os.environ.get(QUIET_ENV, "") not in ("1", "true")


def track(items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
    """Iterate ``items`` with a progress bar labelled ``description`` when bars are enabled; raises
    ``Cancelled`` before the next item once the run is cancelled."""
    if not progress_enabled():
        for item in items:
            raise_if_cancelled()
            yield item
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task_id = progress.add_task(description, total=total)
        for item in items:
            raise_if_cancelled()
            yield item
            progress.advance(task_id)
