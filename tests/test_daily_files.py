"""Daily experience: files another user can read (modes follow the umask), ``diff`` without default noise,
ambiguous run prefixes that list their matches, and ``optipipe demo`` reusing an unchanged baseline."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import signal
import stat
import tempfile
import time
import traceback
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.cli import demo as demo_command
from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.nightly.checkpoints import CheckpointChoice
from pipeline.nightly.promotion import record_night, state_path
from pipeline.records.gc import collect
from pipeline.records.store import ArtifactStore
from pipeline.review.compare import compare_runs, comparison_tables
from pipeline.run.checkpoint_snapshot import snapshot_checkpoint

NOBODY = 65534
KEY, OTHER_KEY = "a" * 64, "b" * 64


def publish(store: ArtifactStore, key: str, params: dict | None = None) -> Path:
    """Publish a one-file artifact (``model.bin``) with ``params`` in its manifest; returns its folder."""
    workdir = store.new_workdir("stage")
    (workdir / "model.bin").write_bytes(key.encode())
    return store.publish(key, workdir, "model.bin", {
        "stage": "s", "uses": "u", "kind": "torch", "params": params or {}, "metrics": {}, "seconds": 0.1,
        "peak_rss_bytes": 1, "versions": {}, "cache_payload": {}, "run_id": "r", "created_at": "2026-01-01T00:00:00+00:00",
    }).path


def mode_of(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """``os.umask`` for one test: the umask it had before is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.fixture
def shared_folder():
    """A folder every user can traverse (pytest's own temporary folders are 0700), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="optipipe-daily-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def exit_code_as(uid: int, action, timeout: float = 60.0) -> int:
    """Run ``action()`` in a forked child that switched to ``uid`` (and its group); the child's exit code:
    0 when it returned, the errno of an ``OSError`` it raised, 1 for anything else (traceback on stderr)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action()
            code = 0
        except OSError as error:
            code = error.errno or 1
        except Exception:  # noqa: BLE001 - the child reports any failure as exit 1; it must never return into pytest
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the child running as uid {uid} did not finish within {timeout:.0f} s")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user (nobody) needs root")


def read_all(*paths: Path) -> None:
    """Read every byte of each file (raises ``PermissionError`` when one cannot be opened)."""
    for path in paths:
        with open(path, "rb") as handle:
            handle.read()


# 7. files a deployer can read -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o444), (0o027, 0o750, 0o440), (0o077, 0o700, 0o400)])
def test_published_artifact_modes_follow_the_umask(tmp_path, umask, mask, folder_mode, file_mode):
    umask(mask)
    folder = publish(ArtifactStore(tmp_path), KEY)
    assert oct(mode_of(folder)) == oct(folder_mode)
    assert oct(mode_of(folder / "model.bin")) == oct(file_mode)
    assert oct(mode_of(folder / "manifest.json")) == oct(file_mode)


def test_a_published_subfolder_gets_the_published_modes(tmp_path, umask):
    umask(0o022)
    store = ArtifactStore(tmp_path)
    workdir = store.new_workdir("stage")
    (workdir / "model.bin").write_bytes(b"weights")
    (workdir / "extra").mkdir(mode=0o700)
    (workdir / "extra" / "side.bin").write_bytes(b"side")
    (workdir / "extra" / "side.bin").chmod(0o600)
    folder = store.publish(KEY, workdir, "model.bin", {
        "stage": "s", "uses": "u", "kind": "torch", "metrics": {}, "seconds": 0.1, "peak_rss_bytes": 1, "versions": {},
        "cache_payload": {}, "run_id": "r", "created_at": "2026-01-01T00:00:00+00:00",
    }).path
    assert (oct(mode_of(folder / "extra")), oct(mode_of(folder / "extra" / "side.bin"))) == (oct(0o755), oct(0o444))


