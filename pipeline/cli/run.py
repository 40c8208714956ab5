"""Commands that run or check recipes: run, plan, validate, schema."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.cli.common import EXIT_INTERRUPTED, console, finish_run, open_store, print_json, store_root
from pipeline.cli.live import live_run_view, live_view_wanted
from pipeline.errors import OptipipeError

STATE_LABELS = {True: "[cyan]cached[/]", False: "[yellow]will run[/]"}


def run_flow(recipe_path: str, checkpoint_path: str, store_root: str, overrides: list[str], live: bool = False,
             runner: str | None = None) -> dict[str, Any]:
    """Check inputs fast (no Prefect start-up for a typo), run the ``optimize`` flow where ``runner`` (or
    ``$OPTIPIPE_RUNNER``, or the recipe) says, and return the run record.

    While the flow runs, Ctrl-C cancels the run (``pipeline.run.cancel``): the record comes back ``cancelled``;
    with ``live``, a table of its stages shows on the terminal meanwhile (``pipeline.cli.live``).
    """
    from pipeline.recipe import load_recipe
    from pipeline.recipe.runner import choose_runner
    from pipeline.records.store import open_store
    from pipeline.run.cancel import interrupt_stops_runs
    from pipeline.run.engine import check_checkpoint_file
    from pipeline.run.record import new_run_id

    plan = load_recipe(recipe_path, overrides)
    check_checkpoint_file(Path(checkpoint_path))
    spec = choose_runner(runner, plan.recipe.runner, recipe_path)
    from flows import check_runner, optimize_on, start_temporary_server

    check_runner(spec)
    store = open_store(store_root)
    store.ensure_writable()

    start_temporary_server()
    run_id = new_run_id()
    with interrupt_stops_runs(), (live_run_view(plan, store, run_id) if live else nullcontext()):
        # absolute paths: a retry from the Prefect UI must not depend on the working directory it runs in
        location = store.location if "://" in store.location else str(Path(store.location).resolve())
        state = optimize_on(spec)(str(Path(recipe_path).resolve()), str(Path(checkpoint_path).resolve()), location, overrides,
                                  run_id, spec.describe(), return_state=True)
    record = store.read_run(run_id) if store.has_run(run_id) else None
    if record is None or record["state"] == "running":  # the flow failed before the run started, or died in it
        outcome = state.result(raise_on_failure=False)
        raise outcome if isinstance(outcome, BaseException) else OptipipeError(state.message or "run failed")
    return record


def command_run(args: argparse.Namespace) -> int:
    """optipipe run RECIPE --checkpoint CKPT [--runner R] [--json]"""
    record = run_flow(args.recipe, args.checkpoint, store_root(args), args.set or [], live=live_view_wanted(args), runner=args.runner)
    if record["state"] == "cancelled":
        print(f"run {record['run_id']} cancelled: {record['message']}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print_json(record)
        return finish_run(record, args.debug, tables=False)
    return finish_run(record, args.debug)


def command_validate(args: argparse.Namespace) -> int:
    """optipipe validate RECIPE [--json]"""
    from pipeline.recipe import load_recipe

    plan = load_recipe(args.recipe, args.set or [])
    if args.json:
        print_json(plan_json(plan))
        return 0
    console.print(f"{args.recipe}: ok — recipe '{plan.recipe.name}', {len(plan.order)} stages: {' → '.join(plan.order)}",
                  markup=False)
    for expansion in plan.expansions():
        console.print(expansion_line(expansion), markup=False)
    return 0


def expansion_line(expansion: dict[str, Any]) -> str:
    """One stage's expansion in words, e.g. ``pruned: matrix 3 - 1 excluded = 2 branches: pruned[amount=0.25], ...``."""
    combinations, excluded, upstream = expansion["matrix"], expansion["excluded"], expansion["per_branch_of"]
    text = f"matrix {combinations}{f' - {excluded} excluded' if excluded else ''}" if combinations else ""
    if upstream:
        text += f" = {combinations - excluded} per branch of {upstream}" if combinations else f"one per branch of {upstream}"
    branches = expansion["branches"]
    return f"{expansion['stage']}: {text} = {len(branches)} branches: {', '.join(branches)}"


