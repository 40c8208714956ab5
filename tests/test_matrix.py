"""Matrix branches in a recipe (names, order, exclude, errors with file:line, fan-out and fan-in), cache sharing
between branches and runs, and the ``search`` budget that bounds how many trials a run starts."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from pipeline.cli import main
from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.recipe.json_schema import recipe_json_schema
from pipeline.records.store import ArtifactStore
from pipeline.run.engine import SearchBudget
from pipeline.run.executor import StageCall, log_internal_error
from tests.conftest import run_without_prefect

HEADER = """name: t
model: {factory: pipeline.zoo:digits_cnn, input_shape: [1, 1, 8, 8]}
stages:
  load:  {uses: load_checkpoint}
  fused: {uses: fuse_conv_bn, needs: [load]}
"""
PRUNED = HEADER + """  pruned:
    uses: prune
    needs: [fused]
    with: {method: channels}
    matrix: {amount: [0.25, 0.5, 0.7]}
    exclude: [{amount: 0.7}]
"""
SEARCH = PRUNED + """  distilled: {uses: distill, needs: [pruned], with: {epochs: 1}}
  onnx: {uses: export_onnx, needs: [distilled]}
  int8:
    uses: quantize_onnx
    needs: [onnx]
    matrix: {calibrate_method: [minmax, entropy], per_channel: [true, false]}
    exclude: [{calibrate_method: entropy, per_channel: false}]
  check: {uses: validate, needs: [fused, int8]}
