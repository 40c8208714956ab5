"""User references like ``mypkg.models:ResNet18``: checked without running them, and resolved to callables.

``check_reference`` is what ``load_recipe`` (so ``optipipe validate``) does: it finds the module's file
through ``sys.path`` without importing it, reads it with ``ast`` and checks that the name is bound at its
top level. No user code runs. A factory must live in the project, the user's folders or an installed
package; modules of the Python standard library (``os:system``, ``subprocess:run``, ``builtins:eval``)
build no models or data and are refused, as are names a module merely imports from them.
``resolve_callable`` imports the module and is what a run does when it builds the model or data.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import RecipeError

# CPython 3.11 can fail ast.parse called from two threads at once ("AST constructor recursion depth
# mismatch", python/cpython#106905); stages compute code digests in concurrent threads, so parse one at a time.
_PARSE_LOCK = threading.Lock()


def parse_python(source: str | bytes, filename: str) -> ast.Module:
    """``ast.parse`` of a source file, safe to call from concurrent threads."""
    with _PARSE_LOCK:
        return ast.parse(source, filename=filename)

STANDARD_LIBRARY = frozenset(sys.stdlib_module_names) | {"__main__"}
FACTORY_RULE = "a factory must be a callable of your project, the recipe's folder or an installed package"
# Values of these kinds, assigned at a module's top level, are never callable.
LITERAL_NODES = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.JoinedStr, ast.ListComp, ast.DictComp, ast.SetComp)


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
    """Let user modules next to a recipe (or in the working directory) be imported.

    The folder goes at the end of ``sys.path``: a ``prefect.py`` or ``sklearn.py`` next to a recipe can
    never shadow the installed package of that name.
    """
    folder_text = str(folder.resolve())
    if folder_text not in sys.path:
        sys.path.append(folder_text)


def in_standard_library(module_name: str) -> bool:
    """True when ``module_name`` (dotted or not) belongs to the Python standard library."""
    return module_name.split(".")[0] in STANDARD_LIBRARY


@dataclass(frozen=True)
class ModuleSource:
    """Where a module lives, found without importing it: its file (None for a namespace package) and,
    for a package, the folders its submodules are looked up in."""

    file: Path | None
    package_folders: tuple[str, ...] = ()

    @property
    def is_package(self) -> bool:
        """True for a package (its submodules have folders to live in)."""
        return bool(self.package_folders)


def _submodule_source(name: str, folders: tuple[str, ...]) -> ModuleSource | None:
    """Submodule ``name`` of a package whose submodules live in ``folders``, looked up on disk in the import
    system's order (package, then extension or source module, then namespace folder)."""
    namespace_folders = []
    for folder in map(Path, folders):
        package = folder / name
        if (package / "__init__.py").is_file():
            return ModuleSource(package / "__init__.py", (str(package),))
        for suffix in (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES):
            if (folder / f"{name}{suffix}").is_file():
                return ModuleSource(folder / f"{name}{suffix}")
        if package.is_dir():
            namespace_folders.append(str(package))
    return ModuleSource(None, tuple(namespace_folders)) if namespace_folders else None


def locate_module(module_name: str) -> ModuleSource | None:
    """The source of ``module_name`` on ``sys.path``, without executing it or its parent packages; None if absent.

    Only the top-level name goes through the import system (``find_spec`` of a top-level name looks up,
    never executes); submodules are looked up in their package's folders on disk.
    """
    top_level, *submodules = module_name.split(".")
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):  # ValueError: a loaded module without a spec
        return None
    if spec is None:
        return None
    source = ModuleSource(Path(spec.origin) if spec.has_location and spec.origin else None,
                          tuple(spec.submodule_search_locations or ()))
    for name in submodules:
        source = _submodule_source(name, source.package_folders)
        if source is None:
            return None
    return source


@dataclass
class TopLevelNames:
    """What a module binds at its top level, read from its source without running it."""

    imported_from: dict[str, str] = field(default_factory=dict)  # name -> what it imports ('' when defined here)
    literals: set[str] = field(default_factory=set)  # names assigned a literal value: not callable
    star_imports: list[str] = field(default_factory=list)  # modules imported with 'from X import *'


def _top_level_statements(body: list[ast.stmt]):
    """A module's top-level statements, including those in if/try/with/for/while/match blocks, not in def or class."""
    for statement in body:
        yield statement
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for block in ("body", "orelse", "finalbody"):
            yield from _top_level_statements(getattr(statement, block, []))
        for nested in (*getattr(statement, "handlers", []), *getattr(statement, "cases", [])):
            yield from _top_level_statements(nested.body)


