"""The recipe JSON Schema: each stage's ``with:`` is checked by its own stage's params, the committed file is current."""

from __future__ import annotations

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.recipe.json_schema import recipe_json_schema
from pipeline.run.registry import stage_names
from tests.conftest import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
COMMITTED_SCHEMA = RECIPES / "recipe.schema.json"
EDITOR_HEADER = ["# yaml-language-server: $schema=./recipe.schema.json", "$schema: ./recipe.schema.json"]


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    """A draft 2020-12 validator of the generated recipe schema (the schema itself checked first)."""
    schema = recipe_json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def small_recipe(**onnx_with) -> dict:
    """A valid three-stage recipe; ``onnx_with`` becomes the ``export_onnx`` stage's ``with``."""
    return {
        "name": "t",
        "model": {"factory": "pipeline.zoo:digits_cnn", "input_shape": [1, 1, 8, 8]},
        "stages": {
            "load": {"uses": "load_checkpoint"},
            "fused": {"uses": "fuse_conv_bn", "needs": ["load"]},
            "onnx": {"uses": "export_onnx", "needs": ["fused"], "with": {"opset": 18, **onnx_with}},
        },
    }


def the_error(validator: Draft202012Validator, recipe: dict):
    """The error a validator reports first (``best_match``) for ``recipe``, which must have one."""
    error = best_match(validator.iter_errors(recipe))
    assert error is not None, "the schema accepted a broken recipe"
    return error


def ready_recipes() -> list:
    """Every recipe shipped in ``recipes/``."""
    paths = sorted(RECIPES.glob("*.yaml"))
    assert paths, f"no recipes found in {RECIPES}"
    return paths


def test_small_recipe_is_valid(validator):
    assert list(validator.iter_errors(small_recipe())) == []


def test_ready_recipes_validate(validator):
    for path in ready_recipes():
        errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], f"{path.name}: {errors}"


def test_ready_recipes_point_editors_at_the_schema():
    for path in ready_recipes():
        assert path.read_text().splitlines()[:2] == EDITOR_HEADER, f"{path.name} must start with {EDITOR_HEADER}"


def test_unknown_stage_is_rejected_at_uses(validator):
    recipe = small_recipe()
    recipe["stages"]["fused"]["uses"] = "fuse_conv_bnn"
    error = the_error(validator, recipe)
    assert list(error.absolute_path) == ["stages", "fused", "uses"] and error.validator == "enum"
    assert "fuse_conv_bnn" in error.message


def test_misspelt_parameter_is_rejected_in_with(validator):
    recipe = small_recipe()
    recipe["stages"]["onnx"]["with"] = {"opsett": 18}
    error = the_error(validator, recipe)
    assert list(error.absolute_path) == ["stages", "onnx", "with"] and error.validator == "additionalProperties"
    assert "'opsett'" in error.message


def test_mistyped_parameter_value_is_rejected_at_the_parameter(validator):
    error = the_error(validator, small_recipe(opset="eighteen"))
    assert list(error.absolute_path) == ["stages", "onnx", "with", "opset"] and error.validator == "type"
    assert "eighteen" in error.message


def test_parameter_of_another_stage_is_rejected(validator):
    error = the_error(validator, small_recipe(batch_sizes=[1]))
    assert list(error.absolute_path) == ["stages", "onnx", "with"] and "'batch_sizes'" in error.message


def test_nested_parameter_typo_is_rejected(validator):
    recipe = small_recipe()
    recipe["stages"]["pruned"] = {
        "uses": "prune", "needs": ["fused"],
        "with": {"method": "channels", "amount": 0.5, "finetune": {"epochs": 1, "lrr": 0.1}},
    }
    error = the_error(validator, recipe)
    assert list(error.absolute_path) == ["stages", "pruned", "with", "finetune"] and "'lrr'" in error.message


def test_required_parameters_make_with_required(validator):
    recipe = small_recipe()
    recipe["stages"]["pruned"] = {"uses": "prune", "needs": ["fused"]}
    error = the_error(validator, recipe)
    assert list(error.absolute_path) == ["stages", "pruned"] and "'with'" in error.message


def test_every_stage_params_refuse_unknown_keys():
    definitions = recipe_json_schema()["$defs"]
    for uses in stage_names():
        assert definitions[f"{uses}.Params"]["additionalProperties"] is False, uses
    stage_definitions = [name for name in definitions if "." in name]
    assert all(definitions[name]["additionalProperties"] is False for name in stage_definitions), stage_definitions


def test_committed_schema_is_current(capsys):
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert COMMITTED_SCHEMA.read_text() == printed, (
        f"{COMMITTED_SCHEMA.relative_to(REPO_ROOT)} is stale: regenerate it with "
        "`optipipe schema > recipes/recipe.schema.json`"
    )


def test_schema_key_loads_and_keeps_the_digest(write_recipe):
    text = yaml.safe_dump(small_recipe(), sort_keys=False)
    plain = load_recipe(write_recipe(text, "plain.yaml"))
    pointed = load_recipe(write_recipe("$schema: ./recipe.schema.json\n" + text, "pointed.yaml"))
    assert pointed.recipe.schema_ == "./recipe.schema.json"
    assert pointed.digest == plain.digest
