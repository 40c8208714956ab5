"""One live view of a run on a terminal: a table of its stages with state and seconds, redrawn from the run
record as stages end. Only on a TTY and without --quiet, --verbose or --json; while it shows, per-loop
progress bars stay off (rich shows one live display at a time)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.errors import OptipipeError
from pipeline.progress import QUIET_ENV

REFRESH_SECONDS = 0.5
STATE_COLORS = {"done": "green", "cached": "cyan", "failed": "red", "rejected": "red", "skipped": "yellow",
                "running": "bold", "waiting": "dim"}


def live_view_wanted(args: argparse.Namespace) -> bool:
    """Whether ``optipipe run`` shows the live view: on a terminal, unless silenced or printing JSON or Prefect logs."""
    return sys.stderr.isatty() and not (args.quiet or args.verbose or getattr(args, "json", False))


def ended_stages(store: Any, run_id: str) -> dict[str, dict[str, Any]]:
    """The stages of run ``run_id`` that have a result so far, by name (none before its record exists)."""
    if not store.run_path(run_id).is_file():
        return {}
    try:
        return {stage["name"]: stage for stage in store.read_run(run_id)["stages"]}
    except (OptipipeError, OSError, ValueError):  # a record being replaced as it is read: the next refresh reads it whole
        return {}


def stages_now(plan: Any, ended: dict[str, dict[str, Any]], ready_since: dict[str, float]) -> Table:
    """The stages table as the run stands: ended stages with their state and seconds; a stage whose
    upstream stages have all ended is running, timed since it became so; the others are waiting."""
    table = Table(title=f"{plan.recipe.name}: running")
    for header in ("stage", "uses", "state", "seconds"):
        table.add_column(header, justify="right" if header == "seconds" else "left", no_wrap=True)
    now = time.monotonic()
    for name in plan.order:
        if name in ended:
            state, seconds = ended[name]["state"], f"{ended[name]['seconds']:.1f}"
        elif all(upstream in ended for upstream in plan.waits_for(name)):
            state = "running"
            seconds = f"{now - ready_since.setdefault(name, now):.1f}"
        else:
            state, seconds = "waiting", ""
        table.add_row(name, plan.recipe.stages[name].uses, f"[{STATE_COLORS.get(state, 'white')}]{state}[/]", seconds)
    return table


@contextmanager
def live_run_view(plan: Any, store: Any, run_id: str) -> Iterator[None]:
    """Show the live stages table of run ``run_id`` on stderr for the block; it disappears when the block ends."""
    stop = threading.Event()
    ready_since: dict[str, float] = {}
    quiet_before = os.environ.get(QUIET_ENV)
    os.environ[QUIET_ENV] = "1"  # no progress bar may start a second live display
    with Live(stages_now(plan, {}, ready_since), console=Console(stderr=True), transient=True, auto_refresh=False) as live:

        def refresh() -> None:
            while not stop.wait(REFRESH_SECONDS):
                live.update(stages_now(plan, ended_stages(store, run_id), ready_since), refresh=True)

        refresher = threading.Thread(target=refresh, name="live-view", daemon=True)
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
            if quiet_before is None:
                os.environ.pop(QUIET_ENV, None)
            else:
                os.environ[QUIET_ENV] = quiet_before
