"""What a model's predictions are scored by, per ``task``: figures, agreement with FP32, and training losses.

- classification: predictions ``[N, classes]`` (logits), targets class ids; top-1, top-5, per-class top-1;
  agreement = share of rows predicting the reference's class; loss cross-entropy, distillation KL at T.
- multilabel: logits ``[N, labels]`` (a label is on where its logit > 0), targets 0/1 ``[N, labels]``;
  F1 micro/macro, mean average precision, exact match; agreement = share of label decisions equal.
- regression: values ``[N]`` or ``[N, k]``, float targets of the same number of values per row; MSE, MAE,
  largest error, R²; loss MSE.
- token-classification: logits ``[N, seq, classes]``, targets ``[N, seq]`` with -100 at padding (the
  Hugging Face convention); per-token accuracy over real tokens; agreement per real token.
- custom: the recipe's ``metric.function(predictions, targets) -> {name: float}``.

Every task also reports, against the FP32 reference, the relative error ``|p - r| / |r|`` and cosine
similarity of the raw outputs, and the largest and mean absolute output difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import DataError, RecipeError, StageError
from pipeline.imports import resolve_callable
from pipeline.recipe.schema import TASK_FIGURES, Recipe

IGNORE_INDEX = -100


def output_closeness(reference: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Relative error, cosine similarity, largest and mean |Δ| of raw outputs (float64)."""
    a = reference.astype(np.float64).ravel()
    b = predictions.astype(np.float64).ravel()
    difference = np.abs(b - a)
    norm = float(np.linalg.norm(a))
    norms = norm * float(np.linalg.norm(b))
    return {
        "relative_error": float(np.linalg.norm(b - a) / norm) if norm > 0 else float(np.linalg.norm(b - a)),
        "cosine_similarity": float(a @ b / norms) if norms > 0 else (1.0 if not difference.any() else 0.0),
        "max_abs_logit_diff": float(difference.max()) if difference.size else 0.0,
        "mean_abs_logit_diff": float(difference.mean()) if difference.size else 0.0,
    }


