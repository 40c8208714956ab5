"""Tests of the prune stage, run directly on real digits inputs (no Prefect)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import fx, nn

from pipeline.errors import StageError
from pipeline.torchkit import channels
from pipeline.torchkit.complexity import count_macs, count_params
from pipeline.torchkit.data import build_data
from pipeline.torchkit.handles import save_torch_weights
from pipeline.torchkit.model_io import ModelIO, feed_rows
from pipeline.torchkit.runners import TorchRunner
from pipeline.torchkit.train import train_model
from pipeline.zoo import digits_cnn, mlp, resnet18, resnet_small
from stages import fuse_conv_bn, prune
from tests.conftest import as_input, one_stage_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Branchy(nn.Module):
    """fx cannot trace it: a Python `if` on a tensor value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.head(x.mean((2, 3)))


def grouped_net() -> nn.Module:
    """A conv feeding a grouped (not depthwise) conv, then a classifier: no layer's channels can be removed."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


@pytest.fixture(scope="module")
def data():
    """This module's own digits loaders (overrides conftest's shared ones): the shuffle order its training and
    fine-tuning see must not depend on how often other test modules iterated a shared train loader first."""
    recipe = one_stage_recipe()
    return build_data(recipe.data, ModelIO.of(recipe.model))


@pytest.fixture(scope="module")
def trained_cnn(data) -> nn.Module:
    """The zoo's digits_cnn (32-64-64 channels), trained 3 seeded epochs on digits."""
    torch.manual_seed(0)
    model = digits_cnn()
    train_model(model, data.train, epochs=3, lr=3e-3)
    return model.eval()


def prune_model(context, tmp_path: Path, model: nn.Module, name: str = "pruned", **params):
    """Run the prune stage on ``model``; returns (StageOutput, ctx)."""
    ctx = context(name)
    handle = as_input(model, tmp_path)
    return prune.run(ctx, {"input": handle}, prune.Params.model_validate(params)), ctx


