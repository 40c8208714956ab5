"""The recipe's stage graph, drawn left to right so every edge is seen going into the stage it feeds.

A stage sits in the column one past its deepest need. An edge that skips columns runs through an empty
lane slot in each column it crosses (one lane per source, shared by its long edges), so it never passes
behind another stage's box; columns are ordered by the mean height of their inputs to keep crossings few,
and the edges into (and out of) one box meet its side at separate heights, so each input reads on its own.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path

BOX_WIDTH, BOX_HEIGHT = 0.74, 0.58
EDGE_COLOR = "#78909c"
ORDERING_SWEEPS = 4
BOX_CHARACTERS = 22  # of a branch's values line (6.5 pt) that fit in a box


def dag_levels(dag: dict[str, list[str]]) -> dict[str, int]:
    """Each stage's column in the drawing: 0 for sources, else one more than its deepest need (any key order)."""
    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            levels[name] = 1 + max((level(need) for need in dag.get(name, []) if need in dag), default=-1)
        return levels[name]

    for name in dag:
        level(name)
    return levels


def lane(source: str, column: int) -> tuple[str, int]:
    """The slot a source's long edges pass through in ``column``."""
    return (source, column)


def _edge_slots(dag: dict[str, list[str]], depth: dict[str, int]) -> dict[tuple[str, str], list[Any]]:
    """Every edge (need, stage) as the slots it passes: the need, a lane per crossed column, the stage."""
    return {
        (need, name): [need, *[lane(need, column) for column in range(depth[need] + 1, depth[name])], name]
        for name, needs in dag.items() for need in needs if need in dag
    }


def dag_columns(dag: dict[str, list[str]], order: list[str]) -> dict[int, list[Any]]:
    """Column -> its slots top to bottom: stage names and lane slots, ordered to keep edge crossings few."""
    depth = dag_levels(dag)
    edges = _edge_slots(dag, depth)
    columns: dict[int, list[Any]] = {}
    for name in order:
        columns.setdefault(depth[name], []).append(name)
    for path in edges.values():
        for slot in path[1:-1]:
            if slot not in columns.setdefault(slot[1], []):
                columns[slot[1]].append(slot)
    feeders: dict[Any, list[Any]] = {}
    for path in edges.values():
        for before, after in pairwise(path):
            if before not in feeders.setdefault(after, []):
                feeders[after].append(before)
    for _ in range(ORDERING_SWEEPS):
        for column in sorted(columns)[1:]:
            rank = {slot: index for index, slot in enumerate(columns[column - 1])}
            previous = list(columns[column])
            columns[column].sort(key=lambda slot: (
                sum(rank[f] for f in feeders.get(slot, [])) / len(feeders[slot]) if feeders.get(slot) else previous.index(slot),
                previous.index(slot)))
    return columns


def _spread(count: int) -> list[float]:
    """Heights (relative to a box's centre) at which ``count`` edges meet one side of it, top first."""
    if count == 1:
        return [0.0]
    return [BOX_HEIGHT * 0.35 * (1 - 2 * index / (count - 1)) for index in range(count)]


def _edge_path(points: list[tuple[float, float]]) -> Path:
    """A smooth path through ``points`` (left to right): straight across each lane slot, S-curves between columns."""
    vertices, codes = [points[0]], [Path.MOVETO]
    for (x0, y0), (x1, y1) in pairwise(points):
        half = (x1 - x0) / 2
        vertices += [(x0 + half, y0), (x1 - half, y1), (x1, y1)]
        codes += [Path.CURVE4] * 3
    return Path(vertices, codes)


def _edge_points(path: list[Any], position: dict[Any, tuple[float, float]], exit_y: float, entry_y: float) -> list[tuple[float, float]]:
    """The points an edge passes: the source's right side, both ends of each lane slot, the target's left side."""
    (sx, _), (tx, _) = position[path[0]], position[path[-1]]
    points = [(sx + BOX_WIDTH / 2, exit_y)]
    for slot in path[1:-1]:
        x, y = position[slot]
        points += [(x - BOX_WIDTH / 2, y), (x + BOX_WIDTH / 2, y)]
    return points + [(tx - BOX_WIDTH / 2, entry_y)]