def plan_json(plan: Any) -> dict[str, Any]:
    """A checked recipe as JSON: its name, digest, baseline, stage order, matrix expansions, and each stage's uses,
    needs, parameters, the recipe stage it is a branch of and its matrix label."""
    return {
        "recipe": plan.recipe.name, "path": str(plan.path), "digest": plan.digest, "baseline": plan.baseline,
        "order": plan.order, "expansions": plan.expansions(),
        "stages": {name: {"uses": plan.uses_of(name), "needs": plan.needs_of(name),
                          "params": plan.params[name].model_dump(mode="json"),
                          "branch_of": plan.stages[name].stage, "label": dict(plan.stages[name].label)} for name in plan.order},
    }


def check_checkpoint_fits(plan: Any, checkpoint_path: Path) -> None:
    """Load the checkpoint's weights as the plan's load stage would, into the recipe's model, saving nothing;
    ``CheckpointError`` (or ``RecipeError`` for the factory) when they do not fit."""
    from stages import load_checkpoint

    loads = [name for name in plan.order if plan.uses_of(name) == "load_checkpoint"]
    params = plan.params[loads[0]] if loads else load_checkpoint.Params()
    load_checkpoint.fit_checkpoint(checkpoint_path, plan.recipe.model, params)


def plan_tree(plan: Any, cached: dict[str, Any] | None) -> Any:
    """The DAG as a rich tree: each stage under the first stage it needs, naming the others it needs, with
    its state (cached or will run; none without a checkpoint)."""
    from rich.markup import escape
    from rich.tree import Tree

    tree = Tree(f"[bold]{plan.recipe.name}[/] · {plan.path}")
    branches: dict[str, Any] = {}
    for name in plan.order:
        needs = plan.needs_of(name)
        also = f" · also needs {', '.join(needs[1:])}" if len(needs) > 1 else ""
        state = "" if cached is None else f" · {STATE_LABELS[cached[name] is not None]}"
        parent = branches[needs[0]] if needs else tree
        branches[name] = parent.add(f"[bold]{escape(name)}[/] ({plan.uses_of(name)}){escape(also)}{state}")
    return tree


def command_plan(args: argparse.Namespace) -> int:
    """optipipe plan RECIPE [--checkpoint CKPT]: the DAG, what is cached and what will run, and whether the
    checkpoint fits the model; before any Prefect start-up."""
    from pipeline.recipe import load_recipe
    from pipeline.run.checkpoint_snapshot import checkpoint_digest
    from pipeline.run.engine import check_checkpoint_file
    from pipeline.run.executor import cached_digests

    plan = load_recipe(args.recipe, args.set or [])
    cached = None
    if args.checkpoint:
        checkpoint_path = Path(args.checkpoint)
        check_checkpoint_file(checkpoint_path)
        check_checkpoint_fits(plan, checkpoint_path)
        cached = cached_digests(plan, open_store(args), checkpoint_digest(checkpoint_path))
    console.print(plan_tree(plan, cached))
    if cached is None:
        console.print("no --checkpoint: the cache was not checked")
        return 0
    reused = sum(artifact is not None for artifact in cached.values())
    console.print(f"checkpoint {args.checkpoint} fits {plan.recipe.model.factory}; "
                  f"{reused} of {len(cached)} stages cached, {len(cached) - reused} will run")
    return 0


def command_schema(args: argparse.Namespace) -> int:
    """optipipe schema [--records]"""
    if args.records:
        from pipeline.records.schemas import records_json_schema

        print_json(records_json_schema())
        return 0
    from pipeline.recipe.json_schema import recipe_json_schema

    print_json(recipe_json_schema())
    return 0
