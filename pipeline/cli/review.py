"""Commands that review a store: runs, show, diff, report, gc (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cli.common import EXIT_REJECTED, console, open_store, print_json
from pipeline.errors import OptipipeError


def command_runs(args: argparse.Namespace) -> int:
    """optipipe runs"""
    from pipeline.review.tables import runs_table

    records = open_store(args).list_runs()
    if args.json:
        print_json([{key: value for key, value in record.items() if key != "stages"} for record in records])
    else:
        console.print(runs_table(records))
    return 0


def command_show(args: argparse.Namespace) -> int:
    """optipipe show RUN"""
    from pipeline.review.tables import stages_table, variant_rows, variants_table

    record = open_store(args).resolve_run(args.run)
    if args.json:
        print_json(record)
        return 0
    console.print(stages_table(record))
    if variant_rows(record):
        console.print(variants_table(record))
    return 0


def command_diff(args: argparse.Namespace) -> int:
    """optipipe diff RUN_A RUN_B"""
    from pipeline.review.compare import compare_runs, comparison_tables

    store = open_store(args)
    comparison = compare_runs(
        store.resolve_run(args.run_a), store.resolve_run(args.run_b),
        max_accuracy_drop=args.max_accuracy_drop, max_latency_increase=args.max_latency_increase,
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
    """optipipe report RUN [--html FILE] [--md FILE]"""
    store = open_store(args)
    record = store.resolve_run(args.run)
    html_path = args.html
    if html_path is None and args.md is None:
        html_path = str(store.root / "reports" / f"{record['run_id']}.html")
    for path in write_report(record, html_path, args.md):
        console.print(f"wrote {path}")
    return 0


def command_gc(args: argparse.Namespace) -> int:
    """optipipe gc --keep N"""
    from pipeline.records.gc import collect
    from pipeline.review.tables import format_bytes

    if args.keep < 0:
        raise OptipipeError(f"--keep {args.keep}: give how many of the newest runs to keep (0 or more)")
    report = collect(open_store(args), args.keep)
    console.print(
        f"removed {len(report.removed_artifacts)} artifacts and {len(report.removed_work_folders)} unfinished work "
        f"folders ({format_bytes(report.freed_bytes)}); kept {report.kept_artifacts} artifacts referenced by the "
        f"newest {args.keep} runs or a running run"
    )
    return 0
