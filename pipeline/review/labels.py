"""Point labels that do not overlap: each label takes the first candidate spot clear of every placed label.

Works in display units (points or pixels, y up) on plain boxes, so it is testable without a figure;
``pipeline.review.plots`` measures the text and converts the chosen offsets for matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass

# (dx, dy, horizontal alignment) around a point, nearest first; the far ones get a leader line
CANDIDATES = [
    (7, 4, "left"), (7, -14, "left"), (-7, 4, "right"), (-7, -14, "right"), (0, 10, "center"), (0, -22, "center"),
    (7, 18, "left"), (7, -28, "left"), (-7, 18, "right"), (-7, -28, "right"), (0, 24, "center"), (0, -36, "center"),
    (7, 32, "left"), (7, -42, "left"), (-7, 32, "right"), (-7, -42, "right"), (0, 38, "center"), (0, -50, "center"),
]
LEADER_FROM = 20  # a label this far or further from its point is joined to it by a thin line


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in display units."""

    left: float
    bottom: float
    right: float
    top: float

    def overlaps(self, other: Box) -> bool:
        """Whether the two rectangles share any area."""
        return self.left < other.right and other.left < self.right and self.bottom < other.top and other.bottom < self.top


@dataclass(frozen=True)
class Placement:
    """Where one label goes: its offset from the point, its alignment, its box, and whether it needs a leader."""

    dx: float
    dy: float
    align: str
    box: Box

    @property
    def leader(self) -> bool:
        """Far enough from its point to need a line back to it."""
        return abs(self.dy) >= LEADER_FROM


def label_box(x: float, y: float, dx: float, dy: float, align: str, width: float, height: float) -> Box:
    """The box of a label of ``width`` x ``height`` whose text baseline starts at (x+dx, y+dy) with ``align``."""
    left = x + dx - {"left": 0.0, "center": width / 2, "right": width}[align]
    return Box(left, y + dy, left + width, y + dy + height)


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]], marker: float = 5.0) -> list[Placement]:
    """A placement per point (in order) for labels of the given (width, height), avoiding earlier labels and every
    marker (a square of side 2*``marker`` around each point); a label with no clear spot takes the last candidate."""
    markers = [Box(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    placed: list[Placement] = []
    for (x, y), (width, height) in zip(points, sizes):
        chosen = None
        for dx, dy, align in CANDIDATES:
            box = label_box(x, y, dx, dy, align, width, height)
            if not any(box.overlaps(other.box) for other in placed) and not any(box.overlaps(dot) for dot in markers):
                chosen = Placement(dx, dy, align, box)
                break
        if chosen is None:
            dx, dy, align = CANDIDATES[-1]
            chosen = Placement(dx, dy, align, label_box(x, y, dx, dy, align, width, height))
        placed.append(chosen)
    return placed
