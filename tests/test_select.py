"""The select stage: the best variant measured on the target runtime within the budget, and why every other one lost."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import StageError
from pipeline.records.selection import SelectionReport, dominators, pareto_front
from pipeline.records.variants import selection_reports
from pipeline.review.page import html_report
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn
from stages import export_onnx, quantize_onnx, select
from tests.conftest import as_input

TIMING = {"warmup": 1, "iterations": 3, "min_seconds": 0, "rounds": 1}


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, one_torch_thread):
    """A digits CNN trained briefly (the baseline), its ONNX export, ONNX static INT8, and an ONNX export of a damaged copy."""
    from pipeline.run.contract import StageContext
    from tests.conftest import digits_data, one_stage_recipe

    folder = tmp_path_factory.mktemp("select")
    data = digits_data()
    torch.manual_seed(0)
    trained = digits_cnn()
    train_model(trained, data.train, epochs=3, lr=3e-3)
    damaged = digits_cnn()
    damaged.load_state_dict(trained.state_dict())
    with torch.no_grad():
        damaged.classifier.weight.add_(torch.randn_like(damaged.classifier.weight) * 3)

    def context(name):
        (folder / name).mkdir()
        return StageContext(name=name, workdir=folder / name, recipe=one_stage_recipe(), checkpoint_path=None, load_data=lambda: data)

    baseline = as_input(trained, folder)
    onnx = export_onnx.run(context("onnx"), {"fused": baseline}, export_onnx.Params()).product
    int8 = quantize_onnx.run(context("int8"), {"onnx": onnx}, quantize_onnx.Params(min_agreement=0.5)).product
    broken = export_onnx.run(context("broken"), {"damaged": as_input(damaged, folder)}, export_onnx.Params()).product
    return {"baseline": baseline, "onnx": onnx, "onnx_int8": int8, "broken": broken}


def run_select(context, candidates, inputs=("onnx", "onnx_int8", "broken"), **params):
    ctx = context("choose", baseline=candidates["baseline"], baseline_name="load")
    chosen = {name: candidates[name] for name in inputs}
    return select.run(ctx, chosen, select.Params(**{"target": "onnxruntime-cpu", "max_drop": 0.05, **TIMING, **params}))


def within_budget(report: SelectionReport) -> dict[str, object]:
    return {name: entry for name, entry in report.candidates.items()
            if entry.status != "not_comparable" and entry.drop <= report.constraints.max_drop}


def test_the_fastest_candidate_within_budget_is_chosen_and_the_damaged_one_lost_on_its_drop(context, candidates):
    output = run_select(context, candidates, inputs=("onnx", "onnx_int8", "broken", "baseline"))
    report = SelectionReport.model_validate(output.metrics)
    ok = within_budget(report)
    assert set(ok) == {"onnx", "onnx_int8"}
    assert report.chosen == min(ok, key=lambda name: ok[name].latency_p50_ms)
    broken = report.candidates["broken"]
    assert broken.status == "lost" and broken.drop > 0.05
    assert broken.reason.startswith(f"drop {broken.drop * 100:.2f} pt over the 5.00 pt budget by ")
    other = next(name for name in ok if name != report.chosen)
    assert report.candidates[other].status == "lost"
    assert "than the chosen" in report.candidates[other].reason or report.candidates[other].reason == f"dominated by {report.chosen}"
    assert report.candidates["baseline"].status == "not_comparable" and "torch model" in report.candidates["baseline"].reason
    assert report.chosen in report.pareto_front and all(report.candidates[name].on_pareto_front for name in report.pareto_front)
    assert json.loads(output.product.path.read_text())["chosen"] == report.chosen


def test_objective_size_picks_the_smallest_within_budget(context, candidates):
    report = SelectionReport.model_validate(run_select(context, candidates, objective="size").metrics)
    ok = within_budget(report)
    assert report.chosen == min(ok, key=lambda name: ok[name].size_bytes) == "onnx_int8"
    loser = report.candidates["onnx"]
    assert loser.reason.endswith("larger than the chosen, onnx_int8") or loser.reason == "dominated by onnx_int8"


def test_a_latency_cap_nothing_meets_fails_in_one_line_naming_the_closest(context, candidates):
    with pytest.raises(StageError) as caught:
        run_select(context, candidates, max_latency_ms=1e-6)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("select: no candidate meets max_latency_ms 1e-06 on onnxruntime-cpu at batch 1: the closest, ")
    closest = message.split("the closest, ")[1].split(",")[0]
    assert closest in ("onnx", "onnx_int8") and message.endswith("ms over); raise max_latency_ms")


def test_a_budget_nothing_meets_names_the_candidate_that_lost_least(context, candidates):
    with pytest.raises(StageError, match=r"^select: no candidate meets max_drop 0\.00 pt on top1: the closest, \w+, lost [\d.]+ pt "
                                         r"\([\d.]+ pt over\); raise max_drop or add a fallback$") as caught:
        run_select(context, candidates, inputs=("broken",), max_drop=0.0)
    assert "the closest, broken," in str(caught.value)


def test_a_target_no_input_runs_on_is_one_clear_error(context, candidates):
    with pytest.raises(StageError, match=r"^select: target torch-cpu compares torch models, and no input is one "
                                         r"\(onnx \(onnx\), onnx_int8 \(onnx\)\); add a torch variant"):
        run_select(context, candidates, inputs=("onnx", "onnx_int8"), target="torch-cpu")


def test_tensorrt_target_without_a_gpu_is_skipped_with_the_reason(context, candidates, monkeypatch):
    from pipeline.errors import StageUnavailable
    from pipeline.torchkit import gpu

    monkeypatch.setattr(gpu, "cuda_status", lambda: "no CUDA device: torch.cuda.is_available() is False")
    with pytest.raises(StageUnavailable, match="^no CUDA device: .*: no candidate timed on TensorRT$"):
        run_select(context, candidates, target="tensorrt")


def test_dominators_name_the_cheapest_better_point_and_the_front_is_the_rest():
    points = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.94), (4.0, 0.80)]
    assert dominators(points) == {2: 1, 3: 0}
    assert pareto_front(points) == [0, 1]
    assert pareto_front([(1.0, 0.5), (2.0, 0.1)], higher_is_better=False) == [0, 1]
    assert dominators([(1.0, 0.1), (2.0, 0.5)], higher_is_better=False) == {1: 0}


def run_record(metrics: dict) -> dict:
    """A finished run record holding one select stage (and its candidates' stages), as the store writes it."""
    stages = [{"name": name, "uses": "export_onnx", "state": "done", "seconds": 1.0} for name in ("onnx", "onnx_int8", "broken")]
    stages.append({"name": "pick", "uses": "select", "state": "done", "seconds": 2.0, "metrics": metrics})
    return {"run_id": "r1", "recipe": {"name": "search", "path": "search.yaml", "digest": "d"},
            "checkpoint": {"path": "c.pt", "sha256": "0" * 64},
            "baseline": "load", "dag": {"onnx": [], "onnx_int8": ["onnx"], "broken": [], "pick": ["onnx", "onnx_int8", "broken"]},
            "state": "succeeded", "started_at": "2025-01-01T00:00:00Z", "seconds": 3.0, "stages": stages}


def test_the_report_parses_through_the_reader_and_the_page_shows_the_selection(context, candidates, tmp_path):
    metrics = run_select(context, candidates).metrics
    record = run_record(metrics)
    [(stage, report)] = selection_reports(record)
    assert stage == "pick" and report.chosen == metrics["chosen"]
    page = html_report(record)
    assert "<h2>Selection: pick</h2>" in page and 'id="plot-selection-pick"' in page
    assert f"chosen: <strong>{report.chosen}</strong>" in page
    assert report.candidates["broken"].reason in page
    (tmp_path / "page.html").write_text(page)


def test_promotion_records_the_choice_and_latest_without_variant_gives_its_model(context, candidates, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.nightly import promotion
    from pipeline.nightly.checkpoints import CheckpointChoice
    from pipeline.records.store import ArtifactStore

    files = {name: str(tmp_path / name / "model.onnx") for name in ("onnx", "onnx_int8", "broken")}
    monkeypatch.setattr(promotion, "variant_artifacts", lambda store, record: files)
    store = ArtifactStore(tmp_path / "store")
    record = run_record(run_select(context, candidates).metrics)
    assert promotion.record_night(store, record, CheckpointChoice(tmp_path / "c.pt", "newest"), {"reference_run": None, "regressions": []})
    chosen = promotion.read_state(store, "search")["latest"]["chosen"]
    assert chosen == record["stages"][-1]["metrics"]["chosen"]
    assert main(["latest", "search", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out.strip() == files[chosen]
    assert main(["latest", "search", "--variant", "onnx", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out.strip() == files["onnx"]

    without = {**record, "run_id": "r2", "stages": record["stages"][:-1]}
    assert promotion.record_night(store, without, CheckpointChoice(tmp_path / "c.pt", "newest"), {"reference_run": None, "regressions": []})
    assert promotion.read_state(store, "search")["latest"].get("chosen") is None
    assert main(["latest", "search", "--store", str(store.root)]) == 2
    assert "has no select stage to choose a variant; pass --variant NAME (one of broken, onnx, onnx_int8)" in capsys.readouterr().err


def test_the_selection_section_says_what_the_search_budget_left_out():
    from pipeline.review.selection import search_note

    record = {"search": {"max_trials": 2, "max_minutes": None, "trials": 3, "tried": ["amount=0.25", "amount=0.5"],
                         "not_tried": ["amount=0.7"], "skipped_for_budget": ["pruned[amount=0.7]"]}}
    note = search_note(record)
    assert "2 of 3 trial(s) tried (budget: max_trials 2)" in note and "not tried, for the budget: amount=0.7" in note
    assert search_note({"search": None}) == "" and search_note({}) == ""