def fused(context, tmp_path: Path, model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorms folded by the fuse_conv_bn stage (a GraphModule, conv biases, no BN)."""
    output = fuse_conv_bn.run(context("fused"), {"input": as_input(model, tmp_path)}, fuse_conv_bn.Params(require_fusion=True))
    return output.product.load()


def strongest_channels(weight: torch.Tensor, keep: int, norm: int = 1) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` output channels with the largest Ln weight norm."""
    norms = weight.detach().flatten(1).norm(p=norm, dim=1)
    return norms.topk(keep).indices.sort().values


def test_channel_pruning_shrinks_layers_their_batchnorms_and_readers(context, tmp_path, data, trained_cnn):
    output, ctx = prune_model(context, tmp_path, trained_cnn, method="channels", amount=0.5)
    metrics = output.metrics
    assert metrics["channels"] == {"features.0.0": [32, 16], "features.1.0": [64, 32], "features.3.0": [64, 32]}
    assert metrics["skipped_layers"] == {"classifier": "its channels are the model's output (a classifier's outputs are never pruned)"}
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.pt"]
    pruned = output.product.load()
    assert type(pruned).__name__ == "DigitsCNN"
    first, first_bn = pruned.features[0][0], pruned.features[0][1]
    assert first.weight.shape == (16, 1, 3, 3) and first.out_channels == 16
    assert first_bn.num_features == 16 and first_bn.running_mean.shape == (16,)
    assert pruned.features[1][0].weight.shape == (32, 16, 3, 3) and pruned.features[1][0].in_channels == 16
    assert pruned.classifier.weight.shape == (10, 32) and pruned.classifier.in_features == 32
    kept = strongest_channels(trained_cnn.features[0][0].weight, 16)  # the 16 of 32 with the largest L1 norm
    torch.testing.assert_close(first.weight, trained_cnn.features[0][0].weight[kept])
    torch.testing.assert_close(first_bn.running_var, trained_cnn.features[0][1].running_var[kept])
    example = torch.from_numpy(data.eval_set.example()["input"])
    one_row = {"input": example[:1]}
    assert metrics["params_before"] == count_params(trained_cnn) == 56554
    assert metrics["macs_before"] == count_macs(trained_cnn, data.io, one_row)
    half_width = digits_cnn(width=16).eval()  # halving every conv's channels gives exactly this architecture
    assert metrics["params_after"] == count_params(pruned) == count_params(half_width)
    assert metrics["macs_after"] == count_macs(pruned, data.io, one_row) == count_macs(half_width, data.io, one_row)
    assert metrics["macs_ratio"] < 0.27 and metrics["params_ratio"] < 0.27
    with torch.no_grad():
        assert pruned(example).shape == (8, 10)
    assert metrics["top1_before"] >= 0.9 and 0 <= metrics["agreement_after_prune"] <= 1
    assert metrics["metric"] == "top1" and metrics["value_before"] == metrics["top1_before"] and metrics["value"] == metrics["top1_after_prune"]
    assert metrics["delta"] == pytest.approx(metrics["top1_after_prune"] - metrics["top1_before"])
    assert "top1_after_finetune" not in metrics


def pruned_groups(metrics: dict) -> list[tuple[list[str], int]]:
    """Each pruned channel group's layers and kept channel count, from the stage's ``joint_groups`` and ``channels``."""
    joint = [(group["layers"], group["channels_after"]) for group in metrics["joint_groups"]]
    grouped = {name for layers, _ in joint for name in layers}
    return joint + [([name], after) for name, (_, after) in metrics["channels"].items() if name not in grouped]


def masked_like_pruned(model: nn.Module, metrics: dict, norm: int) -> nn.Module:
    """``model`` with the weakest channels of each pruned group zeroed (weights and bias), shapes unchanged: a
    channel's strength is the sum of its weight norms over the group's producers (its non-depthwise layers)."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for names, kept_count in pruned_groups(metrics):
            producers = [layers[name].weight for name in names if getattr(layers[name], "groups", 1) == 1]
            strength = sum(weight.detach().flatten(1).norm(p=norm, dim=1) for weight in producers)
            removed = torch.ones(len(strength), dtype=torch.bool)
            removed[strength.topk(kept_count).indices] = False
            for name in names:
                layers[name].weight[removed] = 0
                layers[name].bias[removed] = 0
    return model


@pytest.mark.parametrize(
    ("factory", "norm", "pruned_layers"),
    [(digits_cnn, 2, 3), (partial(resnet_small, width=8), 1, 9), (mlp, 1, 2)],
    ids=["digits_cnn-L2", "resnet_small-L1", "mlp-L1"],
)
def test_removing_channels_of_a_fused_model_equals_zeroing_them(context, tmp_path, data, factory, norm, pruned_layers):
    # Without BatchNorm a zeroed channel (weight and bias) outputs exactly 0 through ReLU and pooling: the
    # model with channels removed must give the same logits as the original with those channels zeroed.
    torch.manual_seed(0)
    model = fused(context, tmp_path, factory().eval())
    assert isinstance(model, fx.GraphModule)
    output, _ = prune_model(context, tmp_path, model, method="channels", amount=0.5, norm=norm)
    assert output.metrics["pruned_layers"] == pruned_layers == len(output.metrics["channels"])
    assert output.metrics["params_ratio"] < 0.6 and output.metrics["macs_ratio"] < 0.6
    pruned = output.product.load()
    reference = masked_like_pruned(model, output.metrics, norm)
    batch = torch.from_numpy(data.eval_set.inputs["input"][:64])
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch), reference(batch), rtol=1e-4, atol=1e-5)


class FlattenedMap(nn.Module):
    """A conv whose 4x4 feature map is flattened with view(size(0), -1): each channel feeds 16 Linear inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.head(x.view(x.size(0), -1))


def test_linear_after_a_flattened_feature_map_loses_each_pruned_channel_s_block_of_inputs(context, tmp_path, data):
    torch.manual_seed(0)
    model = FlattenedMap().eval()
    output, _ = prune_model(context, tmp_path, model, method="channels", amount=0.25)
    assert output.metrics["channels"] == {"conv": [8, 6]}
    pruned = output.product.load()
    assert pruned.head.weight.shape == (10, 6 * 16) and pruned.head.in_features == 96
    batch = torch.from_numpy(data.eval_set.inputs["input"][:64])
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch), masked_like_pruned(model, output.metrics, 1)(batch))


OUTPUT_REASON = "its channels are the model's output (a classifier's outputs are never pruned)"


def test_resnet_small_prunes_every_conv_and_the_residual_channels_jointly(context, tmp_path, data):
    torch.manual_seed(0)
    output, _ = prune_model(context, tmp_path, resnet_small(width=8).eval(), method="channels", amount=0.25)
    metrics = output.metrics
    assert metrics["channels"] == {
        "layers.0.conv1": [8, 6], "layers.1.conv1": [16, 12], "layers.2.conv1": [32, 24],
        "stem.0": [8, 6], "layers.0.conv2": [8, 6],
        "layers.1.downsample.0": [16, 12], "layers.1.conv2": [16, 12],
        "layers.2.downsample.0": [32, 24], "layers.2.conv2": [32, 24],
    }
    assert metrics["joint_groups"] == [
        {"layers": ["stem.0", "layers.0.conv2"], "channels_before": 8, "channels_after": 6},
        {"layers": ["layers.1.downsample.0", "layers.1.conv2"], "channels_before": 16, "channels_after": 12},
        {"layers": ["layers.2.downsample.0", "layers.2.conv2"], "channels_before": 32, "channels_after": 24},
    ]
    assert metrics["skipped_layers"] == {"fc": OUTPUT_REASON}
    assert metrics["channels_removed_fraction"] == pytest.approx((2 * 3 + 4 * 3 + 8 * 3) / (8 * 3 + 16 * 3 + 32 * 3 + 10))  # the classifier stays
    pruned = output.product.load()
    block = pruned.layers[1]
    assert block.conv1.weight.shape == (12, 6, 3, 3) and block.bn1.num_features == 12
    assert block.conv2.weight.shape == (12, 12, 3, 3) and block.downsample[0].weight.shape == (12, 6, 1, 1)
    assert block.bn2.num_features == block.downsample[1].num_features == 12 and pruned.fc.weight.shape == (10, 24)
    with torch.no_grad():
        assert pruned(torch.from_numpy(data.eval_set.example()["input"])).shape == (8, 10)


