"""Stages placed off the driver: worker processes of a local Dask cluster (``--runner processes:N``) and a real
Dask cluster on loopback (``--runner dask://HOST:PORT``: a ``dask scheduler`` and two ``dask worker`` processes
this module starts and stops), through Prefect's prefect-dask task runner."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.cli.run import run_flow
from pipeline.records.store import open_store
from tests.conftest import run_without_prefect
from tests.dask_cluster import loopback_cluster
from tests.s3_server import moto_s3_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

BRANCHES = """name: cluster-branches
model: {{factory: {factory}, input_shape: [1, 1, 8, 8]}}
data: {{source: digits, batch_size: 64}}
stages:
  load:   {{uses: load_checkpoint}}
  slim:   {{uses: strip_optimizer, needs: [load]}}
  fused:  {{uses: fuse_conv_bn, needs: [slim]}}
  onnx:   {{uses: export_onnx, needs: [slim], with: {{opset: 18, simplify: true}}}}
  int8:   {{uses: quantize, needs: [fused], with: {{mode: dynamic}}}}
  pruned: {{uses: prune, needs: [fused], with: {{method: channels, amount: 0.25, norm: 1}}}}
  check:  {{uses: validate, needs: [onnx, int8, pruned], with: {{max_drop: 1.0}}}}
"""
MODEL_KINDS = ("torch", "onnx")


def branches_recipe(folder: Path, factory: str = "pipeline.zoo:digits_cnn") -> Path:
    """The branching recipe above, written into ``folder``."""
    path = folder / "branches.yaml"
    path.write_text(BRANCHES.format(factory=factory))
    return path


def model_files(record: dict) -> dict[str, dict[str, str]]:
    """Stage -> {file name: sha256} of every model artifact a run made or reused."""
    store = open_store(record["store"])
    found = {}
    for stage in record["stages"]:
        artifact = store.read(stage["key"]) if stage["key"] else None
        if artifact is not None and artifact.manifest["kind"] in MODEL_KINDS:
            found[stage["name"]] = artifact.manifest["files"]
    return found


def task_runs_of(run_id: str) -> dict[str, str]:
    """Task run name -> state name of the ``optimize`` flow run of ``run_id``, as the Prefect server has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    with get_client(sync_client=True) as client:
        flow_run, = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=run_id)))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return {task_run.name: task_run.state.name for task_run in task_runs}


def states(record: dict) -> dict[str, str]:
    return {stage["name"]: stage["state"] for stage in record["stages"]}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on loopback; this process reaches it through the environment, with its own cache."""
    with moto_s3_server() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        patch.setenv("OPTIPIPE_CACHE", str(tmp_path_factory.mktemp("driver-cache")))
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, prefect_server):
    """A scheduler and two workers, separate OS processes on 127.0.0.1, each worker with its own store cache (they
    share only the store URL) and the test's Prefect API (as a team's workers have theirs); all of them gone after
    the module."""
    from prefect.settings import PREFECT_API_URL

    caches = tmp_path_factory.mktemp("worker-caches")
    with loopback_cluster(tmp_path_factory.mktemp("dask-logs"), env={**s3.env, "PREFECT_API_URL": PREFECT_API_URL.value()},
                          worker_env=lambda index: {"OPTIPIPE_CACHE": str(caches / f"worker-{index}")}) as running:
        yield running
    assert not running.alive(), "a cluster process outlived the test"


def test_a_run_on_a_real_cluster_and_an_s3_store_uses_both_workers_and_makes_the_bytes_a_local_run_makes(
        cluster, s3, demo_checkpoint, tmp_path):
    recipe = branches_recipe(tmp_path)
    local = run_without_prefect(recipe, demo_checkpoint, tmp_path / "local-store")
    store_url = s3.make_bucket("cluster-run") + "/optipipe"
    remote = run_flow(str(recipe), str(demo_checkpoint), store_url, [], runner=cluster.runner())

    assert remote["state"] == "succeeded", remote["message"]
    assert remote["runner"] == cluster.runner()
    addresses = {address for _, address in cluster.workers.values()}
    used = {stage["worker"] for stage in remote["stages"]}
    assert used == addresses, f"stages ran on {used}, the cluster's workers are {addresses}"
    for stage in remote["stages"]:
        manifest = open_store(remote["store"]).read(stage["key"]).manifest
        assert manifest["worker"] == stage["worker"]
    assert remote["store"] == store_url
    assert task_runs_of(remote["run_id"]) == {stage["name"]: "Completed" for stage in remote["stages"]}  # seen in the Prefect UI
    assert model_files(remote) == model_files(local) and len(model_files(local)) == 6


def kill_when_working(store_root: Path, stage: str, cluster, killed: list) -> None:
    """Wait for ``stage``'s work folder (named ``<stage>-<pid>-``) and SIGKILL the worker process making it."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        for folder in (store_root / "tmp").glob(f"{stage}-*-*"):
            pid = int(folder.name.split("-")[1])
            name = cluster.worker_of_pid(pid)
            if name is not None:
                os.kill(pid, signal.SIGKILL)
                cluster.workers[name][0].wait()  # reaped: a zombie would still look alive to gc
                killed.append((name, folder))
                return
        time.sleep(0.02)


