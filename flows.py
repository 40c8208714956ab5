"""Prefect flows: ``optimize`` runs one recipe on one checkpoint as a DAG of Prefect tasks.

The rules of a run live in ``pipeline.run.engine.run_plan``; this module hands each stage to a Prefect
task with plain arguments (``StageCall``: recipe path, store root, stage name, upstream artifact keys), so
independent branches run concurrently, each stage shows as a task run in the Prefect UI, and the task
runner is a choice, not a rewrite. The run's variant metrics and summary are published as Prefect
artifacts. ``nightly`` wraps ``optimize`` for scheduled runs: newest checkpoint in, regressions against
the last good night out.

Where the stages run is ``runner`` (``pipeline.recipe.runner``): threads of this process (Prefect's thread
pool), worker processes of a local Dask cluster, or an existing Dask scheduler's workers, both through
prefect-dask's ``DaskTaskRunner``; ``optimize_on(spec)`` is the flow bound to one of them.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import prefect  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.server.api.server import SubprocessASGIServer  # noqa: E402
from prefect.settings import PREFECT_API_URL, get_current_settings  # noqa: E402
from prefect.states import Cancelled as CancelledState  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner  # noqa: E402

from pipeline.errors import OptipipeError  # noqa: E402
from pipeline.nightly.checkpoints import newest_checkpoint  # noqa: E402
from pipeline.nightly.promotion import judge, latest_reference, record_night  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.recipe.runner import RunnerSpec, choose_runner  # noqa: E402
from pipeline.records.models import StageResult  # noqa: E402
from pipeline.records.store import open_store  # noqa: E402
from pipeline.review.page import markdown_summary  # noqa: E402
from pipeline.review.prefect_view import name_flow_run, nightly_run_name, optimize_run_name, stage_markdown, tag_flow_run, variant_table  # noqa: E402
from pipeline.run.cancel import Cancelled as RunCancelled  # noqa: E402
from pipeline.run.engine import CANCELLED_MESSAGE, run_plan  # noqa: E402
from pipeline.run.executor import StageCall, execute  # noqa: E402
from pipeline.run.record import new_run_id  # noqa: E402

DEFAULT_STORE = "artifacts"
MAX_CONCURRENT_STAGES = 4
SCHEDULER_CONNECT_SECONDS = 10
LOCAL_CLUSTER_ALLOWED_FAILURES = 1  # a stage whose worker died is retried once, on a fresh worker, then fails
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal the kernel sends a process when its parent dies


def dies_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies, however it dies.

    ``prctl`` is looked up here, before the fork, so the forked child only calls it (nothing to lock).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


class ChildPrefectServer(SubprocessASGIServer):
    """Prefect's temporary server (what Prefect starts when no PREFECT_API_URL is set), started so that it
    dies with this process even on SIGKILL, instead of living on (~190 MB each) after a killed run.

    The command and environment are those of Prefect 3.8.8's ``SubprocessASGIServer._run_uvicorn_command``;
    only ``preexec_fn`` is added (Linux ``prctl(PR_SET_PDEATHSIG)``).
    """

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        """Start uvicorn serving Prefect's API on ``self.port``, as a child that dies with this process."""
        server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        command = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]
        environment = {**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen(command, env=environment, preexec_fn=dies_with_this_process())  # noqa: PLW1509 (only calls prctl)


_temporary_server: list[ChildPrefectServer] = []  # the one this process started, if any


def api_url_for_workers() -> str | None:
    """The Prefect API this process reports to (``PREFECT_API_URL``, else the temporary server it started), so that
    worker processes report their task runs there too instead of each starting a server of its own."""
    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    return _temporary_server[0].api_url if _temporary_server and _temporary_server[0].running else None


def start_temporary_server() -> None:
    """Without PREFECT_API_URL (and on Linux), start Prefect's temporary server now, from this thread, as a
    child the kernel kills with this process; Prefect then finds it running instead of starting its own.

    Started eagerly because the kernel ties PR_SET_PDEATHSIG to the thread that forked: a server Prefect
    started lazily from a worker thread would die with that thread.
    """
    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return
    server = ChildPrefectServer()  # registers itself as the server Prefect's own SubprocessASGIServer() returns
    server.start()
    _temporary_server[:] = [server]


@task(task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def run_stage(stage: str, call: dict[str, Any]) -> Any:
    """One recipe stage as a Prefect task; its state is named ``Cached`` or ``Skipped`` where that applies.

    A failed stage ends Failed with its one-line reason; an internal error also puts its traceback in
    the task's log. The StageResult travels back as the state's data either way.
    """
    result = execute(StageCall.from_dict(call))
    logger = get_run_logger()
    record = result.model_dump(mode="json")
    create_markdown_artifact(markdown=stage_markdown(record), description=f"optipipe stage {stage}: {result.state}")
    if result.state == "failed":
        if result.log:
            logger.error("%s: internal error\n%s", stage, Path(result.log).read_text(encoding="utf-8"))
        return Failed(message=result.reason, data=record)
    if result.state == "skipped":
        logger.warning("%s: skipped: %s", stage, result.reason)
        return Completed(name="Skipped", message=result.reason, data=record)
    if result.state == "cached":
        logger.info("%s: reused cached artifact %s", stage, result.key[:12])
        return Completed(name="Cached", message=f"reused artifact {result.key[:12]}", data=record)
    logger.info("%s: done in %.2fs -> artifact %s", stage, result.seconds, result.key[:12])
    return Completed(data=record)


class TaskResult:
    """A submitted ``run_stage`` task as ``run_plan`` waits on it: ``result()`` is the stage's StageResult."""

    def __init__(self, future: Any):
        self.future = future

    def result(self) -> StageResult:
        self.future.wait()
        state = self.future.state
        if not state.is_final():  # its worker died (Dask gave up on it): the task runner's error says how
            raise lost_task_error(self.future, state)
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):  # the task itself raised (a bug outside execute): run_plan says so
            raise outcome
        return StageResult.model_validate(outcome)


def lost_task_error(future: Any, state: Any) -> BaseException:
    """The error of a task run its task runner lost (a Dask ``KilledWorker``); its run is marked Crashed with it,
    so the Prefect UI does not show it running forever."""
    wrapped = getattr(future, "wrapped_future", None)
    error = wrapped.exception() if wrapped is not None and hasattr(wrapped, "exception") else None
    error = error or RuntimeError(f"the task run ended {state.name} without a result")
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(future.task_run_id, Crashed(message=f"lost by the task runner: {error}"), force=True)
    return error


def submit_task(call: StageCall) -> TaskResult:
    """Hand one stage to the flow's task runner."""
    return TaskResult(run_stage.submit(call.stage, call.as_dict()))


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` settings for ``processes:N``: N single-threaded worker processes, each
    given an equal share of the CPU cores for torch's own threads and this process's Prefect API, no dashboard."""
    cores_each = str(max(1, (os.cpu_count() or 1) // workers))
    api_url = api_url_for_workers()
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "env": {"OMP_NUM_THREADS": cores_each, "MKL_NUM_THREADS": cores_each, **({"PREFECT_API_URL": api_url} if api_url else {})}}


def task_runner_for(spec: RunnerSpec) -> TaskRunner:
    """The Prefect task runner that runs stages where ``spec`` says."""
    if spec.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=spec.workers)
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise OptipipeError(f"runner {spec.describe()} needs prefect-dask and distributed: pip install 'optipipe[cluster]'") from None
    if spec.kind == "dask":
        return DaskTaskRunner(address=spec.address)
    dask.config.set({"distributed.scheduler.allowed-failures": LOCAL_CLUSTER_ALLOWED_FAILURES})
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(spec.workers or 1))


def check_runner(spec: RunnerSpec) -> None:
    """Refuse in one line, before a run starts, a ``dask://`` runner whose scheduler does not answer."""
    if spec.kind != "dask" or spec.address is None:
        return
    host, port = spec.address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=SCHEDULER_CONNECT_SECONDS).close()
    except OSError as error:
        raise OptipipeError(f"runner {spec.describe()}: no Dask scheduler answers at {spec.address} ({error.strerror or error}); "
                            "start one with 'dask scheduler' or fix the address") from None


def optimize_on(spec: RunnerSpec) -> Any:
    """The ``optimize`` flow with its stages run where ``spec`` says."""
    return optimize.with_options(task_runner=task_runner_for(spec))


def _artifact_key(record: dict[str, Any], suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for this run's recipe."""
    recipe = re.sub(r"[^a-z0-9-]+", "-", record["recipe"]["name"].lower()).strip("-") or "recipe"
    return f"optipipe-{recipe}-{suffix}"


def _publish_artifacts(record: dict[str, Any]) -> None:
    """Show the run in the Prefect UI: the flow run named with its run id, a table of variant metrics in human
    units and a markdown summary with the Pareto front."""
    name_flow_run(record)
    rows = variant_table(record)
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


@flow(name="optimize", flow_run_name=optimize_run_name, on_running=[tag_flow_run],
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENT_STAGES))
def optimize(
    recipe_path: str,
    checkpoint_path: str,
    store_root: str = DEFAULT_STORE,
    overrides: list[str] | None = None,
    run_id: str | None = None,
    runner: str | None = None,
) -> Any:
    """Run a recipe on a checkpoint; the flow run ends Failed when any stage failed or a variant was rejected.

    ``runner`` is recorded in the run record; the flow's task runner (``optimize_on``) is what places stages.
    """
    plan = load_recipe(recipe_path, overrides)
    try:
        record = run_plan(plan, open_store(store_root), Path(checkpoint_path), overrides=overrides, run_id=run_id,
                          submit=submit_task, runner=runner)
    except OptipipeError as error:  # the run could not start (the checkpoint, the store): one line, no traceback
        return Failed(message=str(error), data=error)
    except RunCancelled:  # Ctrl-C: the stages stopped, the run record says cancelled; the flow ends likewise
        return CancelledState(message=CANCELLED_MESSAGE)
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


@flow(name="nightly", flow_run_name=nightly_run_name, on_running=[tag_flow_run])
def nightly(recipe_path: str, checkpoints: str, store_root: str = DEFAULT_STORE, overrides: list[str] | None = None,
            runner: str | None = None) -> Any:
    """Optimize the newest complete checkpoint in ``checkpoints`` (a folder or glob); compare with the last good night.

    The stages run where ``runner`` says (default: ``$OPTIPIPE_RUNNER``, then the recipe's ``runner:``).

    Ends Failed when the run failed or a variant regressed beyond the recipe's ``nightly.regression``
    limits, naming each regression; otherwise the run is promoted to the recipe's ``latest``.
    """
    logger = get_run_logger()
    plan = load_recipe(recipe_path, overrides)
    store = open_store(store_root)
    try:
        choice = newest_checkpoint(checkpoints)
    except OptipipeError as error:  # no complete checkpoint: the night fails with that one line, no traceback
        return Failed(message=str(error), data=error)
    for passed_over in choice.passed_over:
        logger.warning("checkpoints: %s", passed_over)
    logger.info("checkpoint %s: %s", choice.path, choice.reason)
    reference = latest_reference(store, plan.recipe.name)
    run_id = new_run_id()
    spec = choose_runner(runner, plan.recipe.runner, recipe_path)
    optimize_on(spec)(recipe_path, str(choice.path), store_root, overrides, run_id, spec.describe(), return_state=True)
    if not store.has_run(run_id):
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
