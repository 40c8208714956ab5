"""The review page's links, timings, budget line, labels and DAG; the nightly trend page; Prefect's view of a run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.demo import DEMO_RECIPE
from pipeline.records.store import ArtifactStore
from pipeline.records.variants import read_variants
from pipeline.review.dag import dag_columns
from pipeline.review.labels import place_labels
from pipeline.review.page import html_report
from pipeline.review.plots import latency_ticks
from pipeline.review.prefect_view import run_title, variant_table
from pipeline.review.trend import trend_report
from tests.conftest import run_without_prefect

BENCHMARK = ["bench.batch_sizes=[1,4]", "bench.min_seconds=0.1", "bench.iterations=5"]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("review-store")


@pytest.fixture(scope="module")
def record(demo_checkpoint, store_root) -> dict:
    made = run_without_prefect(DEMO_RECIPE, demo_checkpoint, store_root, BENCHMARK)
    assert made["state"] == "succeeded", made["message"]
    return ArtifactStore(store_root).read_run(made["run_id"])


def test_every_artifact_has_its_whole_key_and_links_that_resolve_from_reports(record, store_root):
    page = html_report(record)
    stages_table = page[page.index("<h2>Stages</h2>"):page.index("<h2>Variants against")]  # the profile section links traces too
    reports = store_root / "reports"
    for stage in record["stages"]:
        assert f'<code class="key">{stage["key"]}</code>' in stages_table
        hrefs = re.findall(rf'href="(\.\./artifacts/{stage["key"]}/[^"]*)"', stages_table)
        assert len(hrefs) == 3, f"{stage['name']}: folder, model file and manifest links, got {hrefs}"
        for href in hrefs:
            assert (reports / href).resolve().exists(), href


def test_timings_table_has_every_batch_size_p50_and_p95(record):
    page = html_report(record)
    timings = page[page.index('<table class="timings">'):]
    timings = timings[:timings.index("</table>")]
    for variant in read_variants(record):
        for batch, timing in variant.benchmark.batches.items():
            assert f"<td class=\"num\">{batch}</td><td class=\"num\">{timing.p50_ms:.3f}</td><td class=\"num\">{timing.p95_ms:.3f}</td>" in timings


def test_page_shows_stage_figures_versions_threads_and_budget_line(record):
    page = html_report(record)
    assert "fused pairs: " in page and "opset: 18" in page
    assert "<th>torch</th>" in page and "<th>threads</th>" in page
    assert 'id="accuracy-budget"' in page, "the validate stage's max_drop as a line on the plot"
    labels = re.findall(r'<g id="label-([a-z_]+)">', page)
    assert sorted(labels) == sorted(variant.name for variant in read_variants(record))


def test_labels_of_close_points_do_not_overlap():
    points = [(100.0, 50.0), (104.0, 50.0), (108.0, 50.0), (300.0, 50.0)]
    placed = place_labels(points, [(60.0, 11.0)] * len(points))
    for index, first in enumerate(placed):
        for second in placed[index + 1:]:
            assert not first.box.overlaps(second.box)


def test_latency_axis_gets_several_ticks_even_within_a_decade():
    assert len(latency_ticks(0.25, 0.4)) >= 3
    assert latency_ticks(0.01, 0.6) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


def test_long_dag_edges_run_through_empty_lanes_not_behind_boxes():
    dag = {"load": [], "fused": ["load"], "onnx": ["fused"], "check": ["fused", "onnx"]}
    columns = dag_columns(dag, list(dag))
    assert ("fused", 2) in columns[2], "fused -> check crosses column 2 in a lane of its own"
    assert columns[2].count("onnx") == 1


def test_nightly_section_and_trend_page(record, store_root, capsys):
    nights = []
    for index in range(3):
        night = copy.deepcopy(record)
        night["run_id"], night["started_at"] = f"2026120{index + 1}-020000-abc00{index}", f"2026-12-0{index + 1}T02:00:00+00:00"
        night["nightly"] = {"checkpoint_choice": "newest complete", "reference_run": nights[-1]["run_id"] if nights else None,
                            "regressions": ["onnx: top-1 fell 2.0 points"] if index == 2 else [], "comparison": None}
        ArtifactStore(store_root).write_run(night)
        nights.append(night)
    page = html_report(nights[2])
    assert "1 regression(s): not promoted" in page and "onnx: top-1 fell 2.0 points" in page
    assert f"<a href='{nights[1]['run_id']}.html'>" in page
    trend = trend_report([record, *nights], "demo")
    assert '<svg id="plot-trend"' in trend and trend.count("<tr><td><a href=") == 3
    assert main(["report", "--trend", "demo", "--store", str(store_root)]) == 0
    assert (store_root / "reports" / "demo-trend.html").is_file() and "demo-trend.html" in capsys.readouterr().out


def test_prefect_names_and_table_in_human_units(record):
    assert run_title("demo", "/x/digits_cnn.pt", "20261201-1") == "demo · digits_cnn.pt · 20261201-1"
    rows = variant_table(record)
    assert list(rows[0]) == ["variant", "kind", "top-1", "Δ top-1", "size", "p50 latency", "speed-up", "verdict"]
    assert re.fullmatch(r"\d+\.\d\d%", rows[0]["top-1"]) and rows[0]["size"].endswith(" kB")
    assert re.fullmatch(r"\d+\.\d{3} ms @1", rows[1]["p50 latency"]) and rows[1]["speed-up"].endswith("×")
