"""Daily use at the terminal: Ctrl-C stops a run, quiet output, global flags, narrow tables, JSON, the plan."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.cli import build_parser, main
from pipeline.cli.common import console_width
from pipeline.progress import track
from pipeline.records.store import ArtifactStore
from pipeline.review.tables import stages_table, variant_rows, variants_table
from pipeline.run.cancel import CANCEL_REQUESTED, Cancelled
from tests.conftest import REPO_ROOT, run_without_prefect
from tests.test_records import run_record

EDGE_SMALL = REPO_ROOT / "recipes" / "edge-small.yaml"
SHORT_RECIPE = """
name: short
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
data: {source: digits, batch_size: 64}
stages:
  load:  {uses: load_checkpoint}
  slim:  {uses: strip_optimizer, needs: [load]}
  fused: {uses: fuse_conv_bn, needs: [slim]}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A briefly trained digits_cnn checkpoint (the fit of the weights does not matter here)."""
    from pipeline.torchkit.demo_baseline import train_demo_checkpoint

    path = tmp_path_factory.mktemp("checkpoint") / "digits_cnn.pt"
    train_demo_checkpoint(path, epochs=2)
    return path


def optipipe(*args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """``optipipe ARGS`` in a child process, from the repository root, its output captured."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT, env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, read from /proc."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # the process ended while being read
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def start_edge_small_run(checkpoint: Path, tmp_path: Path) -> tuple[ArtifactStore, subprocess.Popen]:
    """``optipipe run recipes/edge-small.yaml`` in a child with its own temporary Prefect server, and its store."""
    store = ArtifactStore(tmp_path / "store")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OPTIPIPE_QUIET": "1"}
    env.pop("PREFECT_API_URL", None)
    return store, optipipe("run", str(EDGE_SMALL), "--checkpoint", str(checkpoint), "--store", str(store.root), env=env)


def still_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def wait_for_stage_underway(store: ArtifactStore, process: subprocess.Popen, ended_before: str, timeout: float = 180) -> None:
    """Poll the store's only run record until stage ``ended_before`` has a result: the next stage is underway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        records = store.list_runs()
        if records and any(stage["name"] == ended_before for stage in records[0]["stages"]):
            return
        time.sleep(0.2)
    pytest.fail(f"stage {ended_before!r} did not end within {timeout}s")


@pytest.mark.slow
def test_one_ctrl_c_cancels_the_run_exits_130_and_leaves_no_process(checkpoint, tmp_path):
    store, process = start_edge_small_run(checkpoint, tmp_path)
    wait_for_stage_underway(store, process, "fused")  # prune, then a 40-epoch distill, are running
    time.sleep(0.5)
    children = children_of(process.pid)
    assert children, "the Prefect server should be a child of the run"
    interrupted_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - interrupted_at < 10
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "EventsWorker" not in stderr
    assert "cancelled" in stderr.splitlines()[-1]
    record = store.list_runs()[0]
    assert record["state"] == "cancelled"
    assert {stage["state"] for stage in record["stages"] if stage["name"] in ("distilled", "onnx")} <= {"skipped"}
    time.sleep(0.5)
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
    assert not list((store.root / "artifacts").glob("*.partial")), "a stopped stage publishes nothing"


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(checkpoint, tmp_path):
    store, process = start_edge_small_run(checkpoint, tmp_path)
    wait_for_stage_underway(store, process, "slim")
    children = children_of(process.pid)
    process.send_signal(signal.SIGINT)
    first_line = process.stderr.readline()  # the first Ctrl-C was handled: two signals at once would coalesce into one
    assert first_line.startswith("interrupted: stopping the running stages"), first_line
    interrupted_again_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - interrupted_again_at < 3 and process.returncode == 130, stderr
    assert "Traceback" not in stderr and " cancelled: " not in stderr, "the second Ctrl-C must not wait for the orderly stop"
    time.sleep(1.0)  # the Prefect server child dies with its parent (PR_SET_PDEATHSIG)
    assert [pid for pid in children if still_running(pid)] == []


def test_cancel_event_stops_track_at_the_next_item():
    CANCEL_REQUESTED.set()
    try:
        with pytest.raises(Cancelled):
            next(iter(track(range(5), "t")))
    finally:
        CANCEL_REQUESTED.clear()


def test_cancelled_stage_is_skipped_and_publishes_nothing(checkpoint, tmp_path, write_recipe):
    from pipeline.recipe import load_recipe
    from pipeline.run.executor import CANCELLED_REASON

    recipe = write_recipe(SHORT_RECIPE)
    CANCEL_REQUESTED.set()
    try:
        with pytest.raises(Cancelled):
            run_without_prefect(recipe, checkpoint, tmp_path / "store")
    finally:
        CANCEL_REQUESTED.clear()
    record = ArtifactStore(tmp_path / "store").list_runs()[0]
    assert record["state"] == "cancelled"
    assert {stage["reason"] for stage in record["stages"]} == {CANCELLED_REASON}
    assert load_recipe(recipe).order == [stage["name"] for stage in record["stages"]]
    assert not list((tmp_path / "store" / "artifacts").glob("*"))


@pytest.mark.parametrize("argv", [["--quiet", "validate", "r.yaml"], ["validate", "r.yaml", "--quiet"],
                                  ["--quiet", "validate", "r.yaml", "--verbose"]])
def test_global_flags_go_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet and not args.debug
    assert args.verbose == ("--verbose" in argv)


def test_no_global_flags_are_false():
    args = build_parser().parse_args(["validate", "r.yaml"])
    assert (args.quiet, args.verbose, args.debug) == (False, False, False)


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("optipipe ")


def test_columns_sets_the_width_of_piped_output(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert console_width() == 80
    monkeypatch.delenv("COLUMNS")
    assert console_width() == (None if sys.stdout.isatty() else 200)


def rendered(table, width: int) -> str:
    """``table`` as text on a console ``width`` columns wide."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_variant_figures_are_whole_at_any_width(width):
    record = run_record("20261201-103342-450d12", top1_loss=1)
    text = rendered(variants_table(record, width), width)
    assert "…" not in text
    for row in variant_rows(record):
        for figure in (f"{row['top1']:.2%}", f"{row['delta_top1'] * 100:+.2f} pt", f"{row['latency_p50_ms']:.3f}"):
            assert figure in text
    assert ("agreement" in text) == (width == 160)
    assert "…" not in rendered(stages_table(record, width), width)


