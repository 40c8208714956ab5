"""Prefect deployments of ``flows.nightly`` on a cron schedule: create or update, serve, list, remove.

Schedules live on a real Prefect server (``prefect server start``, or a team's server), reached through
``PREFECT_API_URL``; Prefect's temporary in-process server refuses them. Without ``--work-pool`` the
command serves the deployment itself (``prefect.serve``: it runs each scheduled night until stopped);
with one it only registers the deployment, and that pool's workers run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import OptipipeError

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOW_NAME = "nightly"
ENTRYPOINT = "flows.py:nightly"


class ScheduleError(OptipipeError):
    """A schedule that cannot be made: no server, bad cron or time zone, unknown deployment."""


@dataclass(frozen=True)
class NightlySchedule:
    """What ``optipipe schedule`` was asked for, with paths made absolute (workers run elsewhere)."""

    name: str
    recipe: str
    checkpoints: str
    store: str
    cron: str
    timezone: str
    runner: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The ``nightly`` flow's parameters every scheduled run gets (``runner`` only when one was given, so a
        worker's ``$OPTIPIPE_RUNNER`` or the recipe's ``runner:`` decides otherwise)."""
        runner = {"runner": self.runner} if self.runner else {}
        return {"recipe_path": self.recipe, "checkpoints": self.checkpoints, "store_root": self.store, **runner}


def api_url() -> str:
    """The Prefect server schedules are registered with, or a clear error saying how to start one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError(
            "schedules need a running Prefect server: start one with 'prefect server start' and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (or point it at your team's server)"
        )
    return url


def check_cron(cron: str, timezone: str) -> None:
    """Refuse a cron expression or time zone with Prefect's own schedule validation, naming the option."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as error:
        field = error.errors()[0]["loc"][0]
        if field == "timezone":
            raise ScheduleError(f"--timezone '{timezone}' is not an IANA time zone name such as 'UTC' or 'Europe/Berlin'") from None
        raise ScheduleError(f"--cron '{cron}' is not a cron expression (five fields, e.g. '0 2 * * *' for 02:00 daily)") from None


def _schedules(spec: NightlySchedule) -> list[Any]:
    from prefect.schedules import Cron

    return [Cron(spec.cron, timezone=spec.timezone)]


def _description(spec: NightlySchedule) -> str:
    return f"optipipe nightly: newest checkpoint in {spec.checkpoints} through {spec.recipe}"


def serve(spec: NightlySchedule) -> None:
    """Create or update the deployment and serve it in this process until interrupted."""
    from prefect import serve as prefect_serve

    from flows import nightly

    deployment = nightly.to_deployment(
        name=spec.name, schedules=_schedules(spec), parameters=spec.parameters(),
        description=_description(spec), tags=["optipipe", "nightly"],
    )
    prefect_serve(deployment)


def register(spec: NightlySchedule, work_pool: str) -> str:
    """Create or update the deployment for ``work_pool``'s workers; returns the deployment id."""
    from prefect import flow

    source_flow = flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = source_flow.deploy(
        name=spec.name, work_pool_name=work_pool, schedules=_schedules(spec), parameters=spec.parameters(),
        description=_description(spec), tags=["optipipe", "nightly"], build=False, push=False,
        print_next_steps=False, ignore_warnings=True,  # a process pool is the intended team set-up here
    )
    return str(deployment_id)


def list_deployments() -> list[dict[str, Any]]:
    """Every deployment of the ``nightly`` flow on the server, with its schedules and parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
        return [
            {
                "name": deployment.name,
                "id": str(deployment.id),
                "work_pool": deployment.work_pool_name,
                "schedules": [
                    {"cron": getattr(item.schedule, "cron", None), "timezone": getattr(item.schedule, "timezone", None), "active": item.active}
                    for item in deployment.schedules
                ],
                "parameters": deployment.parameters,
            }
            for deployment in deployments
        ]


def remove(name: str) -> None:
    """Delete the ``nightly/<name>`` deployment (its past flow runs stay on the server)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        except ObjectNotFound:
            raise ScheduleError(f"--remove '{name}': no deployment '{FLOW_NAME}/{name}' on {api_url()}; 'optipipe schedule --list' shows them") from None
        client.delete_deployment(deployment.id)
