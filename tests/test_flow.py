"""End to end through Prefect: the demo recipe, the cache on re-run, partial re-runs, failures, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.demo import DEMO_RECIPE
from pipeline.cli.run import run_flow
from pipeline.records.store import ArtifactStore
from pipeline.review.tables import variant_rows
from tests.conftest import optipipe_stderr

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first_run(demo_checkpoint, store_root) -> dict:
    return run_flow(str(DEMO_RECIPE), str(demo_checkpoint), str(store_root), [])


def states(record: dict) -> dict[str, str]:
    return {stage["name"]: stage["state"] for stage in record["stages"]}


def test_demo_recipe_runs_every_stage_and_writes_artifacts(first_run, store_root):
    assert first_run["state"] == "succeeded", first_run["message"]
    assert states(first_run) == {name: "done" for name in ("load", "slim", "fused", "onnx", "check", "bench")}
    store = ArtifactStore(store_root)
    for stage in first_run["stages"]:
        manifest = json.loads((Path(stage["artifact"]) / "manifest.json").read_text())
        assert manifest["key"] == stage["key"] and manifest["stage"] == stage["name"]
        assert (Path(stage["artifact"]) / manifest["model"]).is_file()
        assert manifest["versions"]["torch"].startswith("2.13") and manifest["peak_rss_bytes"] > 0
        store.verify(store.read(stage["key"]))
    assert list(store.tmp_dir.iterdir()) == []
    rows = {row["variant"]: row for row in variant_rows(first_run)}
    assert set(rows) == {"load", "fused", "onnx"}
    assert rows["load"]["top1"] > 0.85
    for variant in ("fused", "onnx"):
        assert rows[variant]["agreement"] == 1.0 and abs(rows[variant]["delta_top1"]) < 1e-9
        assert rows[variant]["max_abs_logit_diff"] < 1e-3
        assert rows[variant]["latency_p50_ms"] > 0 and rows[variant]["speedup_vs_baseline"] > 0
    assert rows["onnx"]["kind"] == "onnx" and rows["fused"]["kind"] == "torch"
    assert rows["load"]["speedup_vs_baseline"] == 1.0


def test_second_run_reuses_every_stage(first_run, demo_checkpoint, store_root):
    second = run_flow(str(DEMO_RECIPE), str(demo_checkpoint), str(store_root), [])
    assert second["state"] == "succeeded"
    assert set(states(second).values()) == {"cached"}
    assert [stage["key"] for stage in second["stages"]] == [stage["key"] for stage in first_run["stages"]]
    stage_work = sum(stage["seconds"] for stage in first_run["stages"])
    assert stage_work > 0 and sum(stage["seconds"] for stage in second["stages"]) == 0


@pytest.fixture(scope="module")
def unsimplified_run(first_run, demo_checkpoint, store_root) -> dict:
    return run_flow(str(DEMO_RECIPE), str(demo_checkpoint), str(store_root), ["onnx.simplify=false"])


def test_changed_parameter_reruns_only_that_stage_and_downstream(unsimplified_run):
    assert states(unsimplified_run) == {"load": "cached", "slim": "cached", "fused": "cached", "onnx": "done", "check": "done", "bench": "done"}


def test_diff_of_two_real_runs_names_the_changed_parameter(first_run, unsimplified_run, store_root, capsys):
    code = main(["diff", first_run["run_id"], unsimplified_run["run_id"], "--store", str(store_root), "--json",
                 "--max-accuracy-drop", "0.01"])
    comparison = json.loads(capsys.readouterr().out)
    assert code == 0 and comparison["regressions"] == []
    stages = {stage["name"]: stage for stage in comparison["stages"]}
    assert [name for name, stage in stages.items() if stage["same_artifact"]] == ["load", "slim", "fused"]
    assert stages["onnx"]["params_changed"] == {"simplify": [True, False]}
    assert stages["check"]["params_changed"] == {} and not stages["check"]["same_artifact"]
    variants = {variant["variant"]: variant for variant in comparison["variants"]}
    assert set(variants) == {"fused", "onnx"}  # the baseline is what variants are measured against
    assert variants["onnx"]["delta_top1"] == 0.0 and variants["onnx"]["latency_ms_b"] > 0
    assert main(["diff", first_run["run_id"], unsimplified_run["run_id"], "--store", str(store_root)]) == 0
    assert "simplify" in capsys.readouterr().out


def test_flow_publishes_table_and_markdown_artifacts(first_run):
    from prefect.artifacts import Artifact

    summary = Artifact.get("optipipe-demo-summary")
    assert summary is not None and summary.type == "markdown"
    assert "| variant | kind | top-1 |" in summary.data and "Pareto front" in summary.data
    table = Artifact.get("optipipe-demo-variants")
    assert table is not None and table.type == "table" and '"variant": "onnx"' in table.data


def test_two_branch_dag_validates_both_branches(demo_checkpoint, write_recipe, tmp_path):
    recipe = write_recipe("""name: branches
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
  onnx_fused: {uses: export_onnx, needs: [fused]}
  onnx_plain: {uses: export_onnx, needs: [load], with: {simplify: false}}
  check: {uses: validate, needs: [onnx_fused, onnx_plain, fused]}
