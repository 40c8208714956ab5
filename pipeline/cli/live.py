"""One live view of a run on a terminal: a table of its stages with state and seconds, redrawn from the run
record as stages end, and under it a bar with an ETA for each loop running now (training epochs with
their loss, calibration, evaluation, benchmark rounds). Only on a TTY and without --quiet, --verbose or --json; while it shows, per-loop
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

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from pipeline.errors import OptipipeError
from pipeline.progress import QUIET_ENV, active_loops

REFRESH_SECONDS = 0.5
STATE_COLORS = {"done": "green", "cached": "cyan", "failed": "red", "rejected": "red", "skipped": "yellow",
                "running": "bold", "waiting": "dim"}


def live_view_wanted(args: argparse.Namespace) -> bool:
    """Whether ``optipipe run`` shows the live view: on a terminal, unless silenced or printing JSON or Prefect logs."""
    return sys.stderr.isatty() and not (args.quiet or args.verbose or getattr(args, "json", False))


def ended_stages(store: Any, run_id: str) -> dict[str, dict[str, Any]]:
    """The stages of run ``run_id`` that have a result so far, by name (none before its record exists)."""
    if not store.has_run(run_id):
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
        table.add_row(escape(name), plan.uses_of(name), f"[{STATE_COLORS.get(state, 'white')}]{state}[/]", seconds)
    return table


def loops_now() -> Table:
    """A row per loop running now: what it is, a bar, items done, elapsed, ETA and its note (the loss)."""
    table = Table(box=None, show_header=False, pad_edge=False)
    for _ in range(6):
        table.add_column(no_wrap=True)
    now = time.monotonic()
    for loop in active_loops():
        eta = loop.eta_seconds()
        table.add_row(
            loop.description, ProgressBar(total=loop.total or None, completed=loop.done, width=24),
            f"{loop.done}/{loop.total}" if loop.total else str(loop.done), f"{now - loop.started:.0f}s",
            f"ETA {eta:.0f}s" if eta is not None else "", loop.note,
        )
    return table


def run_view(plan: Any, ended: dict[str, dict[str, Any]], ready_since: dict[str, float]) -> Group:
    """The stages table and, under it, the running loops."""
    return Group(stages_now(plan, ended, ready_since), loops_now())


@contextmanager
def live_run_view(plan: Any, store: Any, run_id: str) -> Iterator[None]:
    """Show the live stages table of run ``run_id`` on stderr for the block; it disappears when the block ends."""
    stop = threading.Event()
    ready_since: dict[str, float] = {}
    quiet_before = os.environ.get(QUIET_ENV)
    os.environ[QUIET_ENV] = "1"  # no progress bar may start a second live display
    with Live(run_view(plan, {}, ready_since), console=Console(stderr=True), transient=True, auto_refresh=False) as live:

        def refresh() -> None:
            while not stop.wait(REFRESH_SECONDS):
                live.update(run_view(plan, ended_stages(store, run_id), ready_since), refresh=True)

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
