"""The artifact store on S3 through fsspec, against a real S3 protocol server (moto standalone, its own process)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import StoreError
from pipeline.records.files import canonical_json
from pipeline.records.store import content_digest, open_store
from tests.conftest import REPO_ROOT
from tests.s3_server import free_port, moto_s3_server

SMALL_RECIPE = """name: object-store-e2e
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  slim: {uses: strip_optimizer, needs: [load]}
  fused: {uses: fuse_conv_bn, needs: [slim]}
"""
WRITER = """
import json, sys, time
from pathlib import Path
from tests.test_object_store import publish_bytes
from pipeline.records.object_store import ObjectStore
url, key, payload, go = sys.argv[1], sys.argv[2], sys.argv[3].encode(), Path(sys.argv[4])
store = ObjectStore(url)
store.ensure_writable()
Path(sys.argv[5]).touch()
while not go.exists():
    time.sleep(0.001)
artifact = publish_bytes(store, key, payload)
print(json.dumps({"digest": artifact.digest, "model": artifact.model_path.read_bytes().decode(), "path": str(artifact.path)}))
"""


def publish_bytes(store, key: str, payload: bytes):
    """Publish ``payload`` as the model file of artifact ``key`` (a minimal valid manifest)."""
    workdir = store.new_workdir("test")
    (workdir / "model.bin").write_bytes(payload)
    return store.publish(key, workdir, "model.bin", {
        "stage": "test", "uses": "test", "kind": "report", "seconds": 0.0, "peak_rss_bytes": 0, "versions": {},
        "cache_payload": {}, "run_id": "20260101-000000-abcdef", "created_at": "2026-01-01T00:00:00Z"})


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def server():
    with moto_s3_server() as running:
        yield running


@pytest.fixture
def bucket(server, monkeypatch, tmp_path, request):
    """A fresh bucket URL with a prefix; the process environment points at the server and a per-test cache."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPTIPIPE_CACHE", str(tmp_path / "cache-a"))
    monkeypatch.delenv("OPTIPIPE_STORAGE_OPTIONS", raising=False)
    name = "b-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:12]
    return server.make_bucket(name) + "/store"


def fresh_worker(monkeypatch, tmp_path: Path, name: str, url: str):
    """An ObjectStore with an empty cache folder of its own, as another worker machine would have."""
    monkeypatch.setenv("OPTIPIPE_CACHE", str(tmp_path / name))
    return open_store(url)


def test_publish_then_read_back_from_an_empty_cache(bucket, monkeypatch, tmp_path):
    writer = open_store(bucket)
    key = key_of("one")
    published = publish_bytes(writer, key, b"model bytes")
    reader = fresh_worker(monkeypatch, tmp_path, "cache-b", bucket)
    assert reader.root != writer.root and not reader.artifact_path(key).exists()
    found = reader.find(key)
    assert found is not None and found.digest == published.digest
    assert found.model_path.read_bytes() == b"model bytes"
    assert found.path.parent == reader.artifacts_dir
    reader.verify(found)
    assert reader.location == bucket and not list(reader.tmp_dir.iterdir())


