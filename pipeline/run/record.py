"""The run record of one run: created when the run starts, updated as each stage ends, closed at the end.

Only the process that drives a run (``run_plan``) writes its record; stages return their results to it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from pipeline.recipe.plan import Plan
from pipeline.records.models import CheckpointRef, RecipeRef, RunRecord, RunState, StageResult
from pipeline.records.reports import ValidationReport
from pipeline.records.store import ArtifactStore
from pipeline.records.variants import stage_report
from pipeline.run.executor import utc_now


def new_run_id() -> str:
    """Sortable, unique run id: ``YYYYMMDD-HHMMSS-<6 hex>``."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class RunRecorder:
    """Keeps ``<store>/runs/<run_id>.json`` current: every stage result as it arrives, the run's final state."""

    def __init__(self, plan: Plan, store: ArtifactStore, checkpoint_path: str, checkpoint_sha256: str, run_id: str,
                 runner: str | None = None):
        self.plan = plan
        self.store = store
        self.results: dict[str, StageResult] = {}
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self.record = RunRecord(
            run_id=run_id,
            recipe=RecipeRef(name=plan.recipe.name, path=str(plan.path), digest=plan.digest),
            checkpoint=CheckpointRef(path=checkpoint_path, sha256=checkpoint_sha256),
            baseline=plan.baseline,
            dag={name: plan.needs_of(name) for name in plan.order},
            store=store.location, runner=runner, state="running", started_at=utc_now(), host=socket.gethostname(), pid=os.getpid(),
        )

    def start(self) -> None:
        """Check the store is writable and write the record as ``running``."""
        self.store.ensure_writable()
        self._save()

    def add(self, result: StageResult) -> None:
        """Record one stage's result; a validate report's rejections mark those variants ``rejected``."""
        with self._lock:
            self.results[result.name] = result
            report = stage_report(self.record.run_id, result)
            for variant, reason in (report.rejected if isinstance(report, ValidationReport) else {}).items():
                if variant in self.results:
                    self.results[variant] = self.results[variant].model_copy(update={"state": "rejected", "reason": reason})
            self._save()

    def finish(self, state: RunState | None = None, message: str | None = None) -> dict[str, Any]:
        """Close the record: ``succeeded`` when no stage failed or was rejected and all ran, else ``failed``."""
        with self._lock:
            problems = [f"{result.name}: {result.reason}" for result in self.results.values() if result.state in ("failed", "rejected")]
            if state is None:
                state = "failed" if problems or len(self.results) < len(self.plan.order) else "succeeded"
            self.record.state = state
            self.record.message = message or "; ".join(problems) or None
            self.record.finished_at = utc_now()
            self.record.seconds = round(time.perf_counter() - self._started, 3)
            self._save()
            return self.record.model_dump(mode="json")

    def _save(self) -> None:
        self.record.stages = [self.results[name] for name in self.plan.order if name in self.results]
        self.store.write_run(self.record.model_dump(mode="json"))
