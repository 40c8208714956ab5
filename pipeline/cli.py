"""The ``optipipe`` command: run recipes, check them, and review runs.

Errors that are the user's input (``OptipipeError``) print as one line and exit 2; ``--debug`` shows
the traceback. A run whose variants were rejected by validation exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from pipeline.errors import OptipipeError
from pipeline.progress import QUIET_ENV

EXIT_REJECTED = 1
EXIT_USER_ERROR = 2
STORE_ENV = "OPTIPIPE_STORE"

# Off a terminal (pipes, CI logs) rich would squeeze tables into 80 columns; give them room instead.
console = Console(width=None if sys.stdout.isatty() else 200)


def _store_root(args: argparse.Namespace) -> str:
    return args.store or os.environ.get(STORE_ENV) or "artifacts"


def _store(args: argparse.Namespace):
    from pipeline.store import ArtifactStore

    return ArtifactStore(_store_root(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def run_flow(recipe_path: str, checkpoint_path: str, store_root: str, overrides: list[str]) -> dict[str, Any]:
    """Check inputs fast (no Prefect start-up for a typo), run the ``optimize`` flow, return the run record."""
    from pipeline.recipe import load_recipe
    from pipeline.session import check_checkpoint_file, new_run_id
    from pipeline.store import ArtifactStore

    load_recipe(recipe_path, overrides)
    check_checkpoint_file(Path(checkpoint_path))
    ArtifactStore(store_root).ensure_writable()
    from flows import optimize

    run_id = new_run_id()
    state = optimize(recipe_path, checkpoint_path, store_root, overrides, run_id, return_state=True)
    store = ArtifactStore(store_root)
    if not store.run_path(run_id).is_file():  # the flow failed before the run started
        outcome = state.result(raise_on_failure=False)
        raise outcome if isinstance(outcome, BaseException) else OptipipeError(state.message or "run failed")
    return store.read_run(run_id)


def _finish_run(record: dict[str, Any]) -> int:
    from pipeline.report import stages_table, variant_rows, variants_table

    console.print(stages_table(record))
    if variant_rows(record):
        console.print(variants_table(record))
    console.print(f"run {record['run_id']}: {record['state']} in {record['seconds']:.1f}s")
    if record["state"] == "succeeded":
        return 0
    print(f"error: run {record['run_id']} failed: {record['message']}", file=sys.stderr)
    states = {stage["state"] for stage in record["stages"]}
    return EXIT_REJECTED if "rejected" in states and "failed" not in states else EXIT_USER_ERROR


def command_run(args: argparse.Namespace) -> int:
    """optipipe run RECIPE --checkpoint CKPT"""
    record = run_flow(args.recipe, args.checkpoint, _store_root(args), args.set or [])
    return _finish_run(record)


def command_validate(args: argparse.Namespace) -> int:
    """optipipe validate RECIPE"""
    from pipeline.recipe import load_recipe

    plan = load_recipe(args.recipe, args.set or [])
    console.print(f"{args.recipe}: ok — recipe '{plan.recipe.name}', {len(plan.order)} stages: {' → '.join(plan.order)}")
    return 0


def command_schema(args: argparse.Namespace) -> int:
    """optipipe schema"""
    from pipeline.recipe import recipe_json_schema

    _print_json(recipe_json_schema())
    return 0


def command_runs(args: argparse.Namespace) -> int:
    """optipipe runs"""
    from pipeline.report import runs_table

    records = _store(args).list_runs()
    if args.json:
        _print_json([{key: value for key, value in record.items() if key != "stages"} for record in records])
    else:
        console.print(runs_table(records))
    return 0


def command_show(args: argparse.Namespace) -> int:
    """optipipe show RUN"""
    from pipeline.report import stages_table, variant_rows, variants_table

    record = _store(args).resolve_run(args.run)
    if args.json:
        _print_json(record)
        return 0
    console.print(stages_table(record))
    if variant_rows(record):
        console.print(variants_table(record))
    return 0


def command_diff(args: argparse.Namespace) -> int:
    """optipipe diff RUN_A RUN_B"""
    from pipeline.compare import compare_runs, comparison_tables

    store = _store(args)
    comparison = compare_runs(
        store.resolve_run(args.run_a), store.resolve_run(args.run_b),
        max_accuracy_drop=args.max_accuracy_drop, max_latency_increase=args.max_latency_increase,
        latency_basis=args.latency_basis,
    )
    if args.json:
        _print_json(comparison)
    else:
        for table in comparison_tables(comparison):
            console.print(table)
        for regression in comparison["regressions"]:
            console.print(f"[red]regression:[/] {regression}", highlight=False)
    return EXIT_REJECTED if comparison["regressions"] else 0


def write_report(record: dict[str, Any], html_path: str | None, md_path: str | None) -> list[str]:
    """Write the run's HTML and/or Markdown report (``-`` prints Markdown to stdout); returns the files written."""
    from pipeline.report_page import html_report, markdown_report

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
    store = _store(args)
    record = store.resolve_run(args.run)
    html_path = args.html
    if html_path is None and args.md is None:
        html_path = str(store.root / "reports" / f"{record['run_id']}.html")
    for path in write_report(record, html_path, args.md):
        console.print(f"wrote {path}")
    return 0


