"""The recipe file's shape as pydantic models: model, data, stages, nightly limits (torch-free).

Unknown keys are refused everywhere (``StrictModel``); each stage's ``with:`` is checked against that
stage's own ``Params`` by ``pipeline.recipe.plan``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class StrictModel(BaseModel):
    """Recipe sections refuse unknown keys: a typo is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(StrictModel):
    """How to build the architecture that the checkpoint's weights go into."""

    factory: str = Field(description="'module.path:callable' returning an nn.Module, e.g. pipeline.zoo:digits_cnn")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    input_shape: list[int] = Field(
        min_length=1, description="shape of one example batch, batch first, e.g. [1, 1, 8, 8]"
    )


class DataSpec(StrictModel):
    """Where train (calibration, fine-tuning) and eval (validation) batches come from."""

    source: Literal["digits", "synthetic"] | None = Field(
        default=None, description="a built-in data set: 'digits' (scikit-learn, offline) or 'synthetic'"
    )
    factory: str | None = Field(
        default=None, description="'module.path:callable' returning (train_loader, eval_loader)"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the source/factory")
    batch_size: int = Field(default=64, ge=1, description="batch size of the built-in sources")
    seed: int = Field(default=0, description="seed of the built-in sources' split and shuffling")

    @model_validator(mode="after")
    def one_source(self) -> "DataSpec":
        if self.source is None and self.factory is None:
            self.source = "digits"
        elif self.source is not None and self.factory is not None:
            raise ValueError("give either 'source' or 'factory', not both")
        return self


class StageSpec(StrictModel):
    """One node of the DAG: which stage it ``uses``, which stages it ``needs``, and its parameters (``with``)."""

    uses: str = Field(description="stage to run, e.g. quantize")
    needs: list[str] = Field(default_factory=list, description="names of the stages whose outputs feed this one")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the stage's parameters")


class RegressionSpec(StrictModel):
    """When a nightly result counts as worse than the last good one (``optipipe diff`` applies the same rules)."""

    max_accuracy_drop: float = Field(
        default=0.005, ge=0.0, le=1.0,
        description="largest top-1 drop (fraction: 0.005 = half a point) a variant may show vs the last good nightly run",
    )
    max_latency_increase: float | None = Field(
        default=0.5, ge=0.0,
        description="largest growth of a variant's batch-1 median latency (fraction: 0.5 = +50%); null turns the check off",
    )
    latency_basis: Literal["baseline", "absolute"] = Field(
        default="baseline",
        description="baseline: latency as a multiple of the FP32 baseline timed in the same run, which cancels the "
        "machine's speed drift between nights; absolute: milliseconds, for a quiet dedicated machine or when the "
        "checkpoint's own architecture (and so the baseline's speed) may change",
    )


class NightlySpec(StrictModel):
    """Settings of scheduled re-optimization (``flows.nightly``, ``optipipe schedule``)."""

    regression: RegressionSpec = Field(default_factory=RegressionSpec)


class Recipe(StrictModel):
    """A whole recipe file."""

    schema_: str | None = Field(
        default=None, alias="$schema", title="Schema",
        description="path or URL of this JSON Schema, for editors; not part of the recipe's identity (digest)",
    )
    name: str = Field(pattern=STAGE_NAME_PATTERN, description="recipe name (letters, digits, '-', '_')")
    description: str = ""
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    baseline: str | None = Field(
        default=None, description="stage whose model is the FP32 baseline; default: the load_checkpoint stage"
    )
    stages: dict[str, StageSpec] = Field(min_length=1, description="stage name -> stage")
    nightly: NightlySpec = Field(default_factory=NightlySpec, description="regression limits of nightly runs")