def test_resnet18_dependencies_group_each_stage_s_residual_channels_and_prune_every_conv():
    model = resnet18(num_classes=10).eval()
    traced = channels.traced_with_shapes(model, ModelIO.single(), {"input": torch.randn(2, 3, 32, 32)})
    groups, skipped = channels.ChannelDependencies(traced).groups()
    assert skipped == {"fc": OUTPUT_REASON}  # was 13 of 21 layers: every conv feeding an add, and the classifier
    assert sum(len(group.layers) for group in groups) == 20  # every conv: the stem, 16 in blocks, 3 projections
    first_convs = [group for group in groups if len(group.producers) == 1]
    assert [group.producers for group in first_convs] == [[f"layers.{index}.conv1"] for index in range(8)]
    for group in first_convs:
        assert group.batchnorms == [group.producers[0].replace("conv1", "bn1")]
        assert group.consumers == {group.producers[0].replace("conv1", "conv2"): 1}
    residual = [group for group in groups if len(group.producers) > 1]
    assert [group.producers for group in residual] == [
        ["stem.0", "layers.0.conv2", "layers.1.conv2"],
        *([f"layers.{block}.downsample.0", f"layers.{block}.conv2", f"layers.{block + 1}.conv2"] for block in (2, 4, 6)),
    ]
    assert residual[1].batchnorms == ["layers.2.downsample.1", "layers.2.bn2", "layers.3.bn2"]
    assert residual[1].consumers == {"layers.3.conv1": 1, "layers.4.downsample.0": 1, "layers.4.conv1": 1}
    assert residual[-1].consumers == {"layers.7.conv1": 1, "fc": 1} and residual[-1].width == 512


@pytest.mark.parametrize("global_ranking", [False, True], ids=["layer-wise", "global"])
def test_magnitude_pruning_reaches_the_amount_and_saves_plain_weights(context, tmp_path, trained_cnn, global_ranking):
    amount = 0.3
    output, _ = prune_model(context, tmp_path, trained_cnn, method="magnitude", amount=amount, **{"global": global_ranking})
    metrics = output.metrics
    pruned = output.product.load()
    state = pruned.state_dict()
    assert not any(key.endswith(("weight_orig", "weight_mask")) for key in state)
    assert not any(module._forward_pre_hooks for module in pruned.modules())
    weights = {name: module.weight for name, module in pruned.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    zeros = {name: int((weight == 0).sum()) for name, weight in weights.items()}
    sizes = {name: weight.numel() for name, weight in weights.items()}
    if global_ranking:
        assert abs(sum(zeros.values()) - amount * sum(sizes.values())) <= 1
        assert len({round(value, 2) for value in metrics["layer_sparsity"].values()}) > 1  # ranked across layers
    else:
        assert all(abs(zeros[name] - amount * sizes[name]) <= 1 for name in weights)
    assert metrics["layer_sparsity"] == pytest.approx({name: zeros[name] / sizes[name] for name in weights})
    assert metrics["sparsity"] == pytest.approx(amount, abs=1e-4)
    assert metrics["params_after"] == metrics["params_before"] and metrics["macs_after"] == metrics["macs_before"]
    assert metrics["top1_after_prune"] >= 0.85  # from 0.97; measured 0.92 layer-wise, 0.97 global


def test_finetune_recovers_accuracy_after_halving_the_channels(context, tmp_path, trained_cnn):
    torch.manual_seed(0)
    output, _ = prune_model(
        context, tmp_path, trained_cnn, method="channels", amount=0.5, finetune={"epochs": 3, "lr": 3e-3}
    )
    metrics = output.metrics
    assert metrics["top1_before"] >= 0.9
    assert metrics["top1_after_prune"] < 0.5  # halving every conv leaves BatchNorm statistics that no longer fit ...
    assert metrics["top1_after_finetune"] >= 0.95  # ... and three epochs bring it back (measured 0.09 -> 0.98)
    assert metrics["agreement_after_finetune"] >= 0.95 and metrics["finetune_loss"] < 0.3


def test_magnitude_finetune_trains_but_keeps_the_pruned_weights_at_zero(context, tmp_path):
    torch.manual_seed(0)
    output, _ = prune_model(context, tmp_path, mlp().eval(), method="magnitude", amount=0.5, finetune={"epochs": 3, "lr": 3e-3})
    metrics = output.metrics
    assert metrics["top1_after_prune"] < 0.3 and metrics["top1_after_finetune"] >= 0.8  # an untrained MLP learns ...
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-4)  # ... with the masks in force throughout
    assert all(value == pytest.approx(0.5, abs=0.01) for value in metrics["layer_sparsity"].values())


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.2])
def test_amount_outside_zero_one_is_a_validation_error(amount):
    with pytest.raises(ValidationError, match="amount"):
        prune.Params.model_validate({"method": "channels", "amount": amount})


