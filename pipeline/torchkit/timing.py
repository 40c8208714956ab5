"""Interleaved timing of several models on the same batches, shared by the ``benchmark`` and ``select`` stages.

Each batch size is timed in ``rounds`` passes, and every pass times each model in turn. On a shared
machine whose speed drifts by 10-20% over a minute, drift then lands on every model alike instead of
on whichever happened to be timed while the machine was busy, so the ratios hold steadier than the
absolute figures. The price: every model stays loaded until timing ends.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from pipeline.progress import track
from pipeline.records.reports import BatchTiming
from pipeline.run.contract import StageParams
from pipeline.run.measure import PeakRSS
from pipeline.torchkit.handles import ModelHandle
from pipeline.torchkit.model_io import Feeds, ModelIO, cycled_rows
from pipeline.torchkit.runners import Runner, runner_for

# The key the baseline is timed under: not a valid stage name, so no input variant can take it.
BASELINE_KEY = "<baseline>"


class TimingParams(StageParams):
    """The timing knobs a stage that times models shares (``benchmark``, ``select``), with one set of defaults."""

    warmup: int = Field(default=10, ge=0, description="untimed runs before timing each batch size")
    iterations: int = Field(default=20, ge=3, description="fewest timed runs per batch size (median and p95 over them)")
    min_seconds: float = Field(
        default=1.0, ge=0, description="keep timing each batch size until this much time is spent too (steadies sub-ms models)"
    )
    rounds: int = Field(
        default=3, ge=1, description="interleaved timing passes over the baseline and every variant; "
        "iterations and min_seconds are shared out among them"
    )


def timed_calls(runner: Runner, batch: Feeds, calls: int, seconds: float) -> list[float]:
    """Seconds per call of ``calls`` or more timed calls, until ``seconds`` have passed too."""
    timings: list[float] = []
    while len(timings) < calls or sum(timings) < seconds:
        started = time.perf_counter()
        runner.predict(batch)
        timings.append(time.perf_counter() - started)
    return timings


ROUNDS_FOR_PERCENTILES = 5  # fewer rounds than this: the spread runs from the lowest to the highest round median


def round_spread(round_medians: list[float], median: float) -> tuple[float, float, float]:
    """The p5 and p95 of the per-round medians (min and max under ``ROUNDS_FOR_PERCENTILES`` rounds) and their
    distance apart as a share of the pooled ``median``."""
    if len(round_medians) < ROUNDS_FOR_PERCENTILES:
        low, high = min(round_medians), max(round_medians)
    else:
        low, high = (float(value) for value in np.percentile(round_medians, [5, 95]))
    return low, high, (high - low) / median


def summarize(rounds: list[list[float]], batch_size: int) -> BatchTiming:
    """Median and p95 latency (ms) and throughput (samples/s) of the timings of one batch size pooled over its
    rounds, and the spread of the rounds' own medians."""
    timings = [timing for round_timings in rounds for timing in round_timings]
    median = statistics.median(timings)
    round_medians = [statistics.median(round_timings) for round_timings in rounds]
    low, high, spread = round_spread(round_medians, median)
    return BatchTiming(
        runs=len(timings),
        timed_seconds=sum(timings),
        p50_ms=median * 1e3,
        p95_ms=float(np.percentile(timings, 95)) * 1e3,
        throughput_per_s=batch_size / median,
        round_medians_ms=[value * 1e3 for value in round_medians],
        round_p5_ms=low * 1e3,
        round_p95_ms=high * 1e3,
        spread=spread,
    )


def load_runner(handle: ModelHandle, model_io: ModelIO, largest_batch: Feeds) -> tuple[Runner, int]:
    """The model's runner and the process's peak memory while loading it and predicting the largest batch.

    The peak is process-wide: it also counts the data, earlier stages' leftovers and the models loaded
    before this one. Resident-memory growth per model was tried and is noise in one process (a 47 MB
    ResNet-18 showed 0 MiB, reusing memory freed earlier); a per-model figure needs a process per model.
    """
    with PeakRSS() as memory:
        runner = runner_for(handle, model_io)
        runner.predict(largest_batch)
    return runner, memory.peak_bytes


def time_interleaved(runners: dict[str, Runner], eval_inputs: Feeds, batch_sizes: Sequence[int], knobs: TimingParams,
                     stage: str = "benchmark") -> dict[str, dict[str, BatchTiming]]:
    """Per model and batch size (as a string), timings pooled over ``knobs.rounds`` passes that each time every model in
    turn, with the spread of the passes' medians."""
    calls_per_round = -(-knobs.iterations // knobs.rounds)
    seconds_per_round = knobs.min_seconds / knobs.rounds
    figures: dict[str, dict[str, BatchTiming]] = {name: {} for name in runners}
    for size in batch_sizes:
        batch = cycled_rows(eval_inputs, size)
        rounds: dict[str, list[list[float]]] = {name: [] for name in runners}
        for runner in runners.values():
            for _ in range(knobs.warmup):
                runner.predict(batch)
        for _ in track(range(knobs.rounds), f"{stage} batch {size}"):
            for name, runner in runners.items():
                runner.predict(batch)  # one untimed call: the model timed before this one had the caches
                rounds[name].append(timed_calls(runner, batch, calls_per_round, seconds_per_round))
        for name, timed in rounds.items():
            figures[name][str(size)] = summarize(timed, size)
    return figures
