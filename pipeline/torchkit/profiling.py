"""Where a model's time goes: operator times per call and a Chrome trace, from torch's and onnxruntime's profilers.

Runners call these from their ``profile(feeds, trace_path)`` (``pipeline.torchkit.runners``): each returns
operator type -> milliseconds per call, summed over the ops of that type, and leaves a Chrome-trace JSON file at
``trace_path`` (open it in chrome://tracing or https://ui.perfetto.dev). The first call is never counted: it is
run before profiling starts (torch), or dropped from the figures (onnxruntime, whose profiler records a
session from its start).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from torch.profiler import ProfilerActivity, profile

PROFILED_CALLS = 5  # calls each profile averages over
TOP_OPERATORS = 10  # operator types a report keeps; the rest are summed as OTHER
OTHER = "other"
KERNEL_SUFFIX = "_kernel_time"  # onnxruntime's node event for the time a node's kernel ran


def top_operators(ms_per_call: dict[str, float], top: int = TOP_OPERATORS) -> dict[str, float]:
    """The ``top`` costliest operator types, costliest first, and the others summed as ``OTHER`` (when there are any)."""
    ranked = sorted(ms_per_call.items(), key=lambda item: -item[1])
    kept = dict(ranked[:top])
    rest = sum(ms for _, ms in ranked[top:])
    return kept | {OTHER: rest} if len(ranked) > top else kept


@contextlib.contextmanager
def native_stderr_discarded() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: torch's profiler (kineto) writes a ``USDT: ... profiler_start``
    line to the C stderr at every start and stop, which no setting turns off. The descriptor is process-wide, so this
    is only for the benchmark, which runs alone (``runs_alone``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_profile(call: Callable[[], Any], trace_path: Path, cuda: bool = False, calls: int = PROFILED_CALLS) -> dict[str, float]:
    """Milliseconds per call of each op the model called (the outermost ops, e.g. ``aten::conv2d``, ``quantized::linear``,
    each with the time of the ops inside it, so the types add up to the call), over ``calls`` profiled calls after one
    unprofiled one; the trace goes to ``trace_path``. On CUDA the trace shows the kernels too, the figures stay host-side."""
    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with native_stderr_discarded(), profile(activities=activities) as profiler:
        for _ in range(calls):
            call()
    profiler.export_chrome_trace(str(trace_path))
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.cpu_parent is None:
            totals[event.name] += event.cpu_time_total
    return {name: microseconds / 1e3 / calls for name, microseconds in totals.items()}


def onnx_profile(session: Any, feeds: dict[str, Any], trace_path: Path, calls: int = PROFILED_CALLS) -> dict[str, float]:
    """Milliseconds per call of each node op type (``Conv``, ``QLinearConv``, ``MatMul``, ...) of an onnxruntime session
    made with ``enable_profiling``, over ``calls`` calls after a first one that is run but not counted; ends the
    session's profiling and moves its trace to ``trace_path``."""
    for _ in range(calls + 1):
        session.run(None, feeds)
    shutil.move(session.end_profiling(), trace_path)
    return onnx_op_times(json.loads(trace_path.read_text(encoding="utf-8")), calls)


def onnx_op_times(events: list[dict[str, Any]], calls: int) -> dict[str, float]:
    """Milliseconds per call of each op type in an onnxruntime trace, counting only the node kernels that ran after
    the first ``model_run`` ended (the first call plans memory and is slower)."""
    runs = sorted(event["ts"] + event["dur"] for event in events if event.get("cat") == "Session" and event.get("name") == "model_run")
    first_ended = runs[0] if runs else float("-inf")
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith(KERNEL_SUFFIX) and event["ts"] >= first_ended:
            totals[event.get("args", {}).get("op_name", "unknown")] += event["dur"]
    return {name: microseconds / 1e3 / calls for name, microseconds in totals.items()}

