"""The JSON Schema of recipe files, for editors, ``check-jsonschema`` and ``optipipe schema``.

Each stage's ``with:`` is checked against the ``Params`` of the stage its ``uses`` names: ``uses`` is an
``enum`` of the stage names, and for each name an ``if``/``then`` pair selects ``#/$defs/<name>.Params``.
An ``if``/``then`` (not a ``oneOf``) keeps validators' errors on the one stage the recipe meant, instead of
a "not valid under any of the given schemas" over all of them.
"""

from __future__ import annotations

from typing import Any

from pipeline.recipe.schema import Recipe
from pipeline.run.registry import declaration, stage_names

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def params_definitions(uses: str) -> dict[str, Any]:
    """``$defs`` entries of stage ``uses``: its ``Params`` and nested models, each named ``<uses>.<model>``."""
    params_schema = declaration(uses).params.model_json_schema(by_alias=True, ref_template=f"#/$defs/{uses}.{{model}}")
    definitions = {f"{uses}.{model_name}": nested for model_name, nested in params_schema.pop("$defs", {}).items()}
    definitions[f"{uses}.Params"] = params_schema
    return definitions


def with_rule(uses: str, params_schema: dict[str, Any]) -> dict[str, Any]:
    """``if uses == <uses> then with: <uses>.Params``; ``with`` is required when the params have required keys."""
    then: dict[str, Any] = {"properties": {"with": {"$ref": f"#/$defs/{uses}.Params"}}}
    if params_schema.get("required"):
        then["required"] = ["with"]
    return {"if": {"properties": {"uses": {"const": uses}}, "required": ["uses"]}, "then": then}


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a recipe, each stage's ``with:`` checked by its own stage's ``Params``."""
    schema = {"$schema": DRAFT, **Recipe.model_json_schema(by_alias=True)}
    stage_spec = schema["$defs"]["StageSpec"]
    stage_spec["properties"]["uses"]["enum"] = stage_names()
    stage_spec["allOf"] = []
    for uses in stage_names():
        definitions = params_definitions(uses)
        schema["$defs"].update(definitions)
        stage_spec["allOf"].append(with_rule(uses, definitions[f"{uses}.Params"]))
    return schema
