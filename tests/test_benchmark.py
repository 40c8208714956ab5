"""The benchmark stage: figures per batch size, ratios to the baseline timed in the same run, and it runs alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.recipe import load_recipe
from pipeline.run.contract import StageContext
from pipeline.torchkit import timing
from pipeline.torchkit.data import build_data
from pipeline.torchkit.handles import save_torch_module
from pipeline.torchkit.model_io import ModelIO
from pipeline.zoo import digits_cnn
from stages import benchmark
from tests.conftest import REPO_ROOT, one_stage_recipe

RECIPE = one_stage_recipe()


def test_benchmark_times_each_batch_size_against_the_baseline(tmp_path):
    data = build_data(RECIPE.data, ModelIO.of(RECIPE.model))
    handles = []
    for name, width in (("baseline", 32), ("narrow", 8)):
        (tmp_path / name).mkdir()
        handles.append(save_torch_module(digits_cnn(width=width).eval(), tmp_path / name))
    (tmp_path / "work").mkdir()
    context = StageContext(
        name="bench", workdir=tmp_path / "work", recipe=RECIPE, checkpoint_path=None, load_data=lambda: data,
        baseline=handles[0], baseline_name="load",
    )
    output = benchmark.run(context, {"narrow": handles[1]}, benchmark.Params(batch_sizes=[1, 4], warmup=1, iterations=5, min_seconds=0.05))
    metrics = output.metrics
    assert metrics["baseline"]["speedup_vs_baseline"] == {"1": 1.0, "4": 1.0}
    narrow = metrics["variants"]["narrow"]
    assert set(narrow["batches"]) == {"1", "4"}
    for figures in narrow["batches"].values():
        assert figures["runs"] >= 5 and figures["timed_seconds"] >= 0.05
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] and figures["throughput_per_s"] > 0
    expected = metrics["baseline"]["batches"]["4"]["p50_ms"] / narrow["batches"]["4"]["p50_ms"]
    assert narrow["speedup_vs_baseline"]["4"] == pytest.approx(expected)
    assert narrow["size_ratio_vs_baseline"] < 0.2 and narrow["peak_rss_bytes"] > 0
    assert metrics["input_shapes"] == {"1": {"input": [1, 1, 8, 8]}, "4": {"input": [4, 1, 8, 8]}}
    assert output.product.path.is_file()


def test_batch_sizes_must_be_positive():
    with pytest.raises(ValidationError, match="at least 1"):
        benchmark.Params(batch_sizes=[0])


def test_benchmark_waits_for_every_other_stage():
    plan = load_recipe(REPO_ROOT / "recipes" / "demo.yaml")
    assert set(plan.waits_for("bench")) == set(plan.order) - {"bench"}
    assert "bench" not in plan.waits_for("check")


class RecordingRunner:
    """Stands in for a model's runner and logs which model each call went to."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def predict(self, feeds):
        self.calls.append(self.name)
        return feeds["input"]


def test_rounds_interleave_the_baseline_and_every_variant(monkeypatch, tmp_path):
    calls: list[str] = []
    monkeypatch.setattr(timing, "runner_for", lambda handle, model_io: RecordingRunner(handle.path.parent.name, calls))
    handles = {}
    for name in ("baseline", "a", "b"):
        (tmp_path / name).mkdir()
        handles[name] = save_torch_module(digits_cnn(width=4), tmp_path / name)
    (tmp_path / "work").mkdir()
    data = build_data(RECIPE.data, ModelIO.of(RECIPE.model))
    context = StageContext(
        name="bench", workdir=tmp_path / "work", recipe=RECIPE, checkpoint_path=None, load_data=lambda: data,
        baseline=handles["baseline"], baseline_name="load",
    )
    params = benchmark.Params(batch_sizes=[2], warmup=0, iterations=6, min_seconds=0, rounds=3)
    metrics = benchmark.run(context, {"a": handles["a"], "b": handles["b"]}, params).metrics
    # one load call each, then 3 rounds of (one untimed + 2 timed calls) per model, in turn
    assert calls[:3] == ["baseline", "a", "b"]
    turns = [name for index, name in enumerate(calls[3:]) if index % 3 == 0]
    assert turns == ["baseline", "a", "b"] * 3
    assert metrics["rounds"] == 3 and metrics["variants"]["b"]["batches"]["2"]["runs"] == 6
    assert metrics["baseline"]["batches"]["2"]["runs"] == 6
