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


def matrix_schema(params_schema: dict[str, Any]) -> dict[str, Any]:
    """A ``matrix`` of stage ``uses``: its keys are the stage's parameters, each a non-empty list of that parameter's values."""
    return {
        "type": "object", "additionalProperties": False,
        "properties": {
            key: {"type": "array", "minItems": 1, "items": {name: value for name, value in schema.items() if name != "default"}}
            for key, schema in params_schema.get("properties", {}).items()
        },
    }


def with_rule(uses: str, params_schema: dict[str, Any]) -> dict[str, Any]:
    """``if uses == <uses> then with: <uses>.Params``; ``with`` is required when the params have required keys, unless
    the stage has a ``matrix``: then the matrix may give them (the planner checks every branch has them) and its
    keys are checked as the stage's parameters."""
    plain: dict[str, Any] = {"properties": {"with": {"$ref": f"#/$defs/{uses}.Params"}}}
    if params_schema.get("required"):
        plain["required"] = ["with"]
    partial = f"#/$defs/{uses}.ParamsWithMatrix" if params_schema.get("required") else f"#/$defs/{uses}.Params"
    matrixed = {"properties": {"with": {"$ref": partial}, "matrix": matrix_schema(params_schema)}}
    then = {"if": {"required": ["matrix"]}, "then": matrixed, "else": plain}
    return {"if": {"properties": {"uses": {"const": uses}}, "required": ["uses"]}, "then": then}


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a recipe, each stage's ``with:`` checked by its own stage's ``Params``."""
    schema = {"$schema": DRAFT, **Recipe.model_json_schema(by_alias=True)}
    stage_spec = schema["$defs"]["StageSpec"]
    stage_spec["properties"]["uses"]["enum"] = stage_names()
    stage_spec["allOf"] = []
    for uses in stage_names():
        definitions = params_definitions(uses)
        if definitions[f"{uses}.Params"].get("required"):  # with a matrix, ``with`` may leave required keys to it
            params_schema = definitions[f"{uses}.Params"]
            definitions[f"{uses}.ParamsWithMatrix"] = {key: value for key, value in params_schema.items() if key != "required"}
        schema["$defs"].update(definitions)
        stage_spec["allOf"].append(with_rule(uses, definitions[f"{uses}.Params"]))
    return schema
