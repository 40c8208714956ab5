"""Executes one stage: reuse its cached artifact, or run it and publish what it made.

``execute(call)`` takes only plain, serializable arguments (``StageCall``: recipe path, store location (a
folder or an object-store URL), stage name, upstream artifact keys, the checkpoint snapshot's path inside the
store), so the same function runs in a thread of ``optipipe run``, in a Prefect task, in a worker process or
on a Dask worker on another machine: it rebuilds the plan, the store and the data it needs from them, and
records where it ran (``worker``). It always
returns a ``StageResult``: deliberate ``OptipipeError``s become one-line failures, anything else is an
internal error whose traceback is kept in a log file beside the run record. Ctrl-C is not a failure: a
``KeyboardInterrupt`` propagates, and a cancelled run (``pipeline.run.cancel``) gives a skipped result,
with nothing published, for a stage it stopped or had not started. Stages that declare ``exclusive`` run
holding the process's torch lock, taken here and nowhere else; the time spent waiting for it is recorded apart from the stage's own seconds. Holding it,
a stage starts with torch's, numpy's and Python's random generators seeded from its cache key.
"""

from __future__ import annotations

import errno
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import OptipipeError, RecipeError, StageError, StageUnavailable, one_line
from pipeline.recipe.plan import Plan, load_recipe
from pipeline.records.models import StageResult
from pipeline.records.store import Artifact, ArtifactStore, open_store
from pipeline.run.cancel import Cancelled, raise_if_cancelled
from pipeline.run.contract import StageContext, StageOutput
from pipeline.run.identity import RunIdentity, cache_key, cache_payload, data_identity
from pipeline.run.measure import PeakRSS, worker_address
from pipeline.run.registry import declaration

# Graph capture in torch is process-global: torch.fx.symbolic_trace patches nn.Module.__call__ for every
# thread (a forward elsewhere then fails with "module is not installed as a submodule") and torch.export
# keeps global mode stacks ("Trying to pop empty mode stack"). So stages that run torch work hold this
# lock for their whole run; stages that only drive onnxruntime or write files overlap with them.
TORCH_LOCK = threading.RLock()


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StageCall:
    """The plain arguments of one stage execution: what a task runner ships to wherever the stage runs."""

    recipe_path: str
    overrides: tuple[str, ...]
    recipe_digest: str
    store_root: str
    checkpoint_path: str
    checkpoint_sha256: str
    run_id: str
    stage: str
    inputs: dict[str, str] = field(default_factory=dict)  # upstream stage -> artifact key, in `needs` order
    baseline_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (a Prefect task parameter)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StageCall":
        """The call ``as_dict`` described."""
        return cls(**{**values, "overrides": tuple(values["overrides"])})


_plans: dict[tuple[str, tuple[str, ...]], Plan] = {}
_data: dict[str, Any] = {}
_cache_lock = threading.Lock()
CACHED_RUNS = 2
CANCELLED_REASON = "cancelled (Ctrl-C) before it finished; a re-run runs it"


def plan_of(call: StageCall) -> Plan:
    """The call's plan, loaded once per process; a recipe edited while its run goes on is refused."""
    with _cache_lock:
        plan = _plans.get((call.recipe_path, call.overrides))
        if plan is None or plan.digest != call.recipe_digest:
            plan = _plans[(call.recipe_path, call.overrides)] = load_recipe(call.recipe_path, list(call.overrides))
    if plan.digest != call.recipe_digest:
        raise RecipeError(f"{call.recipe_path} changed while run {call.run_id} was in progress; start a new run")
    return plan


def data_of(plan: Plan, run_id: str) -> Any:
    """The recipe's data, built once per run in each process (stages each get their own train shuffling).

    Only the newest few runs' data stay cached, so a long-lived process (a served schedule) does not grow.
    """
    from pipeline.torchkit.data import build_data, check_inputs
    from pipeline.torchkit.model_io import ModelIO

    with _cache_lock:
        bundle = _data.get(run_id)
        if bundle is None:
            # a user factory drawing from the global generators gets the same draws whichever stage builds it
            with own_random_generators(cache_key(data_identity(plan.recipe.data))):
                bundle = build_data(plan.recipe.data, ModelIO.of(plan.recipe.model))
                check_inputs(bundle)  # reads the eval split: a loader draws a seed
            _data[run_id] = bundle
            while len(_data) > CACHED_RUNS:
                _data.pop(next(iter(_data)))
    return bundle.for_stage()


