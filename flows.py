"""Prefect flows: ``optimize`` runs one recipe on one checkpoint as a DAG of Prefect tasks.

The work lives in ``pipeline.session.RunSession``; this module only maps stages onto tasks, so
independent branches run concurrently, each stage shows as a task run in the Prefect UI, and the
run's variant metrics are published as a Prefect table artifact.
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
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.report import variant_rows  # noqa: E402
from pipeline.report_page import markdown_summary  # noqa: E402
from pipeline.session import RunSession  # noqa: E402
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