""")
    record = run_flow(str(recipe), str(demo_checkpoint), str(tmp_path / "store"), [])
    assert record["state"] == "succeeded"
    assert {row["variant"] for row in variant_rows(record)} == {"load", "fused", "onnx_fused", "onnx_plain"}


def test_failed_stage_fails_the_run_and_skips_downstream(demo_checkpoint, write_recipe, tmp_path, capsys):
    recipe = write_recipe(Path(DEMO_RECIPE).read_text().replace("pipeline.zoo:digits_cnn", "pipeline.zoo:digits_cnn, kwargs: {width: 16}"))
    store_root = tmp_path / "store"
    code = main(["run", str(recipe), "--checkpoint", str(demo_checkpoint), "--store", str(store_root)])
    assert code == 2
    err = optipipe_stderr(capsys.readouterr().err)
    assert "load:" in err and "mis-shaped" in err and "Traceback" not in err
    record = ArtifactStore(store_root).resolve_run("latest")
    assert record["state"] == "failed"
    assert states(record) == {name: "skipped" for name in ("slim", "fused", "onnx", "check", "bench")} | {"load": "failed"}
    assert "upstream stage 'load'" in record["stages"][1]["reason"]
    assert list((store_root / "artifacts").iterdir()) == [] and list((store_root / "tmp").iterdir()) == []


def test_cli_runs_and_show(first_run, store_root, capsys):
    assert main(["runs", "--store", str(store_root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert first_run["run_id"] in [record["run_id"] for record in listed]
    assert all("stages" not in record for record in listed)
    assert main(["show", first_run["run_id"][:17], "--store", str(store_root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run_id"] == first_run["run_id"] and len(shown["stages"]) == 6
    assert main(["show", "latest", "--store", str(store_root)]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "agreement" in out


def test_each_task_run_carries_its_stage_result_as_markdown(first_run):
    """The Prefect UI's task page shows the stage's state, time, artifact folder and headline figures."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["markdown"])))
    fused = [artifact.data for artifact in artifacts if artifact.task_run_id and "### fused (fuse_conv_bn)" in (artifact.data or "")]
    assert fused, "no task-run markdown for the fused stage"
    assert "artifact `" in fused[-1] and "fused pairs: 3" in fused[-1]


def test_the_flow_run_is_named_and_tagged_for_its_recipe_and_checkpoint(first_run, demo_checkpoint):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    title = f"demo · {demo_checkpoint.name} · {first_run['run_id']}"
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[title])))
    assert len(runs) == 1, f"no flow run named {title!r}"
    assert {"demo", demo_checkpoint.name} <= set(runs[0].tags)
    assert runs[0].parameters["recipe_path"] == str(DEMO_RECIPE.resolve()), "a UI retry must not depend on the working directory"
