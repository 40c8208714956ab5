"""Parse stored JSON through its declared model, failing with one line that names where and which field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import StoreError

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_record(model: type[ModelT], data: Any, where: str) -> ModelT:
    """``data`` as ``model``; raise ``StoreError`` ``<where>: <field path>: <problem>`` when it does not match."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = error.errors()
        first = problems[0]
        field_path = ".".join(str(part) for part in first["loc"]) or "(whole value)"
        message = first["msg"][:1].lower() + first["msg"][1:]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{where}: {field_path}: {message}{more}") from None
