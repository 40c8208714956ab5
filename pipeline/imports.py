"""Resolve user references like ``mypkg.models:ResNet18`` to callables, with a clear error for each way it fails."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import RecipeError


def split_reference(reference: str, field: str) -> tuple[str, str]:
    """Split ``module.path:attribute`` into its two parts, or say how the field must be written."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise RecipeError(
            f"{field}: '{reference}' is not a reference; write it as 'module.path:callable' "
            "(e.g. pipeline.zoo:digits_cnn)"
        )
    return module_name, attribute


def add_search_path(folder: Path) -> None:
    """Let user modules next to a recipe (or in the working directory) be imported."""
    folder_text = str(folder.resolve())
    if folder_text not in sys.path:
        sys.path.insert(0, folder_text)


def resolve_callable(reference: str, field: str) -> Callable[..., Any]:
    """Import the module of ``reference`` and return its callable, with clear errors for each way it fails."""
    module_name, attribute = split_reference(reference, field)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise RecipeError(
                f"{field}: module '{module_name}' not found; put it on PYTHONPATH or next to the recipe"
            ) from error
        raise RecipeError(f"{field}: importing '{module_name}' failed: {error}") from error
    except Exception as error:  # the user's module raised while importing: report it, do not hide it
        raise RecipeError(
            f"{field}: importing '{module_name}' raised {type(error).__name__}: {error}"
        ) from error
    target = getattr(module, attribute, None)
    if target is None or not callable(target):
        public = sorted(name for name in dir(module) if not name.startswith("_"))
        raise RecipeError(
            f"{field}: '{module_name}' has no callable '{attribute}' (it has: {', '.join(public[:12])})"
        )
    return target
