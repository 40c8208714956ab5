"""Which checkpoint a nightly run optimizes: the newest in a folder or glob, by recorded step or time."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import OptipipeError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pt2")
STEP_KEYS = ("global_step", "epoch")


class NightlyError(OptipipeError):
    """No usable checkpoint, or nothing promoted yet for a recipe."""


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a nightly run optimizes and, in one line, why it won."""

    path: Path
    reason: str


def recorded_step(path: Path) -> tuple[str, int] | None:
    """The ``global_step`` (preferred) or ``epoch`` a checkpoint records, read without running pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                values: dict[str, Any] = dict(handle.metadata() or {})
        else:
            import torch

            values = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain training dict (a TorchScript or .pt2 file, a whole pickled module)
        return None
    if not isinstance(values, dict):
        return None
    for key in STEP_KEYS:
        value = values.get(key)
        try:
            return key, int(value)
        except (TypeError, ValueError):
            continue
    return None


def find_checkpoints(source: str) -> list[Path]:
    """Checkpoint files in a folder (by suffix) or matching a glob pattern."""
    folder = Path(source)
    if folder.is_dir():
        return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES)
    if any(character in source for character in "*?["):
        return sorted(Path(match) for match in glob.glob(source) if Path(match).is_file())
    raise NightlyError(f"checkpoints: '{source}' is neither a folder nor a glob pattern such as 'runs/*.pt'")


def newest_checkpoint(source: str) -> CheckpointChoice:
    """The newest checkpoint: highest recorded global_step/epoch when every file records one, else newest mtime.

    Ties (same step, or same modification time) go to the most recently modified file, then to the
    name that sorts last, and the reason says so.
    """
    candidates = find_checkpoints(source)
    if not candidates:
        raise NightlyError(
            f"checkpoints: no checkpoint files in '{source}' (looked for {', '.join(CHECKPOINT_SUFFIXES)}); "
            "point --checkpoints at the folder your training job writes to"
        )
    steps = {path: recorded_step(path) for path in candidates}
    step_kinds = {step[0] for step in steps.values() if step}
    by_step = all(steps.values()) and len(step_kinds) == 1
    def rank(path: Path) -> tuple:
        mtime = path.stat().st_mtime
        return (steps[path][1], mtime, path.name) if by_step else (mtime, path.name)

    ordered = sorted(candidates, key=rank)
    newest = ordered[-1]
    if by_step:
        kind = step_kinds.pop()
        reason = f"highest {kind} {steps[newest][1]} of {len(candidates)} checkpoints"
        tied = [path.name for path in ordered if steps[path][1] == steps[newest][1]]
    else:
        reason = f"newest modification time of {len(candidates)} checkpoints (not every file records a global_step/epoch)"
        tied = [path.name for path in ordered if path.stat().st_mtime == newest.stat().st_mtime]
    if len(tied) > 1:
        reason += f"; tie between {', '.join(tied)} broken by modification time, then name"
    return CheckpointChoice(newest, reason)
