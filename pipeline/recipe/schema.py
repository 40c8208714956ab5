"""The recipe file's shape as pydantic models: model, data, stages, nightly limits (torch-free).

Unknown keys are refused everywhere (``StrictModel``); each stage's ``with:`` is checked against that
stage's own ``Params`` by ``pipeline.recipe.plan``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import RecipeError
from pipeline.recipe.runner import DEFAULT_THREADS, RUNNER_ENV, RUNNER_FORMS, parse_runner

STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class StrictModel(BaseModel):
    """Recipe sections refuse unknown keys: a typo is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


INPUT_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
InputDType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
SHORTHAND_INPUT = "input"
BATCH_DIM = "batch"


class InputSpec(StrictModel):
    """One named input of the model's forward: its shape (symbolic dims allowed), dtype and the values it takes."""

    name: str = Field(pattern=INPUT_NAME_PATTERN, description="the forward's parameter name, e.g. input_ids")
    shape: list[int | str] = Field(
        min_length=1,
        description="shape of one batch, batch first; a name (batch, seq) marks a dimension that may vary and is "
        "shared by every input that uses the same name, e.g. [batch, seq] for token ids and their mask",
    )
    dtype: InputDType = Field(default="float32", description="element type, e.g. float32, int64, bool")
    range: tuple[float, float] | None = Field(
        default=None,
        description="[low, high): the values synthetic and benchmark inputs take; integer inputs need it or vocab_size "
        "(an attention mask is [0, 2))",
    )
    vocab_size: int | None = Field(default=None, ge=1, description="integer inputs: token ids lie in [0, vocab_size)")

    @model_validator(mode="after")
    def values_known(self) -> "InputSpec":
        """Integer inputs say which values are valid; floats and bools need no range; dims are positive or named."""
        integer = self.dtype not in FLOAT_DTYPES and self.dtype != "bool"
        if self.vocab_size is not None and self.range is not None:
            raise ValueError("give either range or vocab_size, not both")
        if self.vocab_size is not None and not integer:
            raise ValueError(f"vocab_size applies to integer inputs; {self.name} is {self.dtype}")
        if integer and self.vocab_size is None and self.range is None:
            raise ValueError(
                f"integer input {self.name} needs range: [low, high) or vocab_size, so that synthetic inputs are valid "
                "(token ids within the vocabulary, masks [0, 2))"
            )
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range [{self.range[0]}, {self.range[1]}) is empty; give [low, high) with low < high")
        for dim in self.shape:
            if isinstance(dim, int) and dim < 1:
                raise ValueError(f"shape {self.shape}: a fixed dimension must be at least 1")
            if isinstance(dim, str) and not re.match(INPUT_NAME_PATTERN, dim):
                raise ValueError(f"shape {self.shape}: a symbolic dimension is a name such as batch or seq, not {dim!r}")
        return self

    @property
    def value_range(self) -> tuple[float, float]:
        """[low, high) of valid values: the vocabulary, the given range, [0, 2) for bools, [-1, 1) for floats."""
        if self.vocab_size is not None:
            return (0, self.vocab_size)
        if self.range is not None:
            return self.range
        return (0, 2) if self.dtype == "bool" else (-1.0, 1.0)


class OutputSpec(StrictModel):
    """Which part of what the forward returns is the prediction, and whether the rest is kept in exported files."""

    prediction: str | int | None = Field(
        default=None,
        description="the prediction inside a tuple, dict or ModelOutput: a name (logits), an index (0) or a dotted "
        "path (outputs.logits, 0.1); default: the output itself when it is a tensor, element 0 of a tuple, 'logits' of a dict",
    )
    keep_others: bool = Field(
        default=False, description="export_onnx also writes the other outputs (after the prediction, by their path names)"
    )


