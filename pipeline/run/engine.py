"""``run_plan``: the rules of a run, in one place, for the Prefect flow, the tests and the benchmarks alike.

A stage starts once every stage it waits for has ended. It is skipped, with the reason, when a stage it
needs failed (or was itself skipped for that), or when an input it cannot do without was skipped
because its hardware is missing; a stage taking many inputs (validate, benchmark) goes on with those
that exist. ``runs_alone`` stages wait for every other stage, but only to keep timings clean: a failure
elsewhere does not skip them. A recipe's ``search`` bounds the matrix trials started (``SearchBudget``): once
``max_trials`` have started or ``max_minutes`` have passed, the stages of trials not yet started are skipped
with the reason, and many-input stages go on with the branches that finished.
Where stages run is the caller's choice: ``submit`` hands a plain
``StageCall`` to a thread, a Prefect task or another process, and returns something with ``.result()``.
"""

from __future__ import annotations

import queue
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import CheckpointError, StoreError, one_line
from pipeline.hf import check_pretrained_folder
from pipeline.recipe.matrix import format_label
from pipeline.recipe.plan import Plan
from pipeline.records.models import StageResult
from pipeline.records.store import ArtifactStore, open_store
from pipeline.run.cancel import Cancelled, raise_if_cancelled
from pipeline.run.checkpoint_snapshot import not_a_regular_file, snapshot_checkpoint
from pipeline.run.executor import StageCall, execute, log_internal_error
from pipeline.run.record import RunRecorder, new_run_id
from pipeline.run.registry import declaration

CANCELLED_MESSAGE = "interrupted (Ctrl-C); finished stages are kept and a re-run resumes from the cache"


class Pending(Protocol):
    """A submitted stage: ``result()`` blocks until it ends and returns its StageResult."""

    def result(self) -> StageResult: ...


Submit = Callable[[StageCall], Pending]


def check_checkpoint_file(checkpoint_path: Path) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint_path`` is an existing regular file, or a save_pretrained folder
    holding config.json and weights (never opens a file: a FIFO would block)."""
    try:
        mode = checkpoint_path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {checkpoint_path}") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {checkpoint_path} cannot be read: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        check_pretrained_folder(checkpoint_path)
    elif not stat.S_ISREG(mode):
        raise not_a_regular_file(checkpoint_path, mode)


def in_threads(max_workers: int = 1) -> tuple[Submit, Callable[[], None]]:
    """A submit function running stages in a local thread pool (1 worker: one after another), and its closer."""
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="stage")
    return (lambda call: pool.submit(execute, call)), lambda: pool.shutdown(wait=False, cancel_futures=True)


class SearchBudget:
    """Which trials of the plan (``Plan.trials``: combinations of matrix labels) have started, and whether the
    recipe's ``search`` limits let another start; ``clock`` gives seconds (a test's fake clock)."""

    def __init__(self, plan: Plan, clock: Callable[[], float] = time.monotonic):
        self.plan = plan
        self.clock = clock
        self.began = clock()
        self.started: list[tuple] = []

    def exhausted(self) -> str | None:
        """Why no further trial may start (None: one may)."""
        limits = self.plan.recipe.search
        if limits is None:
            return None
        if limits.max_trials is not None and len(self.started) >= limits.max_trials:
            return f"search budget: max_trials {limits.max_trials} reached"
        if limits.max_minutes is not None and self.clock() - self.began >= limits.max_minutes * 60:
            return f"search budget: max_minutes {limits.max_minutes:g} passed"
        return None

    def admit(self, name: str) -> str | None:
        """Let stage ``name`` start, starting its first trial when none of its trials has started; or say why not."""
        trials = self.plan.trials_of(name)
        if not trials or any(trial in self.started for trial in trials):
            return None
        reason = self.exhausted()
        if reason is None:
            self.started.append(trials[0])
        return reason

    def summary(self, results: dict[str, StageResult]) -> dict[str, Any]:
        """The run record's ``search`` entry: the limits, the trials tried and not, the stages skipped for the budget."""
        limits = self.plan.recipe.search
        tried = [format_label(trial) for trial in self.started]
        return {
            "max_trials": limits.max_trials if limits else None, "max_minutes": limits.max_minutes if limits else None,
            "trials": len(self.plan.trials()), "tried": tried,
            "not_tried": [format_label(trial) for trial in self.plan.trials() if format_label(trial) not in tried],
            "skipped_for_budget": [name for name, result in results.items() if (result.reason or "").startswith("search budget:")],
        }


