"""The artifact store: content-addressed, atomic, verified."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import StoreError
from pipeline.records.files import canonical_json
from pipeline.records.store import ArtifactStore
from pipeline.run.identity import cache_key


def publish(store: ArtifactStore, key: str, payload: bytes = b"weights") -> object:
    workdir = store.new_workdir("stage")
    (workdir / "model.bin").write_bytes(payload)
    return store.publish(key, workdir, "model.bin", {
        "stage": "s", "uses": "u", "kind": "torch", "metrics": {}, "seconds": 0.1, "peak_rss_bytes": 1, "versions": {},
        "cache_payload": {}, "run_id": "r", "created_at": "2026-12-01T00:00:00+00:00",
    })


def test_cache_key_is_canonical_and_full_sha256():
    first = cache_key({"b": 1, "a": [1, 2]})
    assert first == cache_key({"a": [1, 2], "b": 1})
    assert len(first) == 64 and first != cache_key({"a": [2, 1], "b": 1})
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_publish_writes_manifest_and_leaves_no_temporary_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = publish(store, "k1")
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["model"] == "model.bin"
    assert set(manifest["files"]) == {"model.bin"} and len(manifest["digest"]) == 64
    assert list(store.tmp_dir.iterdir()) == []
    assert store.find("k1").digest == artifact.digest


def test_second_publish_of_same_key_keeps_the_first(tmp_path):
    store = ArtifactStore(tmp_path)
    first = publish(store, "k1", b"a")
    second = publish(store, "k1", b"b")
    assert second.digest == first.digest
    assert list(store.tmp_dir.iterdir()) == []


def test_tampered_artifact_is_refused_and_quarantined(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = publish(store, "k1")
    data = bytearray((artifact.path / "model.bin").read_bytes())
    data[0] ^= 1
    (artifact.path / "model.bin").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its recorded sha256"):
        store.verify(artifact)
    assert store.find("k1") is None
    assert not artifact.path.exists() and any((tmp_path / "quarantine").iterdir())


def test_a_manifest_missing_a_declared_field_is_not_published(tmp_path):
    store = ArtifactStore(tmp_path)
    workdir = store.new_workdir("stage")
    (workdir / "model.bin").write_bytes(b"weights")
    with pytest.raises(ValueError, match="seconds"):
        store.publish("k1", workdir, "model.bin", {"stage": "s", "uses": "u", "kind": "torch"})
    assert store.read("k1") is None


def test_unwritable_store_names_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable.*--store"):
        ArtifactStore(blocker / "store").ensure_writable()


def test_runs_resolve_by_prefix_and_latest(tmp_path):
    store = ArtifactStore(tmp_path)
    declared = {"recipe": {"name": "r", "path": "r.yaml", "digest": "d"}, "checkpoint": {"path": "c", "sha256": "s"}, "state": "succeeded"}
    store.write_run({**declared, "run_id": "20260101-000000-aaaaaa", "started_at": "2026-01-01T00:00:00"})
    store.write_run({**declared, "run_id": "20260102-000000-bbbbbb", "started_at": "2026-01-02T00:00:00"})
    assert store.resolve_run("latest")["run_id"].endswith("bbbbbb")
    assert store.resolve_run("20260101")["run_id"].endswith("aaaaaa")
    with pytest.raises(StoreError, match="matches 2 runs"):
        store.resolve_run("2026")
    with pytest.raises(StoreError, match="no run matches"):
        store.resolve_run("nope")