@dataclass
class Task:
    """Scoring of one task; subclasses fill in the figures, agreement and losses."""

    name: str = "classification"

    def prepare_targets(self, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        """Targets in the dtype and shape the figures need; DataError when they cannot be this task's."""
        return targets

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """The task's figures of one model's predictions."""
        raise NotImplementedError

    def agreement(self, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> float | None:
        """Share of decisions equal to the reference model's; None where a task makes no discrete decisions."""
        return None

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's prediction against its targets."""
        raise NotImplementedError

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Distillation loss of the student's outputs against the teacher's: MSE unless the task has a softer one."""
        return F.mse_loss(student, teacher)

    def collapse(self, predictions: np.ndarray, targets: np.ndarray) -> str | None:
        """Why a trained model is degenerate (one class for every input), or None."""
        return None


class Classification(Task):
    def prepare_targets(self, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        if targets.ndim != 1:
            raise DataError(
                f"task classification needs one class id per example, but the targets are shaped {list(targets.shape)}; "
                "for several labels per example set task: multilabel, for values task: regression"
            )
        if targets.dtype.kind == "f" and not np.all(np.mod(targets, 1) == 0):
            raise DataError(
                "task classification needs class ids, but the eval targets are fractional values "
                f"(e.g. {targets[np.mod(targets, 1) != 0][0]:.4g}); for a model that predicts values set task: regression"
            )
        classes = predictions.shape[1] if predictions.ndim == 2 else 1
        if predictions.ndim != 2 or classes < 2:
            raise DataError(
                f"task classification needs [rows, classes] logits but the model predicts {list(predictions.shape)}; "
                "for a model that predicts values set task: regression"
            )
        labels = targets.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(
                f"eval labels range from {labels.min()} to {labels.max()} but the model predicts {classes} classes "
                f"(0..{classes - 1}); fix the data's labels or the model's number of classes"
            )
        return labels

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        k = min(5, predictions.shape[1])
        top_k = np.argsort(-predictions, axis=1)[:, :k]
        return {
            "top1": float((predictions.argmax(axis=1) == targets).mean()),
            "top5": float((top_k == targets[:, None]).any(axis=1).mean()),
        }

    def agreement(self, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> float | None:
        return float((reference.argmax(axis=1) == predictions.argmax(axis=1)).mean())

    def per_class(self, predictions: np.ndarray, targets: np.ndarray) -> list[float | None]:
        """Top-1 of each class (None for a class absent from the targets)."""
        chosen = predictions.argmax(axis=1)
        return [float((chosen[targets == label] == label).mean()) if (targets == label).any() else None for label in range(predictions.shape[1])]

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction, target.long())

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return temperature**2 * F.kl_div(
            F.log_softmax(student / temperature, dim=-1).flatten(0, -2),
            F.log_softmax(teacher / temperature, dim=-1).flatten(0, -2),
            reduction="batchmean", log_target=True,
        )

    def collapse(self, predictions: np.ndarray, targets: np.ndarray) -> str | None:
        classes = np.unique(predictions.argmax(axis=-1))
        if len(classes) == 1 and len(np.unique(targets[targets != IGNORE_INDEX])) > 1:
            return f"it predicts class {int(classes[0])} for every eval input"
        return None


class TokenClassification(Classification):
    def prepare_targets(self, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        if predictions.ndim != 3 or targets.shape != predictions.shape[:2]:
            raise DataError(
                f"task token-classification needs [rows, seq, classes] logits and [rows, seq] targets; the model predicts "
                f"{list(predictions.shape)} and the targets are {list(targets.shape)}"
            )
        labels = targets.astype(np.int64)
        real = labels[labels != IGNORE_INDEX]
        if real.size and (real.min() < 0 or real.max() >= predictions.shape[2]):
            raise DataError(
                f"token labels range from {real.min()} to {real.max()} but the model predicts {predictions.shape[2]} classes; "
                f"mark padding with {IGNORE_INDEX}"
            )
        return labels

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        real = targets != IGNORE_INDEX
        return {"token_accuracy": float((predictions.argmax(axis=-1) == targets)[real].mean()) if real.any() else 0.0}

    def agreement(self, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> float | None:
        real = targets != IGNORE_INDEX
        same = reference.argmax(axis=-1) == predictions.argmax(axis=-1)
        return float(same[real].mean()) if real.any() else float(same.mean())

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction.flatten(0, 1), target.long().flatten(), ignore_index=IGNORE_INDEX)


class Multilabel(Task):
    def prepare_targets(self, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        if targets.shape != predictions.shape or targets.ndim != 2:
            raise DataError(
                f"task multilabel needs 0/1 targets shaped like the logits [rows, labels]; the model predicts "
                f"{list(predictions.shape)} and the targets are {list(targets.shape)}"
            )
        if not np.isin(targets, (0, 1)).all():
            raise DataError("task multilabel needs 0/1 targets (one column per label); these hold other values")
        return targets.astype(np.int64)

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        from sklearn.metrics import average_precision_score, f1_score

        decided = (predictions > 0).astype(np.int64)
        present = targets.any(axis=0)  # average precision is undefined for a label no example has
        return {
            "f1_micro": float(f1_score(targets, decided, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(targets, decided, average="macro", zero_division=0)),
            "mean_average_precision": float(average_precision_score(targets[:, present], predictions[:, present], average="macro"))
            if present.any() else 0.0,
            "exact_match": float((decided == targets).all(axis=1).mean()),
        }

    def agreement(self, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> float | None:
        return float(((reference > 0) == (predictions > 0)).mean())

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(prediction, target.to(prediction.dtype))

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return temperature**2 * F.binary_cross_entropy_with_logits(student / temperature, torch.sigmoid(teacher / temperature))


class Regression(Task):
    def prepare_targets(self, targets: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        per_row = int(np.prod(predictions.shape[1:])) if predictions.ndim > 1 else 1
        if len(targets) != len(predictions) or targets.size != len(targets) * per_row:
            raise DataError(
                f"task regression needs as many target values per example as the model predicts ({per_row}); the model "
                f"predicts {list(predictions.shape)} and the targets are {list(targets.shape)}"
            )
        return targets.astype(np.float64).reshape(predictions.shape)

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        error = predictions.astype(np.float64) - targets
        variance = float(((targets - targets.mean(axis=0)) ** 2).sum())
        return {
            "mse": float((error**2).mean()),
            "mae": float(np.abs(error).mean()),
            "max_abs_error": float(np.abs(error).max()) if error.size else 0.0,
            "r2": 1.0 - float((error**2).sum()) / variance if variance > 0 else 0.0,
        }

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction, target.to(prediction.dtype).reshape(prediction.shape))

    def collapse(self, predictions: np.ndarray, targets: np.ndarray) -> str | None:
        if predictions.size > 1 and float(np.std(predictions)) == 0.0 and float(np.std(targets)) > 0:
            return "it predicts the same value for every eval input"
        return None


class Custom(Task):
    def __init__(self, function: Callable[[np.ndarray, np.ndarray], Any], reference: str):
        super().__init__("custom")
        self.function = function
        self.reference = reference

    def figures(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        try:
            made = self.function(predictions, targets)
        except Exception as error:  # the user's metric failed: name it
            raise StageError(f"metric.function {self.reference} raised {type(error).__name__}: {error}") from error
        if not isinstance(made, dict) or not made:
            raise RecipeError(f"metric.function {self.reference} must return a non-empty {{name: number}} dict; it returned {type(made).__name__}")
        figures = {}
        for name, value in made.items():
            if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool) or not math.isfinite(float(value)):
                raise RecipeError(f"metric.function {self.reference} returned {name}={value!r}; every figure must be a finite number")
            figures[str(name)] = float(value)
        return figures

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise StageError("task custom has no training loss (only a metric); fine-tuning stages need task classification, "
                         "multilabel, regression or token-classification, or distillation with alpha: 1")


TASKS: dict[str, type[Task]] = {
    "classification": Classification, "multilabel": Multilabel, "regression": Regression, "token-classification": TokenClassification,
}
assert set(TASKS) | {"custom"} == set(TASK_FIGURES)


@dataclass(frozen=True)
class BudgetMetric:
    """The figure accuracy budgets apply to, and its direction."""

    name: str
    higher_is_better: bool

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive: worse), in the figure's own units."""
        return baseline - value if self.higher_is_better else value - baseline


@dataclass(frozen=True)
class Scoring:
    """A recipe's task and the figure its budgets apply to: what every stage compares models by."""

    task: Task
    metric_name: str | None  # None: a metric function's first figure
    higher_is_better: bool

    @classmethod
    def of(cls, recipe: Recipe) -> "Scoring":
        """The scoring a recipe's ``task`` and ``metric`` describe."""
        name, higher = recipe.budget_metric()
        if recipe.task == "custom":
            assert recipe.metric is not None and recipe.metric.function is not None  # the recipe's own check
            task: Task = Custom(resolve_callable(recipe.metric.function, "metric.function"), recipe.metric.function)
        else:
            task = TASKS[recipe.task](recipe.task)
        return cls(task, name, higher)

    @classmethod
    def for_task(cls, name: str = "classification") -> "Scoring":
        """A built-in task's scoring by its default figure (for tools and tests without a recipe)."""
        figure, higher = next(iter(TASK_FIGURES[name].items()))
        return cls(TASKS[name](name), figure, higher)

    def metric(self, figures: dict[str, float]) -> BudgetMetric:
        """The budget figure, checked against the figures measured."""
        name = self.metric_name or next(iter(figures))
        if name not in figures:
            raise RecipeError(f"metric.name {name!r} is not among the figures measured ({', '.join(figures)}); name one of them")
        return BudgetMetric(name, self.higher_is_better)

    def value(self, predictions: np.ndarray, targets: np.ndarray) -> float:
        """The budget figure of one model's predictions (targets prepared)."""
        figures = self.task.figures(predictions, targets)
        return figures[self.metric(figures).name]

    def compare(self, reference: np.ndarray, predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        """Every figure of ``predictions`` and its change from the reference's, agreement and output closeness.

        ``targets`` must already be prepared (``task.prepare_targets``). The keys are those of a ``ModelValidation``.
        """
        if reference.shape != predictions.shape:
            raise StageError(f"the model's predictions are shaped {list(predictions.shape)}, the reference's {list(reference.shape)}")
        task = self.task
        reference_figures = task.figures(reference, targets)
        figures = task.figures(predictions, targets)
        chosen = self.metric(figures)
        compared: dict[str, Any] = {
            "metric": chosen.name,
            "higher_is_better": chosen.higher_is_better,
            "value": figures[chosen.name],
            "delta": figures[chosen.name] - reference_figures[chosen.name],
            "figures": figures,
            "figure_deltas": {name: figures[name] - reference_figures[name] for name in figures},
            "agreement": task.agreement(reference, predictions, targets),
            **output_closeness(reference, predictions),
            "samples": int(len(predictions)),
        }
        if type(task) is Classification:
            before, after = task.per_class(reference, targets), task.per_class(predictions, targets)
            compared |= {
                "top1": figures["top1"],
                "delta_top1": figures["top1"] - reference_figures["top1"],
                "per_class_top1": after,
                "per_class_delta": [None if a is None or b is None else b - a for a, b in zip(before, after)],
            }
        return compared