"""
INT8 = [f"int8[amount={amount},{rest}]" for amount in ("0.25", "0.5") for rest in (
    "calibrate_method=minmax,per_channel=true", "calibrate_method=minmax,per_channel=false", "calibrate_method=entropy,per_channel=true")]


def test_branches_are_named_by_their_values_in_order_less_the_excluded(write_recipe):
    plan = load_recipe(write_recipe(PRUNED))
    assert plan.order == ["load", "fused", "pruned[amount=0.25]", "pruned[amount=0.5]"]
    assert [plan.params[name].amount for name in plan.branches_of("pruned")] == [0.25, 0.5]
    assert {plan.params[name].method for name in plan.branches_of("pruned")} == {"channels"}
    assert plan.uses_of("pruned[amount=0.5]") == "prune" and plan.needs_of("pruned[amount=0.5]") == ["fused"]
    assert plan.expansions() == [{"stage": "pruned", "matrix": 3, "excluded": 1, "per_branch_of": None,
                                  "branches": ["pruned[amount=0.25]", "pruned[amount=0.5]"]}]


def test_one_input_stages_expand_per_branch_and_many_input_stages_take_every_branch(write_recipe):
    plan = load_recipe(write_recipe(SEARCH))
    assert plan.branches_of("distilled") == ["distilled[amount=0.25]", "distilled[amount=0.5]"]
    assert plan.needs_of("onnx[amount=0.5]") == ["distilled[amount=0.5]"]
    assert plan.branches_of("int8") == INT8
    assert plan.needs_of(INT8[4]) == ["onnx[amount=0.5]"]
    assert plan.params[INT8[4]].calibrate_method == "minmax" and plan.params[INT8[4]].per_channel is False
    assert plan.needs_of("check") == ["fused", *INT8]
    assert plan.order.index("check") == len(plan.order) - 1 and len(plan.order) == 15
    assert len(plan.trials()) == 6  # one per int8 branch: pruned[amount=0.5] is part of three of them
    assert len(plan.trials_of("pruned[amount=0.5]")) == 3 and plan.trials_of(INT8[0]) == [plan.stages[INT8[0]].label]
    assert plan.trials_of("fused") == [] and plan.trials_of("check") == []


MATRIX_LINE, EXCLUDE_LINE = 10, 11  # of stage pruned in SEARCH
ERRORS = [
    ("with: {method: channels}", "with: {method: channels, amount: 0.5}", MATRIX_LINE, "'amount' is both in 'with' and in 'matrix'"),
    ("[0.25, 0.5, 0.7]", "[]", MATRIX_LINE, "matrix key 'amount' has no values"),
    ("{amount: 0.7}]", "{amout: 0.7}]", EXCLUDE_LINE, "exclude names 'amout', which is not a matrix key .did you mean 'amount'"),
    ("{amount: 0.7}]", "{amount: 0.8}]", EXCLUDE_LINE, "amount: 0.8, which is not one of its matrix values"),
    ("[{amount: 0.7}]", "[{}]", EXCLUDE_LINE, "exclude removes all 3 combinations of the matrix"),
    ("[0.25, 0.5, 0.7]", "[0.25, 1.5, 0.7]", MATRIX_LINE, r"branch pruned\[amount=1.5\]: Input should be less than 1"),
    ("matrix: {amount:", "matrix: {amout:", MATRIX_LINE, "unknown parameter 'amout' of 'prune' .did you mean 'amount'"),
    ("[0.25, 0.5, 0.7]", "[0.25, a/b, 0.7]", MATRIX_LINE, "matrix value 'a/b' of 'amount' holds one of /"),
    ("[0.25, 0.5, 0.7]", "[0.25, ' ', 0.7]", MATRIX_LINE, "matrix value ' ' of 'amount' is blank"),
    ("[0.25, 0.5, 0.7]", "[0.25, 0.25, 0.7]", MATRIX_LINE, "matrix key 'amount' lists 0.25 twice"),
    ("{uses: distill, needs: [pruned], with: {epochs: 1}}",
     "{uses: prune, needs: [pruned], with: {method: channels}, matrix: {amount: [0.1]}}",
     12, r"'amount' is already in the label of upstream branch 'pruned\[amount=0.25\]'"),
    ("stages:\n", "baseline: distilled\nstages:\n", 3, "the baseline stage 'distilled' is expanded into branches"),
]


@pytest.mark.parametrize(("old", "new", "line", "message"), ERRORS, ids=[case[3][:30] for case in ERRORS])
def test_matrix_mistakes_are_one_line_with_file_and_line(write_recipe, old, new, line, message):
    assert old in SEARCH
    path = write_recipe(SEARCH.replace(old, new, 1))
    with pytest.raises(RecipeError, match=message) as raised:
        load_recipe(path)
    assert str(raised.value).startswith(f"{path}:{line}: ") and "\n" not in str(raised.value)


def test_set_applies_to_every_branch_and_refuses_matrix_keys_and_branch_names(write_recipe):
    path = write_recipe(PRUNED)
    plan = load_recipe(path, ["pruned.norm=2"])
    assert [plan.params[name].norm for name in plan.branches_of("pruned")] == [2, 2]
    with pytest.raises(RecipeError, match="'amount' is a matrix key of stage 'pruned'"):
        load_recipe(path, ["pruned.amount=0.3"])
    with pytest.raises(RecipeError, match="name the recipe stage, not a branch"):
        load_recipe(path, ["pruned[amount=0.5].norm=2"])


def test_validate_prints_the_expansion_and_json_has_it(write_recipe, capsys):
    path = write_recipe(SEARCH)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "15 stages" in out and "int8[amount=0.25,calibrate_method=minmax,per_channel=true]" in out
    assert "pruned: matrix 3 - 1 excluded = 2 branches: pruned[amount=0.25], pruned[amount=0.5]" in out
    assert "distilled: one per branch of pruned = 2 branches" in out
    assert "int8: matrix 4 - 1 excluded = 3 per branch of onnx = 6 branches" in out
    assert main(["validate", str(path), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [entry["stage"] for entry in planned["expansions"]] == ["pruned", "distilled", "onnx", "int8"]
    assert planned["stages"][INT8[1]]["label"] == {"amount": 0.25, "calibrate_method": "minmax", "per_channel": False}
    assert planned["stages"][INT8[1]]["branch_of"] == "int8"


def test_json_schema_checks_matrix_keys_as_the_stage_parameters(write_recipe):
    import yaml

    validator = Draft202012Validator(recipe_json_schema())
    recipe = yaml.safe_load(SEARCH)
    assert not list(validator.iter_errors(recipe))  # prune's required amount comes from the matrix
    recipe["stages"]["pruned"]["matrix"] = {"amount": [1.5]}
    assert [list(error.absolute_path) for error in validator.iter_errors(recipe)] == [["stages", "pruned", "matrix", "amount", 0]]
    recipe["stages"]["pruned"]["matrix"] = {"amout": [0.5]}
    assert "'amout' was unexpected" in next(validator.iter_errors(recipe)).message


def test_search_budget_stops_starting_trials_after_max_minutes(write_recipe):
    plan = load_recipe(write_recipe(PRUNED.replace("stages:", "search: {max_minutes: 5}\nstages:")))
    now = [0.0]
    budget = SearchBudget(plan, clock=lambda: now[0])
    assert budget.admit("fused") is None and budget.admit("pruned[amount=0.25]") is None
    now[0] = 301.0
    assert budget.admit("pruned[amount=0.25]") is None  # its trial started before the time ran out
    assert budget.admit("pruned[amount=0.5]") == "search budget: max_minutes 5 passed"
    assert budget.admit("fused") is None


def test_a_bracketed_stage_name_makes_a_plain_log_file(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    call = StageCall(recipe_path="r.yaml", overrides=(), recipe_digest="d", store_root=str(store.root), checkpoint_path="c",
                     checkpoint_sha256="s", run_id="run-1", stage=INT8[0])
    log_path = log_internal_error(store, call, ValueError("boom"))
    assert log_path == store.runs_dir / "run-1" / f"{INT8[0]}.log" and "boom" in log_path.read_text()


CALIBRATED = HEADER + """  onnx:  {uses: export_onnx, needs: [fused]}
  int8:
    uses: quantize_onnx
    needs: [onnx]
    with: {calibration_batches: 2, min_agreement: 0.5}
    matrix: {calibrate_method: [minmax, percentile], per_channel: [true, false]}
    exclude: [{calibrate_method: percentile, per_channel: false}]
  check: {uses: validate, needs: [int8], with: {max_drop: 0.5, min_agreement: 0.5}}
