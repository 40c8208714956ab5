"""The stage registry: every module of the ``stages`` package is a stage, named by its module.

Names are listed from the package folder without importing anything; a stage's module (and its typed
``STAGE`` declaration, checked when it is imported) is loaded on first use.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

import stages
from pipeline.run.contract import StageDeclaration, StageDeclarationError

STAGES_PACKAGE = stages.__name__


def stage_names() -> list[str]:
    """Every name a recipe's ``uses`` may take: the modules of the ``stages`` package."""
    return sorted(info.name for info in pkgutil.iter_modules(stages.__path__) if not info.name.startswith("_"))


@functools.cache
def declaration(uses: str) -> StageDeclaration:
    """The typed declaration of stage ``uses`` (callers check the name with ``stage_names`` first)."""
    module = importlib.import_module(f"{STAGES_PACKAGE}.{uses}")
    declared = getattr(module, "STAGE", None)
    if not isinstance(declared, StageDeclaration):
        raise StageDeclarationError(f"{module.__file__}: a stage module must end with STAGE = declare_stage(...)")
    if declared.name != uses:
        raise StageDeclarationError(f"{module.__file__}: STAGE.name is '{declared.name}' but the module is '{uses}'")
    return declared


def stage_module_name(uses: str) -> str:
    """The importable module name of stage ``uses`` (what its code digest starts from)."""
    return f"{STAGES_PACKAGE}.{uses}"
