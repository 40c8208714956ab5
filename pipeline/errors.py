"""Error types users see: each one is printed by the CLI as one clear line (exit code 2).

Raise them with the fix in the message: what was wrong, where (file, line, field) and what to do.
"""

from __future__ import annotations


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
