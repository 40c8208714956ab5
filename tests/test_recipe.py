"""Recipe checks: every mistake is found before anything runs, with file, line and the nearest valid name."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.recipe.json_schema import recipe_json_schema

HEADER = """name: t
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
"""
TWO_BRANCHES = HEADER + """  load: {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
  onnx: {uses: export_onnx, needs: [fused], with: {opset: 17}}
  check: {uses: validate, needs: [fused, onnx]}
"""


def recipe_error(write_recipe, text: str) -> str:
    path = write_recipe(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message
    return message


def test_valid_recipe_is_planned_in_dependency_order(write_recipe):
    plan = load_recipe(write_recipe(TWO_BRANCHES))
    assert plan.order.index("load") < plan.order.index("fused") < plan.order.index("onnx") < plan.order.index("check")
    assert plan.baseline == "load"
    assert plan.params["onnx"].opset == 17
    assert plan.waits_for("check") == ["fused", "onnx", "load"]


def test_unknown_stage_names_line_and_suggestion(write_recipe):
    message = recipe_error(write_recipe, HEADER + "  load: {uses: load_checkpoint}\n  fused: {uses: fuse_conv_bm, needs: [load]}\n")
    assert ":5:" in message and "fuse_conv_bm" in message and "did you mean 'fuse_conv_bn'" in message


def test_typo_in_parameter_suggests_the_real_one(write_recipe):
    text = TWO_BRANCHES.replace("{opset: 17}", "{opsett: 17}")
    message = recipe_error(write_recipe, text)
    assert ":6:" in message and "stages.onnx.with.opsett" in message and "did you mean 'opset'" in message


def test_mistyped_parameter_value(write_recipe):
    message = recipe_error(write_recipe, TWO_BRANCHES.replace("{opset: 17}", "{opset: seventeen}"))
    assert "stages.onnx.with.opset" in message and "seventeen" in message


def test_unknown_top_level_key(write_recipe):
    message = recipe_error(write_recipe, "nme: x\n" + TWO_BRANCHES)
    assert ":1:" in message and "unknown key 'nme'" in message and "did you mean 'name'" in message


def test_unknown_key_in_stage(write_recipe):
    message = recipe_error(write_recipe, HEADER + "  load: {uses: load_checkpoint, need: []}\n")
    assert "unknown key 'need'" in message and "did you mean 'needs'" in message


def test_unknown_needs(write_recipe):
    message = recipe_error(write_recipe, HEADER + "  load: {uses: load_checkpoint}\n  fused: {uses: fuse_conv_bn, needs: [laod]}\n")
    assert "needs unknown stage 'laod'" in message and "did you mean 'load'" in message


def test_cycle_is_named(write_recipe):
    text = HEADER + """  load: {uses: load_checkpoint}
  a: {uses: fuse_conv_bn, needs: [b]}
  b: {uses: fuse_conv_bn, needs: [a]}
"""
    message = recipe_error(write_recipe, text)
    assert "cycle in 'needs'" in message and "a" in message and "b" in message


def test_self_dependency(write_recipe):
    message = recipe_error(write_recipe, HEADER + "  load: {uses: load_checkpoint}\n  a: {uses: fuse_conv_bn, needs: [a]}\n")
    assert "needs itself" in message


def test_kind_mismatch_onnx_into_fusion(write_recipe):
    text = HEADER + """  load: {uses: load_checkpoint}
  onnx: {uses: export_onnx, needs: [load]}
  fused: {uses: fuse_conv_bn, needs: [onnx]}
"""
    message = recipe_error(write_recipe, text)
    assert ":6:" in message and "takes torch models but 'onnx' (export_onnx) makes a onnx model" in message


def test_yaml_syntax_error_has_line(write_recipe):
    message = recipe_error(write_recipe, HEADER + "  load: {uses: load_checkpoint\n  x: [\n")
    assert "YAML syntax error" in message


def test_empty_file_and_empty_stages(write_recipe):
    assert "this file is empty" in recipe_error(write_recipe, "")
    assert "stages" in recipe_error(write_recipe, HEADER + "  {}\n")


def test_stage_name_with_path_traversal_is_refused(write_recipe):
    message = recipe_error(write_recipe, HEADER + '  "../../x": {uses: load_checkpoint}\n')
    assert "letters, digits" in message


def test_overrides_change_params_and_reject_unknown_stage(write_recipe):
    path = write_recipe(TWO_BRANCHES)
    assert load_recipe(path, ["onnx.opset=16"]).params["onnx"].opset == 16
    with pytest.raises(RecipeError, match="no stage 'onyx'.*did you mean 'onnx'"):
        load_recipe(path, ["onyx.opset=16"])
    with pytest.raises(RecipeError, match="opsett"):
        load_recipe(path, ["onnx.opsett=16"])


def test_cli_validate_and_schema(write_recipe, capsys):
    assert main(["validate", str(write_recipe(TWO_BRANCHES))]) == 0
    assert "4 stages" in capsys.readouterr().out
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "stages" in schema["properties"]
    assert "opset" in schema["$defs"]["export_onnx.Params"]["properties"]
    assert schema == recipe_json_schema()
    references = set(re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(schema)))
    assert references and references <= set(schema["$defs"]), "every $ref must resolve inside the schema"
    assert "prune.Finetune" in references


def test_cli_prints_one_line_and_exits_2(write_recipe, capsys):
    path = write_recipe(HEADER + "  load: {uses: load_chekpoint}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "did you mean 'load_checkpoint'" in err


def test_bundled_recipes_are_valid():
    from tests.conftest import REPO_ROOT

    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_distill_waits_for_the_baseline_only_when_it_is_the_teacher(write_recipe):
    plan = load_recipe(write_recipe("""name: kd
model: {factory: "pipeline.zoo:digits_cnn", input_shape: [1, 1, 8, 8]}
stages:
  load: {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
  taught: {uses: distill, needs: [fused]}
  fresh: {uses: distill, needs: [fused], with: {student: {factory: "pipeline.zoo:mlp"}}}
"""))
    assert plan.waits_for("taught") == ["fused", "load"] and plan.uses_baseline("taught")
    assert plan.waits_for("fresh") == ["fused"] and not plan.uses_baseline("fresh")
