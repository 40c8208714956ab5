"""Knowledge distillation: train a student to match a teacher's softened outputs as well as the labels.

Where teacher and student come from depends on ``student``:

- no ``student`` (e.g. ``needs: [pruned]``): the upstream input model is the student and is fine-tuned;
  the teacher is the recipe's FP32 baseline (``ctx.baseline``, the ``load_checkpoint`` stage unless the
  recipe's ``baseline`` key names another). Run standalone, or as the baseline itself, there is no
  teacher and the stage fails with a clear error.
- ``student: {factory: module:function, kwargs: {...}}``: a fresh student is built by the factory and the
  upstream input model is the teacher (``needs: [fused]`` distils the fused model into the new student).

Loss per batch: ``alpha * T^2 * KL(softmax(s/T) || softmax(t/T)) + (1 - alpha) * CE(s, labels)`` with the
teacher's logits computed under ``inference_mode`` in eval mode; ``alpha: 0`` is plain cross-entropy
training. The student is trained with Adam by ``pipeline.torchkit.train.train_model``. Weights a pruning stage
set to exactly zero (in Conv/Linear layers) are kept at zero while training, so distillation does not undo
pruning. Both models' top-1 on the eval data are recorded, with the retention ratio student / teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import prune

from pipeline.errors import StageError, one_line
from pipeline.run.contract import StageContext, StageOutput, StageParams, declare_stage, only_input
from pipeline.torchkit.complexity import WEIGHTED_LAYERS, count_params
from pipeline.torchkit.evaluate import agreement, predict_all, top1
from pipeline.torchkit.handles import ModelHandle, TorchModel, build_module, save_like, save_torch_weights
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model

LossOfBatch = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class StudentSpec(StageParams):
    """A fresh student network built from a factory, like the recipe's ``model`` section."""

    factory: str = Field(
        pattern=r"^[\w.]+:[\w.]+$",
        description="'module.path:callable' returning the student nn.Module, e.g. pipeline.zoo:digits_cnn; "
        "it must take the recipe's inputs and give as many classes as the teacher",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory, e.g. {width: 8}")


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


def check_outputs_match(teacher: nn.Module, student: nn.Module, batch: np.ndarray) -> None:
    """StageError unless the student runs on the data and gives logits shaped like the teacher's."""
    teacher_shape = TorchRunner(teacher).predict(batch).shape
    try:
        student_shape = TorchRunner(student).predict(batch).shape
    except Exception as error:  # a student built for other inputs fails deep in torch: say so in one line
        raise StageError(f"distill: the student fails on the data's inputs {list(batch.shape)} ({one_line(error)}); fix student.kwargs") from error
    if student_shape != teacher_shape:
        raise StageError(
            f"distill: the student's outputs have shape {list(student_shape)} but the teacher's {list(teacher_shape)}; "
            "the student must give as many classes as the teacher (e.g. student.kwargs num_classes)"
        )


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> LossOfBatch:
    """``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE``, on softmax at temperature T, per batch."""

    def loss(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        student_logits = student(inputs)
        hard = F.cross_entropy(student_logits, labels)
        if alpha == 0:
            return hard  # plain training: no teacher forward needed
        with torch.inference_mode():
            teacher_logits = teacher(inputs)
        soft = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits.clone() / temperature, dim=1),  # clone: autograd cannot save inference tensors
            reduction="batchmean",
            log_target=True,
        )
        return alpha * temperature**2 * soft + (1 - alpha) * hard

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


def run(ctx: StageContext, inputs: Mapping[str, ModelHandle], params: Params) -> StageOutput:
    """Distil the teacher into the student on the train data, compare both on eval data, save the student."""
    if params.seed is not None:
        torch.manual_seed(params.seed)
    teacher, student, sources = teacher_and_student(ctx, *only_input(inputs), params)
    eval_inputs, eval_labels = ctx.data.eval_arrays
    check_outputs_match(teacher, student, eval_inputs[:8])
    teacher_logits = predict_all(TorchRunner(teacher), eval_inputs, description="distill: teacher eval")
    student_top1_before = top1(predict_all(TorchRunner(student), eval_inputs, description="distill: student eval"), eval_labels)
    masked = keep_pruned_zeros(student)
    _, final_loss = train_model(
        student,
        ctx.data.train,
        epochs=params.epochs,
        lr=params.lr,
        description=f"distill {ctx.name}",
        loss=distillation_loss(teacher.eval(), params.temperature, params.alpha),
    )
    for module in masked:
        prune.remove(module, "weight")  # bake the kept zeros in: a plain weight again
    student_logits = predict_all(TorchRunner(student), eval_inputs, description="distill: student eval")
    teacher_top1, student_top1 = top1(teacher_logits, eval_labels), top1(student_logits, eval_labels)
    metrics = {
        "teacher": sources["teacher"],
        "student": sources["student"],
        "teacher_top1": teacher_top1,
        "student_top1_before": student_top1_before,
        "student_top1": student_top1,
        "retention": student_top1 / teacher_top1 if teacher_top1 > 0 else None,
        "agreement_with_teacher": agreement(student_logits, teacher_logits),
        "teacher_parameters": count_params(teacher),
        "student_parameters": count_params(student),
        "pruned_layers_kept": len(masked),
        "final_loss": final_loss,
        "epochs": params.epochs,
    }
    return StageOutput(product=saved_student(student, ctx, params, only_input(inputs)[1]), metrics=metrics)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, uses_baseline=uses_baseline, capabilities={"train_data", "eval_data"},
)


STAGE = declare_stage(
    takes=("torch",), makes="torch", inputs="one", version=1, params=Params, run=run, uses_baseline=uses_baseline, capabilities={"train_data", "eval_data"},
)
