"""Where the time goes and how far to trust it: the benchmark's per-model profiles and Chrome traces, the report's
profile section and its trace links, the "slower than the model it was made from" flag, the rounds' spread and the
loaded-machine warning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pipeline.records.reports import BatchTiming, ModelValidation, ValidationReport, VariantValidation
from pipeline.review.page import html_report, markdown_summary
from pipeline.review.tables import stages_table, variant_rows, variants_table
from pipeline.run.contract import StageContext
from pipeline.torchkit.data import build_data
from pipeline.torchkit.handles import save_torch_module
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.timing import round_spread
from pipeline.zoo import digits_cnn
from stages import benchmark, export_onnx
from tests.conftest import one_stage_recipe

RECIPE = one_stage_recipe()
ONNX_BRANCH = "onnx[opset=18]"  # a bracketed branch name: its trace file name must be made safe
TINY_TIMING = {"batch_sizes": [1], "warmup": 1, "iterations": 3, "min_seconds": 0.0, "rounds": 3}


class Repeated(torch.nn.Module):
    """A model made deliberately slower: the same forward run ``times`` times, the last output returned."""

    def __init__(self, inner: torch.nn.Module, times: int):
        super().__init__()
        self.inner, self.times = inner, times

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.times):
            output = self.inner(image)
        return output


def context(workdir: Path, data, baseline) -> StageContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return StageContext(name="bench", workdir=workdir, recipe=RECIPE, checkpoint_path=None, load_data=lambda: data,
                        baseline=baseline, baseline_name="load")


def saved(model: torch.nn.Module, folder: Path):
    folder.mkdir(parents=True)
    return save_torch_module(model.eval(), folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A hand-built run record around a real benchmark stage: load (the baseline) -> slow (20 forwards) -> fast (one
    forward, made from slow), and load -> the ONNX export; the benchmark's artifact folder is its work folder."""
    store = tmp_path_factory.mktemp("profile-store")
    data = build_data(RECIPE.data, ModelIO.of(RECIPE.model))
    model = digits_cnn(width=16).eval()
    handles = {"load": saved(model, store / "in" / "load"), "slow": saved(Repeated(model, 20), store / "in" / "slow"),
               "fast": saved(model, store / "in" / "fast")}
    exported = export_onnx.run(context(store / "in" / "onnx", data, handles["load"]), {"input": handles["load"]}, export_onnx.Params())
    handles[ONNX_BRANCH] = exported.product
    folder = store / "artifacts" / "k-bench"
    variants = {name: handle for name, handle in handles.items() if name != "load"}
    output = benchmark.run(context(folder, data, handles["load"]), variants, benchmark.Params(**TINY_TIMING))
    dag = {"load": [], "slow": ["load"], "fast": ["slow"], ONNX_BRANCH: ["load"], "check": list(variants), "bench": list(variants)}
    validation = ValidationReport(baseline_stage="load", baseline=validated(handles["load"]),
                                  variants={name: VariantValidation(**validated(handle).model_dump(), status="accepted")
                                            for name, handle in variants.items()}, rejected={})
    stages = [stage_entry(store, name, "x") for name in handles]
    stages += [stage_entry(store, "check", "validate", validation.model_dump(mode="json")),
               stage_entry(store, "bench", "benchmark", output.metrics)]
    record = {"run_id": "r1", "recipe": {"name": "profiled", "path": "p.yaml", "digest": "d"},
              "checkpoint": {"path": "m.pt", "sha256": "s" * 64},
              "state": "succeeded", "started_at": "2026-01-01T00:00:00+00:00", "seconds": 1.0, "baseline": "load", "dag": dag,
              "stages": stages, "store": str(store)}
    return json.loads(json.dumps(record)), folder, store


def validated(handle) -> ModelValidation:
    """Made-up validation figures: the flags under test come from the benchmark, not from these."""
    return ModelValidation(metric="top1", higher_is_better=True, value=0.9, delta=0.0, figures={"top1": 0.9}, figure_deltas={"top1": 0.0},
                           top1=0.9, delta_top1=0.0, agreement=1.0, max_abs_logit_diff=0.0, mean_abs_logit_diff=0.0, samples=10,
                           kind=handle.kind, size_bytes=handle.size_bytes)


def stage_entry(store: Path, name: str, uses: str, metrics: dict | None = None) -> dict:
    folder = store / "artifacts" / ("k-bench" if uses == "benchmark" else f"k-{name}")
    folder.mkdir(parents=True, exist_ok=True)
    return {"name": name, "uses": uses, "state": "done", "seconds": 0.1, "key": folder.name, "artifact": str(folder), "metrics": metrics,
            "reason": None}


def bench_metrics(record: dict) -> dict:
    return next(stage["metrics"] for stage in record["stages"] if stage["uses"] == "benchmark")


