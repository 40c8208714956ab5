"""The torch stages (quantize, fuse_conv_bn, prune) on models other than image classifiers: a tiny HF BERT with
named integer inputs and a ModelOutput, an LSTM over tokens, a regression MLP, a two-input model returning a tuple,
and a small ViT-like model built on nn.MultiheadAttention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.errors import StageError
from pipeline.recipe import Recipe
from pipeline.run.contract import StageContext
from pipeline.torchkit.attention import SplitProjectionAttention
from pipeline.torchkit.data import DataBundle
from pipeline.torchkit.model_io import ModelIO
from stages import fuse_conv_bn, prune, quantize
from tests.conftest import as_input

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings(r"ignore:torch\.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings(r"ignore:TypedStorage is deprecated:UserWarning"),
]
VOCAB, SEQ = 50, 12
TOKEN_INPUTS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": VOCAB},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]},
]


def tiny_bert() -> nn.Module:
    """A 2-layer, 32-wide BertForSequenceClassification over 3 classes (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


class LstmClassifier(nn.Module):
    """Token ids -> embedding -> LSTM -> Linear over the last state."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        return self.head(states[:, -1])


class ImageAndMeta(nn.Module):
    """forward(image, meta) -> (logits, features): a conv-BN image branch joined with a metadata vector."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([self.image(image), meta], dim=1)
        return self.head(features), features


class TinyVit(nn.Module):
    """Patch embedding (Conv2d), two pre-norm blocks of nn.MultiheadAttention + MLP, a class head."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.patches = nn.Conv2d(1, width, 4, stride=4)
        self.position = nn.Parameter(torch.randn(1, 4, width) * 0.1)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.attention = nn.ModuleList(nn.MultiheadAttention(width, heads, batch_first=True) for _ in range(2))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
        for norm, attention in zip(self.norms, self.attention):
            normed = norm(tokens)
            tokens = tokens + attention(normed, normed, normed, need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens.mean(dim=1))


def token_data(rows: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, an attention mask with padding at the end of some rows, and 3-class labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=generator)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (rows,), generator=generator)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.randint(0, 3, (rows,), generator=generator)


def make_context(tmp_path: Path, name: str, model: dict, dataset: TensorDataset, task: str = "classification") -> StageContext:
    """A StageContext on a recipe with this ``model`` section and task, reading ``dataset`` (targets last) for train and eval."""
    recipe = Recipe.model_validate({
        "name": "any-model", "task": task, "model": {"factory": "pipeline.zoo:mlp", **model},
        "stages": {"load": {"uses": "load_checkpoint"}},
    })
    bundle = DataBundle(train=DataLoader(dataset, batch_size=16), eval=DataLoader(dataset, batch_size=16), io=ModelIO.of(recipe.model))
    workdir = tmp_path / f"work-{name}"
    workdir.mkdir()
    return StageContext(name=name, workdir=workdir, recipe=recipe, checkpoint_path=None, load_data=lambda: bundle)


def bert_context(tmp_path: Path, name: str) -> StageContext:
    ids, mask, labels = token_data()
    return make_context(tmp_path, name, {"inputs": TOKEN_INPUTS}, TensorDataset(ids, mask, labels))


def run_stage(stage, ctx: StageContext, model: nn.Module, tmp_path: Path, **params):
    return stage.run(ctx, {"input": as_input(model, tmp_path)}, stage.Params.model_validate(params))


def one_line_error(call) -> str:
    """The StageError message ``call()`` raises, checked to be one line."""
    with pytest.raises(StageError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_dynamic_int8_quantizes_every_bert_linear_and_keeps_its_predictions(tmp_path):
    model = tiny_bert()
    linears = sum(type(module) is nn.Linear for module in model.modules())
    output = run_stage(quantize, bert_context(tmp_path, "bert"), model, tmp_path, mode="dynamic")
    metrics = output.metrics
    assert metrics["quantized_layers"] == {"Linear": linears} and linears == 2 * 6 + 2  # q/k/v/out/2 MLP per layer, pooler, classifier
    assert sum(isinstance(module, nnqd.Linear) for module in output.product.load().modules()) == linears
    assert metrics["agreement"] >= 0.95 and metrics["max_abs_logit_diff"] < 0.05
    assert metrics["metric"] == "top1" and metrics["value"] == metrics["top1"] and metrics["eval_samples"] == 48
    assert set(metrics["fp32_layers"]) == {
        "bert.embeddings.word_embeddings (Embedding)", "bert.embeddings.position_embeddings (Embedding)",
        "bert.embeddings.token_type_embeddings (Embedding)",
    }
    assert set(metrics["fp32_layers"].values()) == {"dynamic INT8 covers Linear/LSTM/GRU/MultiheadAttention only"}


def test_dynamic_int8_quantizes_the_lstm_and_its_head(tmp_path):
    ids, _, labels = token_data()
    tokens = [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": VOCAB}]
    ctx = make_context(tmp_path, "lstm", {"inputs": tokens}, TensorDataset(ids, labels))
    torch.manual_seed(0)
    output = run_stage(quantize, ctx, LstmClassifier().eval(), tmp_path, mode="dynamic")
    assert output.metrics["quantized_layers"] == {"LSTM": 1, "Linear": 1}
    assert list(output.metrics["fp32_layers"]) == ["embedding (Embedding)"]
    assert output.metrics["agreement"] >= 0.9


def test_dynamic_int8_of_multihead_attention_quantizes_every_projection(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(48, 1, 8, 8, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    ctx = make_context(tmp_path, "vit", {"input_shape": [1, 1, 8, 8]}, TensorDataset(images, labels))
    torch.manual_seed(0)
    output = run_stage(quantize, ctx, TinyVit().eval(), tmp_path, mode="dynamic")
    metrics = output.metrics
    # per block q/k/v/out projections, and the two MLP layers and the head
    assert metrics["quantized_layers"] == {"Linear": 2 * 4 + 3}
    assert metrics["fp32_layers"] == {"patches (Conv2d)": "dynamic INT8 covers Linear/LSTM/GRU/MultiheadAttention only"}
    reloaded = output.product.load()
    for attention in reloaded.attention:
        assert isinstance(attention, SplitProjectionAttention)
        assert all(isinstance(getattr(attention, part), nnqd.Linear) for part in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert not any(p.dim() >= 2 for a in reloaded.attention for p in a.parameters())  # no FP32 in_proj_weight left
    assert metrics["agreement"] >= 0.9 and metrics["relative_error"] < 0.05


def test_attention_the_rebuild_does_not_cover_stays_fp32_with_the_reason(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    ctx = make_context(tmp_path, "vit-bias-kv", {"input_shape": [1, 1, 8, 8]}, TensorDataset(images, labels))
    torch.manual_seed(0)
    model = TinyVit().eval()
    model.attention[1] = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True).eval()
    metrics = run_stage(quantize, ctx, model, tmp_path, mode="dynamic").metrics
    reason = "MultiheadAttention left as it is: add_bias_kv=True is not re-implemented with separate projections"
    assert metrics["fp32_layers"]["attention.1 (MultiheadAttention)"] == reason
    assert metrics["quantized_layers"] == {"Linear": 4 + 3}


@pytest.mark.parametrize(
    ("options", "call"),
    [({"batch_first": False}, {"need_weights": True}), ({"batch_first": True, "kdim": 12, "vdim": 12}, {"average_attn_weights": False})],
    ids=["sequence-first", "kdim-vdim"],
)
def test_split_attention_equals_multihead_attention_with_masks(options, call):
    torch.manual_seed(0)
    packed = nn.MultiheadAttention(16, 4, **options).eval()
    split = SplitProjectionAttention(packed)
    size = options.get("kdim", 16)
    shape = (lambda length, width: (3, length, width)) if options["batch_first"] else (lambda length, width: (length, 3, width))
    query, key = torch.randn(shape(5, 16)), torch.randn(shape(7, size))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), 1)
    with torch.no_grad():
        expected = packed(query, key, key, key_padding_mask=padding, attn_mask=causal, **call)
        made = split(query, key, key, key_padding_mask=padding, attn_mask=causal, **call)
    for a, b in zip(expected, made):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_regression_metrics_are_mse_and_carry_no_top1(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 10, generator=generator)
    targets = features[:, :3].sum(dim=1)
    ctx = make_context(tmp_path, "regression", {"input_shape": [1, 10]}, TensorDataset(features, targets), task="regression")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)).eval()
    metrics = run_stage(quantize, ctx, model, tmp_path, mode="dynamic").metrics
    assert metrics["metric"] == "mse" and metrics["value"] == metrics["figures"]["mse"] and "mae" in metrics["figures"]
    assert metrics["delta"] == pytest.approx(metrics["value"] - metrics["value_fp32"])
    assert metrics["agreement"] is None and "top1" not in metrics and "top1_fp32" not in metrics
    assert metrics["quantized_layers"] == {"Linear": 2}
    pruned = run_stage(prune, ctx, model, tmp_path, method="magnitude", amount=0.5).metrics
    assert pruned["metric"] == "mse" and "top1_before" not in pruned
    assert pruned["value_after_prune"] == pruned["figures_after_prune"]["mse"] and pruned["value"] == pruned["value_after_prune"]


@pytest.mark.parametrize("mode", ["static", "qat"])
def test_static_and_qat_of_bert_fail_with_one_line_naming_the_ways_out(tmp_path, mode):
    params = {"mode": mode} | ({"epochs": 1} if mode == "qat" else {"calibration_batches": 1})
    message = one_line_error(lambda: run_stage(quantize, bert_context(tmp_path, mode), tiny_bert(), tmp_path, **params))
    assert message.startswith(f"quantize: mode {mode} could not trace and prepare the model with torch.fx (")
    assert "BertForSequenceClassification.forward() is wrapped by a decorator" in message
    assert message.endswith("use mode: dynamic, or export_onnx + quantize_onnx")


def test_two_input_tuple_output_model_is_quantized_fused_and_pruned(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, meta = torch.randn(32, 1, 8, 8, generator=generator), torch.randn(32, 4, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    inputs = [{"name": "image", "shape": ["batch", 1, 8, 8]}, {"name": "meta", "shape": ["batch", 4]}]
    ctx = make_context(tmp_path, "two", {"inputs": inputs, "output": 0}, TensorDataset(images, meta, labels))
    torch.manual_seed(0)
    model = ImageAndMeta().eval()
    fused = run_stage(fuse_conv_bn, ctx, model, tmp_path, require_fusion=True)
    assert fused.metrics["method"] == "fx" and fused.metrics["fused_pairs"] == 1 and fused.metrics["max_abs_diff"] < 1e-4
    static = quantize.run(ctx, {"input": fused.product}, quantize.Params(mode="static", calibration_batches=2)).metrics
    assert static["quantized_layers"] and static["agreement"] >= 0.8
    pruned = run_stage(prune, ctx, model, tmp_path, method="magnitude", amount=0.3, finetune={"epochs": 1, "lr": 1e-3}).metrics
    assert pruned["sparsity"] == pytest.approx(0.3, abs=0.01) and "top1_after_finetune" in pruned and pruned["macs_before"] > 0


def test_channel_pruning_of_bert_fails_with_one_line_and_magnitude_works(tmp_path):
    ctx = bert_context(tmp_path, "channels")
    message = one_line_error(lambda: run_stage(prune, ctx, tiny_bert(), tmp_path, method="channels", amount=0.5))
    assert message.startswith("prune: method: channels needs a torch.fx trace of the model")
    assert "BertForSequenceClassification.forward() is wrapped by a decorator" in message
    assert message.endswith("make forward() traceable or use method: magnitude")
    metrics = run_stage(prune, bert_context(tmp_path, "magnitude"), tiny_bert(), tmp_path, method="magnitude", amount=0.3).metrics
    assert metrics["sparsity"] == pytest.approx(0.3, abs=0.01) and metrics["macs_before"] == metrics["macs_after"] > 0
    assert 0 <= metrics["top1_after_prune"] <= 1 and metrics["metric"] == "top1"


@pytest.mark.parametrize("model", [LstmClassifier, tiny_bert], ids=["lstm", "bert"])
def test_fuse_passes_a_model_without_conv_bn_pairs_through(tmp_path, model):
    ids, mask, labels = token_data()
    if model is LstmClassifier:
        tokens = [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": VOCAB}]
        ctx = make_context(tmp_path, "fuse", {"inputs": tokens}, TensorDataset(ids, labels))
    else:
        ctx = bert_context(tmp_path, "fuse")
    output = run_stage(fuse_conv_bn, ctx, model().eval(), tmp_path)
    assert output.metrics["fused_pairs"] == 0 and output.metrics["max_abs_diff"] == 0.0
    assert type(output.product.load()) is type(model())
    with pytest.raises(StageError, match="found no Conv/Linear layer followed by a BatchNorm"):
        run_stage(fuse_conv_bn, ctx, model().eval(), tmp_path, require_fusion=True)


def test_channel_pruning_follows_an_lstm_model_s_head_and_skips_the_output(tmp_path):
    ids, _, labels = token_data()
    tokens = [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64", "vocab_size": VOCAB}]
    ctx = make_context(tmp_path, "lstm-prune", {"inputs": tokens}, TensorDataset(ids, labels))
    message = one_line_error(lambda: run_stage(prune, ctx, LstmClassifier().eval(), tmp_path, method="channels", amount=0.5))
    assert "head: its channels are the model's output" in message and message.endswith("try method: magnitude")
    assert np.isfinite(run_stage(prune, ctx, LstmClassifier().eval(), tmp_path, method="magnitude", amount=0.5).metrics["value"])
