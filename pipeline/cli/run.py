"""Commands that run or check recipes: run, validate, schema."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cli.common import console, finish_run, print_json, store_root
from pipeline.errors import OptipipeError


def run_flow(recipe_path: str, checkpoint_path: str, store_root: str, overrides: list[str]) -> dict[str, Any]:
    """Check inputs fast (no Prefect start-up for a typo), run the ``optimize`` flow, return the run record."""
    from pipeline.recipe import load_recipe
    from pipeline.records.store import ArtifactStore
    from pipeline.run.engine import check_checkpoint_file
    from pipeline.run.record import new_run_id

    load_recipe(recipe_path, overrides)
    check_checkpoint_file(Path(checkpoint_path))
    ArtifactStore(store_root).ensure_writable()
    from flows import optimize, start_temporary_server

    start_temporary_server()
    run_id = new_run_id()
    state = optimize(recipe_path, checkpoint_path, store_root, overrides, run_id, return_state=True)
    store = ArtifactStore(store_root)
    if not store.run_path(run_id).is_file():  # the flow failed before the run started
        outcome = state.result(raise_on_failure=False)
        raise outcome if isinstance(outcome, BaseException) else OptipipeError(state.message or "run failed")
    return store.read_run(run_id)


def command_run(args: argparse.Namespace) -> int:
    """optipipe run RECIPE --checkpoint CKPT"""
    record = run_flow(args.recipe, args.checkpoint, store_root(args), args.set or [])
    return finish_run(record, args.debug)


def command_validate(args: argparse.Namespace) -> int:
    """optipipe validate RECIPE"""
    from pipeline.recipe import load_recipe

    plan = load_recipe(args.recipe, args.set or [])
    console.print(f"{args.recipe}: ok — recipe '{plan.recipe.name}', {len(plan.order)} stages: {' → '.join(plan.order)}")
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