class PlanRun:
    """The state of one run of a plan while ``run_plan`` drives it."""

    def __init__(self, plan: Plan, recorder: RunRecorder):
        self.plan = plan
        self.recorder = recorder
        self.budget = SearchBudget(plan)
        self.keys: dict[str, str] = {}  # stage -> artifact key, for stages that produced one
        self.blocked: set[str] = set()  # stages that failed, or were skipped because something they need failed

    def ended(self, name: str) -> bool:
        """Whether stage ``name`` has a result."""
        return name in self.recorder.results

    def skip_reason(self, name: str) -> str | None:
        """Why stage ``name`` cannot run now that its upstream stages have ended (None: it can run)."""
        needed = list(self.plan.needs_of(name))
        if self.plan.uses_baseline(name):
            needed.append(self.plan.baseline)
        failed = [upstream for upstream in needed if upstream in self.blocked]
        if failed:
            return f"not run: upstream stage '{failed[0]}' did not finish"
        missing = [upstream for upstream in self.plan.needs_of(name) if upstream not in self.keys]
        if self.plan.uses_baseline(name) and self.plan.baseline not in self.keys:
            return self.recorder.results[self.plan.baseline].reason
        many = declaration(self.plan.uses_of(name)).inputs == "many"
        if missing and not (many and len(missing) < len(self.plan.needs_of(name))):
            return self.recorder.results[missing[0]].reason
        return self.budget.admit(name)

    def call(self, name: str, template: StageCall) -> StageCall:
        """The plain arguments of running stage ``name``: its upstream artifact keys and the baseline's."""
        inputs = {upstream: self.keys[upstream] for upstream in self.plan.needs_of(name) if upstream in self.keys}
        baseline_key = self.keys[self.plan.baseline] if self.plan.uses_baseline(name) else None
        return StageCall(**{**template.as_dict(), "overrides": template.overrides, "stage": name,
                            "inputs": inputs, "baseline_key": baseline_key})

    def end(self, result: StageResult) -> None:
        """Record ``result`` and remember what it made, or that it failed."""
        if result.key and result.state in ("done", "cached"):
            self.keys[result.name] = result.key
        if result.state == "failed" or (result.state == "skipped" and (result.reason or "").startswith("not run:")):
            self.blocked.add(result.name)
        if self.plan.trials():
            self.recorder.record.search = self.budget.summary({**self.recorder.results, result.name: result})
        self.recorder.add(result)


def run_plan(plan: Plan, store: ArtifactStore, checkpoint_path: Path | str, *, overrides: list[str] | None = None,
             run_id: str | None = None, submit: Submit | None = None, runner: str | None = None) -> dict[str, Any]:
    """Run every stage of ``plan`` on the checkpoint, by the rules above; returns the closed run record.

    The checkpoint is read once, into the store's snapshot of it (``pipeline.run.checkpoint_snapshot``):
    stages load the snapshot, so the weights loaded are the bytes hashed into the keys, whatever happens
    to the user's file meanwhile; the run record names the user's path. Ctrl-C marks the run
    ``cancelled`` (its finished artifacts stay; a re-run resumes from the cache) and is raised again:
    a KeyboardInterrupt at once, or, under ``pipeline.run.cancel.interrupt_stops_runs``, ``Cancelled``
    once the running stages have stopped at their next step. ``runner`` names where ``submit`` runs the
    stages, for the run record only.
    """
    checkpoint_path = Path(checkpoint_path)
    check_checkpoint_file(checkpoint_path)
    run_id = run_id or new_run_id()
    try:
        snapshot_path, checkpoint_sha256 = snapshot_checkpoint(store, checkpoint_path)
        shared_snapshot = store.share_checkpoint(snapshot_path)
        recorder = RunRecorder(plan, store, str(checkpoint_path), checkpoint_sha256, run_id, runner)
        recorder.start()
    except OSError as error:  # a full disk or a store turned read-only before the run could start
        raise StoreError(
            f"store {store.location}: the run could not start ({error.strerror or error}); "
            "free some space (optipipe gc) or pass --store on a writable disk"
        ) from error
    template = StageCall(recipe_path=str(plan.path), overrides=tuple(overrides or ()), recipe_digest=plan.digest,
                         store_root=store.location, checkpoint_path=shared_snapshot,
                         checkpoint_sha256=checkpoint_sha256, run_id=run_id, stage="")
    closer = None
    if submit is None:
        submit, closer = in_threads()
    state = PlanRun(plan, recorder)
    try:
        drive(state, template, submit)
        raise_if_cancelled()
    except (KeyboardInterrupt, Cancelled):
        recorder.finish("cancelled", CANCELLED_MESSAGE)
        raise
    finally:
        if closer is not None:
            closer()
    return recorder.finish()


def lost_stage(call: StageCall, uses: str, error: Exception, how: str) -> StageResult:
    """The failed result of a stage the task runner could not take or lost, its traceback kept in the store."""
    store = open_store(call.store_root)
    log_path = store.keep_log(log_internal_error(store, call, error))
    return StageResult(name=call.stage, uses=uses, state="failed", error="internal", log=log_path,
                       reason=f"stage '{call.stage}' {how}: {one_line(error)}; traceback in {log_path}")


def wait_for_result(pending: Pending, call: StageCall, uses: str, ended: queue.Queue[StageResult]) -> None:
    """Put the stage's result on ``ended``; a task runner that lost the stage (a worker died) gives a failed
    result, not a hang."""
    try:
        result = pending.result()
    except Exception as error:  # the run goes on without the stage
        result = lost_stage(call, uses, error, "was lost by the task runner")
    ended.put(result)


def drive(state: PlanRun, template: StageCall, submit: Submit) -> None:
    """Start each stage as soon as what it waits for has ended, until every stage has a result."""
    plan = state.plan
    ended: queue.Queue[StageResult] = queue.Queue()
    started: set[str] = set()
    while not all(state.ended(name) for name in plan.order):
        for name in plan.order:
            if name in started or not all(state.ended(upstream) for upstream in plan.waits_for(name)):
                continue
            started.add(name)
            reason = state.skip_reason(name)
            if reason is not None:
                state.end(StageResult(name=name, uses=plan.uses_of(name), state="skipped", reason=reason))
                continue
            call = state.call(name, template)
            try:  # here, in the flow's thread: a task is submitted from its flow run's context
                pending = submit(call)
            except Exception as error:  # the task runner cannot take it (an unreachable scheduler): the run ends without it
                ended.put(lost_stage(call, plan.uses_of(name), error, "could not be handed to the task runner"))
                continue
            threading.Thread(target=wait_for_result, args=(pending, call, plan.uses_of(name), ended), daemon=True).start()
        if not all(state.ended(name) for name in plan.order) and len(started) > len(state.recorder.results):
            state.end(ended.get())
