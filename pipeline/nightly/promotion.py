"""Nightly verdicts without Prefect: judge a run against the last good night, keep the history, promote ``latest``.

``flows.nightly`` strings these together around the ``optimize`` flow. Per recipe the store keeps
``<store>/nightly/<recipe>.json``: every nightly run (checkpoint, state, regressions) and ``latest``,
the newest run that succeeded without regressions, whose artifacts deployers fetch with
``optipipe latest RECIPE --variant NAME``.
"""

from __future__ import annotations

import fcntl
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.nightly.checkpoints import CheckpointChoice, NightlyError
from pipeline.records.models import Manifest
from pipeline.records.nightly_state import LatestEntry, NightEntry, NightlyState
from pipeline.records.parse import parse_record
from pipeline.records.store import MANIFEST_FILE, ArtifactStore, write_json_atomic
from pipeline.review.compare import compare_runs


def state_path(store: ArtifactStore, recipe_name: str) -> Path:
    """Where the store keeps a recipe's nightly history and ``latest``."""
    return store.root / "nightly" / f"{recipe_name}.json"


def load_state(store: ArtifactStore, recipe_name: str) -> NightlyState:
    """A recipe's nightly history and ``latest``, parsed (empty before the first night)."""
    path = state_path(store, recipe_name)
    if not path.is_file():
        return NightlyState(recipe=recipe_name)
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{path}: nightly state unreadable ({error})") from None
    return parse_record(NightlyState, stored, f"{path}: does not match the nightly state")


def read_state(store: ArtifactStore, recipe_name: str) -> dict[str, Any]:
    """``load_state`` as the JSON the file holds: ``recipe``, ``runs`` and ``latest``."""
    return load_state(store, recipe_name).model_dump(mode="json")


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
            manifest_path = Path(stage["artifact"]) / MANIFEST_FILE
            manifest = parse_record(Manifest, json.loads(manifest_path.read_text()), f"{manifest_path}: does not match the artifact manifest")
            if manifest.kind != "report":
                files[stage["name"]] = str(Path(stage["artifact"]) / manifest.model)
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
    state = load_state(store, name)
    promoted = record["state"] == "succeeded" and not verdict["regressions"]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state.runs.append(NightEntry(
        run_id=record["run_id"], checkpoint=str(checkpoint.path), choice=checkpoint.reason,
        state=record["state"], reference_run=verdict["reference_run"], regressions=verdict["regressions"],
        promoted=promoted, at=now,
    ))
    if promoted:
        state.latest = LatestEntry(run_id=record["run_id"], checkpoint=str(checkpoint.path), promoted_at=now,
                                   variants=variant_artifacts(record))
    write_json_atomic(state_path(store, name), state.model_dump(mode="json"))
    return promoted


def latest_reference(store: ArtifactStore, recipe_name: str) -> dict[str, Any] | None:
    """The run record of the recipe's current ``latest``, the yardstick for tonight's run."""
    latest = load_state(store, recipe_name).latest
    if latest is None:
        return None
    try:
        return store.read_run(latest.run_id)
    except (OSError, StoreError):
        return None


def latest_artifact(store: ArtifactStore, recipe_name: str, variant: str) -> str:
    """The model file of ``variant`` in the recipe's promoted ``latest`` run."""
    latest = load_state(store, recipe_name).latest
    if latest is None:
        raise NightlyError(
            f"recipe '{recipe_name}' has no promoted nightly result in store {store.root}; "
            "a nightly run must succeed without regressions first (optipipe schedule, or flows.nightly)"
        )
    if variant not in latest.variants:
        raise NightlyError(f"--variant '{variant}': latest run {latest.run_id} of '{recipe_name}' has {', '.join(sorted(latest.variants))}")
    return latest.variants[variant]
