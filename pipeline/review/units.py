"""How figures read in tables and pages: sizes in human units."""

from __future__ import annotations


def format_bytes(size: int | None) -> str:
    """Human-readable size: 1.2 MB, 340.0 kB."""
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
