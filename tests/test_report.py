"""The review page: HTML with plots (rendered in headless Chromium), Markdown for PR comments, `optipipe report`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.cli.demo import DEMO_RECIPE
from pipeline.records.store import ArtifactStore
from pipeline.review.page import html_report, markdown_report, markdown_summary
from pipeline.review.plots import VARIANT_COLOR, dag_levels, pareto_front
from tests.conftest import run_without_prefect

QUICK_BENCHMARK = ["bench.batch_sizes=[1]", "bench.min_seconds=0.1", "bench.iterations=5"]
PLOT_IDS = ("plot-dag", "plot-accuracy-latency", "plot-sizes", "plot-class-deltas")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-store")


@pytest.fixture(scope="module")
def demo_record(demo_checkpoint, store_root) -> dict:
    record = run_without_prefect(DEMO_RECIPE, demo_checkpoint, store_root, QUICK_BENCHMARK)
    assert record["state"] == "succeeded", record["message"]
    return ArtifactStore(store_root).read_run(record["run_id"])  # as `optipipe report` reads it: JSON keys sorted


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when the machine does not have it yet."""
    found = shutil.which("chromium")
    if found:
        return found
    sudo = "" if os.geteuid() == 0 or not shutil.which("sudo") else "sudo -n "
    install = f"{sudo}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -qq chromium"
    result = subprocess.run(["sh", "-c", install], capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not shutil.which("chromium"):
        pytest.fail(f"could not install Debian's chromium for the report rendering test: {result.stderr[-2000:]}")
    return shutil.which("chromium")


def render(chromium: str, page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page with a fresh profile, the network-quiet flags of this machine."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.90), (0.5, 0.90), (2.0, 0.95), (0.5, 0.80), (3.0, 0.95)]
    assert pareto_front(points) == [1, 2]


def test_dag_columns_follow_the_needs_whatever_the_key_order(demo_record):
    assert list(demo_record["dag"]) == sorted(demo_record["dag"]), "the stored record sorts keys"
    assert dag_levels(demo_record["dag"]) == {"load": 0, "slim": 1, "fused": 2, "onnx": 3, "check": 4, "bench": 4}


def test_html_report_is_self_contained_with_plots_and_tables(demo_record):
    page = html_report(demo_record)
    for plot in PLOT_IDS:
        assert f'<svg id="{plot}"' in page
    assert page.count("<table>") == 2
    for variant in ("load", "fused", "onnx"):
        assert f"<td>{variant}</td>" in page
    assert "Pareto front (fastest first): <strong>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"
    assert "<script" not in page


def test_markdown_report_for_pr_comments(demo_record):
    text = markdown_report(demo_record)
    assert "| variant | kind | top-1 | Δ top-1 | agreement | size | p50 ms @1 | speed-up | status |" in text
    assert "```mermaid\nflowchart LR" in text and "slim --> fused" in text
    assert "Per-class top-1 change vs FP32" in text
    assert text.startswith(markdown_summary(demo_record).rstrip())


def test_report_command_writes_html_and_markdown(demo_record, store_root, tmp_path, capsys):
    run_id = demo_record["run_id"]
    assert main(["report", run_id, "--store", str(store_root), "--html", str(tmp_path / "r.html"), "--md", str(tmp_path / "r.md")]) == 0
    assert '<svg id="plot-sizes"' in (tmp_path / "r.html").read_text()
    assert (tmp_path / "r.md").read_text().startswith(f"## demo · run {run_id}")
    assert main(["report", "latest", "--store", str(store_root)]) == 0
    default = store_root / "reports" / f"{run_id}.html"
    assert default.is_file() and f"wrote {default}" in capsys.readouterr().out
    assert main(["report", run_id, "--store", str(store_root), "--md", "-"]) == 0
    assert "```mermaid" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.partial"))


def test_report_of_unknown_run_is_one_clear_line(store_root, capsys):
    assert main(["report", "no-such-run", "--store", str(store_root)]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_chromium_renders_the_report_with_plots_and_table(demo_record, chromium, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html_report(demo_record))
    screenshot = tmp_path / "report.png"
    shot = render(chromium, page, tmp_path, "--window-size=1200,2400", f"--screenshot={screenshot}")
    assert screenshot.is_file(), shot.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.03, f"screenshot is nearly blank ({non_white:.2%} non-white pixels)"
    variant_rgb = np.array([int(VARIANT_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    plotted = (np.abs(pixels - variant_rgb).max(axis=-1) < 0.03).sum()
    assert plotted > 500, f"the plots' variant colour covers only {plotted} pixels: plots not drawn"
    dom = render(chromium, page, tmp_path, "--dump-dom").stdout
    for plot in PLOT_IDS:
        assert f'id="{plot}"' in dom
    assert "<table>" in dom and "Variants against the FP32 baseline" in dom
