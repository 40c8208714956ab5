"""Which checkpoint a nightly run optimizes: the newest complete one in a folder or glob, by recorded step or time."""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import OptipipeError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pt2")
STEP_KEYS = ("global_step", "epoch")
SETTLE_SECONDS = 1.0  # two looks at each file this far apart tell a complete file from one being written


class NightlyError(OptipipeError):
    """No usable checkpoint, or nothing promoted yet for a recipe."""


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a nightly run optimizes, in one line why it won, and each newer file passed over and why."""

    path: Path
    reason: str
    passed_over: tuple[str, ...] = ()


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


def checkpoint_candidates(source: str) -> list[Path]:
    """The checkpoint files of ``source``; a NightlyError when there are none (checked before a night starts too)."""
    candidates = find_checkpoints(source)
    if not candidates:
        raise NightlyError(
            f"checkpoints: no checkpoint files in '{source}' (looked for {', '.join(CHECKPOINT_SUFFIXES)}); "
            "point --checkpoints at the folder your training job writes to"
        )
    return candidates


def first_byte_readable(path: Path) -> str | None:
    """None when ``path`` can be opened and read, else why not (``Permission denied``, ...)."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        return error.strerror or str(error)
    return None


def look(path: Path) -> tuple[int, int] | None:
    """A file's size and modification time in nanoseconds, or None when it is gone or cannot be examined."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def complete_checkpoints(candidates: list[Path], settle_seconds: float) -> tuple[dict[Path, tuple[int, int]], dict[Path, str]]:
    """Split ``candidates`` into complete files (with their settled size and mtime) and the rest, with why.

    A file is complete when it can be read and two looks ``settle_seconds`` apart see the same size and
    modification time: a trainer still writing one (or rewriting ``last.ckpt`` in place) changes them.
    """
    first = {path: look(path) for path in candidates}
    time.sleep(settle_seconds)
    complete: dict[Path, tuple[int, int]] = {}
    passed_over: dict[Path, str] = {}
    for path in candidates:
        second, unreadable = look(path), first_byte_readable(path)
        if unreadable is not None or second is None:
            passed_over[path] = f"unreadable: {unreadable or 'gone'}"
        elif second != first[path]:
            passed_over[path] = f"still being written: size or modification time changed within {settle_seconds:g} s"
        else:
            complete[path] = second
    return complete, passed_over


def newest_checkpoint(source: str, settle_seconds: float = SETTLE_SECONDS) -> CheckpointChoice:
    """The newest complete checkpoint: highest recorded global_step/epoch when every such file records one, else
    newest mtime.

    Files still being written or unreadable are passed over (``complete_checkpoints``) and the choice
    names each with why, so an unreadable newest file does not fail the night while an older one is good. Ties (same step, or same modification time) go to the most recently modified
    file, then to the name that sorts last, and the reason says so.
    """
    candidates = checkpoint_candidates(source)
    looks, incomplete = complete_checkpoints(candidates, settle_seconds)
    if not looks:
        reasons = "; ".join(f"{path.name} {why}" for path, why in incomplete.items())
        raise NightlyError(f"checkpoints: no complete checkpoint in '{source}' ({reasons}); try again once training has written one")
    steps = {path: recorded_step(path) for path in looks}
    step_kinds = {step[0] for step in steps.values() if step}
    by_step = all(steps.values()) and len(step_kinds) == 1

    def rank(path: Path) -> tuple:
        mtime = looks[path][1]
        return (steps[path][1], mtime, path.name) if by_step else (mtime, path.name)

    ordered = sorted(looks, key=rank)
    newest = ordered[-1]
    if by_step:
        kind = step_kinds.pop()
        reason = f"highest {kind} {steps[newest][1]} of {len(looks)} checkpoints"
        tied = [path.name for path in ordered if steps[path][1] == steps[newest][1]]
    else:
        reason = f"newest modification time of {len(looks)} checkpoints (not every file records a global_step/epoch)"
        tied = [path.name for path in ordered if looks[path][1] == looks[newest][1]]
    if len(tied) > 1:
        reason += f"; tie between {', '.join(tied)} broken by modification time, then name"
    passed_over = tuple(f"passed over {path.name} ({why})" for path, why in incomplete.items())
    if passed_over:
        reason += "; " + "; ".join(passed_over)
    return CheckpointChoice(newest, reason, passed_over)
