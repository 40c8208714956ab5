"""Nightly verdicts without Prefect: judge a run against the last good night, keep the history, promote ``latest``.

``flows.nightly`` strings these together around the ``optimize`` flow. Per recipe the store keeps
``<store>/nightly/<recipe>.json``: every nightly run (checkpoint, state, regressions) and ``latest``,
the newest run that succeeded without regressions, whose artifacts deployers fetch with
``optipipe latest RECIPE --variant NAME``, or without ``--variant`` the model a ``select`` stage of that run
chose (``latest.chosen``). When that file is truncated or not a JSON object the state is
rebuilt from the run records (nightly runs carry a ``nightly`` key), with a warning; the next night
rewrites the file and keeps the damaged one beside it as ``<recipe>.json.damaged``. An object with a
wrong field is an error naming it, not guessed around.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.nightly.checkpoints import CheckpointChoice, NightlyError
from pipeline.records.nightly_state import LatestEntry, NightEntry, NightlyState
from pipeline.records.parse import parse_record
from pipeline.records.store import ArtifactStore
from pipeline.records.variants import chosen_stage
from pipeline.review.compare import compare_runs


def state_path(store: ArtifactStore, recipe_name: str) -> Path:
    """Where the store keeps a recipe's nightly history and ``latest``."""
    return store.root / "nightly" / f"{recipe_name}.json"


class UnreadableState(StoreError):
    """The nightly state file is truncated, not JSON or not an object: it can be rebuilt from the run records."""


def parse_state_file(path: Path) -> NightlyState:
    """The nightly state file parsed: ``UnreadableState`` when it is not a JSON object, ``StoreError`` naming
    the field when an object does not match the declared state (that is not guessed around)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UnreadableState(f"{path}: nightly state unreadable ({error})") from None
    if not isinstance(stored, dict):
        raise UnreadableState(f"{path}: nightly state unreadable (holds {type(stored).__name__}, not a JSON object)")
    return parse_record(NightlyState, stored, f"{path}: does not match the nightly state")


def night_of(record: dict[str, Any]) -> NightEntry:
    """The history entry of a nightly run, from the ``nightly`` key its run record carries."""
    verdict = record["nightly"]
    regressions = verdict.get("regressions") or []
    return NightEntry(
        run_id=record["run_id"], checkpoint=record["checkpoint"]["path"],
        choice=verdict.get("checkpoint_choice") or "(rebuilt from the run record)", state=record["state"],
        reference_run=verdict.get("reference_run"), regressions=regressions,
        promoted=record["state"] == "succeeded" and not regressions, at=record.get("finished_at") or record["started_at"],
    )


def rebuild_state(store: ArtifactStore, recipe_name: str) -> NightlyState:
    """A recipe's nightly history rebuilt from its nightly run records; ``latest`` is the newest promoted
    night whose artifacts are still in the store."""
    records = [record for record in reversed(store.list_runs())
               if record.get("nightly") and record["recipe"]["name"] == recipe_name]
    state = NightlyState(recipe=recipe_name, runs=[night_of(record) for record in records])
    for night, record in reversed(list(zip(state.runs, records))):
        if not night.promoted:
            continue
        try:
            variants = variant_artifacts(store, record)
        except (OSError, json.JSONDecodeError, StoreError):
            continue  # its artifacts were collected: an older night may still be fetchable
        state.latest = LatestEntry(run_id=night.run_id, checkpoint=night.checkpoint, promoted_at=night.at, variants=variants,
                                   keys=variant_keys(record, variants),
                                   **chosen_field(record))
        break
    return state


def load_state_noting_damage(store: ArtifactStore, recipe_name: str) -> tuple[NightlyState, bool]:
    """The recipe's nightly state and whether its file was damaged (then rebuilt from the run records, with a warning)."""
    path = store.pull(state_path(store, recipe_name))
    if not path.is_file():
        return NightlyState(recipe=recipe_name), False
    try:
        return parse_state_file(path), False
    except UnreadableState as problem:
        state = rebuild_state(store, recipe_name)
        print(f"warning: {problem}; rebuilt it from {len(state.runs)} nightly run records", file=sys.stderr)
        return state, True


def load_state(store: ArtifactStore, recipe_name: str) -> NightlyState:
    """A recipe's nightly history and ``latest``, parsed (empty before the first night; rebuilt when damaged)."""
    return load_state_noting_damage(store, recipe_name)[0]


def read_state(store: ArtifactStore, recipe_name: str) -> dict[str, Any]:
    """``load_state`` as the JSON the file holds: ``recipe``, ``runs`` and ``latest``."""
    return load_state(store, recipe_name).model_dump(mode="json")


