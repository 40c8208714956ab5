"""The ``runner`` setting: its forms, which source wins, and one clear line for a bad value before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe.runner import RunnerSpec, choose_runner, parse_runner

RECIPE = """name: r
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
runner: RUNNER
stages:
  load: {uses: load_checkpoint}
"""


@pytest.mark.parametrize(("text", "spec"), [
    ("threads", RunnerSpec("threads", 4)),
    ("threads:1", RunnerSpec("threads", 1)),
    ("processes:3", RunnerSpec("processes", 3)),
    ("dask://10.0.0.5:8786", RunnerSpec("dask", address="tcp://10.0.0.5:8786")),
    ("tcp://scheduler.internal:8786", RunnerSpec("dask", address="tcp://scheduler.internal:8786")),
])
def test_each_runner_form_parses_and_describes_itself_back(text, spec):
    assert parse_runner(text) == spec
    assert parse_runner(spec.describe()) == spec


@pytest.mark.parametrize("text", ["procs", "processes:0", "processes:-1", "dask://host", "dask://host:99999", "threads:two", ""])
def test_a_bad_runner_names_its_source_and_the_forms(text):
    with pytest.raises(RecipeError) as raised:
        parse_runner(text, "--runner")
    assert str(raised.value).startswith("--runner: runner ")
    assert "threads[:N], processes[:N] or dask://HOST:PORT" in str(raised.value) or "give 1 or more" in str(raised.value)


def test_the_flag_beats_the_environment_which_beats_the_recipe(monkeypatch):
    monkeypatch.delenv("OPTIPIPE_RUNNER", raising=False)
    assert choose_runner(None, None) == RunnerSpec("threads", 4)
    assert choose_runner(None, "processes:2") == RunnerSpec("processes", 2)
    monkeypatch.setenv("OPTIPIPE_RUNNER", "dask://127.0.0.1:8786")
    assert choose_runner(None, "processes:2").kind == "dask"
    assert choose_runner("threads:2", "processes:2") == RunnerSpec("threads", 2)
    monkeypatch.setenv("OPTIPIPE_RUNNER", "cluster")
    with pytest.raises(RecipeError, match=r"^\$OPTIPIPE_RUNNER: runner 'cluster' is not one of"):
        choose_runner(None, None)


def test_a_bad_runner_in_a_recipe_is_refused_with_its_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUNNER", "processes:zero"))
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}:3: runner: runner 'processes:zero' is not one of threads[:N], processes[:N] or dask://HOST:PORT")


def test_a_bad_runner_flag_fails_before_prefect_starts_and_writes_no_run(tmp_path, capsys, demo_checkpoint):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUNNER", "threads"))
    store = tmp_path / "store"
    assert main(["run", str(recipe), "--checkpoint", str(demo_checkpoint), "--store", str(store), "--runner", "gpu-farm"]) == 2
    assert "--runner: runner 'gpu-farm' is not one of" in capsys.readouterr().err
    assert not store.exists()


def test_a_dask_runner_whose_scheduler_does_not_answer_is_one_line_before_anything_runs(tmp_path, capsys, demo_checkpoint):
    from tests.s3_server import free_port

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUNNER", "threads"))
    store = tmp_path / "store"
    port = free_port()
    assert main(["run", str(recipe), "--checkpoint", str(demo_checkpoint), "--store", str(store), "--runner", f"dask://127.0.0.1:{port}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: runner dask://127.0.0.1:{port}: no Dask scheduler answers at tcp://127.0.0.1:{port} (Connection refused); "
        "start one with 'dask scheduler' or fix the address")
    assert not store.exists()


def test_a_stage_the_task_runner_cannot_take_fails_with_the_reason_and_the_run_ends(tmp_path, demo_checkpoint):
    from pipeline.recipe import load_recipe
    from pipeline.records.store import ArtifactStore
    from pipeline.run.engine import run_plan

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUNNER", "threads"))

    def unreachable(call):
        raise OSError("Timed out trying to connect to tcp://10.0.0.5:8786 after 30 s")

    record = run_plan(load_recipe(recipe), ArtifactStore(tmp_path / "store"), demo_checkpoint, submit=unreachable)
    assert record["state"] == "failed"
    (load,) = record["stages"]
    assert load["state"] == "failed" and load["error"] == "internal"
    assert load["reason"].startswith("stage 'load' could not be handed to the task runner: OSError: Timed out trying to connect")
    assert "OSError" in Path(load["log"]).read_text()