def _assigned_names(target: ast.expr) -> list[str]:
    """The plain names an assignment target binds (``a``, ``a, b``, ``*rest``); attributes and items bind none."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _assigned_names(element)]
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    return []


def _imported_module(module_name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` in ``module_name`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module_name if is_package else module_name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return ".".join(part for part in (package, node.module) if part)


def read_top_level_names(module_name: str, source: ModuleSource, field: str) -> TopLevelNames:
    """Parse the source file of ``module_name`` and collect the names it binds at top level."""
    try:
        tree = parse_python(source.file.read_bytes(), str(source.file))
    except SyntaxError as error:
        raise RecipeError(f"{field}: '{module_name}' cannot be read: {source.file}:{error.lineno}: {error.msg}") from None
    except OSError as error:
        raise RecipeError(f"{field}: '{module_name}' cannot be read: {source.file}: {error.strerror}") from None
    names = TopLevelNames()
    for statement in _top_level_statements(tree.body):
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.imported_from[statement.name] = ""
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                for name in _assigned_names(target):
                    names.imported_from[name] = ""
                    if isinstance(statement.value, LITERAL_NODES) and isinstance(target, ast.Name):
                        names.literals.add(name)
        elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)) and getattr(statement, "value", None) is not None:
            for name in _assigned_names(statement.target):
                names.imported_from[name] = ""
        elif isinstance(statement, ast.Import):
            for alias in statement.names:
                names.imported_from[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(statement, ast.ImportFrom):
            origin = _imported_module(module_name, source.is_package, statement)
            for alias in statement.names:
                if alias.name == "*":
                    names.star_imports.append(origin)
                else:
                    names.imported_from[alias.asname or alias.name] = f"{origin}.{alias.name}"
    return names


@dataclass(frozen=True)
class Binding:
    """How a module binds a name: where it comes from ('' defined there, else the dotted name it imports)
    and whether it is a literal (so not callable)."""

    origin: str = ""
    literal: bool = False


def find_binding(module_name: str, source: ModuleSource, attribute: str, field: str, seen: set[str]) -> Binding | None:
    """How ``module_name`` binds ``attribute`` at top level, following ``from X import *``; None when it does not."""
    if source.file is None:
        return None
    if source.file.suffix not in SOURCE_SUFFIXES:  # compiled code cannot be read; the run's import checks it
        return Binding()
    names = read_top_level_names(module_name, source, field)
    if attribute in names.imported_from:
        return Binding(origin=names.imported_from[attribute], literal=attribute in names.literals)
    if "__getattr__" in names.imported_from:  # a module-level __getattr__ may provide any name
        return Binding()
    seen.add(module_name)
    for star_module in names.star_imports:
        star_source = None if in_standard_library(star_module) or star_module in seen else locate_module(star_module)
        found = star_source and find_binding(star_module, star_source, attribute, field, seen)
        if found:
            return found
    return None


def trace_import(origin: str, field: str) -> str:
    """The dotted name an imported name finally is, following re-exports (``from a import f``) through
    modules that can be read; stops at the standard library, at compiled code and at names defined in place."""
    seen = set()
    while origin and not in_standard_library(origin) and origin not in seen:
        seen.add(origin)
        module_name, _, name = origin.rpartition(".")
        source = locate_module(module_name) if module_name else None
        binding = source and find_binding(module_name, source, name, field, set())
        if not binding or not binding.origin:
            return origin
        origin = binding.origin
    return origin


def _public_names(module_name: str, source: ModuleSource, field: str) -> str:
    """The first public names a module binds at top level, for an error message."""
    if source.file is None or source.file.suffix not in SOURCE_SUFFIXES:
        return "nothing readable"
    names = read_top_level_names(module_name, source, field).imported_from
    return ", ".join(sorted(name for name in names if not name.startswith("_"))[:12]) or "no public names"


def check_reference(reference: str, field: str) -> None:
    """Check that ``reference`` names a callable a recipe may use as a factory, without running any code.

    Refused, each as one ``RecipeError``: a module of the standard library, a module not on ``sys.path``,
    a name the module does not bind at top level, a literal, and a name imported from the standard library.
    """
    module_name, attribute = split_reference(reference, field)
    if in_standard_library(module_name):
        raise RecipeError(f"{field}: '{reference}' is in the Python standard library; {FACTORY_RULE}")
    source = locate_module(module_name)
    if source is None:
        raise RecipeError(f"{field}: module '{module_name}' not found; put it on PYTHONPATH or next to the recipe")
    binding = find_binding(module_name, source, attribute, field, set())
    if binding is not None and binding.literal:
        raise RecipeError(f"{field}: '{module_name}' sets '{attribute}' to a value, not a callable")
    if binding is None:
        raise RecipeError(
            f"{field}: '{module_name}' has no callable '{attribute}' (it has: {_public_names(module_name, source, field)})"
        )
    origin = trace_import(binding.origin, field)
    if origin and in_standard_library(origin):
        raise RecipeError(f"{field}: '{reference}' is '{origin}' of the Python standard library; {FACTORY_RULE}")


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