class ModelSpec(StrictModel):
    """How to build the architecture that the checkpoint's weights go into, and what it takes and returns."""

    factory: str = Field(description="'module.path:callable' returning an nn.Module, e.g. pipeline.zoo:digits_cnn")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    input_shape: list[int] | None = Field(
        default=None, min_length=1,
        description="shorthand for one float32 input named 'input': the shape of one example batch, batch first, e.g. [1, 1, 8, 8]",
    )
    inputs: list[InputSpec] | None = Field(
        default=None, min_length=1,
        description="the forward's named inputs in order (instead of input_shape), e.g. input_ids and attention_mask",
    )
    output: OutputSpec | str | int | None = Field(
        default=None, description="which output is the prediction: a name, an index, a dotted path, or {prediction, keep_others}"
    )

    @model_validator(mode="after")
    def one_input_declaration(self) -> "ModelSpec":
        """Exactly one of input_shape and inputs; input names unique; every input batch first."""
        if (self.input_shape is None) == (self.inputs is None):
            raise ValueError("give either input_shape (one float input) or inputs (named inputs), not both or neither")
        if self.inputs is not None:
            names = [spec.name for spec in self.inputs]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"inputs: the name {repeated[0]} is used twice; every input needs its own name")
            batch_dims = {str(spec.shape[0]) for spec in self.inputs}
            if len(batch_dims) > 1:
                raise ValueError(f"inputs: every input's first dimension is the batch, but they differ ({', '.join(sorted(batch_dims))})")
        if not isinstance(self.output, OutputSpec):
            self.output = OutputSpec(prediction=self.output)
        return self

    def input_specs(self) -> list[InputSpec]:
        """The declared inputs; ``input_shape`` is one float32 input named ``input`` with a symbolic batch."""
        if self.inputs is not None:
            return list(self.inputs)
        assert self.input_shape is not None
        return [InputSpec(name=SHORTHAND_INPUT, shape=[BATCH_DIM, *self.input_shape[1:]])]

    @property
    def fixed_batch(self) -> int:
        """The batch size of a file exported without a dynamic batch: input_shape's first, or the inputs' fixed one, else 1."""
        first = self.input_shape[0] if self.input_shape is not None else self.input_specs()[0].shape[0]
        return first if isinstance(first, int) else 1


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


# A matrix value is a scalar, so that it can be part of a branch's name (bool before int: true stays true).
MatrixValue = bool | int | float | str


class StageSpec(StrictModel):
    """One node of the DAG: which stage it ``uses``, which stages it ``needs``, and its parameters (``with``)."""

    uses: str = Field(description="stage to run, e.g. quantize")
    needs: list[str] = Field(default_factory=list, description="names of the stages whose outputs feed this one")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the stage's parameters")
    matrix: dict[str, list[MatrixValue]] = Field(
        default_factory=dict,
        description="parameter -> the values to try: the stage runs once per combination, as branches named "
        "stage[key=value,...]; stages taking one input downstream of a branch run once per branch too",
    )
    exclude: list[dict[str, MatrixValue]] = Field(
        default_factory=list,
        description="combinations left out of the matrix: each row a partial assignment, e.g. {amount: 0.7}",
    )


class SearchSpec(StrictModel):
    """Bounds on how many matrix trials a run starts: a trial is one combination of the recipe's matrix labels."""

    max_trials: int | None = Field(default=None, ge=1, description="start at most this many trials; the rest are skipped")
    max_minutes: float | None = Field(
        default=None, gt=0, description="start no trial after this many minutes since the run began; the rest are skipped"
    )


Task = Literal["classification", "multilabel", "regression", "token-classification", "custom"]
# Each built-in task's figures, whether higher is better, and (first) the one a budget applies to by default.
TASK_FIGURES: dict[str, dict[str, bool]] = {
    "classification": {"top1": True, "top5": True},
    "multilabel": {"f1_micro": True, "f1_macro": True, "mean_average_precision": True, "exact_match": True},
    "regression": {"mse": False, "mae": False, "max_abs_error": False, "r2": True},
    "token-classification": {"token_accuracy": True},
    "custom": {},
}
# Figures that are fractions of 1: shown as percentages and their drops as points.
FRACTION_FIGURES = {"top1", "top5", "f1_micro", "f1_macro", "mean_average_precision", "exact_match", "token_accuracy", "agreement"}


