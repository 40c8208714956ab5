"""One run of a recipe on a checkpoint: cache keys, executing stages, and keeping the run record.

This is the orchestration-free core: ``flows.py`` wraps ``RunSession.execute`` in Prefect tasks, and
tests call it directly. Thread-safe, because independent branches run concurrently.
"""

from __future__ import annotations

import errno
import inspect
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.data import DataBundle, build_data, check_input_shape, data_identity
from pipeline.errors import CheckpointError, OptipipeError, StageError, StageUnavailable
from pipeline.imports import module_source_digest
from pipeline.measure import PeakRSS, library_versions
from pipeline.models import ModelHandle, handle_from_record
from pipeline.recipe import Plan, factory_references
from pipeline.stage import StageContext, StageOutput
from pipeline.store import Artifact, ArtifactStore, sha256_file, sha256_text
from stages import load_stage

def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sortable, unique run id: ``YYYYMMDD-HHMMSS-<6 hex>``."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_checkpoint_file(checkpoint_path: Path) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint_path`` is an existing file."""
    if not checkpoint_path.exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint_path}")
    if not checkpoint_path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_path} is a folder; give the checkpoint file inside it")


@dataclass
class StageResult:
    """What happened to one stage in a run (one entry of the run record's ``stages``).

    ``state`` is one of done | cached | failed | skipped | rejected (DESIGN.md contract).
    """

    name: str
    uses: str
    state: str
    seconds: float = 0.0
    key: str | None = None
    artifact: str | None = None
    metrics: dict[str, Any] | None = None
    reason: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The run-record form (DESIGN.md contract)."""
        return dict(self.__dict__)


class RunSession:
    """Executes the stages of one plan against one store, recording every outcome."""

    def __init__(self, plan: Plan, store: ArtifactStore, checkpoint_path: Path, run_id: str | None = None):
        self.plan = plan
        self.store = store
        self.checkpoint_path = Path(checkpoint_path)
        self.run_id = run_id or new_run_id()
        self.results: dict[str, StageResult] = {}
        self.artifacts: dict[str, Artifact] = {}
        self._lock = threading.RLock()
        self._data: DataBundle | None = None
        self._data_lock = threading.Lock()
        self.checkpoint_sha256 = self._checkpoint_digest()
        self.model_identity = {
            "factory": plan.recipe.model.factory,
            "kwargs": plan.recipe.model.kwargs,
            "input_shape": plan.recipe.model.input_shape,
            "source_sha256": module_source_digest(plan.recipe.model.factory),
        }
        self.versions = library_versions()
        self.record: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": {"name": plan.recipe.name, "path": str(plan.path), "digest": plan.digest},
            "checkpoint": {"path": str(self.checkpoint_path), "sha256": self.checkpoint_sha256},
            "baseline": plan.baseline,
            "dag": {name: plan.needs_of(name) for name in plan.order},
            "store": str(store.root),
            "state": "running",
            "started_at": utc_now(),
            "finished_at": None,
            "seconds": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "message": None,
            "stages": [],
        }
        self._started = time.perf_counter()

    def _checkpoint_digest(self) -> str:
        check_checkpoint_file(self.checkpoint_path)
        return sha256_file(self.checkpoint_path)

    def start(self) -> None:
        """Check the store is writable and write the run record as ``running``."""
        self.store.ensure_writable()
        self._save()

    def data(self) -> DataBundle:
        """The recipe's data, built once and shared by every stage of the run."""
        with self._data_lock:
            if self._data is None:
                data = build_data(self.plan.recipe.data, self.plan.recipe.model.input_shape)
                check_input_shape(data, self.plan.recipe.model.input_shape)
                self._data = data
            return self._data

    def cache_payload(self, name: str) -> dict[str, Any]:
        """Everything that determines stage ``name``'s output; its sha256 is the cache key."""
        spec = self.plan.recipe.stages[name]
        module = load_stage(spec.uses)
        payload: dict[str, Any] = {
            "uses": spec.uses,
            "stage_version": module.version,
            "stage_source_sha256": sha256_text(inspect.getsource(module)),
            "params": self.plan.params[name].model_dump(mode="json"),
            "inputs": [self.artifacts[upstream].digest for upstream in self.available_inputs(name)],
            "model": self.model_identity,
            "data": data_identity(self.plan.recipe.data),
            "versions": self.versions,
        }
        factories = factory_references(payload["params"])
        if factories:  # a user's module named in params (a distillation student): edits to it rebuild the stage
            payload["factory_sources"] = {reference: module_source_digest(reference) for _, reference in factories}
        if module.inputs == "none":
            payload["checkpoint_sha256"] = self.checkpoint_sha256
        if self.plan.uses_baseline(name):
            payload["baseline"] = self.artifacts[self.plan.baseline].digest
        return payload

    def available_inputs(self, name: str) -> list[str]:
        """The upstream stages of ``name`` that produced an artifact (skipped ones are left out)."""
        return [upstream for upstream in self.plan.needs_of(name) if upstream in self.artifacts]

    def _unavailable_reason(self, name: str) -> str | None:
        """Why ``name`` must be skipped: an input it cannot do without was skipped (None when it can run)."""
        skipped = [upstream for upstream in self.plan.needs_of(name) if upstream not in self.artifacts]
        if not skipped:
            return None
        if load_stage(self.plan.recipe.stages[name].uses).inputs == "many" and self.available_inputs(name):
            return None
        return self.results[skipped[0]].reason

    def handle_of(self, artifact: Artifact) -> ModelHandle:
        """The model handle of a stored artifact, after re-checking its file digests."""
        self.store.verify(artifact)
        manifest = artifact.manifest
        return handle_from_record(artifact.path, manifest["model"], manifest["kind"], manifest.get("handle", {}))

    def execute(self, name: str) -> StageResult:
        """Run stage ``name`` (its inputs must have finished), or reuse its cached artifact."""
        spec = self.plan.recipe.stages[name]
        module = load_stage(spec.uses)
        unavailable_reason = self._unavailable_reason(name)
        if unavailable_reason is not None:
            return self.skip(name, unavailable_reason)
        inputs_used = self.available_inputs(name)
        payload = self.cache_payload(name)
        key = self.store.cache_key(payload)
        cached = self.store.find(key)
        if cached is not None:
            result = StageResult(name, spec.uses, "cached", 0.0, key, str(cached.path), cached.manifest["metrics"])
            return self._finish_stage(result, cached)
        workdir = self.store.new_workdir(name)
        started = time.perf_counter()
        try:
            context = StageContext(
                name=name,
                workdir=workdir,
                recipe=self.plan.recipe,
                checkpoint_path=self.checkpoint_path,
                load_data=lambda: self.data().for_stage(),
                input_names=inputs_used,
                baseline=self.handle_of(self.artifacts[self.plan.baseline]) if self.plan.uses_baseline(name) else None,
                baseline_name=self.plan.baseline,
            )
            inputs = [self.handle_of(self.artifacts[upstream]) for upstream in inputs_used]
            with PeakRSS() as memory:
                output: StageOutput = module.run(context, inputs, self.plan.params[name])
            seconds = time.perf_counter() - started
            artifact = self.store.publish(key, workdir, self._model_file(output, workdir), {
                "stage": name,
                "uses": spec.uses,
                "kind": output.product.kind,
                "handle": output.product.meta,
                "params": self.plan.params[name].model_dump(mode="json"),
                "inputs": [self.artifacts[upstream].key for upstream in inputs_used],
                "metrics": output.metrics,
                "seconds": round(seconds, 4),
                "peak_rss_bytes": memory.peak_bytes,
                "versions": self.versions,
                "cache_payload": payload,
                "run_id": self.run_id,
                "created_at": utc_now(),
            })
        except StageUnavailable as unavailable:
            self.store.discard(workdir)
            return self.skip(name, str(unavailable))
        except BaseException as error:
            self.store.discard(workdir)
            failure = error if isinstance(error, OptipipeError) else self._explain(name, spec.uses, error)
            self._finish_stage(StageResult(name, spec.uses, "failed", round(time.perf_counter() - started, 4), key, reason=str(failure)))
            if failure is error:
                raise
            raise failure from error
        result = StageResult(name, spec.uses, "done", round(seconds, 4), key, str(artifact.path), output.metrics)
        return self._finish_stage(result, artifact)

    def _explain(self, name: str, uses: str, error: BaseException) -> StageError:
        """One line for an unexpected exception inside a stage, with the fix where one is known."""
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return StageError(
                f"stage '{name}' ({uses}): no space left on the device holding the store {self.store.root}; "
                "free some space (optipipe gc) or pass --store on a larger disk"
            )
        return StageError(f"stage '{name}' ({uses}) failed: {type(error).__name__}: {error}")

    @staticmethod
    def _model_file(output: StageOutput, workdir: Path) -> str:
        if output.product.path.parent != workdir:
            raise StageError(f"stage wrote its product outside its work folder: {output.product.path}")
        return output.product.path.name

    def _finish_stage(self, result: StageResult, artifact: Artifact | None = None) -> StageResult:
        with self._lock:
            self.results[result.name] = result
            if artifact is not None:
                self.artifacts[result.name] = artifact
            for variant, reason in (result.metrics or {}).get("rejected", {}).items():
                if variant in self.results:
                    self.results[variant].state = "rejected"
                    self.results[variant].reason = reason
            self._save()
        return result

    def skip(self, name: str, reason: str) -> StageResult:
        """Record that stage ``name`` did not run, and why (its hardware is missing, an upstream stage failed)."""
        spec = self.plan.recipe.stages[name]
        return self._finish_stage(StageResult(name, spec.uses, "skipped", reason=reason))

    def finish(self) -> dict[str, Any]:
        """Close the run record: ``succeeded`` when every stage is done or cached, else ``failed`` with the reasons."""
        with self._lock:
            problems = [
                f"{result.name}: {result.reason}"
                for result in self.results.values()
                if result.state in ("failed", "rejected")
            ]
            self.record["state"] = "failed" if problems or len(self.results) < len(self.plan.order) else "succeeded"
            self.record["message"] = "; ".join(problems) or None
            self.record["finished_at"] = utc_now()
            self.record["seconds"] = round(time.perf_counter() - self._started, 3)
            self._save()
            return self.record

    def _save(self) -> None:
        self.record["stages"] = [self.results[name].as_record() for name in self.plan.order if name in self.results]
        self.store.write_run(self.record)
