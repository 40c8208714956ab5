"""Declared inputs and outputs (model.inputs / model.output), batches of every shape, and scoring by task."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.errors import DataError, RecipeError, StageError
from pipeline.recipe import Recipe
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.tasks import Scoring

TOKENS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": 50},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]},
]


def recipe(model: dict, **top) -> Recipe:
    """A one-stage recipe around a model section (plus top-level keys such as task and metric)."""
    return Recipe.model_validate({"name": "t", "model": {"factory": "m:f", **model}, "stages": {"load": {"uses": "load_checkpoint"}}, **top})


def test_input_shape_is_one_float_input_with_a_symbolic_batch():
    io = ModelIO.of(recipe({"input_shape": [4, 1, 8, 8]}).model)
    assert io.names == ("input",) and io.specs[0].shape == ["batch", 1, 8, 8] and io.specs[0].dtype == "float32"


@pytest.mark.parametrize("model, message", [
    ({"input_shape": [1, 4], "inputs": TOKENS}, "either input_shape"),
    ({}, "either input_shape"),
    ({"inputs": [{"name": "ids", "shape": ["batch", "seq"], "dtype": "int64"}]}, "needs range: \\[low, high\\) or vocab_size"),
    ({"inputs": [TOKENS[0], TOKENS[0]]}, "used twice"),
    ({"inputs": [{"name": "x", "shape": ["batch", 0]}]}, "at least 1"),
    ({"inputs": [{"name": "x", "shape": ["batch"], "vocab_size": 3}]}, "vocab_size applies to integer inputs"),
    ({"inputs": [{"name": "ids", "shape": ["batch"], "dtype": "int64", "range": [3, 3]}]}, "is empty"),
])
def test_bad_input_declarations_are_refused_with_the_fix(model, message):
    with pytest.raises(ValidationError, match=message):
        recipe(model)


def test_task_and_metric_are_checked_together():
    assert recipe({"input_shape": [1, 4]}, task="regression").budget_metric() == ("mse", False)
    assert recipe({"input_shape": [1, 4]}, task="regression", metric={"name": "r2"}).budget_metric() == ("r2", True)
    with pytest.raises(ValidationError, match="task: custom needs metric"):
        recipe({"input_shape": [1, 4]}, task="custom")
    with pytest.raises(ValidationError, match="not a figure of task classification"):
        recipe({"input_shape": [1, 4]}, metric={"name": "mse"})


def test_batches_of_every_layout_become_named_inputs():
    io = ModelIO.of(recipe({"inputs": TOKENS}).model)
    ids, mask, labels = torch.randint(0, 50, (4, 6)), torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 1, 2, 0])
    for batch in ({"input_ids": ids, "attention_mask": mask, "labels": labels}, ((ids, mask), labels), [ids, mask, labels],
                  ({"attention_mask": mask, "input_ids": ids}, labels)):
        named, target = io.split_batch(batch, "train")
        assert list(named) == ["input_ids", "attention_mask"] and torch.equal(named["input_ids"], ids) and torch.equal(target, labels)


@pytest.mark.parametrize("batch, message", [
    ({"input_ids": 1}, "dict without a target"),
    ((torch.zeros(2, 3), torch.zeros(2)), "one input tensor but model.inputs declares 2"),
    (({"input_ids": torch.zeros(2, 3)}, torch.zeros(2)), "missing attention_mask"),
    (({"input_ids": torch.zeros(2, 3), "attention_mask": torch.zeros(2, 3), "token_type_ids": torch.zeros(2, 3)}, torch.zeros(2)),
     "not declared: token_type_ids"),
    ((torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2)), "4-item tuple"),
    (((torch.zeros(2, 3), [1, 2]), torch.zeros(2)), "input attention_mask must be a tensor; it yielded list"),
])
def test_batches_that_do_not_fit_the_declaration_say_how(batch, message):
    io = ModelIO.of(recipe({"inputs": TOKENS}).model)
    with pytest.raises(DataError, match=message):
        io.split_batch(batch, "train")


def test_a_three_item_batch_of_a_one_input_model_is_refused_not_misread():
    io = ModelIO.single()
    with pytest.raises(DataError, match="3-item tuple"):
        io.split_batch((torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2)), "eval")


def test_feeds_are_checked_against_fixed_and_shared_dims():
    io = ModelIO.of(recipe({"inputs": [{"name": "image", "shape": ["batch", 1, 8, 8]}, {"name": "meta", "shape": ["batch", 4]}]}).model)
    assert io.check_feeds({"image": np.zeros((3, 1, 8, 8)), "meta": np.zeros((3, 4))}, "data") == {"batch": 3}
    with pytest.raises(DataError, match="meta is shaped \\[3, 5\\] but model.inputs fixes dimension 1 to 4"):
        io.check_feeds({"image": np.zeros((3, 1, 8, 8)), "meta": np.zeros((3, 5))}, "data")
    with pytest.raises(DataError, match="batch is 3 in one input and 2 in meta"):
        io.check_feeds({"image": np.zeros((3, 1, 8, 8)), "meta": np.zeros((2, 4))}, "data")


def test_synthetic_feeds_are_valid_token_ids_and_masks():
    io = ModelIO.of(recipe({"inputs": TOKENS}).model)
    feeds = io.synthetic(64, {"seq": 12}, seed=1)
    assert feeds["input_ids"].shape == (64, 12) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 50 and set(np.unique(feeds["attention_mask"])) == {0, 1}


class KeywordNet(nn.Module):
    def forward(self, input_ids, attention_mask):
        return OrderedDict(logits=(input_ids * attention_mask).float()[:, :3], hidden=input_ids.float())


class PositionalNet(nn.Module):
    def forward(self, image, meta):
        return image.sum(dim=(1, 2, 3), keepdim=True) + meta, meta


def test_forwards_are_called_by_keyword_or_position_and_the_prediction_is_selected():
    tokens = ModelIO.of(recipe({"inputs": TOKENS}).model)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert tokens.by_keyword(KeywordNet())
    assert torch.equal(tokens.predict(KeywordNet(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), torch.tensor([[1.0, 2, 3]]))
    two = ModelIO.of(recipe({"inputs": [{"name": "x", "shape": ["batch", 1, 1, 1]}, {"name": "m", "shape": ["batch", 2]}], "output": 1}).model)
    assert not two.by_keyword(PositionalNet())
    assert torch.equal(two.predict(PositionalNet(), {"x": torch.ones(1, 1, 1, 1), "m": torch.tensor([[5.0, 6]])}), torch.tensor([[5.0, 6]]))
    wrong = ModelIO.of(recipe({"inputs": TOKENS, "output": "scores"}).model)
    with pytest.raises(StageError, match="has no 'scores' \\(there: logits, hidden\\)"):
        wrong.predict(KeywordNet(), {"input_ids": ids, "attention_mask": ids})


def test_classification_refuses_fractional_targets_and_points_to_regression():
    scoring = Scoring.for_task("classification")
    with pytest.raises(DataError, match="set task: regression"):
        scoring.task.prepare_targets(np.array([0.25, 1.5]), np.zeros((2, 3)))
    with pytest.raises(DataError, match="labels range from 0 to 7 but the model predicts 3 classes"):
        scoring.task.prepare_targets(np.array([0, 7]), np.zeros((2, 3)))


def test_regression_scores_mse_and_a_worse_variant_drops():
    scoring = Scoring.of(recipe({"input_shape": [1, 4]}, task="regression"))
    targets = scoring.task.prepare_targets(np.array([0.0, 1.0, 2.0, 3.0]), np.zeros((4, 1)))  # [N] targets, [N, 1] predictions
    baseline = np.array([[0.1], [1.0], [2.0], [2.9]], dtype=np.float32)
    variant = baseline + 2.5
    compared = scoring.compare(baseline, variant, targets)
    assert compared["metric"] == "mse" and not compared["higher_is_better"]
    assert compared["value"] == pytest.approx(((variant[:, 0] - targets[:, 0]) ** 2).mean())
    assert compared["delta"] > 6 and compared["agreement"] is None and compared["relative_error"] > 1
    assert "top1" not in compared


def test_multilabel_and_token_figures():
    multilabel = Scoring.for_task("multilabel")
    targets = multilabel.task.prepare_targets(np.array([[1, 0], [0, 1]]), np.zeros((2, 2)))
    figures = multilabel.task.figures(np.array([[2.0, -1.0], [1.0, 3.0]]), targets)
    assert figures["f1_micro"] == pytest.approx(0.8) and figures["exact_match"] == 0.5
    tokens = Scoring.for_task("token-classification")
    logits = np.zeros((1, 3, 2))
    logits[0, :, 1] = 1.0  # predicts class 1 everywhere
    labels = tokens.task.prepare_targets(np.array([[1, 0, -100]]), logits)
    assert tokens.task.figures(logits, labels)["token_accuracy"] == 0.5  # the padded token is not counted


def user_metric(predictions, targets):
    return {"within_half": float((np.abs(predictions[:, 0] - targets) < 0.5).mean()), "bias": float((predictions[:, 0] - targets).mean())}


def test_a_custom_metric_function_scores_and_bad_returns_are_named():
    scoring = Scoring.of(recipe({"input_shape": [1, 4]}, task="custom", metric={"function": "tests.test_model_io_and_tasks:user_metric"}))
    compared = scoring.compare(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]]), np.array([0.0, 1.0]))
    assert compared["metric"] == "within_half" and compared["value"] == 0.5 and compared["delta"] == -0.5
    assert scoring.metric({"x": 1.0}).higher_is_better
    with pytest.raises(RecipeError, match="metric.name 'nope' is not among the figures"):
        Scoring.of(recipe({"input_shape": [1, 4]}, task="custom", metric={"function": "tests.test_model_io_and_tasks:user_metric", "name": "nope"})).metric({"x": 1.0})
