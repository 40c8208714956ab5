"""Digests of the code a stage runs: its module plus every project module it imports, transitively.

A stage's cache key must cover all the code that shapes its output. Hashing only the stage's own file
is wrong both ways: an edit to a helper it calls (``pipeline/torchkit/train.py``, say) keeps serving
artifacts built by the old helper, while a comment-only edit in the stage rebuilds everything. Olive's
stale-cache bugs came from exactly this kind of key, one that left out code that runs.

So the key here is built from the import graph. Starting at the stage module, every ``import`` and
``from ... import`` in the source (at module level, inside functions and under conditionals alike: a
lazy import is code the stage runs too) is followed to the modules it names, and so are the parent
packages whose ``__init__.py`` an import runs. A module counts as project code when its file resolves
under one of the project roots; everything else (torch, numpy, the standard library, other
third-party packages) is left out, because library versions are keyed separately. Modules are found
purely through the file system and are never imported, so digesting a stage costs no torch import.

Each file is hashed through a normalised text of its code: the AST with the module, class and
function docstrings removed, dumped without positions. Comments, blank lines, docstrings and
formatting therefore do not change a digest; any change to the code itself does.

What these digests cannot see is still the job of a stage's ``version``: data files a stage reads,
the behaviour of external tools it drives, and modules reached only through dynamic imports
(``importlib.import_module``) rather than ``import`` statements.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.imports import parse_python

DEFAULT_ROOTS: tuple[Path, ...] = (Path(__file__).resolve().parents[2],)
"""The folder holding the ``pipeline`` package (and ``stages``): where project modules live."""


@dataclass(frozen=True)
class ImportStatement:
    """One ``import`` or ``from ... import`` as written: enough to resolve it against a package."""

    level: int  # leading dots of a relative import; 0 for an absolute one
    module: str  # the dotted name after ``import`` / ``from`` ("" in ``from . import x``)
    names: tuple[str, ...]  # what a ``from`` import takes from ``module``; () for a plain ``import``


@dataclass(frozen=True)
class ParsedModule:
    """What the digest needs from one source file: the hash of its normalised code and its imports."""

    code_sha256: str
    imports: tuple[ImportStatement, ...]


def normalised_code(source: str, filename: str = "<source>") -> str:
    """A canonical text of the code: the AST without docstrings (module/class/function), comments gone, formatting irrelevant."""
    return _canonical_text(parse_python(source, filename))


def code_closure(module_name: str, roots: Sequence[Path] | None = None) -> dict[str, str]:
    """module name -> sha256 of its normalised code, for the module and its transitive project imports (sorted keys)."""
    search_roots = tuple(Path(root) for root in (DEFAULT_ROOTS if roots is None else roots))
    if _find_source(module_name, search_roots) is None:
        raise ModuleNotFoundError(f"{module_name!r} is not a module under {', '.join(map(str, search_roots))}")
    code_hashes: dict[str, str] = {}
    pending = _with_parent_packages(module_name)
    while pending:
        name = pending.pop()
        source_path = None if name in code_hashes else _find_source(name, search_roots)
        if source_path is None:
            continue
        parsed = _parse_file(source_path)
        code_hashes[name] = parsed.code_sha256
        package = name if source_path.name == "__init__.py" else name.rpartition(".")[0]
        for statement in parsed.imports:
            for imported in _imported_module_names(statement, package):
                pending.extend(_with_parent_packages(imported))
    return dict(sorted(code_hashes.items()))


def code_digest(module_name: str, roots: Sequence[Path] | None = None) -> str:
    """sha256 hex over the normalised code of `module_name` and every project module it imports, transitively."""
    closure_lines = "".join(f"{name}\t{sha}\n" for name, sha in code_closure(module_name, roots).items())
    return hashlib.sha256(closure_lines.encode("utf-8")).hexdigest()


def _canonical_text(tree: ast.Module) -> str:
    """The dump of ``tree`` without docstrings or source positions (mutates ``tree``)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            _drop_docstring(node)
    return ast.dump(tree, include_attributes=False)


def _drop_docstring(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """Remove the leading string-constant expression of ``node``'s body; an emptied def/class gets ``pass``."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            del body[0]
    if not body and not isinstance(node, ast.Module):
        body.append(ast.Pass())


def _import_statements(tree: ast.Module) -> tuple[ImportStatement, ...]:
    """Every import in ``tree``, wherever it sits (module level, functions, conditionals), in source order."""
    statements: list[ImportStatement] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.extend(ImportStatement(0, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            taken = tuple(alias.name for alias in node.names if alias.name != "*")
            statements.append(ImportStatement(node.level, node.module or "", taken))
    return tuple(statements)


def _parse_file(source_path: Path) -> ParsedModule:
    """The parsed form of ``source_path``, re-read only when its modification time or size changed."""
    stat = source_path.stat()
    return _parse_file_version(str(source_path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _parse_file_version(source_path: str, mtime_ns: int, size: int) -> ParsedModule:
    """Parse one version of a file (the cache key includes ``mtime_ns`` and ``size`` so edits are seen).

    A syntax error propagates as ``SyntaxError`` carrying ``source_path`` as its filename.
    """
    tree = parse_python(Path(source_path).read_bytes(), source_path)
    imports = _import_statements(tree)
    code_sha256 = hashlib.sha256(_canonical_text(tree).encode("utf-8")).hexdigest()
    return ParsedModule(code_sha256, imports)


def _find_source(module_name: str, roots: tuple[Path, ...]) -> Path | None:
    """The file of ``module_name`` under the first root that has it (package before module), or None."""
    *package_parts, last_part = module_name.split(".")
    for root in roots:
        package_dir = root.joinpath(*package_parts)
        for candidate in (package_dir / last_part / "__init__.py", package_dir / f"{last_part}.py"):
            if candidate.is_file():
                return candidate
    return None


def _imported_module_names(statement: ImportStatement, package: str) -> list[str]:
    """Module names ``statement`` may load, with relative imports resolved against ``package``.

    For ``from x import a, b`` that is ``x`` plus ``x.a`` and ``x.b`` (each kept only if it resolves to a
    file, since ``a`` may be a submodule or just a name defined in ``x``). A relative import that climbs
    above the top-level package cannot run and yields nothing.
    """
    if statement.level == 0:
        base = statement.module
    else:
        package_parts = package.split(".") if package else []
        climb = statement.level - 1
        if climb >= len(package_parts):
            return []
        base = ".".join(part for part in (*package_parts[: len(package_parts) - climb], statement.module) if part)
    return [base, *(f"{base}.{name}" for name in statement.names)]


def _with_parent_packages(module_name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``: importing a submodule runs each parent's ``__init__``."""
    parts = module_name.split(".")
    return [".".join(parts[:count]) for count in range(1, len(parts) + 1)]
