"""YAML reading that remembers the line of every key, so recipe errors can say ``file:line``.

A recipe is plain data: a mapping of scalars, lists and mappings, read with PyYAML's safe loader. Two
things a recipe never needs are refused before anything is built from them, so a small hostile file
cannot exhaust memory or time: anchors and aliases (``&name`` / ``*name``, the "billion laughs" bomb),
and files over ``MAX_RECIPE_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError

MAX_RECIPE_BYTES = 1024 * 1024  # 1 MiB: the bundled recipes are under 2 KiB


@dataclass
class LineMap:
    """Line numbers (1-based) of every mapping key and sequence item, by their path from the root."""

    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def line_of(self, loc: tuple[Any, ...]) -> int:
        """The line of ``loc``, or of its nearest ancestor that has one."""
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return 1


class AnchorRefused(yaml.MarkedYAMLError):
    """An anchor or alias met while composing a recipe: refused before any node is repeated."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases as it composes (before any value is built)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise AnchorRefused(
                problem="YAML anchors and aliases (&name, *name) are not allowed in a recipe; write the value out "
                "(a recipe written by yaml.dump: give it a Dumper whose ignore_aliases returns True)",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)


def _compose_and_build(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree of one YAML document and the plain value built from it; YAML errors propagate."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read") from None
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> tuple[int, str]:
    """The 1-based line (1 when unknown) and the one-line problem of a YAML error."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        return (mark.line + 1 if mark else 1), str(error.problem or error.context or "invalid YAML")
    return 1, str(error)


def load_yaml_value(text: str, what: str) -> Any:
    """A plain value (e.g. a ``--set`` VALUE) read with the recipe loader; bad YAML is one ``RecipeError`` naming ``what``."""
    try:
        return _compose_and_build(text)[1]
    except yaml.YAMLError as error:
        raise RecipeError(f"{what}: not a plain YAML value: {_yaml_problem(error)[1]}") from None


def _read_recipe_text(path: Path) -> str:
    """The text of a recipe file, refusing files over ``MAX_RECIPE_BYTES`` without reading more than that."""
    with path.open("rb") as file:
        data = file.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: recipe is over {MAX_RECIPE_BYTES // 2**20} MiB; a recipe names stages and parameters, not data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file; a recipe is YAML") from None


def _walk(node: yaml.Node, path: tuple[Any, ...], lines: LineMap) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            lines.lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            lines.lines[child] = item.start_mark.line + 1
            _walk(item, child, lines)


def load_yaml_with_lines(path: Path) -> tuple[dict[str, Any], LineMap]:
    """Parse a recipe file into a mapping plus its line map; syntax errors become ``RecipeError``."""
    text = _read_recipe_text(path)
    try:
        node, data = _compose_and_build(text)
    except AnchorRefused as error:
        line, problem = _yaml_problem(error)
        raise RecipeError(f"{path}:{line}: {problem}") from None
    except yaml.MarkedYAMLError as error:
        line, problem = _yaml_problem(error)
        raise RecipeError(f"{path}:{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: YAML error: {error}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{path}:1: a recipe is a mapping with 'name', 'model' and 'stages'; this file is {kind}")
    lines = LineMap()
    _walk(node, (), lines)
    return data, lines