def test_a_worker_killed_mid_stage_gets_the_stage_run_again_on_the_other_worker_never_half_published(cluster, demo_checkpoint, tmp_path):
    """Runs last in this module: it leaves the cluster with one worker."""
    recipe = branches_recipe(tmp_path)
    store_root = tmp_path / "store"
    killed: list = []
    killer = threading.Thread(target=kill_when_working, args=(store_root, "onnx", cluster, killed), daemon=True)
    killer.start()
    record = run_flow(str(recipe), str(demo_checkpoint), str(store_root), [], runner=cluster.runner())
    killer.join(timeout=5)

    assert killed, "the onnx stage's work folder never appeared"
    victim, half_written = killed[0]
    survivor = next(address for name, (_, address) in cluster.workers.items() if name != victim)
    onnx = next(stage for stage in record["stages"] if stage["name"] == "onnx")
    assert record["state"] == "succeeded", record["message"]
    assert onnx["state"] == "done" and onnx["worker"] == survivor
    store = open_store(store_root)
    store.verify(store.read(onnx["key"]))  # the published artifact is whole: every file matches its digest
    assert half_written.is_dir() and not (half_written / "manifest.json").exists()  # the killed attempt stayed a work folder

    from pipeline.records.gc import collect

    report = collect(store, keep=10, grace_seconds=0)
    assert not half_written.exists(), report  # its process is dead: gc clears it


def test_processes_runner_a_stage_that_kills_its_process_fails_alone_and_the_other_branches_finish(demo_checkpoint, tmp_path):
    recipe = branches_recipe(tmp_path, factory="tests.cluster_models:killed_on_export")
    record = run_flow(str(recipe), str(demo_checkpoint), str(tmp_path / "store"), [], runner="processes:2")

    assert record["runner"] == "processes:2"
    assert states(record) == {"load": "done", "slim": "done", "fused": "done", "onnx": "failed", "int8": "done",
                              "pruned": "done", "check": "skipped"}  # check needs onnx: a failure upstream skips it
    onnx = next(stage for stage in record["stages"] if stage["name"] == "onnx")
    assert "lost by the task runner" in onnx["reason"] and "died" in onnx["reason"], onnx["reason"]
    assert task_runs_of(record["run_id"])["onnx"] == "Crashed"  # not left "Running" in the Prefect UI
    assert record["state"] == "failed" and record["message"].startswith("onnx: ")
    assert all(stage["worker"].startswith("tcp://127.0.0.1:") for stage in record["stages"] if stage["state"] == "done")
    assert not list((tmp_path / "store" / "artifacts").glob("*/manifest.json.tmp*"))
