"""Knowledge distillation: train a student to match a teacher's softened outputs as well as the labels.

Where teacher and student come from depends on ``student``:

- no ``student`` (e.g. ``needs: [pruned]``): the upstream input model is the student and is fine-tuned;
  the teacher is the recipe's FP32 baseline (``ctx.baseline``, the ``load_checkpoint`` stage unless the
  recipe's ``baseline`` key names another). Run standalone, or as the baseline itself, there is no
  teacher and the stage fails with a clear error.
- ``student: {factory: module:function, kwargs: {...}}``: a fresh student is built by the factory and the
  upstream input model is the teacher (``needs: [fused]`` distils the fused model into the new student).

Loss per batch: ``alpha * soft + (1 - alpha) * hard + feature_weight * MSE(features)``, by the recipe's task
(``pipeline.torchkit.tasks``): soft is ``T^2 * KL(softmax(s/T) || softmax(t/T))`` on logits for
classification (per token for token-classification, sigmoid targets for multilabel) and MSE on the outputs
for regression and custom tasks; hard is the task's loss against the targets (cross-entropy, MSE, ...).
The teacher runs under ``inference_mode`` in eval mode; ``alpha: 0`` is plain training. ``features``
names an output of each model (e.g. ``1`` of a ``(logits, features)`` tuple, or ``hidden_states.-1``)
whose MSE is added with ``feature_weight``. The student is trained with Adam by
``pipeline.torchkit.train.train_model``. Weights a pruning stage set to exactly zero (in Conv/Linear layers)
are kept at zero while training, so distillation does not undo pruning. Both models' figures on the eval
data are recorded; a student that ends worse than it started, or that predicts one class for everything,
fails the stage with its figures and what to try.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.complexity import WEIGHTED_LAYERS, count_params
from pipeline.torchkit.evaluate import predict_all
from pipeline.torchkit.handles import ModelHandle, TorchModel, build_module, save_like, save_torch_weights
from pipeline.torchkit.model_io import Feeds, ModelIO, feed_shapes, select_path
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.tasks import Custom, Task
from pipeline.torchkit.train import LossOfBatch, train_model


class StudentSpec(StageParams):
    """A fresh student network built from a factory, like the recipe's ``model`` section."""

    factory: str = Field(
        pattern=r"^[\w.]+:[\w.]+$",
        description="'module.path:callable' returning the student nn.Module, e.g. pipeline.zoo:digits_cnn; "
        "it must take the recipe's inputs and give as many classes as the teacher",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory, e.g. {width: 8}")


class FeatureSpec(StageParams):
    """One output of each model whose mean squared difference is added to the loss (same shape in both)."""

    student: str | int = Field(description="the student's output path: an index (1), a name, or a dotted path (hidden_states.-1)")
    teacher: str | int = Field(description="the teacher's output path, e.g. the layer the student's last one should match")


class Params(StageParams):
    """Where the student comes from and how it is trained against the teacher."""

    student: StudentSpec | None = Field(
        default=None,
        description="absent: the upstream input model is the student and the recipe's FP32 baseline the teacher; "
        "given: a fresh student built by this factory, taught by the upstream input model",
    )
    epochs: int = Field(default=10, ge=1, description="passes over the train data")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the student")
    temperature: float = Field(default=4.0, gt=0, description="T: softens both models' softmax; the KL term is scaled by T^2")
    alpha: float = Field(
        default=0.9, ge=0, le=1, description="weight of the teacher (KL) term; 1 - alpha weighs cross-entropy on labels; 0 is plain training"
    )
    seed: int | None = Field(
        default=0, description="seeds torch before the student is built and trained, for reproducible runs; null leaves it unseeded"
    )
    features: FeatureSpec | None = Field(default=None, description="an intermediate output of each model to match as well")
    feature_weight: float = Field(default=0.0, ge=0, description="weight of the feature MSE term (needs features)")


def uses_baseline(params: Params) -> bool:
    """The baseline is the teacher only when no ``student`` factory is given (then the input teaches)."""
    return params.student is None


def teacher_and_student(
    ctx: StageContext, upstream_name: str, upstream: ModelHandle, params: Params
) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """The teacher and student modules as the docstring describes, and where each came from."""
    if params.student is not None:
        sources = {"teacher": f"input:{upstream_name}", "student": f"factory:{params.student.factory}"}
        return upstream.load(), build_module(params.student.factory, params.student.kwargs, "distill: student.factory"), sources
    if ctx.baseline is None:
        raise StageError(
            "distill: no teacher: without a 'student' parameter the teacher is the recipe's FP32 baseline, and this "
            "stage has none (it is the baseline, or runs on its own); give student: {factory: ..., kwargs: ...} to "
            "distil the input model into a new student"
        )
    sources = {"teacher": f"baseline:{ctx.baseline_name}", "student": f"input:{upstream_name}"}
    return ctx.baseline.load(), upstream.load(), sources


def check_outputs_match(io: ModelIO, teacher: nn.Module, student: nn.Module, batch: Feeds) -> None:
    """StageError unless the student runs on the data and predicts in the teacher's shape."""
    teacher_shape = TorchRunner(teacher, io).predict(batch).shape
    try:
        student_shape = TorchRunner(student, io).predict(batch).shape
    except Exception as error:  # a student built for other inputs fails deep in torch: say so in one line
        raise StageError(f"distill: the student fails on the data's inputs {feed_shapes(batch)} ({one_line(error)}); fix student.kwargs") from error
    if student_shape != teacher_shape:
        raise StageError(
            f"distill: the student's outputs have shape {list(student_shape)} but the teacher's {list(teacher_shape)}; "
            "the student must give as many classes as the teacher (e.g. student.kwargs num_classes)"
        )


def check_params(task: Task, params: Params) -> None:
    """Refuse combinations that cannot train: a hard loss for a custom task, a feature weight without features."""
    if isinstance(task, Custom) and params.alpha < 1:
        raise StageError("distill: task custom has no loss against targets; set alpha: 1 to learn from the teacher's outputs only")
    if (params.features is None) != (params.feature_weight == 0):
        raise StageError("distill: give features and a feature_weight above 0 together (or neither)")


def feature(outputs: Any, path: str | int, who: str) -> torch.Tensor:
    """The tensor at ``path`` in a model's outputs, or a StageError naming the path and what is there."""
    try:
        selected, _ = select_path(outputs, path)
    except StageError as error:
        raise StageError(f"distill: features.{who}: {error}") from None
    if not isinstance(selected, torch.Tensor):
        raise StageError(f"distill: features.{who} {path!r} is a {type(selected).__name__}, not a tensor")
    return selected


def distillation_loss(io: ModelIO, task: Task, teacher: nn.Module, params: Params) -> LossOfBatch:
    """``alpha * soft + (1 - alpha) * hard + feature_weight * MSE(features)`` per batch (module docstring)."""

    def loss(student: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        student_outputs = io.call(student, inputs)
        student_prediction = io.prediction(student_outputs)
        total = (1 - params.alpha) * task.loss(student_prediction, targets) if params.alpha < 1 else 0.0
        if params.alpha == 0 and params.features is None:
            return total  # plain training: no teacher forward needed
        with torch.inference_mode():
            teacher_outputs = io.call(teacher, inputs)
        if params.alpha > 0:  # clone: autograd cannot save inference tensors
            total = total + params.alpha * task.soft_loss(student_prediction, io.prediction(teacher_outputs).clone(), params.temperature)
        if params.features is not None:
            mine = feature(student_outputs, params.features.student, "student")
            theirs = feature(teacher_outputs, params.features.teacher, "teacher").clone()
            if mine.shape != theirs.shape:
                raise StageError(f"distill: features differ in shape: student {list(mine.shape)}, teacher {list(theirs.shape)}; "
                                 "pick outputs of one shape (e.g. hidden states of the same width)")
            total = total + params.feature_weight * F.mse_loss(mine, theirs)
        return total

    return loss


def keep_pruned_zeros(student: nn.Module) -> list[nn.Module]:
    """Mask the exact-zero weights of Conv/Linear layers so training keeps them zero; the masked layers."""
    masked = []
    for module in student.modules():
        if isinstance(module, WEIGHTED_LAYERS) and not prune.is_pruned(module) and bool((module.weight == 0).any()):
            prune.custom_from_mask(module, "weight", mask=module.weight != 0)
            masked.append(module)
    return masked


def saved_student(student: nn.Module, ctx: StageContext, params: Params, upstream: ModelHandle) -> TorchModel:
    """The trained student as weights where its architecture can be rebuilt (a factory student, or an upstream
    model saved as weights), else as a whole module."""
    if params.student is not None:
        return save_torch_weights(student, ctx.workdir, params.student.factory, params.student.kwargs)
    return save_like(student, ctx.workdir, upstream)


def check_trained(ctx: StageContext, before: Progress, after: Progress, predictions: np.ndarray, targets: np.ndarray, params: Params) -> None:
    """StageError when training made the student worse than it started or collapsed it to one answer.

    Worse is judged on the recipe's metric, or with ``alpha: 1`` (the teacher alone teaches) on the outputs'
    relative error from the teacher's.
    """
    if params.alpha < 1:
        name, was, now = ctx.scoring.metric_name or "metric", before.value, after.value
        worse = (was - now if ctx.scoring.higher_is_better else now - was) > 1e-9
    else:
        name, was, now = "relative error from the teacher", before.relative_error, after.relative_error
        worse = now - was > 1e-9
    why = ctx.scoring.task.collapse(predictions, targets) or (f"it ended worse than it started ({name} {was:.4g} -> {now:.4g})" if worse else None)
    if why:
        raise StageError(
            f"distill: the student did not learn: {why}, after {params.epochs} epochs at lr {params.lr:g}; "
            "try a lower lr (e.g. a tenth), more epochs, or a larger alpha to follow the teacher more"
        )


@dataclass(frozen=True)
class Progress:
    """Where the student stands: the recipe's metric on the targets and its outputs' relative error from the teacher's."""

    value: float
    relative_error: float


def progress(ctx: StageContext, student: nn.Module, teacher_predictions: np.ndarray, targets: np.ndarray) -> tuple[Progress, np.ndarray, dict[str, Any]]:
    """The student's progress, its eval predictions and its comparison with the teacher."""
    predictions = predict_all(TorchRunner(student, ctx.io), ctx.data.eval_set.inputs, description="distill: student eval")
    compared = ctx.scoring.compare(teacher_predictions, predictions, targets)
    return Progress(compared["value"], compared["relative_error"]), predictions, compared


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Distil the teacher into the student on the train data, compare both on eval data, save the student."""
    task = ctx.scoring.task
    check_params(task, params)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    teacher, student, sources = teacher_and_student(ctx, *only_input(inputs), params)
    evaluation = ctx.data.eval_set
    check_outputs_match(ctx.io, teacher, student, evaluation.example())
    teacher_predictions = predict_all(TorchRunner(teacher, ctx.io), evaluation.inputs, description="distill: teacher eval")
    targets = task.prepare_targets(evaluation.targets, teacher_predictions)
    before, _, _ = progress(ctx, student, teacher_predictions, targets)
    masked = keep_pruned_zeros(student)
    _, final_loss = train_model(
        student, ctx.data.train, epochs=params.epochs, lr=params.lr, description=f"distill {ctx.name}", io=ctx.io,
        loss=distillation_loss(ctx.io, task, teacher.eval(), params),
    )
    for module in masked:
        prune.remove(module, "weight")  # bake the kept zeros in: a plain weight again
    after, student_predictions, compared = progress(ctx, student, teacher_predictions, targets)
    teacher_value, student_value = compared["value"] - compared["delta"], compared["value"]
    metrics = {
        "teacher": sources["teacher"],
        "student": sources["student"],
        "metric": compared["metric"],
        "teacher_value": teacher_value,
        "student_value_before": before.value,
        "student_value": student_value,
        "figures": compared["figures"],
        "agreement_with_teacher": compared["agreement"],
        "relative_error_vs_teacher": compared["relative_error"],
        "teacher_parameters": count_params(teacher),
        "student_parameters": count_params(student),
        "pruned_layers_kept": len(masked),
        "final_loss": final_loss,
        "epochs": params.epochs,
    }
    if "top1" in compared:
        metrics |= {"teacher_top1": teacher_value, "student_top1_before": before.value, "student_top1": student_value,
                    "retention": student_value / teacher_value if teacher_value > 0 else None}
    check_trained(ctx, before, after, student_predictions, targets, params)
    return StageOutput(product=saved_student(student, ctx, params, only_input(inputs)[1]), metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, uses_baseline=uses_baseline, capabilities={"train_data", "eval_data"},
)
