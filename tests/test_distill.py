"""Tests of the distill stage, run directly on digits (no Prefect): a small MLP teacher trained here, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import fx, nn
from torch.nn.utils import prune

from pipeline.errors import RecipeError, StageError
from pipeline.torchkit.handles import TorchModel
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model
from pipeline.zoo import mlp
from stages import distill, fuse_conv_bn
from tests.conftest import as_input, digits_data

SMALL_STUDENT = {"factory": "pipeline.zoo:mlp", "kwargs": {"hidden": [16]}}
STUDENT_EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_model(one_torch_thread) -> nn.Module:
    """An MLP trained on digits for four seeded epochs (0.983 top-1)."""
    torch.manual_seed(0)
    teacher = mlp()
    train_model(teacher, digits_data().train, epochs=4, lr=3e-3)
    return teacher.eval()


@pytest.fixture
def teacher(teacher_model, tmp_path) -> TorchModel:
    """The teacher saved as an upstream stage would have saved it."""
    return as_input(teacher_model, tmp_path)


def distil(context, name: str, upstream: TorchModel, baseline: TorchModel | None = None, **params):
    """Run the distill stage on fresh data; returns (StageOutput, ctx)."""
    ctx = context(name, load_data=digits_data, baseline=baseline, baseline_name="load")
    return distill.run(ctx, {"upstream": upstream}, distill.Params(**params)), ctx


def top1_of(model: nn.Module, inputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    return float((TorchRunner(model, ModelIO.single()).predict(inputs).argmax(1) == labels).mean())


def test_distilled_student_is_at_least_as_good_as_the_same_student_trained_on_labels(context, teacher, teacher_model, data):
    common = {"student": SMALL_STUDENT, "epochs": STUDENT_EPOCHS, "lr": 3e-3, "seed": 3}
    plain, _ = distil(context, "plain", teacher, alpha=0.0, **common)
    distilled, ctx = distil(context, "distilled", teacher, alpha=0.5, temperature=8.0, **common)
    before, after = plain.metrics, distilled.metrics
    assert before["student_top1_before"] == after["student_top1_before"] < 0.2  # same seed, same untrained student
    assert before["student_top1"] > 0.85
    assert after["student_top1"] >= before["student_top1"] - 0.01, (after["student_top1"], before["student_top1"])
    assert after["agreement_with_teacher"] >= before["agreement_with_teacher"] - 0.01

    inputs, labels = data.eval_set.inputs, data.eval_set.targets
    student = distilled.product.load()
    # a factory-built student is saved as weights the factory rebuilds: torch loads them with weights_only=True
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["weights.pt"] and distilled.product.path.parent == ctx.workdir
    assert torch.load(distilled.product.path, weights_only=True).keys() == student.state_dict().keys()
    assert after["student_top1"] == pytest.approx(top1_of(student, inputs, labels))
    assert after["teacher_top1"] == pytest.approx(top1_of(teacher_model, inputs, labels)) and after["teacher_top1"] > 0.95
    assert after["retention"] == pytest.approx(after["student_top1"] / after["teacher_top1"])
    assert after["student_parameters"] == sum(p.numel() for p in student.parameters()) < after["teacher_parameters"]
    assert after["teacher"] == "input:upstream" and after["student"] == "factory:pipeline.zoo:mlp"
    assert after["epochs"] == STUDENT_EPOCHS and np.isfinite(after["final_loss"]) and after["pruned_layers_kept"] == 0


class ShiftedClasses(nn.Module):
    """A teacher whose logits are rolled by one class: it always answers label + 1."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.teacher(x), shifts=1, dims=1)


def test_with_alpha_one_the_student_learns_the_teacher_not_the_labels(context, teacher_model, tmp_path):
    wrong_teacher = as_input(ShiftedClasses(teacher_model), tmp_path)
    output, _ = distil(context, "teacher-only", wrong_teacher, student=SMALL_STUDENT, epochs=STUDENT_EPOCHS, lr=3e-3, alpha=1.0)
    metrics = output.metrics
    assert metrics["teacher_top1"] < 0.05
    assert metrics["agreement_with_teacher"] > 0.8  # the shifted answers were learnt ...
    assert metrics["student_top1"] < 0.1  # ... and not the labels


