"""The spine: cache keys that cover the code a stage runs, typed stage declarations, internal errors kept
with their traceback, and a read side that imports no torch."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run.contract import StageDeclarationError
from tests.conftest import REPO_ROOT, optipipe_stderr

HELPER_RECIPE = """name: helper-edit
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  slim: {uses: strip_optimizer, needs: [load]}
  fused: {uses: fuse_conv_bn, needs: [slim]}
  onnx: {uses: export_onnx, needs: [slim], with: {simplify: false}}
  check: {uses: validate, needs: [fused, onnx]}
  int8: {uses: quantize, needs: [fused], with: {mode: dynamic}}
"""
RUN_SCRIPT = (
    "import json, sys; from pipeline.recipe import load_recipe; from pipeline.records.store import ArtifactStore; "
    "from pipeline.run.engine import run_plan; "
    "record = run_plan(load_recipe(sys.argv[1]), ArtifactStore(sys.argv[2]), sys.argv[3]); "
    "print(json.dumps({stage['name']: stage['state'] for stage in record['stages']}))"
)


def copy_of_the_project(folder: Path) -> Path:
    """The project's importable code, copied so a test can edit it without touching the checkout."""
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO_ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def states_of_a_run(project: Path, recipe: Path, store: Path, checkpoint: Path) -> dict[str, str]:
    """Each stage's state after running ``recipe`` with the project copy's code (in a fresh process)."""
    completed = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(recipe), str(store), str(checkpoint)],
        cwd=project, env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin", "OPTIPIPE_QUIET": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_a_helper_edit_rebuilds_exactly_the_stages_that_import_it_and_a_comment_rebuilds_nothing(tmp_path, demo_checkpoint):
    project = copy_of_the_project(tmp_path / "project")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HELPER_RECIPE)
    store = tmp_path / "store"
    first = states_of_a_run(project, recipe, store, demo_checkpoint)
    assert set(first.values()) == {"done"}

    train = project / "pipeline" / "torchkit" / "train.py"  # of these stages, only quantize imports the training loop
    train.write_text(train.read_text() + "\nEDITED_HELPER = True\n")
    after_helper_edit = states_of_a_run(project, recipe, store, demo_checkpoint)
    assert after_helper_edit == {"load": "cached", "slim": "cached", "fused": "cached", "onnx": "cached", "check": "cached", "int8": "done"}

    stage = project / "stages" / "export_onnx.py"
    stage.write_text("# a comment about the exporter\n" + stage.read_text().replace('"""Export', '"""Export (edited docstring)', 1))
    after_comment_edit = states_of_a_run(project, recipe, store, demo_checkpoint)
    assert set(after_comment_edit.values()) == {"cached"}