@contextmanager
def exclusive(needed: bool) -> Iterator[list[float]]:
    """Hold the torch lock when ``needed``; yields a one-item list that ends up holding the seconds waited."""
    waited = [0.0]
    if not needed:
        yield waited
        return
    started = time.perf_counter()
    with TORCH_LOCK:
        waited[0] = time.perf_counter() - started
        yield waited


@contextmanager
def own_random_generators(key: str) -> Iterator[None]:
    """Seed the global generators from ``key`` for the block, then put back the states they had before."""
    import random

    import numpy
    import torch

    states = random.getstate(), numpy.random.get_state(), torch.random.get_rng_state()
    seed_random_generators(key)
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def seed_random_generators(key: str) -> None:
    """Seed torch's, numpy's and Python's global generators from a cache key, so a stage draws the same
    numbers (a loader shuffling without its own generator, dropout, random init) in any process, after
    any other stages: the same key makes the same bytes.

    Called holding the torch lock only: the generators are process-wide, so seeding them from a stage
    running beside a locked one would change what the locked one draws.
    """
    import random

    import numpy
    import torch

    seed = int(key[:16], 16)
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def handle_of(store: ArtifactStore, artifact: Artifact) -> Any:
    """The model handle of a stored artifact, after re-checking its file digests."""
    from pipeline.torchkit.handles import handle_from_record

    store.verify(artifact)
    manifest = artifact.manifest
    return handle_from_record(artifact.path, manifest["model"], manifest["kind"], manifest.get("handle", {}))


def stored(store: ArtifactStore, key: str, role: str) -> Artifact:
    """The published artifact ``key`` an upstream stage made, or a StoreError saying it is gone."""
    store.lease(key)  # gc keeps an input this stage is about to load
    artifact = store.read(key)
    if artifact is None:
        raise StageError(f"the {role} artifact {key[:12]} is no longer in store {store.root} (removed by gc?); re-run")
    return artifact


def log_internal_error(store: ArtifactStore, call: StageCall, error: BaseException) -> Path:
    """Write the traceback of an unexpected exception to ``<store>/runs/<run_id>/<stage>.log``."""
    log_path = store.runs_dir / call.run_id / f"{call.stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    return log_path


def failure_result(store: ArtifactStore, call: StageCall, uses: str, key: str | None, seconds: float, error: Exception) -> StageResult:
    """The failed StageResult for ``error``: one line for a deliberate error, a logged traceback for a bug."""
    failed = {"name": call.stage, "uses": uses, "state": "failed", "seconds": round(seconds, 4), "key": key, "worker": worker_address()}
    if isinstance(error, OptipipeError):
        return StageResult(**failed, reason=str(error), error="input")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return StageResult(**failed, error="input", reason=(
            f"stage '{call.stage}' ({uses}): no space left on the device holding the store {store.root}; "
            "free some space (optipipe gc) or pass --store on a larger disk"))
    log_path = store.keep_log(log_internal_error(store, call, error))
    return StageResult(**failed, error="internal", log=log_path, reason=(
        f"stage '{call.stage}' ({uses}) failed with an internal error, {one_line(error)}; traceback in {log_path}"))


