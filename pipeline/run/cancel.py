"""Cancelling a run from Ctrl-C: one process-wide event that loops over data check between iterations.

The first Ctrl-C of a run sets the event (``interrupt_stops_runs``); ``pipeline.progress.track`` and the
training loop call ``raise_if_cancelled`` at each step, so a running stage stops at its next batch, the
executor publishes nothing for it, and ``run_plan`` marks the run ``cancelled``. A second Ctrl-C ends the
process at once with exit code 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 130
CANCEL_REQUESTED = threading.Event()


class Cancelled(BaseException):
    """A stage stopped because the run was cancelled (Ctrl-C): not a failure, so, like KeyboardInterrupt, it
    is no ``Exception`` that a stage's own ``except Exception`` would swallow."""


def cancel_requested() -> bool:
    """Whether the run going on in this process has been cancelled."""
    return CANCEL_REQUESTED.is_set()


def raise_if_cancelled() -> None:
    """Raise ``Cancelled`` once the run has been cancelled: called by loops between iterations."""
    if CANCEL_REQUESTED.is_set():
        raise Cancelled("the run was cancelled (Ctrl-C)")


def on_interrupt(signal_number: int, frame: Any) -> None:
    """SIGINT handler: the first asks the run to stop at its stages' next step, a second exits now."""
    if CANCEL_REQUESTED.is_set():
        os._exit(EXIT_INTERRUPTED)
    CANCEL_REQUESTED.set()
    print("interrupted: stopping the running stages (Ctrl-C again to exit at once)", file=sys.stderr, flush=True)


@contextmanager
def interrupt_stops_runs() -> Iterator[None]:
    """For the block, Ctrl-C cancels the run instead of raising KeyboardInterrupt; afterwards the previous
    SIGINT handler is back and the event is clear for the next run of this process."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGINT, on_interrupt)
    CANCEL_REQUESTED.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        CANCEL_REQUESTED.clear()
