"""`optipipe schedule` against a real Prefect server on loopback: deployment, cron schedule, a triggered night."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pipeline.cli import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
NIGHTLY_RECIPE = REPO_ROOT / "recipes" / "nightly.yaml"
DEPLOYMENT = "test-nightly"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def prefect_server_process(tmp_path):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields (api url, env)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "OPTIPIPE_QUIET": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return server.poll() is not None and pytest.fail(f"prefect server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")

    try:
        wait_for(healthy, 120, "the Prefect server to answer /api/health")
        yield api, env
    finally:
        stop(server)
        log.close()


def optipipe(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_schedule_serves_a_cron_deployment_that_runs_a_night(prefect_server_process, demo_checkpoint, tmp_path):
    api, env = prefect_server_process
    checkpoints, store = tmp_path / "checkpoints", tmp_path / "store"
    checkpoints.mkdir()
    shutil.copy(demo_checkpoint, checkpoints / "epoch-08.pt")
    serve_log = open(tmp_path / "serve.log", "w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "schedule", str(NIGHTLY_RECIPE), "--checkpoints", str(checkpoints),
         "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", "--name", DEPLOYMENT, "--store", str(store)],
        env=env, cwd=REPO_ROOT, stdout=serve_log, stderr=subprocess.STDOUT,
    )
    try:
        def listed():
            result = optipipe(env, "schedule", "--list", "--json")
            assert result.returncode == 0, result.stderr
            return next((item for item in json.loads(result.stdout) if item["name"] == DEPLOYMENT), None)

        deployment = wait_for(listed, 90, "the served deployment to be registered", interval=2)
        assert deployment["schedules"] == [{"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}]
        assert deployment["parameters"] == {"recipe_path": str(NIGHTLY_RECIPE), "checkpoints": str(checkpoints), "store_root": str(store)}

        def scheduled_nights():
            # the server's scheduler services create the coming runs a few seconds after registration, not at once
            return httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}, timeout=10).json()

        scheduled = wait_for(scheduled_nights, 60, "the server to schedule the coming nights", interval=1)
        assert all(run["state_type"] == "SCHEDULED" for run in scheduled), [run["state_type"] for run in scheduled]

        flow_run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10).json()

        def finished():
            run = httpx.get(f"{api}/flow_runs/{flow_run['id']}", timeout=10).json()
            return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        run = wait_for(finished, 240, "the triggered nightly run to finish", interval=2)
        assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
        records = list((store / "runs").glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["state"] == "succeeded"
        assert (store / "nightly" / "nightly.json").is_file()
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["optipipe-nightly-nightly"]}}}, timeout=10).json()
        assert artifacts and "promoted to latest: **yes**" in artifacts[0]["data"]
    finally:
        stop(serving)
        serve_log.close()

    removed = optipipe(env, "schedule", "--remove", DEPLOYMENT)
    assert removed.returncode == 0, removed.stderr
    assert optipipe(env, "schedule", "--list", "--json").stdout.strip() == "[]"

    # a team set-up: register for a work pool's workers instead of serving
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "optipipe-test", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert pool.returncode == 0, pool.stderr
    registered = optipipe(env, "schedule", str(NIGHTLY_RECIPE), "--checkpoints", str(checkpoints), "--cron", "30 1 * * 1-5",
                          "--name", "team", "--work-pool", "optipipe-test", "--store", str(store), "--runner", "dask://10.0.0.5:8786")
    assert registered.returncode == 0, registered.stderr
    assert "prefect worker start --pool optipipe-test" in " ".join(registered.stdout.split())
    listed = json.loads(optipipe(env, "schedule", "--list", "--json").stdout)
    assert [(item["name"], item["work_pool"], item["schedules"][0]["cron"]) for item in listed] == [("team", "optipipe-test", "30 1 * * 1-5")]
    assert listed[0]["parameters"]["runner"] == "dask://10.0.0.5:8786"  # the pool's nights place stages on that cluster


def test_schedule_without_a_server_says_how_to_start_one(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["schedule", str(NIGHTLY_RECIPE), "--checkpoints", ".", "--cron", "0 2 * * *"]) == 2
    assert "prefect server start" in capsys.readouterr().err


def test_bad_cron_and_timezone_name_the_option(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["schedule", str(NIGHTLY_RECIPE), "--checkpoints", ".", "--cron", "0 2 * *"]) == 2
        assert "--cron '0 2 * *'" in capsys.readouterr().err
        assert main(["schedule", str(NIGHTLY_RECIPE), "--checkpoints", ".", "--cron", "0 2 * * *", "--timezone", "Mars/Base"]) == 2
        assert "--timezone 'Mars/Base'" in capsys.readouterr().err
