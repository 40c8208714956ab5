"""export_onnx, quantize_onnx and benchmark on models that are not one float image in, logits out.

A tiny Hugging Face BERT (int64 token ids and mask, [batch, seq]), a two-input model returning a tuple,
and a regression MLP, each built here with small synthetic data (no checkpoint, no Prefect).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.recipe import Recipe
from pipeline.run.contract import StageContext
from pipeline.torchkit.data import DataBundle
from pipeline.torchkit.model_io import ModelIO
from pipeline.torchkit.runners import OnnxRunner, TorchRunner
from stages import benchmark, export_onnx, quantize_onnx
from tests.conftest import as_input

pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

TOKEN_INPUTS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": 50},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]},
]
IMAGE_META_INPUTS = [{"name": "image", "shape": ["batch", 1, 8, 8]}, {"name": "meta", "shape": ["batch", 3]}]


def recipe_of(inputs: list[dict[str, Any]], output: Any = None, task: str = "classification") -> Recipe:
    """A one-stage recipe declaring these inputs, output and task (the factory is never called: models are built here)."""
    return Recipe.model_validate({
        "name": "t", "task": task, "stages": {"load": {"uses": "load_checkpoint"}},
        "model": {"factory": "pipeline.zoo:mlp", "inputs": inputs, "output": output},
    })


def context_of(folder: Path, name: str, recipe: Recipe, *tensors: torch.Tensor, baseline=None) -> StageContext:
    """A StageContext on ``recipe`` whose train and eval loaders yield ``tensors`` (inputs in order, then targets)."""
    loader = DataLoader(TensorDataset(*tensors), batch_size=16)
    data = DataBundle(train=loader, eval=loader, io=ModelIO.of(recipe.model))
    workdir = folder / name
    workdir.mkdir()
    return StageContext(name=name, workdir=workdir, recipe=recipe, checkpoint_path=None, load_data=lambda: data,
                        baseline=baseline, baseline_name="load" if baseline is not None else None)


def token_data(rows: int = 48, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, a mask padding the last positions of some rows, and 3-class labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (rows, seq), generator=generator)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.randint(0, 3, (rows,), generator=generator)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


class ImageAndMeta(nn.Module):
    """forward(image, meta) -> (logits, features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 + 3, 5)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([self.conv(image).mean((2, 3)), meta], dim=1)
        return self.head(features), features


