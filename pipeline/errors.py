"""Error types users see: each one is printed by the CLI as one clear line (exit code 2).

Raise them with the fix in the message: what was wrong, where (file, line, field) and what to do.
"""

from __future__ import annotations

import difflib
import re

ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class OptipipeError(Exception):
    """Base of every error that is the user's input, not a bug in optipipe."""


class RecipeError(OptipipeError):
    """A recipe file is malformed, refers to unknown things, or wires stages wrongly."""


class CheckpointError(OptipipeError):
    """A checkpoint cannot be read or does not fit the recipe's model."""


class StageError(OptipipeError):
    """A stage failed while running (export refused an op, a parity check failed, ...)."""


class DataError(OptipipeError):
    """A data source cannot be built or does not fit the model."""


class StoreError(OptipipeError):
    """The artifact store is unusable (not writable, corrupted artifact, unknown run)."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of any exception, without terminal colour codes."""
    lines = [line.strip() for line in ANSI_CODES.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


class StageUnavailable(OptipipeError):
    """A stage cannot run on this machine (no CUDA device, TensorRT missing) and asked to be skipped.

    The session records the stage as ``skipped`` with this message; stages fed only by it are skipped
    with the same reason, and stages taking many inputs (validate) go on without it.
    """


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean \'x\'?)' for the closest of ``choices``, else the choices to pick from."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (choose from: {', '.join(sorted(choices))})"
