"""Recipes: YAML loading with file:line errors, and the stage DAG with its checks and matrix expansion.

Everything that can be wrong with a recipe is found here, before any stage runs: unknown keys or
stages, mistyped parameters, unknown ``needs``, cycles, stages fed a model kind they cannot take, and
matrices that name no branch.

A stage with a ``matrix`` becomes one branch per combination of its values (less the ``exclude`` rows),
named ``stage[key=value,...]``; a one-input stage downstream of a branch runs once per branch and carries
its label (``distilled[amount=0.5]``), a stage with its own matrix there adds its keys to the label, and a
many-input stage (validate, benchmark) takes every branch of each stage it needs. Stages without a matrix
upstream keep their recipe names, so their cache keys are those of the same recipe without a matrix.
"""

from __future__ import annotations

import graphlib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.errors import RecipeError, did_you_mean
from pipeline.imports import add_search_path, check_reference
from pipeline.recipe.matrix import Label, branch_name, kept_combinations, matrix_combinations, matrix_problem
from pipeline.recipe.schema import STAGE_NAME_PATTERN, Recipe, StageSpec
from pipeline.recipe.yaml_lines import LineMap, load_yaml_value, load_yaml_with_lines
from pipeline.run.registry import declaration, stage_names


@dataclass(frozen=True)
class PlanStage:
    """One stage as the plan runs it: a recipe stage, or one branch of a recipe stage expanded by a matrix."""

    name: str
    stage: str  # the recipe's name for the stage it is a branch of (its own name when not a branch)
    uses: str
    needs: list[str]
    label: Label


@dataclass
class Plan:
    """A checked recipe ready to run: its stages with matrices expanded, validated params per stage, a topological order."""

    recipe: Recipe
    path: Path
    digest: str
    params: dict[str, BaseModel]
    order: list[str]
    baseline: str
    stages: dict[str, PlanStage]

    def needs_of(self, name: str) -> list[str]:
        """Upstream stages whose outputs are ``name``'s inputs."""
        return self.stages[name].needs

    def uses_of(self, name: str) -> str:
        """The stage implementation plan stage ``name`` runs."""
        return self.stages[name].uses

    def branches_of(self, stage: str) -> list[str]:
        """The plan stages of recipe stage ``stage``, in plan order: its branches, or itself alone."""
        return [name for name in self.order if self.stages[name].stage == stage]

    def trials(self) -> list[Label]:
        """The run's trials in plan order: each a combination of matrix labels no other stage's label extends."""
        labels = list(dict.fromkeys(self.stages[name].label for name in self.order if self.stages[name].label))
        return [label for label in labels if not any(set(label) < set(other) for other in labels)]

    def trials_of(self, name: str) -> list[Label]:
        """The trials stage ``name`` is part of (none for a stage outside every matrix branch)."""
        label = set(self.stages[name].label)
        return [trial for trial in self.trials() if label <= set(trial)] if label else []

    def expansions(self) -> list[dict[str, Any]]:
        """Each recipe stage that runs as branches, in plan order: its matrix's combinations (0 without one), how many
        ``exclude`` removed, the need it runs once per branch of (None: none), and its branches."""
        found = []
        for stage in dict.fromkeys(self.stages[name].stage for name in self.order):
            spec, branches = self.recipe.stages[stage], self.branches_of(stage)
            if not spec.matrix and len(branches) == 1:
                continue
            combinations = len(matrix_combinations(spec)) if spec.matrix else 0
            upstream = spec.needs[0] if declaration(spec.uses).inputs == "one" and len(self.branches_of(spec.needs[0])) > 1 else None
            excluded = combinations - len(kept_combinations(spec)) if spec.matrix else 0
            found.append({"stage": stage, "matrix": combinations, "excluded": excluded, "per_branch_of": upstream, "branches": branches})
        return found

    def uses_baseline(self, name: str) -> bool:
        """True when stage ``name`` is handed the FP32 baseline besides its inputs (``ctx.baseline``), as its
        declaration says for its params; the baseline stage itself never is."""
        declared = declaration(self.uses_of(name))
        return name != self.baseline and declared.wants_baseline(self.params[name])

    def waits_for(self, name: str) -> list[str]:
        """Upstream stages ``name`` must wait for: its needs, the baseline for stages that compare with it,
        and, for stages that time things (``runs_alone``), every other stage, so no concurrent work skews them."""
        upstream = list(self.needs_of(name))
        if self.uses_baseline(name) and self.baseline not in upstream:
            upstream.append(self.baseline)
        if declaration(self.uses_of(name)).runs_alone:
            upstream += [
                other for other in self.order
                if other not in upstream and not declaration(self.uses_of(other)).runs_alone
            ]
        return upstream


