"""Trust and data safety of the store: gc never removes what a run may still need or anything outside the store,
a damaged manifest is rebuilt instead of raised, and one damaged record never breaks the read side (torch-free)."""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.nightly.checkpoints import CheckpointChoice
from pipeline.nightly.promotion import read_state, record_night, state_path
from pipeline.records.gc import collect
from pipeline.records.store import ArtifactStore

KEY_OLD, KEY_NEW, KEY_SALVAGED = "a" * 64, "b" * 64, "c" * 64


def publish(store: ArtifactStore, key: str, run_id: str = "r", kind: str = "torch") -> Path:
    """Publish a one-file artifact made by ``run_id``; returns its folder."""
    workdir = store.new_workdir("stage")
    (workdir / "model.bin").write_bytes(key.encode())
    return store.publish(key, workdir, "model.bin", {
        "stage": "s", "uses": "u", "kind": kind, "metrics": {}, "seconds": 0.1, "peak_rss_bytes": 1, "versions": {},
        "cache_payload": {}, "run_id": run_id, "created_at": "2026-01-01T00:00:00+00:00",
    }).path


def run_record(run_id: str, keys: list[str], state: str = "succeeded", stage_state: str = "done", **extra) -> dict:
    """A complete run record whose stages made ``keys``."""
    return {
        "run_id": run_id, "recipe": {"name": "demo", "path": "demo.yaml", "digest": "d"},
        "checkpoint": {"path": "m.pt", "sha256": "s"}, "state": state, "started_at": run_id,
        "host": socket.gethostname(), "pid": os.getpid(),
        "stages": [{"name": f"s{index}", "uses": "u", "state": stage_state, "key": key} for index, key in enumerate(keys)],
        **extra,
    }


def artifact_names(store: ArtifactStore) -> list[str]:
    return sorted(path.name for path in store.artifacts_dir.iterdir())


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a refused command; fails on a traceback or more lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    made = ArtifactStore(tmp_path / "store")
    made.ensure_writable()
    return made


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of the user's outside the store, holding one precious file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def age_leases(store: ArtifactStore, seconds: float = 7200) -> None:
    """Make every lease ``seconds`` old, as if the runs that took them were long over."""
    for lease in store.leases_dir.iterdir():
        os.utime(lease, (lease.stat().st_mtime - seconds,) * 2)


# 3. gc deletes what is still needed ------------------------------------------------------------------


def test_gc_keeps_an_artifact_a_run_is_reusing_from_the_cache(store):
    publish(store, KEY_OLD, run_id="old")
    store.write_run(run_record("2026-1-old", [KEY_OLD]))
    age_leases(store)
    assert store.find(KEY_OLD) is not None  # a new run reuses it; its record does not name it yet
    report = collect(store, keep=0)
    assert report.kept_leased == [KEY_OLD] and report.removed_artifacts == []
    assert collect(store, keep=0, grace_seconds=0).removed_artifacts == [KEY_OLD]


def test_gc_puts_back_an_artifact_a_run_leases_while_gc_moves_it(store, monkeypatch):
    publish(store, KEY_OLD)
    age_leases(store)
    checks = []

    def lease_arrives_after_first_check(key: str, seconds: float) -> bool:
        checks.append(key)
        if len(checks) == 1:
            store.lease(key)  # a run finds the artifact just after gc looked at its lease
            return False
        return ArtifactStore.leased_within(store, key, seconds)

    monkeypatch.setattr(store, "leased_within", lease_arrives_after_first_check)
    report = collect(store, keep=0)
    assert report.kept_leased == [KEY_OLD] and artifact_names(store) == [KEY_OLD]
    assert store.find(KEY_OLD) is not None and not list(store.tmp_dir.iterdir())


def test_gc_keeps_a_just_published_artifact_its_run_has_not_recorded_yet(store):
    publish(store, KEY_NEW, run_id="2026-2-running")
    store.write_run(run_record("2026-2-running", [], state="running"))
    assert collect(store, keep=0).kept_leased == [KEY_NEW]