"""
CALIBRATED_BRANCHES = ["int8[calibrate_method=minmax,per_channel=true]", "int8[calibrate_method=minmax,per_channel=false]",
                       "int8[calibrate_method=percentile,per_channel=true]"]


def states(record: dict) -> dict[str, tuple[str, str | None]]:
    """Stage name -> (state, key) of a run record, in record order."""
    return {stage["name"]: (stage["state"], stage["key"]) for stage in record["stages"]}


@pytest.fixture(scope="module")
def first_run(demo_checkpoint, tmp_path_factory):
    """The calibration matrix run once in a fresh store: (store root, recipe folder, run record)."""
    folder = tmp_path_factory.mktemp("matrix")
    path = folder / "calibrated.yaml"
    path.write_text(CALIBRATED)
    return folder / "store", folder, run_without_prefect(path, demo_checkpoint, folder / "store")


def test_branches_share_the_prefix_and_have_distinct_keys(first_run):
    _, _, record = first_run
    assert record["state"] == "succeeded", record["message"]
    ran = states(record)
    assert list(ran) == ["load", "fused", "onnx", *CALIBRATED_BRANCHES, "check"]
    assert all(state == "done" for state, _ in ran.values())
    assert len({ran[name][1] for name in CALIBRATED_BRANCHES}) == 3
    assert record["dag"]["check"] == CALIBRATED_BRANCHES
    check = next(stage for stage in record["stages"] if stage["name"] == "check")
    assert set(check["metrics"]["variants"]) == set(CALIBRATED_BRANCHES)
    assert record["search"]["trials"] == 3 and record["search"]["skipped_for_budget"] == []


def test_one_more_value_reuses_every_earlier_key_and_runs_only_the_new_branch(first_run, demo_checkpoint):
    store, folder, record = first_run
    path = folder / "wider.yaml"
    path.write_text(CALIBRATED.replace("[minmax, percentile]", "[minmax, percentile, entropy]").replace(
        "exclude: [{calibrate_method: percentile, per_channel: false}]",
        "exclude: [{calibrate_method: percentile, per_channel: false}, {calibrate_method: entropy, per_channel: false}]"))
    wider = states(run_without_prefect(path, demo_checkpoint, store))
    before = states(record)
    new = "int8[calibrate_method=entropy,per_channel=true]"
    assert list(wider) == ["load", "fused", "onnx", *CALIBRATED_BRANCHES, new, "check"]
    for name in ["load", "fused", "onnx", *CALIBRATED_BRANCHES]:
        assert wider[name] == ("cached", before[name][1]), name
    assert wider[new][0] == "done" and wider[new][1] not in {key for _, key in before.values()}
    assert wider["check"][0] == "done"  # a new input: validated anew


def test_max_trials_skips_the_other_branches_and_validate_goes_on_with_the_finished_one(first_run, demo_checkpoint):
    store, folder, record = first_run
    path = folder / "budget.yaml"
    path.write_text(CALIBRATED.replace("stages:", "search: {max_trials: 1}\nstages:"))
    budgeted = run_without_prefect(path, demo_checkpoint, store)
    assert budgeted["state"] == "succeeded", budgeted["message"]
    ran = {stage["name"]: stage for stage in budgeted["stages"]}
    assert ran[CALIBRATED_BRANCHES[0]]["key"] == states(record)[CALIBRATED_BRANCHES[0]][1]
    for name in CALIBRATED_BRANCHES[1:]:
        assert ran[name]["state"] == "skipped" and ran[name]["reason"] == "search budget: max_trials 1 reached"
    assert ran["check"]["state"] == "done" and set(ran["check"]["metrics"]["variants"]) == {CALIBRATED_BRANCHES[0]}
    assert budgeted["search"] == {
        "max_trials": 1, "max_minutes": None, "trials": 3, "tried": ["calibrate_method=minmax,per_channel=true"],
        "not_tried": ["calibrate_method=minmax,per_channel=false", "calibrate_method=percentile,per_channel=true"],
        "skipped_for_budget": CALIBRATED_BRANCHES[1:],
    }
