"""Recipes: YAML loading with file:line errors, and the stage DAG with its checks.

Everything that can be wrong with a recipe is found here, before any stage runs: unknown keys or
stages, mistyped parameters, unknown ``needs``, cycles, and stages fed a model kind they cannot take.
"""

from __future__ import annotations

import difflib
import graphlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.errors import RecipeError
from pipeline.imports import add_search_path, check_reference
from pipeline.recipe.schema import STAGE_NAME_PATTERN, Recipe, StageSpec
from pipeline.recipe.yaml_lines import LineMap, load_yaml_value, load_yaml_with_lines
from pipeline.run.registry import declaration, stage_names


@dataclass
class Plan:
    """A checked recipe ready to run: validated params per stage and a topological order."""

    recipe: Recipe
    path: Path
    digest: str
    params: dict[str, BaseModel]
    order: list[str]
    baseline: str

    def needs_of(self, name: str) -> list[str]:
        """Upstream stages whose outputs are ``name``'s inputs."""
        return self.recipe.stages[name].needs

    def uses_baseline(self, name: str) -> bool:
        """True when stage ``name`` is handed the FP32 baseline besides its inputs (``ctx.baseline``), as its
        declaration says for its params; the baseline stage itself never is."""
        declared = declaration(self.recipe.stages[name].uses)
        return name != self.baseline and declared.wants_baseline(self.params[name])

    def waits_for(self, name: str) -> list[str]:
        """Upstream stages ``name`` must wait for: its needs, the baseline for stages that compare with it,
        and, for stages that time things (``runs_alone``), every other stage, so no concurrent work skews them."""
        upstream = list(self.needs_of(name))
        if self.uses_baseline(name) and self.baseline not in upstream:
            upstream.append(self.baseline)
        if declaration(self.recipe.stages[name].uses).runs_alone:
            upstream += [
                other for other in self.order
                if other not in upstream and not declaration(self.recipe.stages[other].uses).runs_alone
            ]
        return upstream


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (choose from: {', '.join(sorted(choices))})"


def _apply_overrides(raw: dict[str, Any], overrides: list[str], path: Path) -> None:
    """Apply ``--set STAGE.PARAM=VALUE`` (VALUE parsed as YAML) to the raw recipe mapping."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    for override in overrides:
        target, sep, value_text = override.partition("=")
        stage_name, dot, param = target.partition(".")
        if not sep or not dot or not param:
            raise RecipeError(f"--set {override!r}: write it as STAGE.PARAM=VALUE, e.g. int8.calibration_batches=32")
        if stage_name not in stages:
            raise RecipeError(f"--set {override!r}: {path} has no stage '{stage_name}'{_suggest(stage_name, list(stages))}")
        stage = stages[stage_name]
        if not isinstance(stage, dict):
            continue  # not a stage mapping: validating the recipe names the problem with its line
        if not isinstance(stage.get("with"), dict):
            stage["with"] = {}
        stage["with"][param] = load_yaml_value(value_text, f"--set {override!r}")


def _error_message(path: Path, lines: LineMap, loc: tuple[Any, ...], message: str) -> str:
    where = ".".join(str(part) for part in loc) or "recipe"
    return f"{path}:{lines.line_of(loc)}: {where}: {message}"


def _pydantic_errors(path: Path, lines: LineMap, error: ValidationError, prefix: tuple[Any, ...], fields: list[str]) -> RecipeError:
    first = error.errors()[0]
    loc = prefix + tuple(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'{_suggest(str(loc[-1]), fields)}"
    elif first["type"] == "missing":
        message = f"required key '{loc[-1]}' is missing"
    elif "input" in first and first["type"] not in {"missing"}:
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" [and {more} more problem{'s' * (more > 1)}]" if more else ""
    return RecipeError(_error_message(path, lines, loc, message) + suffix)


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


def _check_stage(path: Path, lines: LineMap, recipe: Recipe, name: str) -> BaseModel:
    spec = recipe.stages[name]
    loc = ("stages", name)
    if not re.match(STAGE_NAME_PATTERN, name):
        raise RecipeError(_error_message(path, lines, loc, "stage names may hold only letters, digits, '-' and '_'"))
    if spec.uses not in stage_names():
        raise RecipeError(_error_message(path, lines, loc + ("uses",), f"unknown stage '{spec.uses}'{_suggest(spec.uses, stage_names())}"))
    declared = declaration(spec.uses)
    for upstream in spec.needs:
        if upstream == name:
            raise RecipeError(_error_message(path, lines, loc + ("needs",), f"stage '{name}' needs itself"))
        if upstream not in recipe.stages:
            raise RecipeError(_error_message(path, lines, loc + ("needs",), f"needs unknown stage '{upstream}'{_suggest(upstream, list(recipe.stages))}"))
    if declared.inputs == "none" and spec.needs:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' starts a pipeline and takes no inputs; remove 'needs'"))
    if declared.inputs == "one" and len(spec.needs) != 1:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' takes exactly one input; 'needs' lists {len(spec.needs)}"))
    if declared.inputs == "many" and not spec.needs:
        raise RecipeError(_error_message(path, lines, loc + ("needs",), f"'{spec.uses}' needs at least one input stage"))
    try:
        return declared.params.model_validate(spec.with_)
    except ValidationError as error:
        fields = [info.alias or field for field, info in declared.params.model_fields.items()]
        raise _pydantic_errors(path, lines, error, loc + ("with",), fields) from None


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
            raise RecipeError(_error_message(path, lines, ("baseline",), f"unknown stage '{recipe.baseline}'{_suggest(recipe.baseline, list(recipe.stages))}"))
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


def _check_factories(path: Path, lines: LineMap, recipe: Recipe, params: dict[str, BaseModel]) -> None:
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
        references += factory_references(stage_params.model_dump(mode="json", by_alias=True), ("stages", name, "with"))
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
    params = {name: _check_stage(path, lines, recipe, name) for name in recipe.stages}
    _check_factories(path, lines, recipe, params)
    order = _topological_order(path, lines, recipe)
    _check_kinds(path, lines, recipe)
    baseline = _choose_baseline(path, lines, recipe)
    canonical = json.dumps(recipe.model_dump(mode="json", by_alias=True, exclude={"schema_"}), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return Plan(recipe=recipe, path=path, digest=digest, params=params, order=order, baseline=baseline)