def test_every_model_gets_a_chrome_trace_and_its_top_operators(run):
    record, folder, _ = run
    metrics = bench_metrics(record)
    assert metrics["profile_batch"] == 1
    entries = {"load": metrics["baseline"], **metrics["variants"]}
    assert entries[ONNX_BRANCH]["trace_file"] == "trace-onnx_opset_18.json" and entries["load"]["trace_file"] == "trace-load.json"
    for name, entry in entries.items():
        trace = json.loads((folder / entry["trace_file"]).read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        assert isinstance(events, list) and any(event.get("ph") == "X" for event in events), name
        assert 0 < len(entry["top_operators"]) <= 11 and all(ms >= 0 for ms in entry["top_operators"].values())
    assert "aten::conv2d" in entries["load"]["top_operators"]
    assert "Conv" in entries[ONNX_BRANCH]["top_operators"]
    # the slow model calls the same convolutions 20 times as often: count them in the traces (times vary with load)
    def conv_calls(name: str) -> int:
        trace = json.loads((folder / entries[name]["trace_file"]).read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        return sum(1 for event in events if event.get("ph") == "X" and event.get("name") == "aten::conv2d")

    assert conv_calls("fast") > 0 and conv_calls("slow") == 20 * conv_calls("fast")


def test_traces_are_files_the_store_publishes(run):
    _, folder, _ = run
    assert not [path for path in folder.iterdir() if path.is_dir()], "the store publishes only a work folder's top-level files"
    assert not list(folder.glob("*.ort*")), "onnxruntime's own profile file was moved, not left beside the trace"


def test_page_shows_the_operator_bars_and_links_that_resolve(run):
    record, _, store = run
    page = html_report(record)
    section = page[page.index("bench: where the time goes at batch 1"):]
    assert '<svg id="plot-operators-bench"' in section and "ui.perfetto.dev" in section and "chrome://tracing" in section
    hrefs = re.findall(r'href="([^"]*trace-[^"]*\.json)"', section)
    assert len(hrefs) == 4
    for href in hrefs:
        assert (store / "reports" / href).resolve().is_file(), href


def test_a_variant_slower_than_its_source_is_flagged_and_a_faster_one_is_not(run):
    record, _, _ = run
    rows = {row["variant"]: row for row in variant_rows(record)}
    assert re.fullmatch(r"slower than load \(0\.\d\d×\)", rows["slow"]["slower_than"])
    assert rows["fast"]["slower_than"] is None, "fast was made from slow and is faster than it"
    console = Console(record=True, width=250)
    console.print(variants_table(record))
    assert "accepted · slower than load" in console.export_text()
    page = html_report(record)
    assert page.count("slower than load (") == 2, "the variants table and the profile section"
    assert "slower than load" in markdown_summary(record)


def test_spread_of_round_medians_is_recorded(run):
    record, _, _ = run
    for entry in [bench_metrics(record)["baseline"], *bench_metrics(record)["variants"].values()]:
        timing = entry["batches"]["1"]
        assert len(timing["round_medians_ms"]) == 3
        assert timing["round_p5_ms"] == min(timing["round_medians_ms"]) and timing["round_p95_ms"] == max(timing["round_medians_ms"])
        assert timing["spread"] == pytest.approx((timing["round_p95_ms"] - timing["round_p5_ms"]) / timing["p50_ms"])
    assert "round spread" in html_report(record)


def test_spread_uses_percentiles_from_five_rounds():
    assert round_spread([1.0, 2.0, 4.0], 2.0) == (1.0, 4.0, 1.5)
    low, high, spread = round_spread([float(value) for value in range(1, 21)], 10.0)
    assert low == pytest.approx(1.95) and high == pytest.approx(19.05) and spread == pytest.approx(1.71)


def test_a_loaded_machine_and_noisy_rounds_are_warned_about(monkeypatch, tmp_path, run):
    record, _, _ = run
    monkeypatch.setattr(benchmark, "load_average", lambda: [10_000.0, 10_000.0, 10_000.0])
    data = build_data(RECIPE.data, ModelIO.of(RECIPE.model))
    baseline = saved(digits_cnn(width=4), tmp_path / "load")
    metrics = benchmark.run(context(tmp_path / "work", data, baseline), {"narrow": saved(digits_cnn(width=4), tmp_path / "narrow")},
                            benchmark.Params(**TINY_TIMING, profile=False)).metrics
    assert metrics["load_average_before"] == [10_000.0] * 3 and metrics["cpu_count"] >= 1
    assert metrics["profile_batch"] is None and metrics["variants"]["narrow"]["trace_file"] is None
    assert len(metrics["warnings"]) >= 1 and metrics["warnings"][0].startswith("the machine was loaded: 1-minute load average 10000.00")
    loaded = json.loads(json.dumps(record))
    next(stage for stage in loaded["stages"] if stage["uses"] == "benchmark")["metrics"]["warnings"] = metrics["warnings"]
    console = Console(record=True, width=250)
    console.print(stages_table(loaded))
    assert "warning: the machine was loaded" in console.export_text()
    assert "<li>warning: bench: the machine was loaded" in html_report(loaded)
    assert "**Warning:** bench: the machine was loaded" in markdown_summary(loaded)


def test_noisy_rounds_and_quiet_ones():
    noisy = BatchTiming(runs=9, timed_seconds=0.1, p50_ms=2.0, p95_ms=3.0, throughput_per_s=500.0, round_medians_ms=[1.5, 2.0, 2.5],
                        round_p5_ms=1.5, round_p95_ms=2.5, spread=0.5)
    quiet = noisy.model_copy(update={"spread": 0.1})
    warnings = benchmark.timing_warnings([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 2, {"a": "int8", "b": "fused"},
                                         {"a": {"1": noisy}, "b": {"1": quiet}})
    assert warnings == ["int8 at batch 1: the rounds' medians spread 50% of the median (1.500-2.500 ms over 3 rounds); "
                        "rerun on a quieter machine or with more rounds"]


def test_trace_names_are_safe_and_distinct_and_other_runtimes_say_why_there_is_none(tmp_path):
    names = benchmark.trace_files({"<baseline>": "load", "a": "int8[amount=0.5]", "b": "int8/amount 0.5", "c": "load"})
    assert names == {"<baseline>": "trace-load.json", "a": "trace-int8_amount_0.5.json", "b": "trace-int8_amount_0.5-2.json",
                     "c": "trace-load-2.json"}

    class NoProfile:
        def predict(self, feeds):
            return feeds

    assert benchmark.profile_model(NoProfile(), {}, tmp_path / "trace.json") == {"profile_note": "no profile for this runtime"}
