"""What every command shares: the console, exit codes, the store option, JSON output, a finished run's summary."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

EXIT_REJECTED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
STORE_ENV = "OPTIPIPE_STORE"
# OSErrors that are the machine refusing a path the user chose (their input), not a bug in optipipe.
REFUSED_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                                 errno.EEXIST, errno.ENOTDIR, errno.EISDIR})

PIPED_WIDTH = 200
# Prefect's console handler prints task and flow states and server start-up; the Prefect UI keeps them all.
PREFECT_CONSOLE_LEVEL_ENV = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"


def console_width() -> int | None:
    """$COLUMNS when set; else the terminal's width (None: rich measures it), or 200 off a terminal
    (pipes, CI logs), where rich would squeeze tables into 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if sys.stdout.isatty() else PIPED_WIDTH


def quiet_prefect_console() -> None:
    """Keep Prefect's own log lines off the terminal (they still reach the Prefect UI); before Prefect is imported."""
    os.environ.setdefault(PREFECT_CONSOLE_LEVEL_ENV, "CRITICAL")


console = Console(width=console_width())


def store_root(args: argparse.Namespace) -> str:
    """The store folder: --store, else $OPTIPIPE_STORE, else ./artifacts."""
    return args.store or os.environ.get(STORE_ENV) or "artifacts"


def open_store(args: argparse.Namespace):
    """The artifact store the command works on."""
    from pipeline.records.store import open_store

    return open_store(store_root(args))


def file_system_refusal(error: OSError) -> str | None:
    """The one-line message for an OSError where the file system refused a path (permission denied, read-only,
    full, a file where a folder should be), or None when ``error`` is not one (a bug, then)."""
    if error.errno not in REFUSED_PATH_ERRNOS or not error.filename:
        return None
    return (f"cannot use {error.filename}: {error.strerror} (check the path and its permissions, or choose "
            "another with --store DIR or --html FILE)")


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON with sorted keys."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def print_run_tables(record: dict[str, Any]) -> None:
    """Print a run's stages table and, when it validated variants, its variants table, sized to the console."""
    from pipeline.review.tables import stages_table, variant_rows, variants_table

    console.print(stages_table(record, console.width))
    if variant_rows(record):
        console.print(variants_table(record, console.width))


def finish_run(record: dict[str, Any], debug: bool = False, tables: bool = True) -> int:
    """Print a finished run's stages and variants (unless not ``tables``: stdout holds JSON); the exit code its
    outcome deserves, with the reason of a failure on stderr.

    0 succeeded; 1 a variant was rejected; 3 a stage failed with an internal error (its traceback is in the
    log file the message names, and printed with --debug); 2 any other failure (bad input).
    """
    if tables:
        print_run_tables(record)
        console.print(f"run {record['run_id']}: {record['state']} in {record['seconds']:.1f}s")
    if record["state"] == "succeeded":
        return 0
    print(f"error: run {record['run_id']} {record['state']}: {record['message']}", file=sys.stderr)
    internal = [stage for stage in record["stages"] if stage.get("error") == "internal"]
    if debug:
        for stage in internal:
            print(Path(stage["log"]).read_text(encoding="utf-8"), file=sys.stderr)
    if internal:
        return EXIT_INTERNAL_ERROR
    states = {stage["state"] for stage in record["stages"]}
    return EXIT_REJECTED if "rejected" in states and "failed" not in states else EXIT_USER_ERROR