def judge(record: dict[str, Any], reference: dict[str, Any] | None, regression: Any) -> dict[str, Any]:
    """Compare tonight's run record with the last good nightly run's, under the recipe's regression limits (``max_drop``
    of the recipe's metric in its direction, latency growth)."""
    if reference is None:
        return {"reference_run": None, "regressions": [], "comparison": None}
    comparison = compare_runs(
        reference, record,
        max_drop=regression.max_drop, max_latency_increase=regression.max_latency_increase,
        latency_basis=regression.latency_basis,
    )
    return {"reference_run": reference["run_id"], "regressions": comparison["regressions"], "comparison": comparison}


def variant_artifacts(store: ArtifactStore, record: dict[str, Any]) -> dict[str, str]:
    """Each model-producing stage's artifact model file, by stage name, from a finished run record, read through
    ``store`` (an object store fetches the artifact into this machine's cache: the record's paths are the worker's)."""
    files = {}
    for stage in record["stages"]:
        if stage.get("key") and stage["state"] in ("done", "cached"):
            artifact = store.read(stage["key"])
            if artifact is None:
                raise StoreError(f"artifact {stage['key'][:12]} of stage '{stage['name']}' is no longer in store {store.location}")
            if artifact.manifest["kind"] != "report":
                files[stage["name"]] = str(artifact.model_path)
    return files


def variant_keys(record: dict[str, Any], variants: dict[str, str]) -> dict[str, str]:
    """The artifact key of each of ``variants``, from the run record: what finds its model on any machine."""
    return {stage["name"]: stage["key"] for stage in record["stages"] if stage["name"] in variants and stage.get("key")}


def chosen_field(record: dict[str, Any]) -> dict[str, str]:
    """``{"chosen": stage}`` when the run has a finished select stage (the model ``optipipe latest`` gives without
    ``--variant``), else nothing: ``latest`` entries of runs without one stay as they were."""
    chosen = chosen_stage(record)
    return {} if chosen is None else {"chosen": chosen}


def record_night(store: ArtifactStore, record: dict[str, Any], checkpoint: CheckpointChoice, verdict: dict[str, Any]) -> bool:
    """Append tonight to the recipe's history; promote it to ``latest`` when it succeeded without regressions."""
    name = record["recipe"]["name"]
    lock_path = state_path(store, name).with_suffix(".lock")
    store.refuse_links(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW and no O_TRUNC: a lock file that is a link is refused, and nothing is ever truncated
    lock = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:  # two nightly runs of one recipe must not lose each other's entry
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _append_night(store, name, record, checkpoint, verdict)
    finally:
        os.close(lock)


def _append_night(store: ArtifactStore, name: str, record: dict[str, Any], checkpoint: CheckpointChoice, verdict: dict[str, Any]) -> bool:
    """Add tonight to the (possibly rebuilt) state and write it; a damaged file is kept aside as ``.damaged``."""
    state, damaged = load_state_noting_damage(store, name)
    if damaged:
        path = state_path(store, name)
        path.replace(path.with_name(f"{path.name}.damaged"))
    promoted = record["state"] == "succeeded" and not verdict["regressions"]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state.runs = [night for night in state.runs if night.run_id != record["run_id"]]  # a rebuilt state already has it
    state.runs.append(NightEntry(
        run_id=record["run_id"], checkpoint=str(checkpoint.path), choice=checkpoint.reason,
        state=record["state"], reference_run=verdict["reference_run"], regressions=verdict["regressions"],
        promoted=promoted, at=now,
    ))
    if promoted:
        variants = variant_artifacts(store, record)
        state.latest = LatestEntry(run_id=record["run_id"], checkpoint=str(checkpoint.path), promoted_at=now,
                                   variants=variants, keys=variant_keys(record, variants), **chosen_field(record))
    store.write_json(state_path(store, name), state.model_dump(mode="json"))
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


def latest_artifact(store: ArtifactStore, recipe_name: str, variant: str | None = None) -> str:
    """The model file of ``variant`` in the recipe's promoted ``latest`` run; without one, of the variant that run's
    select stage chose."""
    latest = load_state(store, recipe_name).latest
    if latest is None:
        raise NightlyError(
            f"recipe '{recipe_name}' has no promoted nightly result in store {store.location}; "
            "a nightly run must succeed without regressions first (optipipe schedule, or flows.nightly)"
        )
    variant = variant or latest.chosen
    if variant is None:
        raise NightlyError(f"latest run {latest.run_id} of '{recipe_name}' has no select stage to choose a variant; "
                           f"pass --variant NAME (one of {', '.join(sorted(latest.variants))})")
    if variant not in latest.variants:
        raise NightlyError(f"--variant '{variant}': latest run {latest.run_id} of '{recipe_name}' has {', '.join(sorted(latest.variants))}")
    artifact = store.read(latest.keys[variant]) if variant in latest.keys else None
    return str(artifact.model_path) if artifact is not None else latest.variants[variant]
