"""The ``optipipe`` command: run recipes, check them, review runs, re-optimize nightly.

One module per command group (``run``, ``review``, ``nightly``, ``demo``); this one parses arguments and
turns outcomes into exit codes: 0 success; 1 the run finished but ``validate`` rejected a variant (or
``diff`` found a regression); 2 bad input (recipe, checkpoint, data, store), printed as one line naming
the file, field and fix, or a path the file system refused (no permission, read-only, full, not a
folder); 3 an internal error (a bug), printed as one line naming the log file that holds
its traceback; 130 interrupted. ``--debug`` shows the traceback of either kind of error. The global flags
(``--quiet``, ``--verbose``, ``--debug``) go before or after the sub-command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from pipeline.cli import demo as demo_commands
from pipeline.cli import nightly as nightly_commands
from pipeline.cli import review as review_commands
from pipeline.cli import run as run_commands
from pipeline.cli.common import (
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    STORE_ENV,
    file_system_refusal,
    quiet_prefect_console,
)
from pipeline.errors import OptipipeError, one_line
from pipeline.progress import QUIET_ENV
from pipeline.recipe.runner import RUNNER_ENV, RUNNER_FORMS

RUNNER_HELP = f"where the stages run: {RUNNER_FORMS} (default ${RUNNER_ENV}, then the recipe's runner:, then threads)"

GLOBAL_FLAGS = {"debug": "show tracebacks", "quiet": "no progress bars or live view",
                "verbose": "show Prefect's own log lines (task and flow states, server start-up)"}


def global_flags(default: object) -> argparse.ArgumentParser:
    """A parser of the global flags: with ``default=False`` for the top level, and with ``argparse.SUPPRESS``
    as each sub-command's parent, so a flag after the sub-command does not reset one given before it."""
    flags = argparse.ArgumentParser(add_help=False)
    for name, help_text in GLOBAL_FLAGS.items():
        flags.add_argument(f"--{name}", action="store_true", default=default, help=help_text)
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="optipipe", description="Optimize PyTorch checkpoints with recipes of stages.",
                                     parents=[global_flags(False)])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('optipipe')}")
    sub_flags = global_flags(argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, store: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[sub_flags])
        sub.set_defaults(handler=handler)
        if store:
            sub.add_argument("--store", help=f"artifact store folder (default ${STORE_ENV} or ./artifacts)")
        return sub

    run = add("run", run_commands.command_run, "run a recipe on a checkpoint")
    run.add_argument("recipe")
    run.add_argument("--checkpoint", required=True, help="the training checkpoint to optimize")
    run.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE", help="override a stage parameter")
    run.add_argument("--json", action="store_true", help="print the run record as JSON, and nothing else on stdout")
    run.add_argument("--runner", help=RUNNER_HELP)
    plan = add("plan", run_commands.command_plan, "show a recipe's stages as a tree: which are cached, which will run; "
               "with --checkpoint, check that it fits the model")
    plan.add_argument("recipe")
    plan.add_argument("--checkpoint", help="the checkpoint the run would optimize")
    plan.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE", help="override a stage parameter")
    validate = add("validate", run_commands.command_validate, "check a recipe without running it", store=False)
    validate.add_argument("recipe")
    validate.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE")
    validate.add_argument("--json", action="store_true", help="print the plan (stages, order, parameters) as JSON")
    schema = add("schema", run_commands.command_schema, "print the recipe JSON Schema (--records: the JSON Schemas of the files optipipe writes)", store=False)
    schema.add_argument("--records", action="store_true", help="print the JSON Schemas of manifests, run records, reports and nightly state")
    runs = add("runs", review_commands.command_runs, "list runs, newest first")
    runs.add_argument("--json", action="store_true")
    show = add("show", review_commands.command_show, "show one run's stages and variants")
    show.add_argument("run", help="run id, unique prefix, or 'latest'")
    show.add_argument("--json", action="store_true")
    diff = add("diff", review_commands.command_diff, "compare two runs: identical artifacts, changed parameters, accuracy/latency/size deltas")
    diff.add_argument("run_a", help="run id, unique prefix, or 'latest'")
    diff.add_argument("run_b")
    diff.add_argument("--max-drop", "--max-accuracy-drop", dest="max_drop", type=float, default=0.0,
                      help="loss of the recipe's metric flagged as a regression, in its units (top-1 as a fraction: 0.01 = 1 point)")
    diff.add_argument("--max-latency-increase", type=float, default=None, help="latency growth (fraction) flagged as a regression")
    diff.add_argument(
        "--latency-basis", choices=["baseline", "absolute"], default="baseline",
        help="judge latency as a multiple of the FP32 baseline timed in the same run (default: cancels machine-load "
        "drift between runs) or in absolute milliseconds",
    )
    diff.add_argument("--json", action="store_true")
    report = add("report", review_commands.command_report, "write a run's review page: HTML with plots, or Markdown for PR comments")
    report.add_argument("run", nargs="?", help="run id, unique prefix, or 'latest'")
    report.add_argument("--html", metavar="FILE", help="write the HTML page here (default without --md: <store>/reports/RUN.html)")
    report.add_argument("--md", metavar="FILE", help="write Markdown here ('-' prints it)")
    report.add_argument("--trend", metavar="RECIPE", help="write the recipe's nightly trend page (default: <store>/reports/RECIPE-trend.html)")
    nightly = add("nightly", nightly_commands.command_nightly, "optimize the newest checkpoint now and compare with the last good nightly run")
    nightly.add_argument("recipe")
    nightly.add_argument("--checkpoints", required=True, help="folder (or glob) the training job writes checkpoints to")
    nightly.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE", help="override a stage parameter")
    nightly.add_argument("--runner", help=RUNNER_HELP)
    latest = add("latest", nightly_commands.command_latest, "print the model file of a variant of a recipe's newest good nightly run")
    latest.add_argument("recipe", help="recipe file or recipe name")
    latest.add_argument("--variant", required=False, default=None, help="stage name of the variant, e.g. onnx (default: the select stage's choice)")
    latest.add_argument("--json", action="store_true", help="print the whole 'latest' entry")
    schedule = add("schedule", nightly_commands.command_schedule, "schedule nightly re-optimization of the newest checkpoint as a Prefect deployment")
    schedule.add_argument("recipe", nargs="?")
    schedule.add_argument("--checkpoints", help="folder (or glob) the training job writes checkpoints to")
    schedule.add_argument("--cron", help="cron expression, e.g. '0 2 * * *' (02:00 daily)")
    schedule.add_argument("--timezone", default="UTC", help="IANA time zone of the cron schedule (default UTC)")
    schedule.add_argument("--name", help="deployment name (default: the recipe's name)")
    schedule.add_argument("--work-pool", help="register for this work pool's workers instead of serving here")
    schedule.add_argument("--runner", help=RUNNER_HELP)
    schedule.add_argument("--list", action="store_true", help="list the nightly deployments and their schedules")
    schedule.add_argument("--remove", metavar="NAME", help="delete the deployment nightly/NAME")
    schedule.add_argument("--json", action="store_true")
    gc = add("gc", review_commands.command_gc, "remove artifacts that neither the newest N runs nor a running run reference")
    gc.add_argument("--keep", type=int, default=10, help="how many of the newest runs that produced artifacts keep them (default 10)")
    gc.add_argument("--grace", default="1h", help="keep artifacts a run reused or made within this long (default 1h; 90s, 30m, 2d)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed and remove nothing")
    gc.add_argument("--json", action="store_true", help="print what was (or would be) removed and kept as JSON")
    demo = add("demo", demo_commands.command_demo, "train the digits baseline and run recipes/demo.yaml on it")
    demo.add_argument("--out", default="demo-out", help="folder for the demo checkpoint")
    demo.add_argument("--epochs", type=int, default=15)
    example = add("example", demo_commands.command_example, "train an example model of another shape (BERT, LSTM, regression, "
                  "two inputs, a DataParallel training dict) and save its checkpoint", store=False)
    example.add_argument("name", choices=list(demo_commands.EXAMPLE_RECIPES))
    example.add_argument("--out", default="examples-out", help="folder for the checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optipipe`` command; see the module docstring for its exit codes."""
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ[QUIET_ENV] = "1"
    if not args.verbose:
        quiet_prefect_console()
    try:
        return args.handler(args)
    except OptipipeError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        if args.debug:
            raise
        refusal = file_system_refusal(error)
        if refusal is None:
            return report_internal_error(error)
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        if args.debug:
            raise
        return report_internal_error(error)


def report_internal_error(error: Exception) -> int:
    """A bug, not bad input: one line naming the log file that keeps its traceback; the exit code for it."""
    log_path = write_crash_log(error)
    print(f"internal error (a bug in optipipe, not your input): {one_line(error)}; traceback in {log_path}; "
          "--debug shows it", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def write_crash_log(error: BaseException) -> Path:
    """Write the traceback of an unexpected exception to a file in the temporary folder; returns its path."""
    descriptor, path = tempfile.mkstemp(prefix=f"optipipe-crash-{datetime.now():%Y%m%d-%H%M%S}-", suffix=".log")
    with os.fdopen(descriptor, "w", encoding="utf-8") as log:
        log.write("".join(traceback.format_exception(error)))
    return Path(path)