def import_stage_file(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"stage_under_test_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


STAGE_TEMPLATE = """
from pipeline.run.contract import StageParams, declare_stage

class Params(StageParams):
    pass

def run(ctx, inputs, params):
    raise NotImplementedError

STAGE = declare_stage({fields}, params=Params, run=run)
"""


@pytest.mark.parametrize(("fields", "message"), [
    ('takse=("torch",), makes="torch", inputs="one", version=1', r"takse: unknown field \(did you mean 'takes'\?\)"),
    ('takes=("torch",), makes="onnnx", inputs="one", version=1', r"makes: Input should be 'torch', 'onnx', 'engine', 'openvino' or 'report'"),
    ('takes=(), makes="torch", inputs="one", version=1', r"takes must be empty exactly when inputs is 'none'"),
    ('takes=("torch",), makes="torch", inputs="one", version=0', r"version: Input should be greater than or equal to 1"),
])
def test_a_typo_in_a_stage_declaration_fails_at_import_naming_the_file_and_field(tmp_path, fields, message):
    path = tmp_path / "broken_stage.py"
    path.write_text(STAGE_TEMPLATE.format(fields=fields))
    with pytest.raises(StageDeclarationError, match=rf"^{path}: STAGE = declare_stage\(\.\.\.\): .*{message}"):
        import_stage_file(path)


def test_every_stage_module_is_discovered_and_declared():
    from pipeline.run.registry import declaration, stage_names

    names = stage_names()
    assert {"load_checkpoint", "fuse_conv_bn", "export_onnx", "validate", "benchmark", "quantize_onnx"} <= set(names)
    assert names == sorted(path.stem for path in (REPO_ROOT / "stages").glob("*.py") if not path.stem.startswith("_"))
    for name in names:
        assert declaration(name).name == name


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_unexpected_exception_is_an_internal_error_with_its_traceback_kept(tmp_path, demo_checkpoint, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.records.store import ArtifactStore
    from stages import fuse_conv_bn

    def broken_fusion(traced):
        raise KeyError("boom")

    monkeypatch.setattr(fuse_conv_bn, "fuse_traced", broken_fusion)
    store = tmp_path / "store"
    code = main(["run", str(REPO_ROOT / "recipes" / "demo.yaml"), "--checkpoint", str(demo_checkpoint), "--store", str(store),
                 "--set", "bench.min_seconds=0", "--set", "bench.iterations=3"])
    err = capsys.readouterr().err
    assert code == 3, err
    record = ArtifactStore(store).list_runs()[0]
    fused = next(stage for stage in record["stages"] if stage["name"] == "fused")
    assert fused["state"] == "failed" and fused["error"] == "internal"
    log = Path(fused["log"])
    assert log.parent == store / "runs" / record["run_id"]
    assert "Traceback (most recent call last)" in log.read_text() and "KeyError: 'boom'" in log.read_text()
    error_lines = [line for line in optipipe_stderr(err).splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"internal error, KeyError: 'boom'; traceback in {log}" in error_lines[0]


def test_the_read_side_imports_no_torch(tmp_path):
    """runs, show, diff and report start fast by design: nothing on their path imports torch."""
    run_record = {
        "run_id": "20261201-000000-abcdef", "recipe": {"name": "r", "path": "r.yaml", "digest": "d"},
        "checkpoint": {"path": "c.pt", "sha256": "s"}, "state": "succeeded", "started_at": "2026-12-01T00:00:00+00:00",
        "finished_at": "2026-12-01T00:00:01+00:00", "seconds": 1.0, "stages": [],
    }
    (tmp_path / "runs").mkdir()
    for suffix in ("abcdef", "fedcba"):
        record = {**run_record, "run_id": f"20261201-000000-{suffix}"}
        (tmp_path / "runs" / f"{record['run_id']}.json").write_text(json.dumps(record))
    script = (
        "import sys; from pipeline.cli import main\n"
        f"store = {str(tmp_path)!r}\n"
        "for argv in (['runs'], ['show', 'latest'], ['diff', '20261201-000000-abcdef', '20261201-000000-fedcba'],"
        " ['report', 'latest', '--md', '-'], ['schema', '--records']):\n"
        "    assert main([*argv, '--store', store] if argv[0] != 'schema' else argv) == 0, argv\n"
        "import pipeline.recipe, pipeline.records.store, pipeline.records.gc, pipeline.review.compare, pipeline.review.page\n"
        "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
        "print('TORCH:', loaded)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "TORCH: []"


def test_a_stage_call_is_plain_json_and_a_recipe_edited_mid_run_is_refused(tmp_path, demo_checkpoint):
    from pipeline.recipe import load_recipe
    from pipeline.records.files import sha256_file
    from pipeline.run import executor
    from pipeline.run.executor import StageCall, execute

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HELPER_RECIPE)
    call = StageCall(recipe_path=str(recipe), overrides=(), recipe_digest=load_recipe(recipe).digest, store_root=str(tmp_path / "store"),
                     checkpoint_path=str(demo_checkpoint), checkpoint_sha256=sha256_file(demo_checkpoint), run_id="r1", stage="load")
    shipped = StageCall.from_dict(json.loads(json.dumps(call.as_dict())))  # what a task runner sends over the wire
    assert shipped == call
    assert execute(shipped).state == "done"
    recipe.write_text(HELPER_RECIPE.replace("simplify: false", "simplify: true"))
    executor._plans.clear()  # as in a fresh worker process, which reads the recipe file anew
    refused = execute(StageCall.from_dict({**call.as_dict(), "stage": "slim"}))
    assert refused.state == "failed" and refused.error == "input"
    assert refused.reason == f"{recipe} changed while run r1 was in progress; start a new run"


def test_a_stage_its_task_runner_loses_is_an_internal_failure_with_a_traceback(tmp_path, demo_checkpoint):
    from pipeline.recipe import load_recipe
    from pipeline.records.store import ArtifactStore
    from pipeline.run.engine import run_plan

    class LostTask:
        def result(self):
            raise RuntimeError("worker died")

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HELPER_RECIPE)
    record = run_plan(load_recipe(recipe), ArtifactStore(tmp_path / "store"), demo_checkpoint, submit=lambda call: LostTask())
    load = record["stages"][0]
    assert record["state"] == "failed" and load["state"] == "failed" and load["error"] == "internal"
    assert "RuntimeError: worker died" in Path(load["log"]).read_text()
    assert load["reason"].startswith("stage 'load' was lost by the task runner: RuntimeError: worker died; traceback in ")
    assert {stage["state"] for stage in record["stages"][1:]} == {"skipped"}
