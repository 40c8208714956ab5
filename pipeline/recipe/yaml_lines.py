"""YAML reading that remembers the line of every key, so recipe errors can say ``file:line``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file; a recipe is YAML") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{path}:{line}: YAML syntax error: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: YAML error: {error}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{path}:1: a recipe is a mapping with 'name', 'model' and 'stages'; this file is {kind}")
    lines = LineMap()
    _walk(node, (), lines)
    return data, lines