def _draw_edges(axes: Any, edges: dict[tuple[str, str], list[Any]], position: dict[Any, tuple[float, float]]) -> None:
    """Every edge with its arrowhead at the box it feeds; a box's inputs (and outputs) meet it at distinct heights."""
    def next_height(path: list[Any]) -> float:
        return position[path[1]][1]

    def previous_height(path: list[Any]) -> float:
        return position[path[-2]][1]

    exits: dict[tuple[str, str], float] = {}
    entries: dict[tuple[str, str], float] = {}
    for stage in {source for source, _ in edges}:
        outgoing = sorted((edge for edge in edges if edge[0] == stage), key=lambda edge: -next_height(edges[edge]))
        distinct = sorted({next_height(edges[edge]) for edge in outgoing}, reverse=True)
        offsets = dict(zip(distinct, _spread(len(distinct))))
        exits.update({edge: position[stage][1] + offsets[next_height(edges[edge])] for edge in outgoing})
    for stage in {target for _, target in edges}:
        incoming = sorted((edge for edge in edges if edge[1] == stage), key=lambda edge: -previous_height(edges[edge]))
        entries.update({edge: position[stage][1] + offset for edge, offset in zip(incoming, _spread(len(incoming)))})
    for edge, path in edges.items():
        points = _edge_points(path, position, exits[edge], entries[edge])
        axes.add_patch(FancyArrowPatch(path=_edge_path(points), arrowstyle="-|>", mutation_scale=10, color=EDGE_COLOR,
                                       linewidth=1.2, zorder=2, shrinkA=0, shrinkB=0))


def box_lines(name: str) -> tuple[str, str]:
    """A box's name line and, for a matrix branch ``stage[key=value,...]``, its values (``0.5 · minmax``), cut to fit the box."""
    branch = re.fullmatch(r"([^\[]+)\[(.+)\]", name)
    if branch is None:
        return name, ""
    values = " · ".join(assignment.partition("=")[2] for assignment in branch.group(2).split(","))
    return branch.group(1), values if len(values) <= BOX_CHARACTERS else values[:BOX_CHARACTERS - 1] + "…"


def dag_figure(dag: dict[str, list[str]], stages: dict[str, dict[str, Any]], colors: dict[str, str]) -> Figure:
    """The stage graph as a figure: boxes coloured by state (``colors``), labelled with name, state and time."""
    order = [name for name in stages if name in dag] + [name for name in dag if name not in stages]
    columns = dag_columns(dag, order)
    rows = max(len(slots) for slots in columns.values())
    position = {slot: (float(column), (len(slots) - 1) / 2 - index)
                for column, slots in columns.items() for index, slot in enumerate(slots)}
    figure = Figure(figsize=(1.8 * len(columns) + 0.3, 0.8 * rows + 0.4))
    axes = figure.add_subplot()
    _draw_edges(axes, _edge_slots(dag, dag_levels(dag)), position)
    for name in order:
        x, y = position[name]
        stage = stages.get(name, {})
        state = stage.get("state", "not run")
        timing = f" · {stage['seconds']:.2f}s" if state == "done" else ""
        axes.add_patch(FancyBboxPatch((x - BOX_WIDTH / 2, y - BOX_HEIGHT / 2), BOX_WIDTH, BOX_HEIGHT, boxstyle="round,pad=0,rounding_size=0.08",
                                      facecolor=colors.get(state, "#9e9e9e"), edgecolor="none", zorder=3, gid=f"dag-{name}"))
        title, values = box_lines(name)
        axes.text(x, y + (0.15 if values else 0.09), title, ha="center", va="center", fontsize=9, fontweight="bold", color="white",
                  zorder=4)
        if values:
            axes.text(x, y - 0.01, values, ha="center", va="center", fontsize=6.5, color="white", zorder=4)
        axes.text(x, y - (0.16 if values else 0.13), f"{state}{timing}", ha="center", va="center", fontsize=8, color="white", zorder=4)
    axes.set_xlim(-0.5, len(columns) - 0.5)
    axes.set_ylim(-rows / 2, rows / 2)
    axes.axis("off")
    return figure