def _apply_overrides(raw: dict[str, Any], overrides: list[str], path: Path) -> None:
    """Apply ``--set STAGE.PARAM=VALUE`` (VALUE parsed as YAML) to the raw recipe mapping.

    STAGE is a recipe stage: on a stage with a matrix the value is set in ``with``, so in every branch; a branch
    name (``pruned[amount=0.5]``) and a matrix key as PARAM are refused (edit the matrix's values in the recipe)."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    for override in overrides:
        target, sep, value_text = override.partition("=")
        stage_name, dot, param = target.partition(".")
        if "[" in target:
            raise RecipeError(f"--set {override!r}: name the recipe stage, not a branch; --set STAGE.PARAM=VALUE sets it in every branch")
        if not sep or not dot or not param:
            raise RecipeError(f"--set {override!r}: write it as STAGE.PARAM=VALUE, e.g. int8.calibration_batches=32")
        if stage_name not in stages:
            raise RecipeError(f"--set {override!r}: {path} has no stage '{stage_name}'{did_you_mean(stage_name, list(stages))}")
        stage = stages[stage_name]
        if not isinstance(stage, dict):
            continue  # not a stage mapping: validating the recipe names the problem with its line
        if isinstance(stage.get("matrix"), dict) and param in stage["matrix"]:
            raise RecipeError(f"--set {override!r}: '{param}' is a matrix key of stage '{stage_name}'; edit its list of values in {path}")
        if not isinstance(stage.get("with"), dict):
            stage["with"] = {}
        stage["with"][param] = load_yaml_value(value_text, f"--set {override!r}")


def _error_message(path: Path, lines: LineMap, loc: tuple[Any, ...], message: str) -> str:
    where = ".".join(str(part) for part in loc) or "recipe"
    return f"{path}:{lines.line_of(loc)}: {where}: {message}"


def _pydantic_errors(path: Path, lines: LineMap, error: ValidationError, prefix: tuple[Any, ...], fields: list[str],
                     note: str = "") -> RecipeError:
    first = error.errors()[0]
    loc = prefix + tuple(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'{did_you_mean(str(loc[-1]), fields)}"
    elif first["type"] == "missing":
        message = f"required key '{loc[-1]}' is missing"
    elif first["type"] == "value_error":  # a validator's own sentence; a whole section as "got" would drown it
        message = message.removeprefix("Value error, ")
        if not isinstance(first.get("input"), (dict, list)) and repr(first.get("input")) not in message:
            message = f"{message} (got {first['input']!r})"
    elif "input" in first:
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" [and {more} more problem{'s' * (more > 1)}]" if more else ""
    return RecipeError(_error_message(path, lines, loc, note + message) + suffix)


def _check_section_keys(path: Path, lines: LineMap, error: ValidationError) -> RecipeError:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    owner: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = owner.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            owner = annotation
        elif owner is Recipe and part == "stages":
            owner = StageSpec
    names = [info.alias or name for name, info in owner.model_fields.items()]
    return _pydantic_errors(path, lines, error, (), names)


def _check_stage(path: Path, lines: LineMap, recipe: Recipe, name: str) -> None:
    spec = recipe.stages[name]
    loc = ("stages", name)
    if not re.match(STAGE_NAME_PATTERN, name):
        raise RecipeError(_error_message(path, lines, loc, "stage names may hold only letters, digits, '-' and '_'"))
    if spec.uses not in stage_names():
        raise RecipeError(_error_message(path, lines, loc + ("uses",), f"unknown stage '{spec.uses}'{did_you_mean(spec.uses, stage_names())}"))
    declared = declaration(spec.uses)
    for upstream in spec.needs:
        if upstream == name:
            raise RecipeError(_error_message(path, lines, loc + ("needs",), f"stage '{name}' needs itself"))
        if upstream not in recipe.stages:
            raise RecipeError(_error_message(path, lines, loc + ("needs",), f"needs unknown stage '{upstream}'{did_you_mean(upstream, list(recipe.stages))}"))
    if declared.inputs == "none" and spec.needs:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' starts a pipeline and takes no inputs; remove 'needs'"))
    if declared.inputs == "one" and len(spec.needs) != 1:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' takes exactly one input; 'needs' lists {len(spec.needs)}"))
    if declared.inputs == "many" and not spec.needs:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' needs at least one input stage"))
    fields = [info.alias or field for field, info in declared.params.model_fields.items()]
    for key in spec.matrix:
        if key not in fields:
            raise RecipeError(_error_message(path, lines, loc + ("matrix", key), f"unknown parameter '{key}' of '{spec.uses}'{did_you_mean(key, fields)}"))
    problem = matrix_problem(name, spec)
    if problem:
        raise RecipeError(_error_message(path, lines, *problem))


def _branch_params(path: Path, lines: LineMap, name: str, spec: StageSpec, label: Label) -> BaseModel:
    """The stage's params for one combination of its matrix (``with`` plus the label), checked by its ``Params``."""
    params = declaration(spec.uses).params
    try:
        return params.model_validate({**spec.with_, **dict(label)})
    except ValidationError as error:
        first = error.errors()[0]["loc"]
        section = "matrix" if first and first[0] in spec.matrix else "with"
        fields = [info.alias or field for field, info in params.model_fields.items()]
        note = f"branch {branch_name(name, label)}: " if label else ""
        raise _pydantic_errors(path, lines, error, ("stages", name, section), fields, note) from None


