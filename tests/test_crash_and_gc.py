"""Crash safety and garbage collection: a killed run loses nothing finished and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.cli import main
from pipeline.records.gc import collect
from pipeline.records.store import ArtifactStore
from tests.conftest import REPO_ROOT


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_run(store: ArtifactStore, run_id: str, keys: list[str], state: str = "succeeded", pid: int | None = None) -> None:
    for key in keys:
        folder = store.artifacts_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text("{}")
    store.write_run({
        "run_id": run_id, "started_at": run_id, "state": state, "host": socket.gethostname(), "pid": pid or os.getpid(),
        "recipe": {"name": "r", "path": "r.yaml", "digest": "d"}, "checkpoint": {"path": "c", "sha256": "s"},
        "stages": [{"name": key, "uses": "u", "state": "done", "key": key} for key in keys],
    })


def test_running_record_of_a_dead_process_shows_as_crashed(tmp_path):
    store = ArtifactStore(tmp_path)
    fake_run(store, "2026-a", [], state="running", pid=dead_pid())
    fake_run(store, "2026-b", [], state="running", pid=os.getpid())
    states = {record["run_id"]: record["state"] for record in store.list_runs()}
    assert states == {"2026-a": "crashed", "2026-b": "running"}
    assert "ended without finishing" in store.read_run("2026-a")["message"]


def test_gc_keeps_newest_runs_and_running_runs(tmp_path):
    store = ArtifactStore(tmp_path)
    store.ensure_writable()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_run(store, "2026-1-old", ["old", "shared"])
        fake_run(store, "2026-2-running", ["inflight"], state="running", pid=sleeper.pid)
        fake_run(store, "2026-3-new", ["new", "shared"])
        (store.tmp_dir / f"fused-{dead_pid()}-abc").mkdir()
        (store.tmp_dir / f"fused-{sleeper.pid}-def").mkdir()
        report = collect(store, keep=1)
    finally:
        sleeper.kill()
    assert report.removed_artifacts == ["old"]
    assert sorted(path.name for path in store.artifacts_dir.iterdir()) == ["inflight", "new", "shared"]
    assert [path.name for path in store.tmp_dir.iterdir()] == [f"fused-{sleeper.pid}-def"]


def test_gc_cli_refuses_negative_keep(tmp_path, capsys):
    assert main(["gc", "--keep", "-1", "--store", str(tmp_path)]) == 2
    assert "--keep -1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_sigkill_mid_stage_leaves_no_partial_artifact_and_rerun_resumes(demo_checkpoint, tmp_path):
    from prefect.settings import PREFECT_API_URL

    store_root = tmp_path / "store"
    store = ArtifactStore(store_root)
    recipe = REPO_ROOT / "recipes" / "demo.yaml"
    command = [sys.executable, "-m", "pipeline.cli", "--quiet", "run", str(recipe), "--checkpoint", str(demo_checkpoint), "--store", str(store_root)]
    environment = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen(command + ["--set", "bench.min_seconds=60"], env=environment, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(store.tmp_dir.glob("bench-*")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert any(store.tmp_dir.glob("bench-*")), "the benchmark stage never started"
    child.send_signal(signal.SIGKILL)
    child.wait()

    for folder in store.artifacts_dir.iterdir():  # only complete artifacts were published
        manifest = json.loads((folder / "manifest.json").read_text())
        store.verify(store.read(folder.name))
        assert manifest["stage"] != "bench"
    killed = store.list_runs()[0]
    assert killed["state"] == "crashed"
    assert main(["runs", "--store", str(store_root), "--json"]) == 0

    rerun = subprocess.run(command + ["--set", "bench.min_seconds=0.1"], env=environment, cwd=REPO_ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = store.resolve_run("latest")
    states = {stage["name"]: stage["state"] for stage in resumed["stages"]}
    assert states == {"load": "cached", "slim": "cached", "fused": "cached", "onnx": "cached", "check": "cached", "bench": "done"}
    finished_keys = {stage["name"]: stage["key"] for stage in killed["stages"]}
    assert all(finished_keys[name] == stage["key"] for stage in resumed["stages"] if (name := stage["name"]) in finished_keys)
    collect(store, keep=5)
    assert not list(store.tmp_dir.iterdir())