def test_run_records_nightly_state_and_snapshots_follow_the_umask(tmp_path, umask):
    umask(0o022)
    store = ArtifactStore(tmp_path / "store")
    record = {"run_id": "20260101-000000-aaaaaa", "recipe": {"name": "demo", "path": "demo.yaml", "digest": "d"},
              "checkpoint": {"path": "m.pt", "sha256": "s"}, "state": "failed", "started_at": "2026-01-01T00:00:00",
              "stages": []}
    store.write_run(record)
    record_night(store, record, CheckpointChoice(path=Path("m.pt"), reason="newest"),
                 {"reference_run": None, "regressions": []})
    checkpoint = tmp_path / "m.pt"
    checkpoint.write_bytes(b"weights")
    snapshot, _ = snapshot_checkpoint(store, checkpoint)
    assert oct(mode_of(store.run_path(record["run_id"]))) == oct(0o644)
    assert oct(mode_of(state_path(store, "demo"))) == oct(0o644)
    assert oct(mode_of(snapshot)) == oct(0o444)


def test_gc_and_quarantine_still_remove_published_artifacts(tmp_path, umask):
    umask(0o022)
    store = ArtifactStore(tmp_path)
    publish(store, KEY)
    publish(store, OTHER_KEY)
    store.quarantine(OTHER_KEY)
    report = collect(store, keep=0, grace_seconds=0)
    assert report.removed_artifacts == [KEY] and report.removed_quarantine
    assert list(store.artifacts_dir.iterdir()) == [] and not (store.root / "quarantine").exists()


@needs_root
@pytest.mark.parametrize("mask, expected", [(0o022, 0), (0o077, errno.EACCES)])
def test_another_user_reads_the_model_file_and_manifest(shared_folder, umask, mask, expected):
    umask(mask)
    folder = publish(ArtifactStore(shared_folder / "store"), KEY)
    code = exit_code_as(NOBODY, lambda: read_all(folder / "model.bin", folder / "manifest.json"))
    assert code == expected, f"uid {NOBODY} reading the artifact under umask {mask:03o}: exit {code}"


