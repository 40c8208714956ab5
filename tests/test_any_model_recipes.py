"""The ready recipes for models of other shapes, end to end on the checkpoints ``optipipe example`` writes.

BERT (a ``save_pretrained`` folder, dict batches, two int64 inputs, a ``ModelOutput``) runs through
``optipipe run`` and Prefect; the LSTM, regression, image+metadata and DataParallel-dict cases run with
``run_plan`` (the same engine, without Prefect's start-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from pipeline.cli import main
from pipeline.examples import write_example
from pipeline.recipe import load_recipe
from pipeline.run.contract import StageContext
from pipeline.torchkit.data import build_data
from pipeline.torchkit.model_io import ModelIO
from pipeline.zoo import regression_mlp
from stages import validate
from tests.conftest import REPO_ROOT, as_input, run_without_prefect

RECIPES = REPO_ROOT / "recipes"
QUICK_BENCH = ["bench.min_seconds=0.05", "bench.iterations=3", "bench.warmup=1", "bench.rounds=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict[str, Path]:
    """Every example checkpoint, trained once for this module."""
    out = tmp_path_factory.mktemp("examples")
    return {name: write_example(name, out) for name in ("bert", "lstm", "regression", "image-meta", "dataparallel")}


def stage(record: dict, name: str) -> dict:
    """One stage's entry of a run record."""
    return next(entry for entry in record["stages"] if entry["name"] == name)


def onnx_inputs(record: dict, name: str) -> dict[str, tuple[int, list]]:
    """The ONNX file of stage ``name``: input name -> (element type, dims as names or sizes)."""
    model = onnx.load(str(Path(stage(record, name)["artifact"]) / "model.onnx"))
    return {entry.name: (entry.type.tensor_type.elem_type, [dim.dim_param or dim.dim_value for dim in entry.type.tensor_type.shape.dim])
            for entry in model.graph.input}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_bert_folder_through_optipipe_run(examples, tmp_path, capsys):
    store = tmp_path / "store"
    sets = [argument for override in QUICK_BENCH for argument in ("--set", override)]
    code = main(["run", str(RECIPES / "bert.yaml"), "--checkpoint", str(examples["bert"]), "--store", str(store), "--json", *sets])
    record = json.loads(capsys.readouterr().out)
    assert code == 0, record.get("message")
    assert stage(record, "load")["metrics"]["format"] == "huggingface"
    quantized = stage(record, "torch_int8")["metrics"]
    assert quantized["quantized_layers"].get("Linear", 0) >= 4 * 6  # Q, K, V, output, intermediate, output dense per layer
    assert onnx_inputs(record, "onnx") == {"input_ids": (onnx.TensorProto.INT64, ["batch", "seq"]),
                                           "attention_mask": (onnx.TensorProto.INT64, ["batch", "seq"])}
    assert "MatMulInteger" in stage(record, "onnx_int8")["metrics"]["op_counts"] or "DynamicQuantizeMatMul" in json.dumps(
        stage(record, "onnx_int8")["metrics"]["runtime_op_counts"])
    student = stage(record, "student")["metrics"]
    assert student["student_parameters"] < student["teacher_parameters"] and student["student_value"] > 0.8
    report = stage(record, "check")["metrics"]
    assert report["baseline"]["metric"] == "top1" and report["baseline"]["value"] > 0.9
    for name in ("torch_int8", "onnx", "onnx_int8", "student"):
        assert report["variants"][name]["status"] == "accepted", report["rejected"]
    assert report["variants"]["onnx"]["max_abs_logit_diff"] < 1e-3
    timings = stage(record, "bench")["metrics"]["variants"]
    assert set(timings) == {"torch_int8", "onnx", "onnx_int8", "student"} and set(timings["onnx"]["speedup_vs_baseline"]) == {"1", "8"}


def test_lstm_dynamic_int8_quantizes_the_lstm_and_its_classifier(examples, tmp_path):
    record = run_without_prefect(RECIPES / "lstm-int8.yaml", examples["lstm"], tmp_path / "store", QUICK_BENCH)
    assert record["state"] == "succeeded", record.get("message")
    assert stage(record, "int8")["metrics"]["quantized_layers"] == {"LSTM": 1, "Linear": 1}
    assert onnx_inputs(record, "onnx") == {"tokens": (onnx.TensorProto.INT64, ["batch", "seq"])}
    report = stage(record, "check")["metrics"]
    assert report["baseline"]["value"] > 0.9 and not report["rejected"]


def test_regression_recipe_measures_mse_and_keeps_it_within_budget(examples, tmp_path):
    record = run_without_prefect(RECIPES / "regression.yaml", examples["regression"], tmp_path / "store", QUICK_BENCH)
    assert record["state"] == "succeeded", record.get("message")
    report = stage(record, "check")["metrics"]
    baseline = report["baseline"]
    assert baseline["metric"] == "mse" and not baseline["higher_is_better"] and baseline["top1"] is None
    assert 0 < baseline["figures"]["mse"] < 0.5 and set(baseline["figures"]) == {"mse", "mae", "max_abs_error", "r2"}
    for name, figures in report["variants"].items():
        assert figures["status"] == "accepted" and figures["relative_error"] < 0.1, name


def test_regression_variant_with_a_much_larger_error_is_rejected(examples, tmp_path):
    recipe = load_recipe(RECIPES / "regression.yaml").recipe
    data = build_data(recipe.data, ModelIO.of(recipe.model))
    good = regression_mlp()
    good.load_state_dict(torch.load(examples["regression"], weights_only=True))
    damaged = regression_mlp()
    damaged.load_state_dict({**good.state_dict(), "2.bias": good.state_dict()["2.bias"] + 2.5})
    handles = {name: as_input(model, tmp_path) for name, model in (("baseline", good), ("same", good), ("damaged", damaged))}
    (tmp_path / "work").mkdir()
    ctx = StageContext(name="check", workdir=tmp_path / "work", recipe=recipe, checkpoint_path=None, load_data=lambda: data,
                       baseline=handles["baseline"], baseline_name="load")
    report = validate.run(ctx, {"same": handles["same"], "damaged": handles["damaged"]}, validate.Params(max_drop=0.02)).metrics
    assert report["variants"]["same"]["status"] == "accepted"
    assert report["variants"]["damaged"]["status"] == "rejected" and report["variants"]["damaged"]["value"] > 20 * report["baseline"]["value"]
    assert report["rejected"]["damaged"].startswith("mse rose ") and "max_drop allows 0.02" in report["rejected"]["damaged"]


def test_two_inputs_and_a_tuple_output(examples, tmp_path):
    record = run_without_prefect(RECIPES / "image-meta.yaml", examples["image-meta"], tmp_path / "store", QUICK_BENCH)
    assert record["state"] == "succeeded", record.get("message")
    assert list(onnx_inputs(record, "onnx")) == ["image", "meta"]
    report = stage(record, "check")["metrics"]
    assert report["baseline"]["value"] > 0.8 and set(report["variants"]) == {"int8", "onnx", "onnx_int8"}
    assert stage(record, "fused")["metrics"]


def test_dataparallel_training_dict_under_net_runs_the_cpu_int8_recipe(examples, tmp_path):
    record = run_without_prefect(RECIPES / "cpu-int8.yaml", examples["dataparallel"], tmp_path / "store", QUICK_BENCH)
    assert record["state"] == "succeeded", record.get("message")
    loaded = stage(record, "load")["metrics"]
    assert loaded["state_dict_key"] == "net" and loaded["prefix_stripped"] == "module."
    assert stage(record, "check")["metrics"]["baseline"]["value"] > 0.9