def test_gc_keeps_what_a_damaged_record_may_reference_and_reports_it(store, capsys):
    publish(store, KEY_OLD, run_id="2026-1-broken")  # made by the run whose record is damaged
    publish(store, KEY_SALVAGED, run_id="2026-0-other")  # reused by it: its key is still legible
    publish(store, KEY_NEW, run_id="2026-0-other")
    age_leases(store)
    whole = json.dumps(run_record("2026-1-broken", [KEY_SALVAGED, KEY_OLD]))
    store.run_path("2026-1-broken").write_text(whole[: whole.index(KEY_OLD)])
    store.run_path("2026-3-null").write_text("null")
    report = collect(store, keep=0)
    assert sorted(report.kept_for_damaged) == [KEY_OLD, KEY_SALVAGED] and report.removed_artifacts == [KEY_NEW]
    assert [path.name for path, _ in report.damaged_records] == ["2026-3-null.json", "2026-1-broken.json"]
    assert main(["gc", "--keep", "0", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "damaged run record" in out and "2026-1-broken.json: truncated or not JSON" in out and "2026-3-null.json: holds null" in out


def test_keep_counts_only_runs_that_produced_something(store):
    publish(store, KEY_OLD)
    age_leases(store)
    store.write_run(run_record("2026-1-good", [KEY_OLD]))
    store.write_run(run_record("2026-2-failed", [KEY_NEW], state="failed", stage_state="failed"))
    store.write_run(run_record("2026-3-failed", [], state="failed"))
    report = collect(store, keep=1)
    assert report.removed_artifacts == [] and report.kept_artifacts == 1 and artifact_names(store) == [KEY_OLD]


@pytest.mark.parametrize("folder", ["tmp", "artifacts"])
def test_gc_refuses_a_linked_store_folder_and_touches_nothing_outside(store, outside, folder, capsys):
    linked = store.root / folder
    os.rename(linked, store.root / f"{folder}.real")
    linked.symlink_to(outside, target_is_directory=True)
    assert main(["gc", "--keep", "0", "--store", str(store.root)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "removed nothing" in line and "symbolic link" in line and str(linked) in line
    assert (outside / "precious.txt").read_text() == "keep me"


def test_gc_removes_a_link_in_tmp_but_never_what_it_points_to(store, outside):
    (store.tmp_dir / "leftover-link").symlink_to(outside, target_is_directory=True)
    assert collect(store, keep=0).removed_work_folders == ["leftover-link"]
    assert (outside / "precious.txt").read_text() == "keep me" and not list(store.tmp_dir.iterdir())


def test_store_writes_never_follow_a_link(store, outside):
    store.run_path("2026-1-a").symlink_to(outside / "precious.txt")
    with pytest.raises(StoreError, match="2026-1-a.json is a symbolic link"):
        store.write_run(run_record("2026-1-a", []))
    assert (outside / "precious.txt").read_text() == "keep me"
    lock = state_path(store, "demo").with_suffix(".lock")
    lock.parent.mkdir()
    lock.symlink_to(outside / "precious.txt")
    with pytest.raises(StoreError, match="symbolic link"):
        record_night(store, run_record("2026-1-a", []), CheckpointChoice(path=Path("m.pt"), reason="newest"),
                     {"reference_run": None, "regressions": []})
    assert (outside / "precious.txt").read_text() == "keep me"
    os.rename(store.tmp_dir, store.root / "tmp.real")
    store.tmp_dir.symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        store.new_workdir("stage")
    assert sorted(path.name for path in outside.iterdir()) == ["precious.txt"]


def test_gc_dry_run_lists_and_removes_nothing(store, capsys):
    publish(store, KEY_OLD)
    age_leases(store)
    (store.tmp_dir / "leftover").mkdir()
    assert main(["gc", "--keep", "0", "--dry-run", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"would remove artifact {KEY_OLD}" in out and "would remove work folder leftover" in out
    assert "nothing was removed (--dry-run)" in out
    assert artifact_names(store) == [KEY_OLD] and [path.name for path in store.tmp_dir.iterdir()] == ["leftover"]


def test_gc_on_a_read_only_store_says_it_removed_nothing(store, monkeypatch, capsys):
    publish(store, KEY_OLD)
    age_leases(store)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    if os.geteuid() == 0:  # root writes through permission bits: stand in for a read-only mount
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    else:
        for folder in (store.artifacts_dir, store.tmp_dir):
            folder.chmod(0o555)
    try:
        assert main(["gc", "--keep", "0", "--store", str(store.root)]) == 2
    finally:
        for folder in (store.artifacts_dir, store.tmp_dir):
            folder.chmod(0o755)
    line = one_error_line(capsys.readouterr().err)
    assert "gc removed nothing" in line and "read-only" in line and artifact_names(store) == [KEY_OLD]


def test_gc_grace_must_be_a_duration(store, capsys):
    assert main(["gc", "--grace", "soon", "--store", str(store.root)]) == 2
    assert "--grace 'soon'" in one_error_line(capsys.readouterr().err)


# 4. a damaged manifest is rebuilt, never raised out of find -------------------------------------------


@pytest.mark.parametrize("damage", ['{"key": "a', "null", "[]", '{"key": "x"}', None])
def test_damaged_manifest_is_quarantined_and_find_returns_none(store, damage):
    folder = publish(store, KEY_OLD)
    if damage is None:
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text(damage)
        with pytest.raises(StoreError, match=f"artifact {KEY_OLD[:12]}: manifest "):
            store.read(KEY_OLD)
    assert store.find(KEY_OLD) is None
    assert not folder.exists() and any((store.root / "quarantine").iterdir())
    assert publish(store, KEY_OLD).is_dir() and store.find(KEY_OLD) is not None  # rebuilt like a tampered one


# 5. one damaged record never breaks the read side -----------------------------------------------------


@pytest.fixture
def damaged_store(store) -> ArtifactStore:
    """A good run, then a truncated, a null and a field-missing record, each newer than the last."""
    store.write_run(run_record("20260101-000000-good00", []))
    store.run_path("20260102-000000-trunc0").write_text('{"run_id": "20260102-000000-trunc0", "sta')
    store.run_path("20260103-000000-null00").write_text("null")
    broken = run_record("20260104-000000-nofld0", [])
    del broken["state"]
    store.run_path("20260104-000000-nofld0").write_text(json.dumps(broken))
    return store


def test_list_runs_returns_good_records_and_names_the_damaged(damaged_store):
    assert [record["run_id"] for record in damaged_store.list_runs()] == ["20260101-000000-good00"]
    problems = {path.stem: problem for path, problem in damaged_store.damaged_runs()}
    assert problems["20260102-000000-trunc0"].startswith("truncated or not JSON")
    assert problems["20260103-000000-null00"] == "holds null, not a JSON object"
    assert problems["20260104-000000-nofld0"] == "does not match the run record: state: field required"


def test_runs_lists_a_line_per_damaged_record(damaged_store, capsys):
    assert main(["runs", "--store", str(damaged_store.root)]) == 0
    captured = capsys.readouterr()
    assert "20260101-000000-good00" in captured.out and "Traceback" not in captured.err
    damaged_lines = captured.err.splitlines()
    assert len(damaged_lines) == 3 and all(line.startswith("damaged run record ") for line in damaged_lines)
    assert main(["runs", "--json", "--store", str(damaged_store.root)]) == 0
    assert [record["run_id"] for record in json.loads(capsys.readouterr().out)] == ["20260101-000000-good00"]


@pytest.mark.parametrize("command", ["show", "report"])
@pytest.mark.parametrize("reference", ["20260102", "20260103-000000-null00", "latest"])
def test_show_and_report_of_a_damaged_run_say_so(damaged_store, capsys, command, reference):
    assert main([command, reference, "--store", str(damaged_store.root)]) == 2
    assert "damaged record" in one_error_line(capsys.readouterr().err)


def test_read_run_of_a_damaged_record_is_one_store_error(damaged_store):
    with pytest.raises(StoreError, match="damaged run record .*trunc0.json: truncated or not JSON"):
        damaged_store.read_run("20260102-000000-trunc0")


def nightly_record(store: ArtifactStore, run_id: str, regressions: list[str]) -> dict:
    """A nightly run record with one onnx artifact, written as ``flows.nightly`` leaves it."""
    key = run_id.replace("-", "").ljust(64, "0")
    folder = publish(store, key, run_id=run_id, kind="onnx")
    record = run_record(run_id, [key], nightly={"checkpoint_choice": "highest epoch", "reference_run": None,
                                                "regressions": regressions, "comparison": None})
    record["stages"][0].update(name="onnx", artifact=str(folder))
    store.write_run(record)
    return record


def test_a_truncated_nightly_state_is_rebuilt_from_the_run_records(store, capsys):
    good = nightly_record(store, "20260101-000000-aaaaaa", [])
    nightly_record(store, "20260102-000000-bbbbbb", ["onnx: top-1 dropped"])
    path = state_path(store, "demo")
    path.parent.mkdir()
    path.write_text('{"recipe": "demo", "runs": [')
    assert main(["latest", "demo", "--variant", "onnx", "--store", str(store.root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(Path(good["stages"][0]["artifact"]) / "model.bin")
    assert "nightly state unreadable" in captured.err and "rebuilt it from 2 nightly run records" in captured.err

    tonight = nightly_record(store, "20260103-000000-cccccc", [])
    assert record_night(store, tonight, CheckpointChoice(path=Path("m.pt"), reason="newest"), {"reference_run": None, "regressions": []})
    state = read_state(store, "demo")
    assert [night["promoted"] for night in state["runs"]] == [True, False, True]
    assert state["latest"]["run_id"] == tonight["run_id"]
    assert path.with_name("demo.json.damaged").read_text() == '{"recipe": "demo", "runs": ['


def test_gc_removes_checkpoint_snapshots_no_kept_run_read(store):
    old_sha, new_sha = "a" * 64, "b" * 64
    store.write_run(run_record("20261201-000001-old", ["k-old"], checkpoint={"path": "old.pt", "sha256": old_sha}))
    store.write_run(run_record("20261201-000002-new", ["k-new"], checkpoint={"path": "new.pt", "sha256": new_sha}))
    for sha256 in (old_sha, new_sha, "c" * 64):
        (store.checkpoints_dir / sha256).mkdir(parents=True)
        (store.checkpoints_dir / sha256 / "model.pt").write_bytes(b"weights")
        os.utime(store.checkpoints_dir / sha256, (1, 1))  # made long before the grace period
    fresh = store.checkpoints_dir / ("d" * 64)
    fresh.mkdir()  # being written by a run that has not recorded it yet
    report = collect(store, keep=1, grace_seconds=3600)
    assert sorted(report.removed_snapshots) == [old_sha, "c" * 64]
    assert sorted(path.name for path in store.checkpoints_dir.iterdir()) == [new_sha, "d" * 64]