@needs_root
def test_the_owner_can_quarantine_and_gc_its_read_only_artifacts(shared_folder, umask):
    umask(0o022)
    os.chown(shared_folder, NOBODY, NOBODY)

    def publish_quarantine_and_collect() -> None:
        """As nobody (write permission bits apply): publish two artifacts, quarantine one, gc both away."""
        store = ArtifactStore(shared_folder / "store")
        publish(store, KEY)
        publish(store, OTHER_KEY)
        store.quarantine(OTHER_KEY)
        report = collect(store, keep=0, grace_seconds=0)
        assert report.removed_artifacts == [KEY] and report.removed_quarantine
        assert list(store.artifacts_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []

    assert exit_code_as(NOBODY, publish_quarantine_and_collect) == 0


# 8. diff, prefixes and demo --------------------------------------------------------------------------------------

def stage(store: ArtifactStore, name: str, key: str, params: dict) -> dict:
    """A run record's stage entry whose artifact (published now) records ``params``."""
    return {"name": name, "uses": "quantize", "state": "done", "key": key, "artifact": str(publish(store, key, params))}


def diff_record(run_id: str, stages: list[dict]) -> dict:
    """A run record holding ``stages``."""
    return {"run_id": run_id, "recipe": {"name": "demo", "path": "demo.yaml", "digest": "d"},
            "checkpoint": {"path": "m.pt", "sha256": "s"}, "state": "succeeded", "started_at": run_id, "stages": stages}


def stages_row(comparison: dict, name: str) -> str:
    """The line of stage ``name`` in the comparison's stages table, as ``optipipe diff`` prints it."""
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(comparison_tables(comparison)[0])
    return next(line for line in console.file.getvalue().splitlines() if line.startswith(f"│ {name} "))


def test_a_stage_only_one_run_has_is_said_so_without_its_defaults(tmp_path):
    store = ArtifactStore(tmp_path)
    load = stage(store, "load", "c" * 64, {"strict": True})
    quant = stage(store, "quant", KEY, {"mode": "dynamic", "lr": 0.0001, "epochs": 1})
    comparison = compare_runs(diff_record("run-a", [load]), diff_record("run-b", [load, quant]))
    stages = {entry["name"]: entry for entry in comparison["stages"]}
    assert stages["quant"]["only_in"] == "B" and stages["quant"]["params_changed"] == {}
    assert stages["load"]["only_in"] is None
    assert "only in B" in stages_row(comparison, "quant") and "lr" not in stages_row(comparison, "quant")
    reversed_comparison = compare_runs(diff_record("run-b", [load, quant]), diff_record("run-a", [load]))
    assert "only in A" in stages_row(reversed_comparison, "quant")


def test_a_param_recorded_on_one_side_only_is_not_a_change(tmp_path):
    store = ArtifactStore(tmp_path)
    before = stage(store, "quant", KEY, {"mode": "dynamic", "dtype": "qint8"})
    after = stage(store, "quant", OTHER_KEY, {"mode": "dynamic", "dtype": "float16", "lr": 0.0001})
    comparison = compare_runs(diff_record("run-a", [before]), diff_record("run-b", [after]))
    assert comparison["stages"][0]["params_changed"] == {"dtype": ["qint8", "float16"]}
    assert stages_row(comparison, "quant").split("│")[-2].strip() == "dtype: 'qint8' → 'float16'"


def test_diff_cli_prints_only_in_and_exits_0(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    load = stage(store, "load", "c" * 64, {"strict": True})
    quant = stage(store, "quant", KEY, {"mode": "dynamic", "lr": 0.0001})
    store.write_run(diff_record("20260101-000000-aaaaaa", [load]))
    store.write_run(diff_record("20260102-000000-bbbbbb", [load, quant]))
    assert main(["diff", "20260101", "20260102", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "only in B" in out and "lr" not in out and "None" not in out


def runs_for_prefix(store: ArtifactStore, count: int) -> list[str]:
    """Write ``count`` run records of recipe ``r`` started one day apart; their ids, oldest first."""
    run_ids = []
    for day in range(1, count + 1):
        run_id = f"202601{day:02d}-000000-{day:06d}"
        store.write_run({**diff_record(run_id, []), "recipe": {"name": "r", "path": "r.yaml", "digest": "d"},
                         "started_at": f"2026-01-{day:02d}T00:00:00"})
        run_ids.append(run_id)
    return run_ids


def test_an_ambiguous_prefix_lists_the_runs_it_matches(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    runs_for_prefix(store, 2)
    expected = ("'2026' matches 2 runs: 20260102-000000-000002 (recipe r, started 2026-01-02T00:00:00), "
                "20260101-000000-000001 (recipe r, started 2026-01-01T00:00:00); give more of the id")
    with pytest.raises(StoreError) as raised:
        store.resolve_run("2026")
    assert str(raised.value) == expected
    assert main(["show", "2026", "--store", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected}"]


def test_an_ambiguous_prefix_lists_ten_runs_and_counts_the_rest(tmp_path):
    store = ArtifactStore(tmp_path)
    run_ids = runs_for_prefix(store, 12)
    store.run_path("20260113-000000-000013").write_text("{")
    with pytest.raises(StoreError) as raised:
        store.resolve_run("2026")
    message = str(raised.value)
    assert message.startswith("'2026' matches 13 runs: 20260113-000000-000013 (damaged record), "
                              "20260112-000000-000012 (recipe r, started 2026-01-12T00:00:00), ")
    assert message.endswith("20260104-000000-000004 (recipe r, started 2026-01-04T00:00:00) and 3 more; give more of the id")
    assert all(run_id not in message for run_id in run_ids[:3])


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the demo's training with writing a small checkpoint; the list of epochs each training used."""
    trainings: list[int] = []

    def train(checkpoint_path: Path, epochs: int = 15, seed: int = 0) -> dict[str, float]:
        trainings.append(epochs)
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path.write_bytes(f"weights {epochs} {seed}".encode())
        return {"loss": 0.25, "eval_top1": 0.975}

    monkeypatch.setattr("pipeline.torchkit.demo_baseline.train_demo_checkpoint", train)
    return trainings


def test_demo_reuses_its_checkpoint_while_the_training_inputs_are_unchanged(tmp_path, fake_training, capsys):
    checkpoint = tmp_path / "digits_cnn.pt"
    demo_command.demo_checkpoint(checkpoint, epochs=3)
    assert "training digits_cnn on scikit-learn digits (3 epochs; no earlier checkpoint with a training record)" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "digits_cnn.pt.json").read_text())
    assert set(recorded) == {"epochs", "seed", "code_digest", "torch", "sha256", "loss", "eval_top1"}
    assert demo_command.demo_checkpoint(checkpoint, epochs=3) == recorded and fake_training == [3]
    assert " ".join(capsys.readouterr().out.split()) == (
        f"reused {checkpoint} (training inputs unchanged: 3 epochs, seed 0; eval top-1 97.50%); "
        f"delete {tmp_path / 'digits_cnn.pt.json'} to retrain")


@pytest.mark.parametrize("change, reason", [
    (lambda checkpoint, record: record.update(epochs=4), "epochs changed since it was trained"),
    (lambda checkpoint, record: record.update(code_digest="0" * 64), "code_digest changed since it was trained"),
    (lambda checkpoint, record: record.update(torch="1.0"), "torch changed since it was trained"),
    (lambda checkpoint, record: checkpoint.write_bytes(b"other"), "digits_cnn.pt no longer matches its recorded sha256"),
])
def test_demo_retrains_when_a_training_input_or_the_checkpoint_changed(tmp_path, fake_training, capsys, change, reason):
    checkpoint = tmp_path / "digits_cnn.pt"
    record_path = tmp_path / "digits_cnn.pt.json"
    demo_command.demo_checkpoint(checkpoint, epochs=3)
    record = json.loads(record_path.read_text())
    change(checkpoint, record)
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    demo_command.demo_checkpoint(checkpoint, epochs=3)
    assert fake_training == [3, 3] and f"(3 epochs; {reason})" in capsys.readouterr().out


def test_demo_retrains_over_a_damaged_training_record(tmp_path, fake_training, capsys):
    checkpoint = tmp_path / "digits_cnn.pt"
    demo_command.demo_checkpoint(checkpoint, epochs=3)
    (tmp_path / "digits_cnn.pt.json").write_text("[")
    demo_command.demo_checkpoint(checkpoint, epochs=3)
    assert fake_training == [3, 3] and "digits_cnn.pt.json is unreadable" in capsys.readouterr().out


def test_demo_command_says_it_reused_the_checkpoint_and_runs_the_recipe(tmp_path, fake_training, monkeypatch, capsys):
    flows = []
    monkeypatch.setattr(demo_command, "run_flow", lambda *args: flows.append(args) or {"run_id": "r"})
    monkeypatch.setattr(demo_command, "finish_run", lambda record, debug: 0)
    monkeypatch.setattr(demo_command, "write_report", lambda record, html, md: [])
    args = argparse.Namespace(out=str(tmp_path), epochs=2, store=str(tmp_path / "store"), debug=False)
    assert demo_command.command_demo(args) == 0 and demo_command.command_demo(args) == 0
    assert fake_training == [2] and len(flows) == 2
    assert f"reused {tmp_path / 'digits_cnn.pt'} (training inputs unchanged" in capsys.readouterr().out


def test_demo_training_code_digest_covers_the_training_module():
    from pipeline.run.code_digest import code_closure

    closure = code_closure(demo_command.TRAINING_CODE)
    assert {"pipeline.torchkit.demo_baseline", "pipeline.torchkit.train", "pipeline.torchkit.data"} <= set(closure)
    assert "pipeline.cli.demo" not in closure  # the reuse logic itself does not retrain the baseline when edited