def _recipe_name(reference: str) -> str:
    """A recipe's name from its file, or the reference itself when it names no file."""
    if Path(reference).is_file():
        from pipeline.recipe import load_recipe

        return load_recipe(reference, []).recipe.name
    return reference


def command_latest(args: argparse.Namespace) -> int:
    """optipipe latest RECIPE --variant NAME"""
    from pipeline.nightly import latest_artifact, read_state

    store = _store(args)
    name = _recipe_name(args.recipe)
    if not args.json and not args.variant:
        raise OptipipeError("latest needs --variant NAME (a stage name such as onnx), or --json for the whole entry")
    if args.json:
        _print_json(read_state(store, name)["latest"])
        return 0
    print(latest_artifact(store, name, args.variant))
    return 0


def command_nightly(args: argparse.Namespace) -> int:
    """optipipe nightly RECIPE --checkpoints DIR: one night by hand, as the schedule would run it."""
    from pipeline.recipe import load_recipe
    from pipeline.store import ArtifactStore

    load_recipe(args.recipe, args.set or [])
    ArtifactStore(_store_root(args)).ensure_writable()
    from flows import nightly

    state = nightly(args.recipe, args.checkpoints, _store_root(args), args.set or [], return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, OptipipeError):
        raise outcome
    if isinstance(outcome, dict):
        _finish_run(outcome)
    if state.is_completed():
        console.print(f"promoted run {outcome['run_id']} to latest")
        return 0
    print(f"error: {state.message}", file=sys.stderr)
    return EXIT_REJECTED if "regressions vs run" in (state.message or "") else EXIT_USER_ERROR


def command_schedule(args: argparse.Namespace) -> int:
    """optipipe schedule RECIPE --checkpoints DIR --cron CRON | --list | --remove NAME"""
    from pipeline import schedule

    url = schedule.api_url()
    if args.list:
        deployments = schedule.list_deployments()
        if args.json:
            _print_json(deployments)
            return 0
        for deployment in deployments:
            crons = ", ".join(f"{item['cron']} ({item['timezone']}){'' if item['active'] else ' paused'}" for item in deployment["schedules"])
            pool = deployment["work_pool"] or "served by 'optipipe schedule'"
            console.print(f"nightly/{deployment['name']}: {crons or 'no schedule'} · {pool} · {deployment['parameters']}")
        return 0
    if args.remove:
        schedule.remove(args.remove)
        console.print(f"removed deployment nightly/{args.remove} from {url}")
        return 0
    if not args.recipe or not args.checkpoints or not args.cron:
        raise OptipipeError("schedule needs RECIPE, --checkpoints DIR and --cron '0 2 * * *' (or --list, or --remove NAME)")
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, [])
    schedule.check_cron(args.cron, args.timezone)
    spec = schedule.NightlySchedule(
        name=args.name or recipe.recipe.name, recipe=str(Path(args.recipe).resolve()), checkpoints=str(Path(args.checkpoints).resolve()),
        store=str(Path(_store_root(args)).resolve()), cron=args.cron, timezone=args.timezone,
    )
    if args.work_pool:
        deployment_id = schedule.register(spec, args.work_pool)
        console.print(f"deployment nightly/{spec.name} ({deployment_id}) on {url}: '{spec.cron}' {spec.timezone}, work pool '{args.work_pool}'; "
                      f"start a worker with: prefect worker start --pool {args.work_pool}")
        return 0
    console.print(f"serving deployment nightly/{spec.name} on {url}: '{spec.cron}' {spec.timezone}; Ctrl-C stops serving")
    schedule.serve(spec)
    return 0


