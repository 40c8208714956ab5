"""The contract between the pipeline and a stage module: what a stage is given and what it returns.

A stage module (``stages/<name>.py``) defines ``Params`` (a pydantic model), ``takes`` (model kinds it
accepts), ``inputs`` (``"none"`` for a source stage, ``"one"`` or ``"many"``), ``makes`` (the kind it
produces), ``version`` (bumped when its output changes for the same input) and
``run(ctx, inputs, params) -> StageOutput``. It writes only into ``ctx.workdir``; the store publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

from pipeline.models import ModelHandle

if TYPE_CHECKING:
    from pipeline.data import DataBundle
    from pipeline.recipe import Recipe


class StageParams(BaseModel):
    """Base of every stage's ``Params``: unknown keys are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageOutput:
    """What a stage returns: its product (a model or a report file inside ``ctx.workdir``) and its metrics."""

    product: ModelHandle
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may use besides its inputs and params."""

    name: str
    workdir: Path
    recipe: "Recipe"
    checkpoint_path: Path | None
    load_data: Callable[[], "DataBundle"]
    input_names: list[str] = field(default_factory=list)
    baseline: ModelHandle | None = None
    baseline_name: str | None = None

    @cached_property
    def data(self) -> "DataBundle":
        """The recipe's data (train and eval loaders), built on first use and shared across stages."""
        return self.load_data()