def test_validate_json_prints_the_plan(capsys):
    assert main(["validate", str(EDGE_SMALL), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["order"][:2] == ["load", "slim"] and plan["stages"]["distilled"]["params"]["epochs"] == 40


def test_gc_json_prints_the_report(tmp_path, capsys):
    assert main(["gc", "--store", str(tmp_path), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["removed_artifacts"] == []


def plan_states(capsys) -> list[str]:
    """The state each stage line of ``optipipe plan`` output shows."""
    lines = [line for line in capsys.readouterr().out.splitlines() if "(" in line and " · " in line]
    return [line.rsplit(" · ", 1)[1].strip() for line in lines]


def test_plan_says_what_will_run_then_what_is_cached(checkpoint, tmp_path, write_recipe, capsys):
    recipe, store = write_recipe(SHORT_RECIPE), tmp_path / "store"
    assert main(["plan", str(recipe), "--checkpoint", str(checkpoint), "--store", str(store)]) == 0
    assert plan_states(capsys) == ["will run"] * 3
    run_without_prefect(recipe, checkpoint, store)
    assert main(["plan", str(recipe), "--checkpoint", str(checkpoint), "--store", str(store)]) == 0
    assert plan_states(capsys) == ["cached"] * 3


def test_plan_of_a_checkpoint_that_does_not_fit_is_one_error_line(tmp_path, write_recipe):
    import torch

    wrong = tmp_path / "wrong.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, wrong)
    started = time.monotonic()
    process = optipipe("plan", str(write_recipe(SHORT_RECIPE)), "--checkpoint", str(wrong), "--store", str(tmp_path / "s"))
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started < 10
    assert process.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and "does not fit" in stderr


def test_running_loops_show_in_the_live_view_with_their_eta_and_loss():
    from rich.console import Console

    from pipeline.cli.live import loops_now
    from pipeline.progress import active_loops, note, track

    console = Console(width=120, record=True)
    for epoch in track(range(4), "distill student"):
        note(f"loss {1.0 / (epoch + 1):.4f}")
        if epoch == 2:
            [loop] = active_loops()
            assert (loop.done, loop.total) == (2, 4)
            console.print(loops_now())
    text = console.export_text()
    assert "distill student" in text and "2/4" in text and "ETA" in text and "loss 0.3333" in text
    assert active_loops() == []