def test_global_is_for_magnitude_only_and_keeps_its_recipe_name():
    with pytest.raises(ValidationError, match="global: true applies to method: magnitude only"):
        prune.Params.model_validate({"method": "channels", "amount": 0.5, "global": True})
    params = prune.Params.model_validate({"method": "magnitude", "amount": 0.5, "global": True})
    assert params.global_ is True and params.model_dump(mode="json")["global"] is True


def test_untraceable_model_is_refused_for_channels_but_magnitude_works(context, tmp_path):
    with pytest.raises(StageError, match=r"tracing failed \(TraceError: .*\); make forward\(\) traceable or use method: magnitude") as raised:
        prune_model(context, tmp_path, Branchy(), method="channels", amount=0.5)
    assert "\n" not in str(raised.value)
    output, _ = prune_model(context, tmp_path, Branchy(), name="magnitude", method="magnitude", amount=0.5)
    assert output.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("model", "method", "expected"),
    [
        (
            grouped_net(),
            "channels",
            r"no layer's output channels can be removed \(0: its channels feed grouped convolution '2' \(groups=2\), .*; "
            r"2: grouped convolution \(groups=2, 8->8 channels\): .*; 6: its channels are the model's output .*\); try method: magnitude",
        ),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), "magnitude", "the model has no Conv1d/2d/3d or Linear layer, so there is nothing to prune"),
    ],
    ids=["channels-grouped", "magnitude-no-layers"],
)
def test_model_with_nothing_prunable_is_a_clear_error(context, tmp_path, model, method, expected):
    with pytest.raises(StageError, match=expected):
        prune_model(context, tmp_path, model.eval(), method=method, amount=0.5)


def test_pruned_weights_and_history_reload_with_weights_only(context, tmp_path, trained_cnn, data):
    """An input saved as weights + factory gives a pruned model saved the same way: weights that torch loads with
    weights_only=True, and the kept channel indices, replayed on a fresh digits_cnn when the model is loaded."""
    source_folder = tmp_path / "slim"
    source_folder.mkdir()
    source = save_torch_weights(trained_cnn, source_folder, "pipeline.zoo:digits_cnn", {})
    ctx = context("pruned")
    output = prune.run(ctx, {"slim": source}, prune.Params(method="channels", amount=0.5))
    assert output.metrics["saved_as"] == "weights and pruning history"
    assert output.product.path.name == "weights.pt"
    weights = torch.load(output.product.path, weights_only=True)  # no pickled module anywhere in the file
    assert weights["features.0.0.weight"].shape[0] == 16
    history = output.product.meta["pruning"]
    conv = trained_cnn.features[0][0].weight
    first = next(cut for cut in history if cut["producers"] == ["features.0.0"])
    assert first["kept"] == strongest_channels(conv, 16).tolist() and first["batchnorms"] == ["features.0.1"]
    reloaded = output.product.load()
    batch = feed_rows(data.eval_set.inputs, slice(0, 16))
    expected = TorchRunner(trained_cnn, data.io).predict(batch)  # unpruned: only the shapes must agree with it
    assert TorchRunner(reloaded, data.io).predict(batch).shape == expected.shape
    top1_after = output.metrics["top1_after_prune"]
    predictions = TorchRunner(reloaded, data.io).predict(data.eval_set.inputs)
    assert float((predictions.argmax(axis=1) == data.eval_set.targets).mean()) == pytest.approx(top1_after)


def test_a_whole_module_input_stays_a_whole_module(context, tmp_path, trained_cnn):
    output, _ = prune_model(context, tmp_path, trained_cnn, method="magnitude", amount=0.3)
    assert output.metrics["saved_as"] == "whole module" and output.product.path.name == "model.pt"