def pruned_fused_student(context, tmp_path: Path) -> TorchModel:
    """A weak MLP, BatchNorm fused by the fuse_conv_bn stage (an fx GraphModule), half its weights pruned for good."""
    torch.manual_seed(1)
    student = mlp(hidden=(32,))
    train_model(student, digits_data().train, epochs=1, lr=1e-3)
    fused = fuse_conv_bn.run(context("fused"), {"input": as_input(student, tmp_path)}, fuse_conv_bn.Params()).product.load()
    for layer in fused.modules():
        if isinstance(layer, nn.Linear):
            prune.l1_unstructured(layer, "weight", amount=0.5)
            prune.remove(layer, "weight")
    return as_input(fused, tmp_path)


def zero_masks(model: nn.Module) -> list[torch.Tensor]:
    return [layer.weight == 0 for layer in model.modules() if isinstance(layer, nn.Linear)]


def test_upstream_pruned_graph_module_is_taught_by_the_baseline_and_stays_pruned(context, teacher, tmp_path):
    upstream = pruned_fused_student(context, tmp_path)
    output, _ = distil(context, "recover", upstream, baseline=teacher, epochs=2, lr=3e-3, alpha=0.5)
    metrics = output.metrics
    assert metrics["teacher"] == "baseline:load" and metrics["student"] == "input:upstream"
    assert metrics["student_top1"] > metrics["student_top1_before"] + 0.1
    assert metrics["pruned_layers_kept"] == 2
    student = output.product.load()
    assert isinstance(student, fx.GraphModule) and not any(isinstance(m, nn.BatchNorm1d) for m in student.modules())
    assert not any(prune.is_pruned(m) for m in student.modules())  # plain weights again, no masks or hooks
    for kept, original in zip(zero_masks(student), zero_masks(upstream.load()), strict=True):
        assert torch.equal(kept, original) and original.float().mean() == pytest.approx(0.5, abs=0.01)


def test_without_student_or_baseline_there_is_no_teacher(context, teacher):
    with pytest.raises(StageError, match=r"distill: no teacher: .*give student: \{factory"):
        distil(context, "alone", teacher, epochs=1)


def test_student_with_another_class_count_is_refused_naming_both_shapes(context, teacher):
    five_classes = {"factory": "pipeline.zoo:mlp", "kwargs": {"num_classes": 5}}
    with pytest.raises(StageError, match=r"student's outputs have shape \[8, 5\] but the teacher's \[8, 10\]"):
        distil(context, "five", teacher, student=five_classes, epochs=1)


def test_student_for_other_inputs_is_refused_in_one_line(context, teacher):
    wide_input = {"factory": "pipeline.zoo:mlp", "kwargs": {"in_features": 100}}
    with pytest.raises(StageError, match=r"student fails on the data's inputs \[8, 1, 8, 8\] \(RuntimeError: .*fix student.kwargs") as raised:
        distil(context, "wide", teacher, student=wide_input, epochs=1)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("student", "expected"),
    [
        ({"factory": "pipeline.zoo:nope"}, r"student.factory: 'pipeline.zoo' has no callable 'nope'"),
        ({"factory": "pipeline.zoo:mlp", "kwargs": {"depth": 3}}, r"student.factory pipeline.zoo:mlp\(\*\*\{'depth': 3\}\) raised TypeError"),
    ],
    ids=["unknown-callable", "bad-kwargs"],
)
def test_bad_student_factory_is_a_recipe_error_naming_the_field(context, teacher, student, expected):
    with pytest.raises(RecipeError, match=expected):
        distil(context, "bad", teacher, student=student, epochs=1)


def test_params_refuse_a_malformed_factory_and_alpha_outside_0_1():
    with pytest.raises(ValidationError, match="student.factory"):
        distill.Params(student={"factory": "pipeline.zoo.mlp"})
    with pytest.raises(ValidationError, match="alpha"):
        distill.Params(alpha=1.5)