def command_gc(args: argparse.Namespace) -> int:
    """optipipe gc --keep N"""
    from pipeline.gc import collect
    from pipeline.report import format_bytes

    if args.keep < 0:
        raise OptipipeError(f"--keep {args.keep}: give how many of the newest runs to keep (0 or more)")
    report = collect(_store(args), args.keep)
    console.print(
        f"removed {len(report.removed_artifacts)} artifacts and {len(report.removed_work_folders)} unfinished work "
        f"folders ({format_bytes(report.freed_bytes)}); kept {report.kept_artifacts} artifacts referenced by the "
        f"newest {args.keep} runs or a running run"
    )
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """optipipe demo: train the digits baseline, then run recipes/demo.yaml on it."""
    from pipeline.demo import DEMO_RECIPE, train_demo_checkpoint

    checkpoint_path = Path(args.out) / "digits_cnn.pt"
    console.print(f"training digits_cnn on scikit-learn digits ({args.epochs} epochs) ...")
    trained = train_demo_checkpoint(checkpoint_path, epochs=args.epochs)
    console.print(f"saved {checkpoint_path} (eval top-1 {trained['eval_top1']:.2%}, loss {trained['loss']:.4f})")
    record = run_flow(str(DEMO_RECIPE), str(checkpoint_path), _store_root(args), [])
    exit_code = _finish_run(record)
    for path in write_report(record, str(Path(args.out) / "report.html"), None):
        console.print(f"report: {Path(path).resolve()}")
    return exit_code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="optipipe", description="Optimize PyTorch checkpoints with recipes of stages.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or Prefect logs")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, store: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if store:
            sub.add_argument("--store", help=f"artifact store folder (default ${STORE_ENV} or ./artifacts)")
        return sub

    run = add("run", command_run, "run a recipe on a checkpoint")
    run.add_argument("recipe")
    run.add_argument("--checkpoint", required=True, help="the training checkpoint to optimize")
    run.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE", help="override a stage parameter")
    validate = add("validate", command_validate, "check a recipe without running it", store=False)
    validate.add_argument("recipe")
    validate.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE")
    add("schema", command_schema, "print the recipe JSON Schema", store=False)
    runs = add("runs", command_runs, "list runs, newest first")
    runs.add_argument("--json", action="store_true")
    show = add("show", command_show, "show one run's stages and variants")
    show.add_argument("run", help="run id, unique prefix, or 'latest'")
    show.add_argument("--json", action="store_true")
    diff = add("diff", command_diff, "compare two runs: identical artifacts, changed parameters, accuracy/latency/size deltas")
    diff.add_argument("run_a", help="run id, unique prefix, or 'latest'")
    diff.add_argument("run_b")
    diff.add_argument("--max-accuracy-drop", type=float, default=0.0, help="top-1 drop (fraction) flagged as a regression")
    diff.add_argument("--max-latency-increase", type=float, default=None, help="latency growth (fraction) flagged as a regression")
    diff.add_argument(
        "--latency-basis", choices=["baseline", "absolute"], default="baseline",
        help="judge latency as a multiple of the FP32 baseline timed in the same run (default: cancels machine-load "
        "drift between runs) or in absolute milliseconds",
    )
    diff.add_argument("--json", action="store_true")
    report = add("report", command_report, "write a run's review page: HTML with plots, or Markdown for PR comments")
    report.add_argument("run", help="run id, unique prefix, or 'latest'")
    report.add_argument("--html", metavar="FILE", help="write the HTML page here (default without --md: <store>/reports/RUN.html)")
    report.add_argument("--md", metavar="FILE", help="write Markdown here ('-' prints it)")
    nightly = add("nightly", command_nightly, "optimize the newest checkpoint now and compare with the last good nightly run")
    nightly.add_argument("recipe")
    nightly.add_argument("--checkpoints", required=True, help="folder (or glob) the training job writes checkpoints to")
    nightly.add_argument("--set", action="append", metavar="STAGE.PARAM=VALUE", help="override a stage parameter")
    latest = add("latest", command_latest, "print the model file of a variant of a recipe's newest good nightly run")
    latest.add_argument("recipe", help="recipe file or recipe name")
    latest.add_argument("--variant", required=False, default=None, help="stage name of the variant, e.g. onnx")
    latest.add_argument("--json", action="store_true", help="print the whole 'latest' entry")
    schedule = add("schedule", command_schedule, "schedule nightly re-optimization of the newest checkpoint as a Prefect deployment")
    schedule.add_argument("recipe", nargs="?")
    schedule.add_argument("--checkpoints", help="folder (or glob) the training job writes checkpoints to")
    schedule.add_argument("--cron", help="cron expression, e.g. '0 2 * * *' (02:00 daily)")
    schedule.add_argument("--timezone", default="UTC", help="IANA time zone of the cron schedule (default UTC)")
    schedule.add_argument("--name", help="deployment name (default: the recipe's name)")
    schedule.add_argument("--work-pool", help="register for this work pool's workers instead of serving here")
    schedule.add_argument("--list", action="store_true", help="list the nightly deployments and their schedules")
    schedule.add_argument("--remove", metavar="NAME", help="delete the deployment nightly/NAME")
    schedule.add_argument("--json", action="store_true")
    gc = add("gc", command_gc, "remove artifacts that neither the newest N runs nor a running run reference")
    gc.add_argument("--keep", type=int, default=10, help="how many of the newest runs keep their artifacts (default 10)")
    demo = add("demo", command_demo, "train the digits baseline and run recipes/demo.yaml on it")
    demo.add_argument("--out", default="demo-out", help="folder for the demo checkpoint")
    demo.add_argument("--epochs", type=int, default=15)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optipipe`` command."""
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ[QUIET_ENV] = "1"
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        return args.handler(args)
    except OptipipeError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