def _expand(path: Path, lines: LineMap, recipe: Recipe, order: list[str]) -> tuple[dict[str, PlanStage], dict[str, BaseModel]]:
    """The plan's stages in order, matrices expanded (see the module's docstring), and each one's params."""
    stages: dict[str, PlanStage] = {}
    params: dict[str, BaseModel] = {}
    branches: dict[str, list[PlanStage]] = {}
    for name in order:
        spec = recipe.stages[name]
        if declaration(spec.uses).inputs == "many":
            bases: list[tuple[Label, list[str]]] = [((), [branch.name for need in spec.needs for branch in branches[need]])]
        else:
            bases = [(branch.label, [branch.name]) for need in spec.needs for branch in branches[need]] or [((), [])]
        _check_label_keys(path, lines, name, spec, [label for label, _ in bases])
        own = [(label, _branch_params(path, lines, name, spec, label)) for label in kept_combinations(spec)]
        branches[name] = []
        for (upstream_label, needs), (label, branch_params) in itertools.product(bases, own):
            stage = PlanStage(name=branch_name(name, upstream_label + label), stage=name, uses=spec.uses, needs=needs,
                              label=upstream_label + label)
            stages[stage.name], params[stage.name] = stage, branch_params
            branches[name].append(stage)
    return stages, params


def _check_label_keys(path: Path, lines: LineMap, name: str, spec: StageSpec, upstream: list[Label]) -> None:
    """A stage's matrix keys are not keys of the upstream branches' labels, so no branch name repeats a key."""
    for label in upstream:
        for key, _ in label:
            if key in spec.matrix:
                raise RecipeError(_error_message(path, lines, ("stages", name, "matrix", key),
                                                 f"matrix key '{key}' is already in the label of upstream branch "
                                                 f"'{branch_name(spec.needs[0], label)}'; a branch name holds each key once"))