class ConstantStudent(nn.Module):
    """A student that cannot look at its input: whatever it learns, it gives every input the same class."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 10)


def constant_student() -> ConstantStudent:
    return ConstantStudent()


def test_a_student_that_collapses_to_one_class_fails_with_what_to_try(context, teacher):
    collapsing = {"factory": "tests.test_distill:constant_student"}
    with pytest.raises(StageError, match=r"distill: the student did not learn: it predicts class \d for every eval input, after 2 epochs "
                                         r"at lr 0.01; try a lower lr"):
        distil(context, "collapse", teacher, student=collapsing, epochs=2, lr=1e-2, alpha=0.0)


def regression_context(context, tmp_path):
    """A StageContext on the regression example's data and recipe (task regression, metric mse)."""
    from pipeline.examples import regression_task
    from pipeline.recipe import load_recipe
    from pipeline.torchkit.data import DataBundle
    from tests.conftest import REPO_ROOT

    recipe = load_recipe(REPO_ROOT / "recipes" / "regression.yaml").recipe
    train, evaluation = regression_task()
    bundle = DataBundle(train=train, eval=evaluation, io=ModelIO.of(recipe.model))
    return lambda name, **overrides: context(name, recipe=recipe, load_data=lambda: bundle, **overrides)


def test_regression_is_distilled_on_outputs_and_scored_by_mse(context, tmp_path):
    from pipeline.zoo import regression_mlp

    regression = regression_context(context, tmp_path)
    torch.manual_seed(0)
    teacher = regression_mlp(hidden=32)
    ctx = regression("teach")
    train_model(teacher, ctx.data.train, epochs=40, lr=1e-2, io=ctx.io, task=ctx.scoring.task)
    student = {"factory": "pipeline.zoo:regression_mlp", "kwargs": {"hidden": 8}}
    output = distill.run(regression("student"), {"teacher": as_input(teacher, tmp_path)},
                         distill.Params(student=student, epochs=40, lr=1e-2, alpha=0.5))
    metrics = output.metrics
    assert metrics["metric"] == "mse" and "student_top1" not in metrics
    assert metrics["student_value"] < metrics["student_value_before"] / 5  # the MSE fell
    assert metrics["relative_error_vs_teacher"] < 0.5 and metrics["agreement_with_teacher"] is None


def test_feature_term_matches_an_intermediate_output_and_refuses_mismatched_shapes(context, tmp_path):
    from pipeline.examples import image_meta_task
    from pipeline.recipe import load_recipe
    from pipeline.torchkit.data import DataBundle
    from pipeline.zoo import image_meta_net
    from tests.conftest import REPO_ROOT

    recipe = load_recipe(REPO_ROOT / "recipes" / "image-meta.yaml").recipe
    train, evaluation = image_meta_task()
    bundle = DataBundle(train=train, eval=evaluation, io=ModelIO.of(recipe.model))
    torch.manual_seed(0)
    teacher = as_input(image_meta_net(), tmp_path)
    same_width = {"factory": "pipeline.zoo:image_meta_net"}
    output = distill.run(context("features", recipe=recipe, load_data=lambda: bundle), {"teacher": teacher}, distill.Params(
        student=same_width, epochs=1, lr=3e-3, alpha=1.0, features={"student": 1, "teacher": 1}, feature_weight=0.5, seed=1))
    assert np.isfinite(output.metrics["final_loss"])
    narrow = {"factory": "pipeline.zoo:image_meta_net", "kwargs": {"width": 8}}
    with pytest.raises(StageError, match=r"features differ in shape: student \[\d+, 24\], teacher \[\d+, 48\]"):
        distill.run(context("narrow", recipe=recipe, load_data=lambda: bundle), {"teacher": teacher}, distill.Params(
            student=narrow, epochs=1, alpha=1.0, features={"student": 1, "teacher": 1}, feature_weight=0.5))
    with pytest.raises(StageError, match="give features and a feature_weight above 0 together"):
        distill.run(context("half", recipe=recipe, load_data=lambda: bundle), {"teacher": teacher}, distill.Params(
            student=same_width, epochs=1, features={"student": 1, "teacher": 1}))
