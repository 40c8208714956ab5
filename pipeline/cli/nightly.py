"""Commands of nightly re-optimization: nightly (one night now), latest, schedule."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.common import EXIT_INTERRUPTED, EXIT_REJECTED, EXIT_USER_ERROR, console, finish_run, open_store, print_json, store_root
from pipeline.errors import OptipipeError


def recipe_name(reference: str) -> str:
    """A recipe's name from its file, or the reference itself when it names no file."""
    if Path(reference).is_file():
        from pipeline.recipe import load_recipe

        return load_recipe(reference, []).recipe.name
    return reference


def command_latest(args: argparse.Namespace) -> int:
    """optipipe latest RECIPE [--variant NAME]: without --variant, the model the run's select stage chose."""
    from pipeline.nightly.promotion import latest_artifact, read_state

    store = open_store(args)
    name = recipe_name(args.recipe)
    if args.json:
        print_json(read_state(store, name)["latest"])
        return 0
    print(latest_artifact(store, name, args.variant))
    return 0


def command_nightly(args: argparse.Namespace) -> int:
    """optipipe nightly RECIPE --checkpoints DIR: one night by hand, as the schedule would run it."""
    from pipeline.nightly.checkpoints import checkpoint_candidates
    from pipeline.recipe import load_recipe
    from pipeline.recipe.runner import choose_runner
    from pipeline.records.store import open_store
    from pipeline.run.cancel import interrupt_stops_runs

    plan = load_recipe(args.recipe, args.set or [])
    spec = choose_runner(args.runner, plan.recipe.runner, args.recipe)  # a bad runner setting: one line, before Prefect starts
    checkpoint_candidates(args.checkpoints)  # no Prefect start-up for an empty or missing folder
    from flows import check_runner, nightly, start_temporary_server

    check_runner(spec)
    open_store(store_root(args)).ensure_writable()

    start_temporary_server()
    with interrupt_stops_runs():
        state = nightly(args.recipe, args.checkpoints, store_root(args), args.set or [], args.runner, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, OptipipeError):
        raise outcome
    if isinstance(outcome, dict) and outcome["state"] == "cancelled":
        print(f"run {outcome['run_id']} cancelled: {outcome['message']}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(outcome, dict):
        finish_run(outcome, args.debug)
    if state.is_completed():
        console.print(f"promoted run {outcome['run_id']} to latest")
        return 0
    print(f"error: {state.message}", file=sys.stderr)
    return EXIT_REJECTED if "regressions vs run" in (state.message or "") else EXIT_USER_ERROR


def command_schedule(args: argparse.Namespace) -> int:
    """optipipe schedule RECIPE --checkpoints DIR --cron CRON | --list | --remove NAME"""
    from pipeline.nightly import schedule

    url = schedule.api_url()
    if args.list:
        deployments = schedule.list_deployments()
        if args.json:
            print_json(deployments)
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
    if not Path(args.checkpoints).is_dir() and not any(character in args.checkpoints for character in "*?["):
        raise OptipipeError(f"--checkpoints '{args.checkpoints}' is not a folder (nor a glob such as 'runs/*.pt'); "
                            "give the folder your training job writes checkpoints to")
    from pipeline.recipe import load_recipe
    from pipeline.recipe.runner import choose_runner

    recipe = load_recipe(args.recipe, [])
    if args.runner:
        choose_runner(args.runner, None)  # refused here, not at 02:00
    schedule.check_cron(args.cron, args.timezone)
    store = store_root(args)
    spec = schedule.NightlySchedule(
        name=args.name or recipe.recipe.name, recipe=str(Path(args.recipe).resolve()), checkpoints=str(Path(args.checkpoints).resolve()),
        store=store if "://" in store else str(Path(store).resolve()), cron=args.cron, timezone=args.timezone, runner=args.runner,
    )
    if args.work_pool:
        deployment_id = schedule.register(spec, args.work_pool)
        console.print(f"deployment nightly/{spec.name} ({deployment_id}) on {url}: '{spec.cron}' {spec.timezone}, work pool '{args.work_pool}'; "
                      f"start a worker with: prefect worker start --pool {args.work_pool}")
        return 0
    console.print(f"serving deployment nightly/{spec.name} on {url}: '{spec.cron}' {spec.timezone}; Ctrl-C stops serving")
    schedule.serve(spec)
    return 0
