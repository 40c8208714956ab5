"""Resilience without Prefect: tampered artifacts are rebuilt, a full disk is one clear line, random recipes only raise RecipeError."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.records.store import ArtifactStore
from pipeline.run.engine import run_plan
from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "recipes" / "demo.yaml"
NO_BENCH = ["bench.min_seconds=0", "bench.iterations=3", "bench.warmup=0"]


def run_all(checkpoint, store_root, overrides=NO_BENCH) -> dict:
    return run_plan(load_recipe(DEMO, list(overrides)), ArtifactStore(store_root), checkpoint, overrides=list(overrides))


def test_tampered_artifact_is_detected_and_rebuilt(demo_checkpoint, tmp_path):
    first = run_all(demo_checkpoint, tmp_path / "store")
    fused = next(stage for stage in first["stages"] if stage["name"] == "fused")
    model_file = next(path for path in os.scandir(fused["artifact"]) if path.name != "manifest.json")
    data = bytearray(open(model_file.path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(model_file.path, "wb").write(bytes(data))

    second = run_all(demo_checkpoint, tmp_path / "store")
    states = {stage["name"]: stage["state"] for stage in second["stages"]}
    assert states["fused"] == "done" and states["load"] == "cached" and states["slim"] == "cached"
    assert second["state"] == "succeeded"
    assert any((tmp_path / "store" / "quarantine").iterdir())
    ArtifactStore(tmp_path / "store").verify(ArtifactStore(tmp_path / "store").read(fused["key"]))


def test_full_disk_is_one_clear_line_and_leaves_nothing(demo_checkpoint, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ArtifactStore, "publish", no_space)
    record = run_all(demo_checkpoint, tmp_path / "store")
    assert record["state"] == "failed"
    assert re.match(r"stage 'load' \(load_checkpoint\): no space left on the device holding the store .*optipipe gc", record["stages"][0]["reason"])
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert list((tmp_path / "store" / "artifacts").iterdir()) == []


def test_two_processes_sharing_stages_on_one_store(demo_checkpoint, tmp_path):
    """Two runs in two processes at once: shared stages are published once, nothing is lost or corrupted."""
    store_root = tmp_path / "store"
    script = (
        "import sys; from pathlib import Path; from tests.test_resilience import run_all; "
        "record = run_all(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]); "
        "sys.exit(0 if record['state'] == 'succeeded' else 1)"
    )
    commands = [
        [sys.executable, "-c", script, str(demo_checkpoint), str(store_root), *NO_BENCH],
        [sys.executable, "-c", script, str(demo_checkpoint), str(store_root), *NO_BENCH, "onnx.simplify=false"],
    ]
    children = [subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) for command in commands]
    outcomes = [(child.wait(timeout=300), child.stderr.read()) for child in children]
    assert all(code == 0 for code, _ in outcomes), outcomes
    store = ArtifactStore(store_root)
    runs = store.list_runs()
    assert len(runs) == 2 and {record["state"] for record in runs} == {"succeeded"}
    keys = [{stage["name"]: stage["key"] for stage in record["stages"]} for record in runs]
    for shared in ("load", "slim", "fused"):
        assert keys[0][shared] == keys[1][shared]
    assert keys[0]["onnx"] != keys[1]["onnx"]
    for folder in store.artifacts_dir.iterdir():
        store.verify(store.read(folder.name))
    assert list(store.tmp_dir.iterdir()) == []


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.text(max_size=12))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
recipe_like = st.fixed_dictionaries(
    {},
    optional={
        "name": yaml_values,
        "model": st.one_of(yaml_values, st.fixed_dictionaries({"factory": st.sampled_from(["pipeline.zoo:digits_cnn", "x:y", "nope"]), "input_shape": yaml_values})),
        "stages": st.one_of(yaml_values, st.dictionaries(
            st.sampled_from(["load", "a", "b", "../x"]),
            st.fixed_dictionaries({"uses": st.sampled_from(["load_checkpoint", "fuse_conv_bn", "export_onnx", "validate", "nope"])},
                                  optional={"needs": st.lists(st.sampled_from(["load", "a", "b", "c"]), max_size=3), "with": yaml_values}),
            max_size=4,
        )),
        "data": yaml_values,
        "extra": yaml_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(recipe_like, yaml_values), raw_text=st.one_of(st.none(), st.text(max_size=80)))
def test_recipe_loader_only_raises_recipe_errors(tmp_path, document, raw_text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(raw_text if raw_text is not None else yaml.safe_dump(document))
    try:
        load_recipe(path)
    except RecipeError as error:
        assert str(error).startswith(str(path))


def test_each_stage_sees_the_same_train_order_whatever_ran_before():
    from tests.conftest import digits_data

    shared = digits_data()

    def first_labels(bundle) -> list[int]:
        return next(iter(bundle.train))[1].tolist()

    first_stage = first_labels(shared.for_stage())
    for _ in range(3):  # other stages exhaust the shared loader's shuffling in between
        list(shared.train)
    assert first_labels(shared.for_stage()) == first_stage
    assert first_labels(shared.for_stage()) != first_labels(shared), "the shared loader has moved on; stages do not see that"
