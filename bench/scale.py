"""Scale benchmark: one 12-branch matrix recipe through Prefect on each runner, wall time and dispatch overhead.

    python bench/scale.py [--out bench-out/scale] [--workers N] [--epochs 4]

The recipe (the demo CNN): load -> slim -> fused, then 12 branches: channel pruning at 6 amounts, each distilled
from FP32 (torch training: CPU-bound, under the torch lock in threads), and 6 ONNX Runtime INT8 configurations
(3 calibration methods x per-channel or not) on one ONNX export. Each runner runs the recipe twice in a fresh
store: the first run does the work (wall time, each stage's recorded seconds), the second reuses every stage
from the cache, so a stage's wall time there, from submit to result as the driver sees it, is what dispatching
one stage costs on that runner. Runners: ``threads:4`` (the default), ``processes:1`` (one worker process: each
stage measured alone, the reference for recorded seconds), ``processes:N`` (a local Dask cluster, N = the CPU
count, started for the run as ``--runner processes:N`` does), ``dask-warm:N`` (the same N workers as a long-lived
cluster reached by address, as ``--runner dask://HOST:PORT`` reaches a team's: warmed by one run of the recipe
into another store first, so its workers have imported torch and built the data once), and Prefect's own
``ProcessPoolTaskRunner`` with N processes, the alternative to a local Dask cluster.
Printed: wall time and speed-ups, dispatch overhead per stage (median and p90 ms), each stage kind's recorded
seconds against the same stages measured alone, and the machine's load before and after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from compress import NoAliasDumper, demo_checkpoint  # noqa: E402

from pipeline.cli.common import quiet_prefect_console  # noqa: E402

quiet_prefect_console()  # Prefect's and Dask's log lines stay in the Prefect UI, off the table's terminal
import flows  # noqa: E402
from pipeline.recipe.runner import parse_runner  # noqa: E402
from pipeline.records.store import ArtifactStore  # noqa: E402
from pipeline.run.measure import cpu_model, load_average  # noqa: E402

AMOUNTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
INT8_MATRIX = {"calibrate_method": ["minmax", "entropy", "percentile"], "per_channel": [True, False]}


def scale_recipe(epochs: int) -> dict[str, Any]:
    """The 12-branch recipe: 6 pruned-and-distilled torch branches, 6 ONNX Runtime INT8 branches."""
    return {
        "name": "bench-scale",
        "model": {"factory": "pipeline.zoo:digits_cnn", "input_shape": [1, 1, 8, 8]},
        "data": {"source": "digits", "batch_size": 64},
        "stages": {
            "load": {"uses": "load_checkpoint"},
            "slim": {"uses": "strip_optimizer", "needs": ["load"]},
            "fused": {"uses": "fuse_conv_bn", "needs": ["slim"]},
            "pruned": {"uses": "prune", "needs": ["fused"], "with": {"method": "channels", "norm": 1}, "matrix": {"amount": AMOUNTS}},
            "distilled": {"uses": "distill", "needs": ["pruned"],
                          "with": {"epochs": epochs, "lr": 0.002, "temperature": 4.0, "alpha": 0.9}},
            "onnx": {"uses": "export_onnx", "needs": ["fused"]},
            "int8": {"uses": "quantize_onnx", "needs": ["onnx"], "with": {"mode": "static", "calibration_batches": 8},
                     "matrix": INT8_MATRIX},
        },
    }


class TimedSubmit:
    """Wraps ``flows.submit_task``: the seconds from each stage's submission until its result came back."""

    def __init__(self, submit: Callable[[Any], Any]):
        self.submit = submit
        self.seconds: dict[str, float] = {}

    def __call__(self, call: Any) -> Any:
        started = time.perf_counter()
        pending = self.submit(call)
        timings = self.seconds

        class Timed:
            def result(self) -> Any:
                outcome = pending.result()
                timings[call.stage] = time.perf_counter() - started
                return outcome

        return Timed()


def task_runner(name: str, workers: int) -> Any:
    """The Prefect task runner a row of the table names."""
    if name == "prefect-process-pool":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    return flows.task_runner_for(parse_runner(name))


def run_once(recipe: Path, checkpoint: Path, store: Path, runner: Any, label: str) -> tuple[dict[str, Any], dict[str, float], float]:
    """One flow run: its record, each stage's submit-to-result seconds, and the wall seconds."""
    timed = TimedSubmit(flows.submit_task)
    original, flows.submit_task = flows.submit_task, timed
    started = time.perf_counter()
    try:
        flows.optimize.with_options(task_runner=runner)(str(recipe), str(checkpoint), str(store), None, None, label, return_state=True)
    finally:
        flows.submit_task = original
    wall = time.perf_counter() - started
    record = ArtifactStore(store).list_runs()[0]
    return record, timed.seconds, wall


@contextlib.contextmanager
def runner_factory(name: str, workers: int, recipe: Path, checkpoint: Path, workdir: Path) -> Iterator[Callable[[], Any]]:
    """Makes the row's task runner; for ``dask-warm`` a long-lived local cluster, warmed with one run, is its target."""
    if not name.startswith("dask-warm"):
        yield lambda: task_runner(name, workers)
        return
    from distributed import LocalCluster

    with LocalCluster(**flows.local_cluster_kwargs(workers)) as cluster:
        address = cluster.scheduler_address.replace("tcp://", "dask://")

        def make() -> Any:
            return task_runner(address, workers)

        shutil.rmtree(workdir / "store-warm-up", ignore_errors=True)
        run_once(recipe, checkpoint, workdir / "store-warm-up", make(), name)
        yield make


