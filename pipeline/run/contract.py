"""The contract between the pipeline and a stage: its typed declaration, what it is given, what it returns.

A stage module (``stages/<name>.py``) defines ``Params`` (a pydantic model), ``run(ctx, inputs, params)``
and, once, ``STAGE = declare_stage(...)``: the model kinds it takes and makes, how many inputs it has,
its ``version``, and how the executor must treat it. The declaration is checked when the module is
imported, so a typo in it fails at once, naming the file and the field. A stage writes only into
``ctx.workdir``; the store publishes what it returns.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import OptipipeError

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe
    from pipeline.torchkit.data import DataBundle
    from pipeline.torchkit.handles import ModelHandle
    from pipeline.torchkit.model_io import ModelIO
    from pipeline.torchkit.tasks import Scoring

ModelKind = Literal["torch", "onnx", "engine", "openvino", "report"]
Arity = Literal["none", "one", "many"]
# What a stage needs from the machine or the recipe beyond its inputs; shown by `optipipe validate`.
Capability = Literal["cuda", "train_data", "eval_data", "checkpoint"]


class StageDeclarationError(OptipipeError):
    """A stage module's declaration is malformed (a bug in the stage, reported at import)."""


class StageParams(BaseModel):
    """Base of every stage's ``Params``: unknown keys are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class StageDeclaration(BaseModel):
    """Everything the planner and the executor need to know about a stage, declared once in its module."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(description="the recipe's `uses` name: the module's name in the stages package")
    takes: tuple[ModelKind, ...] = Field(description="model kinds the stage accepts from upstream stages")
    makes: ModelKind = Field(description="the kind of what the stage produces")
    inputs: Arity = Field(description="none: a source stage; one: exactly one upstream stage; many: one or more")
    version: int = Field(
        ge=1,
        description="bump only for output changes the code digest cannot see (a data file, an external tool's "
        "behaviour): the cache key already covers this stage's code and every project module it imports",
    )
    params: type[StageParams] = Field(description="the pydantic model of the stage's `with:` parameters")
    run: Callable[..., Any] = Field(description="run(ctx, inputs, params) -> StageOutput")
    runs_alone: bool = Field(default=False, description="start only after every other stage (timings must not be skewed)")
    uses_baseline: bool | Callable[[Any], bool] | None = Field(
        default=None,
        description="whether the FP32 baseline is handed in as ctx.baseline: True/False, a function of the params, "
        "or None for the default (stages with many inputs compare with it)",
    )
    exclusive: bool = Field(
        default=True,
        description="runs torch work: the executor runs it holding the process's torch lock, since torch.fx and "
        "torch.export patch process-global state that a concurrent forward would trip over",
    )
    capabilities: frozenset[Capability] = Field(default=frozenset(), description="what the stage needs to run")

    @model_validator(mode="after")
    def consistent(self) -> "StageDeclaration":
        """Source stages take nothing; others take at least one kind; ``Params`` derives from StageParams."""
        if (self.inputs == "none") != (not self.takes):
            raise ValueError("takes must be empty exactly when inputs is 'none' (a source stage)")
        if not (isinstance(self.params, type) and issubclass(self.params, StageParams)):
            raise ValueError("params must be a subclass of pipeline.run.contract.StageParams")
        if list(inspect.signature(self.run).parameters) != ["ctx", "inputs", "params"]:
            raise ValueError("run must take exactly (ctx, inputs, params)")
        return self

    def wants_baseline(self, params: StageParams) -> bool:
        """Whether this stage, with these params, is handed the recipe's FP32 baseline."""
        wanted = self.inputs == "many" if self.uses_baseline is None else self.uses_baseline
        return bool(wanted(params) if callable(wanted) else wanted)


def declare_stage(**fields: Any) -> StageDeclaration:
    """The typed declaration of the calling stage module; any mistake fails here, naming the file and field."""
    caller = inspect.stack()[1]
    module_path = Path(caller.filename)
    fields.setdefault("name", module_path.stem)
    try:
        return StageDeclaration(**fields)
    except ValidationError as error:
        # a misspelt field also leaves the real one missing: name the misspelling, it is the fix
        first = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")[0]
        field_name = ".".join(str(part) for part in first["loc"]) or "declaration"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field_name, list(StageDeclaration.model_fields), n=1)
            message = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
        raise StageDeclarationError(f"{module_path}: STAGE = declare_stage(...): {field_name}: {message}") from None


def only_input(inputs: Mapping[str, "ModelHandle"]) -> tuple[str, "ModelHandle"]:
    """The name and model of a one-input stage's input (the planner guarantees there is exactly one)."""
    if len(inputs) != 1:
        raise StageDeclarationError(f"a one-input stage was given {len(inputs)} inputs: {', '.join(inputs) or 'none'}")
    return next(iter(inputs.items()))


@dataclass
class StageOutput:
    """What a stage returns: its product (a model or a report file inside ``ctx.workdir``) and its metrics."""

    product: "ModelHandle"
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may use besides its inputs and params."""

    name: str
    workdir: Path
    recipe: "Recipe"
    checkpoint_path: Path | None
    load_data: Callable[[], "DataBundle"]
    baseline: "ModelHandle | None" = None
    baseline_name: str | None = None

    @cached_property
    def data(self) -> "DataBundle":
        """The recipe's data (train and eval loaders), built on first use and shared across stages."""
        return self.load_data()

    @cached_property
    def io(self) -> "ModelIO":
        """The model's declared inputs and output: how batches become feeds and forwards give predictions."""
        from pipeline.torchkit.model_io import ModelIO

        return ModelIO.of(self.recipe.model)

    @cached_property
    def scoring(self) -> "Scoring":
        """The recipe's task and budget figure: how predictions are scored and compared with FP32."""
        from pipeline.torchkit.tasks import Scoring

        return Scoring.of(self.recipe)