class MetricSpec(StrictModel):
    """The figure budgets apply to: a built-in task's (``name``), or one of the figures a user function returns."""

    function: str | None = Field(
        default=None, pattern=r"^[\w.]+:[\w.]+$",
        description="'module:function' called as function(predictions, targets) with numpy arrays; returns {name: float}",
    )
    name: str | None = Field(default=None, description="the figure budgets apply to; default: the task's first (top1, f1_micro, mse, ...)")
    higher_is_better: bool | None = Field(default=None, description="the figure's direction; known for built-in figures, default true for a function's")


class RegressionSpec(StrictModel):
    """When a nightly result counts as worse than the last good one (``optipipe diff`` applies the same rules)."""

    max_drop: float = Field(
        default=0.005, ge=0.0, validation_alias=AliasChoices("max_drop", "max_accuracy_drop"),
        description="largest loss of the recipe's metric a variant may show vs the last good nightly run, in the metric's "
        "units and direction (top-1 as a fraction: 0.005 = half a point; an MSE rise in squared target units); "
        "max_accuracy_drop is the older name",
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
    task: Task = Field(
        default="classification",
        description="what the model predicts, which decides what validate measures: classification (top-1, top-5), "
        "multilabel (F1, mAP), regression (MSE, MAE, max error), token-classification (per-token accuracy), custom (metric.function)",
    )
    metric: MetricSpec | None = Field(
        default=None, description="the figure the accuracy budgets apply to, or the user's own metric function (task: custom)"
    )
    data: DataSpec = Field(default_factory=DataSpec)
    baseline: str | None = Field(
        default=None, description="stage whose model is the FP32 baseline; default: the load_checkpoint stage"
    )
    stages: dict[str, StageSpec] = Field(min_length=1, description="stage name -> stage")
    nightly: NightlySpec = Field(default_factory=NightlySpec, description="regression limits of nightly runs")
    search: SearchSpec | None = Field(
        default=None, description="bounds on how many combinations of the stages' matrices a run tries"
    )
    runner: str | None = Field(
        default=None, description=f"where the stages run: {RUNNER_FORMS} (default threads:{DEFAULT_THREADS}); "
        f"--runner and ${RUNNER_ENV} override it; never part of a cache key",
    )

    @field_validator("runner")
    @classmethod
    def runner_is_known(cls, value: str | None) -> str | None:
        """A runner setting must parse (``pipeline.recipe.runner``)."""
        if value is not None:
            try:
                parse_runner(value, "runner")
            except RecipeError as error:
                raise ValueError(str(error).removeprefix("runner: ")) from None
        return value

    @model_validator(mode="after")
    def metric_fits_task(self) -> "Recipe":
        """task: custom needs a metric function; a named built-in figure must be one the task measures."""
        metric = self.metric or MetricSpec()
        if self.task == "custom" and metric.function is None:
            raise ValueError("task: custom needs metric: {function: module:function, name: ...} to score predictions")
        if metric.function is None and metric.name is not None and metric.name not in TASK_FIGURES[self.task]:
            raise ValueError(
                f"metric.name {metric.name!r} is not a figure of task {self.task} "
                f"(it measures {', '.join(TASK_FIGURES[self.task])}); or give metric.function"
            )
        if metric.function is None and metric.higher_is_better is not None:
            raise ValueError("metric.higher_is_better applies to a metric.function's figure; built-in figures know their direction")
        return self

    def budget_metric(self) -> tuple[str | None, bool]:
        """The figure accuracy budgets apply to and whether higher is better (None: a metric function's first figure)."""
        metric = self.metric or MetricSpec()
        if metric.function is not None:
            return metric.name, True if metric.higher_is_better is None else metric.higher_is_better
        name = metric.name or next(iter(TASK_FIGURES[self.task]))
        return name, TASK_FIGURES[self.task][name]


