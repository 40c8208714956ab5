"""Progress bars for loops over data: rich bars on a terminal, silent otherwise or under ``--quiet``."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Item = TypeVar("Item")
QUIET_ENV = "OPTIPIPE_QUIET"


def progress_enabled() -> bool:
    """Bars show only on an interactive terminal and when not silenced (``--quiet`` sets OPTIPIPE_QUIET=1)."""
    return sys.stderr.isatty() and os.environ.get(QUIET_ENV, "") not in ("1", "true")


def track(items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
    """Iterate ``items`` with a progress bar labelled ``description`` when bars are enabled."""
    if not progress_enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task_id = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task_id)
