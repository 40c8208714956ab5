"""Matrix branches of a recipe stage: their combinations, the ``exclude`` rows, and the names they give branches.

A stage with a ``matrix`` becomes one branch per kept combination of its values, named ``stage[key=value,...]``
(keys in the order written, values as YAML writes them). Torch-free; ``pipeline.recipe.plan`` expands the DAG
with these and turns a ``matrix_problem`` into a file:line error.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from pipeline.errors import did_you_mean
from pipeline.recipe.schema import MatrixValue, StageSpec

Label = tuple[tuple[str, MatrixValue], ...]  # the matrix assignments that make a branch, keys in recipe order
REFUSED_IN_VALUES = "/[],="  # characters that would make a branch name a path or ambiguous


def format_value(value: MatrixValue) -> str:
    """A matrix value as YAML writes it: true/false, 0.5, strings bare."""
    return value if isinstance(value, str) else json.dumps(value)


def format_label(label: Label) -> str:
    """``key=value,...`` in the label's order."""
    return ",".join(f"{key}={format_value(value)}" for key, value in label)


def branch_name(stage: str, label: Label) -> str:
    """``stage[key=value,...]`` for a branch, the stage's own name when the label is empty."""
    return f"{stage}[{format_label(label)}]" if label else stage


def same_value(value: MatrixValue, other: MatrixValue) -> bool:
    """Equal matrix values, true never equal to 1."""
    return value == other and isinstance(value, bool) == isinstance(other, bool)


def value_problem(value: MatrixValue) -> str | None:
    """Why a matrix value cannot be part of a branch name (None: it can)."""
    if isinstance(value, str) and not value.strip():
        return "is blank"
    if isinstance(value, str) and any(char in value for char in REFUSED_IN_VALUES):
        return f"holds one of {' '.join(REFUSED_IN_VALUES)}"
    return None


def matrix_problem(name: str, spec: StageSpec) -> tuple[tuple[Any, ...], str] | None:
    """Where (a recipe location) and what is wrong with a stage's matrix, or None: its keys are not in ``with``, each
    lists distinct values that can name a branch, and the ``exclude`` rows name its keys and values and leave at least
    one combination."""
    loc = ("stages", name, "matrix")
    for key, values in spec.matrix.items():
        if key in spec.with_:
            return loc + (key,), f"'{key}' is both in 'with' and in 'matrix'; give it in one"
        if not values:
            return loc + (key,), f"matrix key '{key}' has no values; list at least one"
        for index, value in enumerate(values):
            problem = value_problem(value)
            if problem:
                return loc + (key, index), f"matrix value {value!r} of '{key}' {problem}, so it cannot name a branch; use a plain word or number"
            if any(same_value(value, earlier) for earlier in values[:index]):
                return loc + (key, index), f"matrix key '{key}' lists {format_value(value)} twice"
    for row_index, row in enumerate(spec.exclude):
        for key, value in row.items():
            where = ("stages", name, "exclude", row_index, key)
            if key not in spec.matrix:
                hint = did_you_mean(key, list(spec.matrix)) if spec.matrix else "; this stage has no matrix"
                return where, f"exclude names '{key}', which is not a matrix key{hint}"
            if not any(same_value(value, listed) for listed in spec.matrix[key]):
                listed = ", ".join(format_value(item) for item in spec.matrix[key])
                return where, f"exclude names {key}: {format_value(value)}, which is not one of its matrix values ({listed})"
    if spec.exclude and not kept_combinations(spec):
        total = len(matrix_combinations(spec))
        return ("stages", name, "exclude"), f"exclude removes all {total} combinations of the matrix; leave at least one"
    return None


def matrix_combinations(spec: StageSpec) -> list[Label]:
    """Every combination of a stage's matrix, keys in the order written, the last key changing fastest (one empty
    label without a matrix)."""
    return [tuple(zip(spec.matrix, values)) for values in itertools.product(*spec.matrix.values())]


def kept_combinations(spec: StageSpec) -> list[Label]:
    """The combinations of a stage's matrix that no ``exclude`` row matches."""
    def excluded(label: Label) -> bool:
        assigned = dict(label)
        return any(all(same_value(assigned[key], value) for key, value in row.items()) for row in spec.exclude)

    return [label for label in matrix_combinations(spec) if not excluded(label)]
