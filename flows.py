"""Prefect flows: ``optimize`` runs one recipe on one checkpoint as a DAG of Prefect tasks.

The work lives in ``pipeline.session.RunSession``; this module only maps stages onto tasks, so
independent branches run concurrently, each stage shows as a task run in the Prefect UI, and the
run's variant metrics and summary are published as Prefect artifacts. ``nightly`` wraps ``optimize`` for
scheduled runs: newest checkpoint in, regressions against the last good night out.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.errors import OptipipeError  # noqa: E402
from pipeline.nightly import judge, latest_reference, newest_checkpoint, record_night  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.report import variant_rows  # noqa: E402
from pipeline.report_page import markdown_summary  # noqa: E402
from pipeline.session import RunSession, new_run_id  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

DEFAULT_STORE = "artifacts"
MAX_CONCURRENT_STAGES = 4


@task(task_run_name="{name}", cache_policy=NO_CACHE, retries=0)
def run_stage(session: RunSession, name: str) -> Any:
    """One recipe stage as a Prefect task; a stage reused from the store ends in a state named ``Cached``.

    A failing stage ends Failed with its one-line message (the session already recorded it), so the
    log shows the reason rather than a traceback; downstream tasks then never start.
    """
    try:
        result = session.execute(name)
    except OptipipeError as error:
        return Failed(message=str(error))
    logger = get_run_logger()
    if result.state == "skipped":
        logger.warning("%s: skipped: %s", name, result.reason)
        return Completed(name="Skipped", message=result.reason, data=result.as_record())
    if result.state == "cached":
        logger.info("%s: reused cached artifact %s", name, result.key[:12])
        return Completed(name="Cached", message=f"reused artifact {result.key[:12]}", data=result.as_record())
    logger.info("%s: done in %.2fs -> artifact %s", name, result.seconds, result.key[:12])
    return result.as_record()


def _first_unfinished_upstream(session: RunSession, name: str) -> str:
    for upstream in session.plan.waits_for(name):
        upstream_result = session.results.get(upstream)
        if upstream_result is None or upstream_result.state in ("failed", "skipped"):
            return upstream
    return "an upstream stage"


def _artifact_key(record: dict[str, Any], suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for this run's recipe."""
    recipe = re.sub(r"[^a-z0-9-]+", "-", record["recipe"]["name"].lower()).strip("-") or "recipe"
    return f"optipipe-{recipe}-{suffix}"


def _publish_artifacts(record: dict[str, Any]) -> None:
    """Show the run in the Prefect UI: a table of variant metrics and a markdown summary with the Pareto front."""
    rows = variant_rows(record)
    if rows:
        create_table_artifact(
            key=_artifact_key(record, "variants"),
            table=rows,
            description=f"optipipe run {record['run_id']}: variants vs the FP32 baseline",
        )
    create_markdown_artifact(
        key=_artifact_key(record, "summary"),
        markdown=markdown_summary(record),
        description=f"optipipe run {record['run_id']}: summary (full page: optipipe report {record['run_id']})",
    )


@flow(name="optimize", task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENT_STAGES))
def optimize(
    recipe_path: str,
    checkpoint_path: str,
    store_root: str = DEFAULT_STORE,
    overrides: list[str] | None = None,
    run_id: str | None = None,
) -> Any:
    """Run a recipe on a checkpoint; the flow run ends Failed when any stage failed or a variant was rejected."""
    plan = load_recipe(recipe_path, overrides)
    session = RunSession(plan, ArtifactStore(store_root), Path(checkpoint_path), run_id)
    session.start()
    futures = {}
    for name in plan.order:
        upstream = [futures[needed] for needed in plan.waits_for(name)]
        futures[name] = run_stage.submit(session, name, wait_for=upstream)
    for name in plan.order:
        futures[name].wait()
        if name not in session.results:
            session.skip(name, f"not run: upstream stage '{_first_unfinished_upstream(session, name)}' did not finish")
    record = session.finish()
    _publish_artifacts(record)
    if record["state"] != "succeeded":
        return Failed(message=record["message"] or "some stages did not finish", data=record)
    return record


def _nightly_markdown(record: dict[str, Any], choice: Any, verdict: dict[str, Any], promoted: bool) -> str:
    lines = [f"## nightly {record['recipe']['name']}: run {record['run_id']} **{record['state']}**",
             f"checkpoint `{choice.path}` ({choice.reason})"]
    if verdict["reference_run"] is None:
        lines.append("first nightly run of this recipe: nothing to compare with")
    else:
        lines.append(f"compared with the last good nightly run {verdict['reference_run']}")
    lines += [f"- regression: {regression}" for regression in verdict["regressions"]]
    lines.append(f"promoted to latest: **{'yes' if promoted else 'no'}**")
    return "\n\n".join(lines) + "\n"


@flow(name="nightly")
def nightly(recipe_path: str, checkpoints: str, store_root: str = DEFAULT_STORE, overrides: list[str] | None = None) -> Any:
    """Optimize the newest checkpoint in ``checkpoints`` (a folder or glob) and compare with the last good night.

    Ends Failed when the run failed or a variant regressed beyond the recipe's ``nightly.regression``
    limits, naming each regression; otherwise the run is promoted to the recipe's ``latest``.
    """
    logger = get_run_logger()
    plan = load_recipe(recipe_path, overrides)
    store = ArtifactStore(store_root)
    choice = newest_checkpoint(checkpoints)
    logger.info("checkpoint %s: %s", choice.path, choice.reason)
    reference = latest_reference(store, plan.recipe.name)
    run_id = new_run_id()
    optimize(recipe_path, str(choice.path), store_root, overrides, run_id, return_state=True)
    if not store.run_path(run_id).is_file():
        return Failed(message=f"nightly {plan.recipe.name}: the optimize run did not start (see its log)")
    record = store.read_run(run_id)
    if all(stage["state"] == "cached" for stage in record["stages"]):
        logger.info("every stage reused from the cache: %s was already optimized with this recipe, no work done", choice.path.name)
    verdict = judge(record, reference, plan.recipe.nightly.regression)
    record["nightly"] = {"checkpoint_choice": choice.reason, "reference_run": verdict["reference_run"],
                         "regressions": verdict["regressions"], "comparison": verdict["comparison"]}
    store.write_run(record)
    promoted = record_night(store, record, choice, verdict)
    create_markdown_artifact(key=_artifact_key(record, "nightly"), markdown=_nightly_markdown(record, choice, verdict, promoted),
                             description=f"nightly verdict for run {run_id}")
    if record["state"] != "succeeded":
        return Failed(message=f"nightly {plan.recipe.name}: run {run_id} failed: {record['message']}", data=record)
    if verdict["regressions"]:
        named = "; ".join(verdict["regressions"])
        return Failed(message=f"nightly {plan.recipe.name}: regressions vs run {verdict['reference_run']}: {named}", data=record)
    logger.info("run %s promoted to latest for recipe %s", run_id, plan.recipe.name)
    return record
