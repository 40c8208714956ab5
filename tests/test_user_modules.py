"""A user's own architecture and data factory, next to the recipe, run through a session without Prefect."""

from __future__ import annotations

import textwrap

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.records.files import sha256_file
from pipeline.records.store import ArtifactStore
from pipeline.run.engine import run_plan
from pipeline.run.identity import RunIdentity, cache_key, cache_payload
from pipeline.zoo import mlp

USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.body(x)


def loaders(samples=96):
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(samples) % 3
    inputs = torch.randn(samples, 12, generator=generator) + labels[:, None].float()
    dataset = TensorDataset(inputs, labels)
    return DataLoader(dataset, batch_size=16), DataLoader(dataset, batch_size=32)
'''

RECIPE = """name: user
model: {factory: "%s:TinyNet", kwargs: {hidden: 16}, input_shape: [1, 12]}
data: {factory: "%s:loaders", kwargs: {samples: 96}}
stages:
  load: {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
  onnx: {uses: export_onnx, needs: [fused]}
  check: {uses: validate, needs: [fused, onnx]}
"""


def test_user_model_and_data_factory_from_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_models_a.py").write_text(USER_MODULE)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE % ("user_models_a", "user_models_a"))
    plan = load_recipe(recipe_path)
    import user_models_a

    torch.manual_seed(0)
    model = user_models_a.TinyNet(hidden=16)
    model.train()(torch.randn(32, 12))  # non-trivial BatchNorm statistics
    checkpoint_path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint_path)
    record = run_plan(plan, ArtifactStore(tmp_path / "store"), checkpoint_path)
    assert record["state"] == "succeeded", record["message"]
    fused = next(stage for stage in record["stages"] if stage["name"] == "fused")
    assert fused["metrics"]["fused_pairs"] == 1
    check = next(stage for stage in record["stages"] if stage["name"] == "check")
    assert check["metrics"]["variants"]["onnx"]["agreement"] == 1.0
    assert check["metrics"]["baseline"]["samples"] == 96
    first_keys = [stage["key"] for stage in record["stages"]]

    # editing the user's module's code changes every cache key: no stale artifact is reused
    (tmp_path / "user_models_a.py").write_text(USER_MODULE + "\nEDITED = True\n")
    edited = load_recipe(recipe_path)
    identity = RunIdentity.of(edited, sha256_file(checkpoint_path))
    assert cache_key(cache_payload(edited, "load", identity, [], None)) != first_keys[plan.order.index("load")]


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from tests.conftest import REPO_ROOT

    code = main(["run", str(REPO_ROOT / "recipes" / "demo.yaml"), "--checkpoint", str(tmp_path / "nope.pt"), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
    assert not (tmp_path / "s").exists()


def test_missing_factory_module_is_reported(tmp_path, capsys):
    checkpoint_path = tmp_path / "c.pt"
    torch.save({}, checkpoint_path)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(textwrap.dedent("""\
        name: r
        model: {factory: "no_such_module_xyz:Net", input_shape: [1, 4]}
        stages:
          load: {uses: load_checkpoint}
        """))
    code = main(["run", str(recipe_path), "--checkpoint", str(checkpoint_path), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "module 'no_such_module_xyz' not found" in err and "Traceback" not in err


STUDENT_RECIPE = """name: students
model: {factory: "pipeline.zoo:mlp", input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  student: {uses: distill, needs: [load], with: {epochs: 1, student: {factory: "%s:make"}}}
"""


def test_a_student_factory_is_checked_with_the_recipe_and_keys_its_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(STUDENT_RECIPE % "no_such_students")
    with pytest.raises(RecipeError, match=r"recipe.yaml:5: .*module 'no_such_students' not found"):
        load_recipe(recipe_path)

    student_module = tmp_path / "user_students.py"
    student_module.write_text("from pipeline.zoo import mlp\n\ndef make():\n    return mlp(hidden=(8,))\n")
    recipe_path.write_text(STUDENT_RECIPE % "user_students")
    checkpoint_path = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), checkpoint_path)

    def student_key() -> str:
        record = run_plan(load_recipe(recipe_path), ArtifactStore(tmp_path / "store"), checkpoint_path)
        return next(stage["key"] for stage in record["stages"] if stage["name"] == "student")

    before = student_key()
    student_module.write_text(student_module.read_text() + "EDITED = True\n")
    assert student_key() != before, "editing the student's module must rebuild the distill stage"