def execute(call: StageCall) -> StageResult:
    """Run stage ``call.stage`` on its upstream artifacts, or reuse its cached artifact; never raises for a failure."""
    store = open_store(call.store_root)
    uses, key, started = call.stage, None, time.perf_counter()
    try:
        raise_if_cancelled()
        plan = plan_of(call)
        uses = plan.uses_of(call.stage)
        upstream = {name: stored(store, artifact_key, f"'{name}'") for name, artifact_key in call.inputs.items()}
        baseline = stored(store, call.baseline_key, "baseline") if call.baseline_key else None
        identity = RunIdentity.of(plan, call.checkpoint_sha256)
        payload = cache_payload(plan, call.stage, identity, [artifact.digest for artifact in upstream.values()],
                                baseline.digest if baseline else None)
        key = cache_key(payload)
        cached = store.find(key)
        if cached is not None:
            return StageResult(name=call.stage, uses=uses, state="cached", key=key, artifact=str(cached.path),
                               metrics=cached.manifest["metrics"], worker=worker_address())
        return run_and_publish(call, plan, store, upstream, baseline, payload, key)
    except StageUnavailable as unavailable:
        return StageResult(name=call.stage, uses=uses, state="skipped", reason=str(unavailable))
    except Cancelled:
        return StageResult(name=call.stage, uses=uses, state="skipped", reason=CANCELLED_REASON)
    except Exception as error:  # every failure becomes a result; a bug keeps its traceback in a log file
        return failure_result(store, call, uses, key, time.perf_counter() - started, error)


def run_and_publish(call: StageCall, plan: Plan, store: ArtifactStore, upstream: dict[str, Artifact],
                    baseline: Artifact | None, payload: dict[str, Any], key: str) -> StageResult:
    """Run the stage in a fresh work folder and publish its product under ``key`` (the folder goes on failure)."""
    uses = plan.uses_of(call.stage)
    declared = declaration(uses)
    params = plan.params[call.stage]
    workdir = store.new_workdir(call.stage)
    try:
        context = StageContext(
            name=call.stage, workdir=workdir, recipe=plan.recipe, checkpoint_path=store.checkpoint_file(call.checkpoint_path),
            load_data=lambda: data_of(plan, call.run_id), baseline=handle_of(store, baseline) if baseline else None,
            baseline_name=plan.baseline,
        )
        inputs = {name: handle_of(store, artifact) for name, artifact in upstream.items()}
        with exclusive(declared.exclusive) as waited:
            raise_if_cancelled()  # cancelled while waiting for the torch lock
            if declared.exclusive:
                seed_random_generators(key)
            started = time.perf_counter()
            with PeakRSS() as memory:
                output: StageOutput = declared.run(context, inputs, params)
            seconds = time.perf_counter() - started
        if output.product.path.parent != workdir:
            raise StageError(f"stage wrote its product outside its work folder: {output.product.path}")
        artifact = store.publish(key, workdir, output.product.path.name, {
            "stage": call.stage, "uses": uses, "kind": output.product.kind, "handle": output.product.meta,
            "params": params.model_dump(mode="json"), "inputs": [artifact.key for artifact in upstream.values()],
            "metrics": output.metrics, "seconds": round(seconds, 4), "waited_seconds": round(waited[0], 4),
            "peak_rss_bytes": memory.peak_bytes, "start_rss_bytes": memory.start_bytes, "versions": payload["versions"],
            "cache_payload": payload,
            "run_id": call.run_id, "created_at": utc_now(), "worker": worker_address(),
        })
    except BaseException:
        store.discard(workdir)
        raise
    return StageResult(name=call.stage, uses=uses, state="done", seconds=round(seconds, 4), key=key,
                       artifact=str(artifact.path), metrics=output.metrics, waited_seconds=round(waited[0], 4),
                       worker=worker_address())


def cached_digests(plan: Plan, store: ArtifactStore, checkpoint_sha256: str) -> dict[str, str | None]:
    """Each stage's artifact digest where the store already holds its artifact, keyed as ``execute`` would key
    it, or None where the stage will run.

    Keys chain through the digests of cached upstream artifacts; a stage downstream of one that will run
    gets None, since its inputs do not exist yet. Reads manifests only (no leases, no downloads).
    """
    identity = RunIdentity.of(plan, checkpoint_sha256)
    found: dict[str, str | None] = {}
    for name in plan.order:
        upstream = [found[needed] for needed in plan.needs_of(name)]
        baseline = found[plan.baseline] if plan.uses_baseline(name) else None
        if any(digest is None for digest in upstream) or (plan.uses_baseline(name) and baseline is None):
            found[name] = None
            continue
        manifest = store.manifest_of(cache_key(cache_payload(plan, name, identity, upstream, baseline)))
        found[name] = manifest["digest"] if manifest else None
    return found
