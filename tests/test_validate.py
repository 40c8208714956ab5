"""The validate stage: metrics against the baseline, and rejection of variants that lost accuracy."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.run.contract import StageContext
from pipeline.torchkit.handles import save_torch_module
from pipeline.torchkit.tasks import Scoring
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn
from stages import validate
from tests.conftest import digits_data, one_stage_recipe

RECIPE = one_stage_recipe()


def test_classification_comparison_counts_agreement_and_class_deltas():
    labels = np.array([0, 1, 1, 0])
    baseline = np.array([[2.0, 0], [0, 2], [0, 2], [2, 0]])
    variant = np.array([[2.0, 0], [2, 0], [0, 2], [2, 0]])
    metrics = Scoring.for_task("classification").compare(baseline, variant, labels)
    assert metrics["top1"] == 0.75 and metrics["delta_top1"] == -0.25 and metrics["agreement"] == 0.75
    assert metrics["per_class_delta"] == [0.0, -0.5] and metrics["max_abs_logit_diff"] == 2.0
    assert metrics["metric"] == "top1" and metrics["value"] == 0.75 and metrics["delta"] == -0.25


def test_variant_over_the_allowed_drop_is_rejected(tmp_path):
    torch.manual_seed(0)
    data = digits_data()
    trained = digits_cnn()
    train_model(trained, data.train, epochs=3, lr=3e-3)
    damaged = digits_cnn()
    damaged.load_state_dict(trained.state_dict())
    with torch.no_grad():
        damaged.classifier.weight.add_(torch.randn_like(damaged.classifier.weight) * 3)
    handles = []
    for name, module in (("baseline", trained), ("same", trained), ("damaged", damaged)):
        (tmp_path / name).mkdir()
        handles.append(save_torch_module(module, tmp_path / name))
    workdir = tmp_path / "work"
    workdir.mkdir()
    context = StageContext(
        name="check", workdir=workdir, recipe=RECIPE, checkpoint_path=None, load_data=lambda: data,
        baseline=handles[0], baseline_name="load",
    )
    output = validate.run(context, {"same": handles[1], "damaged": handles[2]}, validate.Params(max_accuracy_drop=0.01))
    variants = output.metrics["variants"]
    assert variants["same"]["status"] == "accepted" and variants["same"]["agreement"] == 1.0
    assert variants["damaged"]["status"] == "rejected"
    assert set(output.metrics["rejected"]) == {"damaged"}
    assert "top1 dropped" in output.metrics["rejected"]["damaged"] and "points vs FP32" in output.metrics["rejected"]["damaged"]
    assert json.loads(output.product.path.read_text())["variants"]["damaged"]["status"] == "rejected"
