"""Where a run's stages execute: the ``runner`` setting, parsed once (torch-free, Prefect-free).

``threads[:N]``   stages in threads of the ``optipipe run`` process (the default, N = 4); torch stages take turns.
``processes[:N]`` stages in N worker processes of a local Dask cluster (N = the CPU count): torch stages run truly
                  in parallel, a crashed or out-of-memory stage fails alone, each manifest's seconds and memory are
                  the stage's own.
``dask://HOST:PORT`` stages on an existing ``distributed`` scheduler's workers (``tcp://HOST:PORT`` also works).

The setting comes from ``--runner``, else ``$OPTIPIPE_RUNNER``, else the recipe's ``runner:``, else ``threads``.
It never enters a cache key: where a stage ran does not change what it made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import RecipeError

RUNNER_ENV = "OPTIPIPE_RUNNER"
DEFAULT_THREADS = 4
RUNNER_FORMS = "threads[:N], processes[:N] or dask://HOST:PORT"
_COUNTED = re.compile(r"^(threads|processes)(?::(\d+))?$")
_ADDRESS = re.compile(r"^(dask|tcp)://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$")


@dataclass(frozen=True)
class RunnerSpec:
    """A parsed runner setting: ``kind``, how many stages at once (``workers``), the scheduler ``address`` for Dask."""

    kind: Literal["threads", "processes", "dask"]
    workers: int | None = None
    address: str | None = None

    def describe(self) -> str:
        """The setting as a user writes it (``processes:2``, ``dask://127.0.0.1:8786``)."""
        if self.kind == "dask":
            return "dask://" + (self.address or "").removeprefix("tcp://")
        return f"{self.kind}:{self.workers}"


def parse_runner(text: str, source: str = "--runner") -> RunnerSpec:
    """The ``RunnerSpec`` that ``text`` names; ``RecipeError`` naming ``source`` and the accepted forms otherwise."""
    value = text.strip()
    counted = _COUNTED.match(value)
    if counted:
        kind, count = counted.group(1), counted.group(2)
        workers = int(count) if count else (DEFAULT_THREADS if kind == "threads" else os.cpu_count() or 1)
        if workers < 1:
            raise RecipeError(f"{source}: runner '{text}' asks for {workers} workers; give 1 or more")
        return RunnerSpec(kind=kind, workers=workers)  # type: ignore[arg-type]
    address = _ADDRESS.match(value)
    if address and 0 < int(address.group(3)) < 65536:
        return RunnerSpec(kind="dask", address=f"tcp://{address.group(2)}:{address.group(3)}")
    raise RecipeError(f"{source}: runner '{text}' is not one of {RUNNER_FORMS}")


def choose_runner(given: str | None, recipe_runner: str | None, recipe_path: str | None = None) -> RunnerSpec:
    """The runner a run uses: ``given`` (``--runner``), else ``$OPTIPIPE_RUNNER``, else the recipe's, else threads."""
    if given:
        return parse_runner(given)
    if os.environ.get(RUNNER_ENV):
        return parse_runner(os.environ[RUNNER_ENV], f"${RUNNER_ENV}")
    if recipe_runner:
        return parse_runner(recipe_runner, f"{recipe_path or 'the recipe'}: runner")
    return RunnerSpec(kind="threads", workers=DEFAULT_THREADS)