def image_meta_data(rows: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(rows, 1, 8, 8, generator=generator), torch.rand(rows, 3, generator=generator), torch.randint(0, 5, (rows,))


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """The tiny BERT, its recipe and data, exported once by export_onnx."""
    folder = tmp_path_factory.mktemp("bert")
    model, recipe, data = tiny_bert(), recipe_of(TOKEN_INPUTS, "logits"), token_data()
    output = export_onnx.run(context_of(folder, "onnx", recipe, *data), {"input": as_input(model, folder)}, export_onnx.Params())
    return model, recipe, data, output


def test_bert_exports_int64_inputs_with_batch_and_seq_axes(bert_export, tmp_path):
    model, recipe, _, output = bert_export
    metrics = output.metrics
    assert metrics["inputs"] == {name: {"shape": ["batch", "seq"], "dtype": "int64"} for name in ("input_ids", "attention_mask")}
    assert metrics["outputs"] == ["logits"] and metrics["dynamic_dims"] == ["batch", "seq"]
    assert metrics["dims_checked"] == [{"batch": 8, "seq": 12}, {"batch": 1, "seq": 12}, {"batch": 8, "seq": 11}]
    assert metrics["max_abs_diff"] <= 1e-4
    io = ModelIO.of(recipe.model)
    onnx_runner, torch_runner = OnnxRunner(output.product.path), TorchRunner(model, io)
    for rows, seq in ((3, 7), (5, 20)):  # another batch and other lengths than exported
        feeds = io.synthetic(rows, dims={"seq": seq}, seed=rows)
        np.testing.assert_allclose(onnx_runner.predict(feeds), torch_runner.predict(feeds), atol=1e-4)


def test_bert_dynamic_int8_loads_and_agrees(bert_export, tmp_path):
    _, recipe, data, exported = bert_export
    output = quantize_onnx.run(context_of(tmp_path, "int8", recipe, *data), {"input": exported.product}, quantize_onnx.Params(mode="dynamic"))
    metrics = output.metrics
    assert metrics["op_counts"].get("MatMulInteger", 0) + metrics["op_counts"].get("DynamicQuantizeMatMul", 0) >= 1
    assert metrics["agreement"] >= 0.9 and metrics["metric"] == "top1" and metrics["eval_samples"] == 48
    assert metrics["size_ratio"] > 1.5
    feeds = ModelIO.of(recipe.model).synthetic(4, dims={"seq": 9})
    assert OnnxRunner(output.product.path).predict(feeds).shape == (4, 3)


def test_bert_static_int8_calibrates_on_token_batches(bert_export, tmp_path):
    _, recipe, data, exported = bert_export
    params = quantize_onnx.Params(mode="static", calibration_batches=2, min_agreement=0.5)
    output = quantize_onnx.run(context_of(tmp_path, "int8", recipe, *data), {"input": exported.product}, params)
    assert output.metrics["calibration_batches"] == 2 and output.metrics["calibration_samples"] == 32
    assert output.metrics["op_counts"]["QuantizeLinear"] >= 1 and output.metrics["agreement"] >= 0.5


@pytest.mark.parametrize("keep_others", [False, True], ids=["prediction-only", "keep-others"])
def test_two_input_tuple_model_exports_both_inputs_and_named_outputs(tmp_path, keep_others):
    torch.manual_seed(0)
    recipe = recipe_of(IMAGE_META_INPUTS, {"prediction": 0, "keep_others": keep_others})
    ctx = context_of(tmp_path, "onnx", recipe, *image_meta_data())
    output = export_onnx.run(ctx, {"input": as_input(ImageAndMeta(), tmp_path)}, export_onnx.Params())
    metrics = output.metrics
    assert metrics["inputs"] == {"image": {"shape": ["batch", 1, 8, 8], "dtype": "float32"}, "meta": {"shape": ["batch", 3], "dtype": "float32"}}
    assert metrics["outputs"] == (["0", "1"] if keep_others else ["0"]) and metrics["batch_sizes_checked"] == [8, 1]
    graph = onnx.load(output.product.path).graph
    assert [entry.name for entry in graph.output] == metrics["outputs"]
    if keep_others:
        assert [dim.dim_param or dim.dim_value for dim in graph.output[1].type.tensor_type.shape.dim] == ["batch", 7]


def test_regression_mlp_exports_and_int8_reports_mse(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)).eval()
    recipe = recipe_of([{"name": "x", "shape": ["batch", 10]}], task="regression")
    inputs = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = model(inputs)[:, 0] + 0.1
    exported = export_onnx.run(context_of(tmp_path, "onnx", recipe, inputs, targets), {"input": as_input(model, tmp_path)}, export_onnx.Params())
    assert exported.metrics["inputs"] == {"x": {"shape": ["batch", 10], "dtype": "float32"}}
    output = quantize_onnx.run(context_of(tmp_path, "int8", recipe, inputs, targets), {"input": exported.product},
                               quantize_onnx.Params(mode="dynamic"))
    metrics = output.metrics
    assert metrics["metric"] == "mse" and set(metrics["figures"]) == {"mse", "mae", "max_abs_error", "r2"}
    assert metrics["agreement"] is None and metrics["top1_input"] is None and metrics["value_input"] == pytest.approx(0.01, rel=1e-3)
    assert metrics["relative_error"] <= quantize_onnx.Params().max_relative_error
    with pytest.raises(quantize_onnx.StageError, match=r"outputs differ from the input model's by .* \(relative error\) .*max_relative_error 0%; mse"):
        quantize_onnx.run(context_of(tmp_path, "strict", recipe, inputs, targets), {"input": exported.product},
                          quantize_onnx.Params(mode="dynamic", max_relative_error=1e-9))


def test_benchmark_times_a_two_input_model_on_its_eval_feeds(tmp_path):
    recipe = recipe_of(IMAGE_META_INPUTS, 0)
    baseline = as_input(ImageAndMeta(), tmp_path)
    ctx = context_of(tmp_path, "bench", recipe, *image_meta_data(), baseline=baseline)
    params = benchmark.Params(batch_sizes=[1, 40], warmup=0, iterations=3, min_seconds=0, rounds=1)
    metrics = benchmark.run(ctx, {"other": as_input(ImageAndMeta(), tmp_path)}, params).metrics
    assert metrics["input_shapes"] == {"1": {"image": [1, 1, 8, 8], "meta": [1, 3]}, "40": {"image": [40, 1, 8, 8], "meta": [40, 3]}}
    assert set(metrics["variants"]["other"]["batches"]) == {"1", "40"}
