"""Nightly re-optimization without Prefect: choose the newest checkpoint, judge a run, promote ``latest``.

``flows.nightly`` strings these together around the ``optimize`` flow. Per recipe the store keeps
``<store>/nightly/<recipe>.json``: every nightly run (checkpoint, state, regressions) and ``latest``,
the newest run that succeeded without regressions, whose artifacts deployers fetch with
``optipipe latest RECIPE --variant NAME``.
"""

from __future__ import annotations

import fcntl
import glob
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.compare import compare_runs
from pipeline.errors import OptipipeError, StoreError
from pipeline.store import ArtifactStore, write_json_atomic

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pt2")
STEP_KEYS = ("global_step", "epoch")


class NightlyError(OptipipeError):
    """No usable checkpoint, or nothing promoted yet for a recipe."""


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a nightly run optimizes and, in one line, why it won."""

    path: Path
    reason: str


def recorded_step(path: Path) -> tuple[str, int] | None:
    """The ``global_step`` (preferred) or ``epoch`` a checkpoint records, read without running pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                values: dict[str, Any] = dict(handle.metadata() or {})
        else:
            import torch

            values = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain training dict (a TorchScript or .pt2 file, a whole pickled module)
        return None
    if not isinstance(values, dict):
        return None
    for key in STEP_KEYS:
        value = values.get(key)
        try:
            return key, int(value)
        except (TypeError, ValueError):
            continue
    return None


def find_checkpoints(source: str) -> list[Path]:
    """Checkpoint files in a folder (by suffix) or matching a glob pattern."""
    folder = Path(source)
    if folder.is_dir():
        return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES)
    if any(character in source for character in "*?["):
        return sorted(Path(match) for match in glob.glob(source) if Path(match).is_file())
    raise NightlyError(f"checkpoints: '{source}' is neither a folder nor a glob pattern such as 'runs/*.pt'")


def newest_checkpoint(source: str) -> CheckpointChoice:
    """The newest checkpoint: highest recorded global_step/epoch when every file records one, else newest mtime.

    Ties (same step, or same modification time) go to the most recently modified file, then to the
    name that sorts last, and the reason says so.
    """
    candidates = find_checkpoints(source)
    if not candidates:
        raise NightlyError(
            f"checkpoints: no checkpoint files in '{source}' (looked for {', '.join(CHECKPOINT_SUFFIXES)}); "
            "point --checkpoints at the folder your training job writes to"
        )
    steps = {path: recorded_step(path) for path in candidates}
    step_kinds = {step[0] for step in steps.values() if step}
    by_step = all(steps.values()) and len(step_kinds) == 1
    def rank(path: Path) -> tuple:
        mtime = path.stat().st_mtime
        return (steps[path][1], mtime, path.name) if by_step else (mtime, path.name)

    ordered = sorted(candidates, key=rank)
    newest = ordered[-1]
    if by_step:
        kind = step_kinds.pop()
        reason = f"highest {kind} {steps[newest][1]} of {len(candidates)} checkpoints"
        tied = [path.name for path in ordered if steps[path][1] == steps[newest][1]]
    else:
        reason = f"newest modification time of {len(candidates)} checkpoints (not every file records a global_step/epoch)"
        tied = [path.name for path in ordered if path.stat().st_mtime == newest.stat().st_mtime]
    if len(tied) > 1:
        reason += f"; tie between {', '.join(tied)} broken by modification time, then name"
    return CheckpointChoice(newest, reason)


def state_path(store: ArtifactStore, recipe_name: str) -> Path:
    """Where the store keeps a recipe's nightly history and ``latest``."""
    return store.root / "nightly" / f"{recipe_name}.json"


def read_state(store: ArtifactStore, recipe_name: str) -> dict[str, Any]:
    """A recipe's nightly history and ``latest`` (empty before the first night)."""
    path = state_path(store, recipe_name)
    return json.loads(path.read_text()) if path.is_file() else {"recipe": recipe_name, "runs": [], "latest": None}


def judge(record: dict[str, Any], reference: dict[str, Any] | None, regression: Any) -> dict[str, Any]:
    """Compare tonight's run record with the last good nightly run's, under the recipe's regression limits."""
    if reference is None:
        return {"reference_run": None, "regressions": [], "comparison": None}
    comparison = compare_runs(
        reference, record,
        max_accuracy_drop=regression.max_accuracy_drop, max_latency_increase=regression.max_latency_increase,
        latency_basis=regression.latency_basis,
    )
    return {"reference_run": reference["run_id"], "regressions": comparison["regressions"], "comparison": comparison}


def variant_artifacts(record: dict[str, Any]) -> dict[str, str]:
    """Each model-producing stage's artifact model file, by stage name, from a finished run record."""
    files = {}
    for stage in record["stages"]:
        if stage.get("artifact") and stage["state"] in ("done", "cached"):
            manifest = json.loads((Path(stage["artifact"]) / "manifest.json").read_text())
            if manifest["kind"] != "report":
                files[stage["name"]] = str(Path(stage["artifact"]) / manifest["model"])
    return files


def record_night(store: ArtifactStore, record: dict[str, Any], checkpoint: CheckpointChoice, verdict: dict[str, Any]) -> bool:
    """Append tonight to the recipe's history; promote it to ``latest`` when it succeeded without regressions."""
    name = record["recipe"]["name"]
    lock_path = state_path(store, name).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:  # two nightly runs of one recipe must not lose each other's entry
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _append_night(store, name, record, checkpoint, verdict)


def _append_night(store: ArtifactStore, name: str, record: dict[str, Any], checkpoint: CheckpointChoice, verdict: dict[str, Any]) -> bool:
    state = read_state(store, name)
    promoted = record["state"] == "succeeded" and not verdict["regressions"]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state["runs"].append({
        "run_id": record["run_id"], "checkpoint": str(checkpoint.path), "choice": checkpoint.reason,
        "state": record["state"], "reference_run": verdict["reference_run"], "regressions": verdict["regressions"],
        "promoted": promoted, "at": now,
    })
    if promoted:
        state["latest"] = {"run_id": record["run_id"], "checkpoint": str(checkpoint.path), "promoted_at": now,
                           "variants": variant_artifacts(record)}
    write_json_atomic(state_path(store, name), state)
    return promoted


def latest_reference(store: ArtifactStore, recipe_name: str) -> dict[str, Any] | None:
    """The run record of the recipe's current ``latest``, the yardstick for tonight's run."""
    latest = read_state(store, recipe_name)["latest"]
    if latest is None:
        return None
    try:
        return store.read_run(latest["run_id"])
    except (OSError, StoreError):
        return None


def latest_artifact(store: ArtifactStore, recipe_name: str, variant: str) -> str:
    """The model file of ``variant`` in the recipe's promoted ``latest`` run."""
    latest = read_state(store, recipe_name)["latest"]
    if latest is None:
        raise NightlyError(
            f"recipe '{recipe_name}' has no promoted nightly result in store {store.root}; "
            "a nightly run must succeed without regressions first (optipipe schedule, or flows.nightly)"
        )
    variants = latest["variants"]
    if variant not in variants:
        raise NightlyError(f"--variant '{variant}': latest run {latest['run_id']} of '{recipe_name}' has {', '.join(sorted(variants))}")
    return variants[variant]