def measure_runner(name: str, workers: int, recipe: Path, checkpoint: Path, workdir: Path) -> dict[str, Any]:
    """Run the recipe twice on one runner in a fresh store: the working run, then the all-cached one."""
    store = workdir / f"store-{name.replace(':', '-')}"
    shutil.rmtree(store, ignore_errors=True)
    with runner_factory(name, workers, recipe, checkpoint, workdir) as make:
        load_before = load_average()
        first, _, wall = run_once(recipe, checkpoint, store, make(), name)
        second, dispatch, cached_wall = run_once(recipe, checkpoint, store, make(), name)
    states = {stage["state"] for stage in second["stages"]}
    overheads_ms = sorted(seconds * 1000 for seconds in dispatch.values())
    return {
        "runner": name, "state": first["state"], "message": first["message"], "wall_s": wall, "cached_wall_s": cached_wall,
        "cached_states": sorted(states), "dispatch_median_ms": statistics.median(overheads_ms),
        "dispatch_p90_ms": overheads_ms[int(0.9 * (len(overheads_ms) - 1))],
        "stage_seconds": {stage["name"]: stage["seconds"] for stage in first["stages"]},
        "uses": {stage["name"]: stage["uses"] for stage in first["stages"]},
        "workers_used": len({stage.get("worker") for stage in first["stages"]}),
        "load_before": load_before, "load_after": load_average(),
    }


def seconds_by_kind(row: dict[str, Any]) -> dict[str, float]:
    """Recorded stage seconds summed by stage kind (``uses``)."""
    totals: dict[str, float] = {}
    for name, seconds in row["stage_seconds"].items():
        totals[row["uses"][name]] = totals.get(row["uses"][name], 0.0) + seconds
    return totals


def print_tables(rows: list[dict[str, Any]], console: Console, workers: int) -> None:
    """Wall time and speed-ups, dispatch overhead, recorded seconds against the same stages alone."""
    by_name = {row["runner"]: row for row in rows}
    alone, threads = by_name.get("processes:1"), by_name.get("threads:4")
    table = Table(title=f"12-branch matrix recipe, {os.cpu_count()} CPUs ({cpu_model()}), {workers} worker processes")
    columns = ("runner", "run", "wall s", "x vs processes:1", "x vs threads:4", "dispatch ms/stage (median, p90)", "workers used",
               "load before → after")
    for column in columns:
        table.add_column(column, justify="left" if column in ("runner", "run") else "right")
    for row in rows:
        table.add_row(
            row["runner"], row["state"], f"{row['wall_s']:.1f}",
            f"{alone['wall_s'] / row['wall_s']:.2f}" if alone else "-", f"{threads['wall_s'] / row['wall_s']:.2f}" if threads else "-",
            f"{row['dispatch_median_ms']:.0f}, {row['dispatch_p90_ms']:.0f}", str(row["workers_used"]),
            f"{row['load_before'][0] if row['load_before'] else '-'} → {row['load_after'][0] if row['load_after'] else '-'}",
        )
    console.print(table)
    if alone is None:
        return
    kinds = Table(title="recorded stage seconds by stage kind (sum over the run) vs the same stages alone (processes:1)")
    kinds.add_column("stage kind")
    kinds.add_column("alone s", justify="right")
    for row in rows:
        if row is not alone:
            kinds.add_column(f"{row['runner']} s (x alone)", justify="right")
    alone_totals = seconds_by_kind(alone)
    for kind, alone_seconds in alone_totals.items():
        cells = [f"{seconds_by_kind(row).get(kind, 0.0):.2f} ({seconds_by_kind(row).get(kind, 0.0) / alone_seconds:.2f})"
                 for row in rows if row is not alone]
        kinds.add_row(kind, f"{alone_seconds:.2f}", *cells)
    console.print(kinds)


def sample_load(stop: threading.Event, samples: list[float]) -> None:
    """Record the 1-minute load average every 5 s while the benchmark runs."""
    while not stop.wait(5):
        samples.append(os.getloadavg()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/scale")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="worker processes of processes:N (default: the CPU count)")
    parser.add_argument("--epochs", type=int, default=4, help="distillation epochs per pruned branch")
    parser.add_argument("--runners", default=None, help="comma-separated subset of the rows")
    args = parser.parse_args()
    workdir = Path(args.out).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console = Console(width=170)
    checkpoint = demo_checkpoint(workdir)
    recipe = workdir / "bench-scale.yaml"
    recipe.write_text(yaml.dump(scale_recipe(args.epochs), Dumper=NoAliasDumper, sort_keys=False))
    names = ["threads:4", "processes:1", f"processes:{args.workers}", f"dask-warm:{args.workers}", "prefect-process-pool"]
    if args.runners:
        names = [name for name in names if name in args.runners.split(",")]
    flows.start_temporary_server()
    stop, samples = threading.Event(), []
    threading.Thread(target=sample_load, args=(stop, samples), daemon=True).start()
    rows = []
    for name in names:
        console.print(f"[bold]{name}[/]: working run, then the all-cached run ...")
        rows.append(measure_runner(name, args.workers, recipe, checkpoint, workdir))
    stop.set()
    print_tables(rows, console, args.workers)
    if samples:
        console.print(f"load average (1 min) while running: min {min(samples):.2f}, max {max(samples):.2f}, on {os.cpu_count()} CPUs")
    (workdir / "scale.json").write_text(json.dumps({"rows": rows, "load_samples": samples}, indent=2))
    console.print(f"figures: {workdir / 'scale.json'}")
    return 0 if all(row["state"] == "succeeded" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