def _check_kinds(path: Path, lines: LineMap, recipe: Recipe) -> None:
    for name, spec in recipe.stages.items():
        takes = declaration(spec.uses).takes
        for upstream in spec.needs:
            made = declaration(recipe.stages[upstream].uses).makes
            if made not in takes:
                raise RecipeError(_error_message(
                    path, lines, ("stages", name, "needs"),
                    f"'{spec.uses}' takes {' or '.join(takes)} models but '{upstream}' ({recipe.stages[upstream].uses}) makes a {made} model",
                ))


def _topological_order(path: Path, lines: LineMap, recipe: Recipe) -> list[str]:
    sorter = graphlib.TopologicalSorter({name: spec.needs for name, spec in recipe.stages.items()})
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as error:
        cycle = error.args[1]
        raise RecipeError(_error_message(path, lines, ("stages", cycle[0], "needs"), f"cycle in 'needs': {' -> '.join(cycle)}")) from None


def _choose_baseline(path: Path, lines: LineMap, recipe: Recipe) -> str:
    if recipe.baseline is not None:
        if recipe.baseline not in recipe.stages:
            raise RecipeError(_error_message(path, lines, ("baseline",), f"unknown stage '{recipe.baseline}'{did_you_mean(recipe.baseline, list(recipe.stages))}"))
        return recipe.baseline
    sources = [name for name, spec in recipe.stages.items() if spec.uses == "load_checkpoint"]
    if len(sources) != 1:
        raise RecipeError(_error_message(path, lines, ("stages",), f"a recipe needs exactly one load_checkpoint stage (found {len(sources)}), or a 'baseline' key naming the FP32 stage"))
    return sources[0]


def factory_references(value: Any, loc: tuple = ()) -> list[tuple[tuple, str]]:
    """Every ``module:callable`` named under a ``factory`` key inside stage params (a distillation student)."""
    found: list[tuple[tuple, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "factory" and isinstance(item, str):
                found.append((loc + (key,), item))
            else:
                found += factory_references(item, loc + (key,))
    return found


def _check_factories(path: Path, lines: LineMap, recipe: Recipe, stages: dict[str, PlanStage], params: dict[str, BaseModel]) -> None:
    """Check every factory now (model, data, stage params) without running its module, so a missing module or
    callable is a recipe error, not a mid-run failure; see ``pipeline.imports.check_reference``."""
    add_search_path(path.parent)
    add_search_path(Path.cwd())
    references = [(("model", "factory"), recipe.model.factory)]
    if recipe.data.factory is not None:
        references.append((("data", "factory"), recipe.data.factory))
    if recipe.metric is not None and recipe.metric.function is not None:
        references.append((("metric", "function"), recipe.metric.function))
    for name, stage_params in params.items():
        references += factory_references(stage_params.model_dump(mode="json", by_alias=True), ("stages", stages[name].stage, "with"))
    for loc, reference in references:
        try:
            check_reference(reference, ".".join(loc))
        except RecipeError as error:
            raise RecipeError(f"{path}:{lines.line_of(loc)}: {error}") from None


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Plan:
    """Read, validate and plan a recipe file; every problem is a ``RecipeError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    raw, lines = load_yaml_with_lines(path)
    _apply_overrides(raw, overrides or [], path)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise _check_section_keys(path, lines, error) from None
    for name in recipe.stages:
        _check_stage(path, lines, recipe, name)
    recipe_order = _topological_order(path, lines, recipe)
    _check_kinds(path, lines, recipe)
    stages, params = _expand(path, lines, recipe, recipe_order)
    _check_factories(path, lines, recipe, stages, params)
    baseline = _choose_baseline(path, lines, recipe)
    if len([name for name in stages if stages[name].stage == baseline]) > 1:
        where = ("baseline",) if recipe.baseline is not None else ("stages", baseline)
        raise RecipeError(_error_message(path, lines, where, f"the baseline stage '{baseline}' is expanded into branches by a matrix; "
                                         "the baseline is one stage: name one upstream of every matrix"))
    canonical = json.dumps(recipe.model_dump(mode="json", by_alias=True, exclude={"schema_"}), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return Plan(recipe=recipe, path=path, digest=digest, params=params, order=list(stages), baseline=baseline, stages=stages)
