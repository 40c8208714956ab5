"""Commands that review a store: runs, show, diff, report, gc (torch-free)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.cli.common import EXIT_REJECTED, console, open_store, print_json, print_run_tables
from pipeline.errors import OptipipeError

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def print_damaged(damaged: list[tuple[Path, str]]) -> None:
    """One stderr line per damaged run record: its path and what is wrong."""
    for path, problem in damaged:
        print(f"damaged run record {path}: {problem}", file=sys.stderr)


def command_runs(args: argparse.Namespace) -> int:
    """optipipe runs: the readable runs, then a line per damaged record (stderr, so --json stays parseable)."""
    from pipeline.review.tables import runs_table

    store = open_store(args)
    records = store.list_runs()
    if args.json:
        print_json([{key: value for key, value in record.items() if key != "stages"} for record in records])
    else:
        console.print(runs_table(records))
    print_damaged(store.damaged_runs())
    return 0


def command_show(args: argparse.Namespace) -> int:
    """optipipe show RUN"""
    record = open_store(args).resolve_run(args.run)
    if args.json:
        print_json(record)
        return 0
    print_run_tables(record)
    return 0


def command_diff(args: argparse.Namespace) -> int:
    """optipipe diff RUN_A RUN_B"""
    from pipeline.review.compare import compare_runs, comparison_tables

    store = open_store(args)
    comparison = compare_runs(
        store.resolve_run(args.run_a), store.resolve_run(args.run_b),
        max_drop=args.max_drop, max_latency_increase=args.max_latency_increase,
        latency_basis=args.latency_basis,
    )
    if args.json:
        print_json(comparison)
    else:
        for table in comparison_tables(comparison):
            console.print(table)
        for regression in comparison["regressions"]:
            console.print(f"[red]regression:[/] {regression}", highlight=False)
    return EXIT_REJECTED if comparison["regressions"] else 0


def write_report(record: dict[str, Any], html_path: str | None, md_path: str | None) -> list[str]:
    """Write the run's HTML and/or Markdown report (``-`` prints Markdown to stdout); returns the files written."""
    from pipeline.review.page import html_report, markdown_report

    written = []
    for path, render in ((html_path, html_report), (md_path, markdown_report)):
        if path is None:
            continue
        text = render(record)
        if path == "-":
            print(text, end="")
            continue
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)  # a reader never sees half a report
        written.append(str(target))
    return written


def command_report(args: argparse.Namespace) -> int:
    """optipipe report RUN [--html FILE] [--md FILE] | optipipe report --trend RECIPE [--html FILE]"""
    store = open_store(args)
    if args.trend:
        from pipeline.review.trend import trend_report

        target = Path(args.html or store.root / "reports" / f"{args.trend}-trend.html")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(trend_report(store.list_runs(), args.trend), encoding="utf-8")
        partial.replace(target)  # a reader never sees half a page
        console.print(f"wrote {target}")
        return 0
    if args.run is None:
        raise OptipipeError("report: name a run (an id, a unique prefix or 'latest'), or give --trend RECIPE")
    record = store.resolve_run(args.run)
    html_path = args.html
    if html_path is None and args.md is None:
        html_path = str(store.root / "reports" / f"{record['run_id']}.html")
    for path in write_report(record, html_path, args.md):
        console.print(f"wrote {path}")
    return 0


def grace_seconds(text: str) -> float:
    """``--grace`` as seconds: a number with an optional unit s, m, h or d (``90s``, ``30m``, ``1h``)."""
    match = DURATION.match(text)
    if match is None:
        raise OptipipeError(f"--grace {text!r}: give a duration such as 3600, 90s, 30m, 1h or 2d")
    return float(match.group(1)) * SECONDS_PER_UNIT[match.group(2)]


def gc_lines(report: Any, keep: int, grace: str) -> list[str]:
    """What a collection did (or, dry, would do): each removal when dry, the summary, and what it kept and why."""
    from pipeline.review.units import format_bytes

    verb = "would remove" if report.dry_run else "removed"
    lines = [f"{verb} artifact {key}" for key in report.removed_artifacts] if report.dry_run else []
    lines += [f"{verb} work folder {name}" for name in report.removed_work_folders] if report.dry_run else []
    lines += [f"{verb} checkpoint snapshot {sha256}" for sha256 in report.removed_snapshots] if report.dry_run else []
    lines.append(
        f"{verb} {len(report.removed_artifacts)} artifacts, {len(report.removed_snapshots)} checkpoint snapshots and "
        f"{len(report.removed_work_folders)} unfinished work folders"
        f"{' and the quarantine' if report.removed_quarantine else ''} ({format_bytes(report.freed_bytes)}); "
        f"kept {report.kept_artifacts} artifacts referenced by the newest {keep} runs that produced any or a running run"
    )
    if report.kept_leased:
        lines.append(f"kept {len(report.kept_leased)} artifacts a run reused or made within --grace {grace}")
    for path, problem in report.damaged_records:
        lines.append(f"damaged run record {path}: {problem}")
    if report.damaged_records:
        lines.append(f"kept {len(report.kept_for_damaged)} artifacts the damaged run records may reference; "
                     "repair or delete those records and run gc again to collect them")
    if report.dry_run:
        lines.append("nothing was removed (--dry-run)")
    return lines


def command_gc(args: argparse.Namespace) -> int:
    """optipipe gc --keep N [--grace DURATION] [--dry-run] [--json]"""
    from dataclasses import asdict

    from pipeline.records.gc import collect

    if args.keep < 0:
        raise OptipipeError(f"--keep {args.keep}: give how many of the newest runs to keep (0 or more)")
    report = collect(open_store(args), args.keep, grace_seconds(args.grace), dry_run=args.dry_run)
    if args.json:
        print_json(asdict(report))
        return 0
    for line in gc_lines(report, args.keep, args.grace):
        console.print(line, highlight=False)
    return 0