def test_two_writers_racing_on_one_key_publish_once(bucket, server, tmp_path):
    go, keys, writers = tmp_path / "go", [key_of(f"race-{index}") for index in range(3)], []
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "OPTIPIPE_QUIET": "1", **server.env}
    for key in keys:
        for side in ("left", "right"):
            ready = tmp_path / f"ready-{key[:8]}-{side}"
            process = subprocess.Popen(
                [sys.executable, "-c", WRITER, bucket, key, f"{side} bytes of {key[:8]}", str(go), str(ready)],
                cwd=REPO_ROOT, env={**env, "OPTIPIPE_CACHE": str(tmp_path / f"cache-{key[:8]}-{side}")},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            writers.append((key, side, ready, process))
    try:
        deadline = time.monotonic() + 60
        while not all(ready.exists() for _, _, ready, _ in writers) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()  # every writer is waiting on it: released together
        results = {}
        for key, side, _, process in writers:
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr[-3000:]
            results[key, side] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for *_, process in writers:
            process.kill() if process.poll() is None else None
    store = open_store(bucket)
    for key in keys:
        left, right = results[key, "left"], results[key, "right"]
        assert left["digest"] == right["digest"] and left["model"] == right["model"]  # the loser holds the winner's bytes
        assert left["model"] in (f"left bytes of {key[:8]}", f"right bytes of {key[:8]}")
        assert store.fs.find(store.remote("artifacts", key)) == [store.remote("artifacts", key, "manifest.json")]
        manifest = json.loads(store.fs.cat_file(store.remote("artifacts", key, "manifest.json")))
        assert manifest["digest"] == left["digest"]


def test_a_tampered_blob_is_detected_and_the_artifact_quarantined(bucket, monkeypatch, tmp_path):
    writer = open_store(bucket)
    key = key_of("tampered")
    published = publish_bytes(writer, key, b"good bytes")
    writer.fs.pipe_file(writer.remote("blobs", published.manifest["files"]["model.bin"]), b"evil bytes")
    reader = fresh_worker(monkeypatch, tmp_path, "cache-b", bucket)
    assert reader.find(key) is None
    assert not reader.fs.exists(reader.remote("artifacts", key, "manifest.json"))
    quarantined = reader.fs.find(reader.remote("quarantine"))
    assert len(quarantined) == 1 and quarantined[0].split("/")[-2].startswith(key)
    assert not reader.artifact_path(key).exists() and not list(reader.tmp_dir.iterdir())
    assert publish_bytes(reader, key, b"good bytes").digest == published.digest  # rebuilt: the bad blob was replaced
    assert fresh_worker(monkeypatch, tmp_path, "cache-c", bucket).find(key).model_path.read_bytes() == b"good bytes"


def test_a_hostile_manifest_cannot_write_outside_the_cache(bucket, monkeypatch, tmp_path):
    store = open_store(bucket)
    key, payload = key_of("hostile"), b"payload"
    sha256 = hashlib.sha256(payload).hexdigest()
    files = {"../../x": sha256}
    manifest = {"key": key, "stage": "s", "uses": "s", "kind": "report", "model": "../../x", "files": files,
                "digest": content_digest(files), "seconds": 0, "peak_rss_bytes": 0, "versions": {}, "cache_payload": {},
                "run_id": "r", "created_at": "now"}
    store.fs.pipe_file(store.remote("blobs", sha256), payload)
    store.fs.pipe_file(store.remote("artifacts", key, "manifest.json"), canonical_json(manifest).encode())
    reader = fresh_worker(monkeypatch, tmp_path, "cache-b", bucket)
    with pytest.raises(StoreError, match="not a plain file name") as raised:
        reader.read(key)
    assert "\n" not in str(raised.value) and bucket in str(raised.value)
    assert not any(path.name == "x" for path in tmp_path.rglob("x"))
    assert not reader.artifact_path(key).exists()
    assert reader.find(key) is None  # quarantined: nothing left to find


def test_an_unreachable_endpoint_is_one_line_naming_the_url(monkeypatch, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    for name, value in {"AWS_ENDPOINT_URL_S3": closed, "AWS_ENDPOINT_URL": closed, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "OPTIPIPE_CACHE": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPTIPIPE_STORAGE_OPTIONS", json.dumps({"retries": 1, "config_kwargs": {"retries": {"max_attempts": 1}}}))
    store = open_store("s3://nowhere/prefix")
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        store.ensure_writable()
    message = str(raised.value)
    assert message.startswith("store s3://nowhere/prefix is not reachable (") and "\n" not in message
    assert "AWS_ENDPOINT_URL_S3" in message and time.monotonic() - started < 20


def test_malformed_storage_options_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("OPTIPIPE_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(StoreError, match="OPTIPIPE_STORAGE_OPTIONS must be a JSON object"):
        open_store("s3://bucket/prefix")


def test_gc_removes_the_unreferenced_and_keeps_the_leased_and_fresh_blobs(bucket):
    from pipeline.records.gc import collect

    store = open_store(bucket)
    old, leased = key_of("old"), key_of("leased")
    old_blob = publish_bytes(store, old, b"old bytes").manifest["files"]["model.bin"]
    leased_blob = publish_bytes(store, leased, b"leased bytes").manifest["files"]["model.bin"]
    time.sleep(3.2)
    store.lease(leased)
    (store.leases_dir / old).unlink()  # only the remote lease is left, and it is old
    fresh_blob = hashlib.sha256(b"fresh").hexdigest()
    store.fs.pipe_file(store.remote("blobs", fresh_blob), b"fresh")
    report = collect(store, keep=1, grace_seconds=2.0)
    assert report.removed_artifacts == [old] and report.kept_leased == [leased]
    remaining = {path.rsplit("/", 1)[-1] for path in store.fs.find(store.remote("blobs"))}
    assert remaining == {leased_blob, fresh_blob} and old_blob not in remaining
    assert not store.fs.exists(store.remote("artifacts", old, "manifest.json")) and not store.artifact_path(old).exists()
    assert store.find(leased).model_path.read_bytes() == b"leased bytes"


def test_run_plan_end_to_end_through_the_object_store(bucket, monkeypatch, tmp_path, demo_checkpoint):
    from pipeline.recipe import load_recipe
    from pipeline.run.engine import run_plan

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMALL_RECIPE)
    first = run_plan(load_recipe(recipe), open_store(bucket), demo_checkpoint)
    assert {stage["name"]: stage["state"] for stage in first["stages"]} == {"load": "done", "slim": "done", "fused": "done"}
    second = run_plan(load_recipe(recipe), fresh_worker(monkeypatch, tmp_path, "cache-b", bucket), demo_checkpoint)
    assert {stage["state"] for stage in second["stages"]} == {"cached"}
    runs = fresh_worker(monkeypatch, tmp_path, "cache-c", bucket).list_runs()
    assert {record["run_id"] for record in runs} == {second["run_id"], first["run_id"]}  # started in the same second maybe: no order
    assert all(record["state"] == "succeeded" for record in runs)


def test_checkpoint_snapshots_and_logs_reach_a_worker_through_the_store(bucket, monkeypatch, tmp_path):
    from pipeline.run.checkpoint_snapshot import snapshot_checkpoint

    single, folder = tmp_path / "weights.pt", tmp_path / "pretrained"
    single.write_bytes(b"weights")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"tensors")
    runner = open_store(bucket)
    shared = [runner.share_checkpoint(snapshot_checkpoint(runner, path)[0]) for path in (single, folder)]
    worker = fresh_worker(monkeypatch, tmp_path, "cache-b", bucket)
    assert worker.checkpoint_file(shared[0]).read_bytes() == b"weights"
    assert sorted(path.name for path in worker.checkpoint_file(shared[1]).iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(StoreError, match="share no local paths"):
        worker.checkpoint_file(str(single))
    with pytest.raises(StoreError, match="not a path inside"):
        worker.checkpoint_file("checkpoints/../../etc/passwd")
    log = worker.runs_dir / "20260101-000000-abcdef" / "stage.log"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback ...")
    address = worker.keep_log(log)
    assert address == f"{bucket}/runs/20260101-000000-abcdef/stage.log"
    assert worker.fs.cat_file(address.removeprefix("s3://")) == b"Traceback ..."
    with pytest.raises(StoreError, match=f"no run 'nope' in store {bucket}"):
        worker.read_run("nope")


def test_a_cached_copy_of_an_artifact_removed_remotely_is_not_found(bucket):
    store = open_store(bucket)
    key = key_of("stale")
    publish_bytes(store, key, b"bytes")
    store.fs.rm_file(store.remote("artifacts", key, "manifest.json"))  # as gc or another worker's quarantine would
    assert store.artifact_path(key).is_dir()
    assert store.find(key) is None and not store.artifact_path(key).exists()


def test_a_night_promoted_through_the_object_store_gives_its_model_on_another_machine(bucket, monkeypatch, tmp_path, demo_checkpoint, capsys):
    from pipeline.cli import main
    from pipeline.nightly.checkpoints import CheckpointChoice
    from pipeline.nightly.promotion import record_night
    from pipeline.recipe import load_recipe
    from pipeline.run.engine import run_plan

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMALL_RECIPE)
    store = open_store(bucket)
    record = run_plan(load_recipe(recipe), store, demo_checkpoint)
    assert record_night(store, record, CheckpointChoice(demo_checkpoint, "newest"), {"reference_run": None, "regressions": []})

    deployer = fresh_worker(monkeypatch, tmp_path, "cache-deployer", bucket)
    assert main(["latest", "object-store-e2e", "--variant", "fused", "--store", bucket]) == 0
    model = Path(capsys.readouterr().out.strip())
    assert model.is_file() and deployer.root in model.parents  # fetched into this machine's cache, not the promoter's path
    fused = next(stage for stage in record["stages"] if stage["name"] == "fused")
    assert deployer.read(fused["key"]).manifest["files"][model.name] == store.read(fused["key"]).manifest["files"][model.name]


def test_plan_against_an_object_store_reads_manifests_only(bucket, monkeypatch, tmp_path, demo_checkpoint, capsys):
    from pipeline.cli import main
    from pipeline.recipe import load_recipe
    from pipeline.run.engine import run_plan

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMALL_RECIPE)
    run_plan(load_recipe(recipe), open_store(bucket), demo_checkpoint)
    planner = fresh_worker(monkeypatch, tmp_path, "cache-planner", bucket)
    assert main(["plan", str(recipe), "--checkpoint", str(demo_checkpoint), "--store", bucket]) == 0
    assert "3 of 3 stages cached, 0 will run" in capsys.readouterr().out
    assert not planner.artifacts_dir.exists() or not any(planner.artifacts_dir.iterdir())  # nothing was downloaded


def test_damaged_and_oversized_run_records_in_the_object_store_list_as_damaged_never_raise(bucket, monkeypatch, tmp_path):
    from pipeline.records.object_files import MAX_RECORD_BYTES

    writer = open_store(bucket)
    writer.fs.pipe_file(writer.remote("runs", "20990101-000000-aaaaaa.json"), b'{"run_id": "20990101-0')  # truncated
    writer.fs.pipe_file(writer.remote("runs", "20990101-000000-bbbbbb.json"), b" " * (MAX_RECORD_BYTES + 10) + b"{}")
    writer.fs.pipe_file(writer.remote("runs", "notes.txt"), b"not a record")
    reader = fresh_worker(monkeypatch, tmp_path, "cache-reader", bucket)
    assert reader.list_runs() == []
    assert sorted(path.name for path, _ in reader.damaged_runs()) == ["20990101-000000-aaaaaa.json", "20990101-000000-bbbbbb.json"]
    assert all(path.parent == reader.runs_dir for path, _ in reader.damaged_runs())  # nothing written outside the cache
    with pytest.raises(StoreError, match="damaged record"):
        reader.resolve_run("latest")
