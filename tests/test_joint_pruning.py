"""Channel pruning of residual-coupled channels as one group, and of depthwise convs with the layer feeding them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.torchkit import channel_cuts, channels
from pipeline.torchkit.complexity import count_macs
from pipeline.torchkit.handles import save_torch_weights
from pipeline.torchkit.model_io import ModelIO
from pipeline.zoo import resnet18, resnet_small
from stages import export_onnx, fuse_conv_bn, prune, quantize
from tests.conftest import as_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OUTPUT_REASON = "its channels are the model's output (a classifier's outputs are never pruned)"


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1, with a residual add when the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetish(nn.Module):
    """A small MobileNetV2-style net for 1x8x8 digits: a stem, five inverted residual blocks (three with a residual
    add, the first two adds chained on 24 channels), a 1x1 head conv and a classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 24, 1, 4), InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
        )
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.head(self.blocks(self.stem(x))), 1))


def mobilenetish(num_classes: int = 10) -> MobileNetish:
    """The factory a weights-only artifact of the test's MobileNet-style net names."""
    return MobileNetish(num_classes)


def with_random_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with random BatchNorm affine weights and running statistics (fresh ones are 1 and 0)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def planned_cuts(model: nn.Module, amount: float, shape=(2, 1, 8, 8)) -> list[channel_cuts.ChannelCut]:
    """The cuts channel pruning makes on ``model`` (found on a copy: ``model`` is left whole)."""
    cuts, _ = channel_cuts.cut_channels(copy.deepcopy(model), ModelIO.single(), {"input": torch.randn(*shape)}, amount, 1)
    return cuts


def deadened(model: nn.Module, cuts: list[channel_cuts.ChannelCut]) -> nn.Module:
    """A copy of ``model`` whose channels the ``cuts`` remove output exactly zero in every layer of their group:
    zero filters and biases in producers and depthwise convs, zero scale and shift in every BatchNorm."""
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for cut in cuts:
            removed = torch.ones(cut.width_before, dtype=torch.bool)
            removed[list(cut.kept)] = False
            for name in (*cut.layers, *cut.batchnorms):
                layer = dead.get_submodule(name)
                layer.weight[removed] = 0
                if layer.bias is not None:
                    layer.bias[removed] = 0
    return dead


@pytest.mark.parametrize("factory", [resnet_small, mobilenetish], ids=["resnet_small", "mobilenet-style"])
def test_removing_dead_residual_and_depthwise_channels_keeps_the_outputs(factory):
    model = with_random_statistics(factory())
    dead = deadened(model, planned_cuts(model, 0.5))
    pruned = copy.deepcopy(dead)
    cuts, _ = channel_cuts.cut_channels(pruned, ModelIO.single(), {"input": torch.randn(2, 1, 8, 8)}, 0.5, 1)
    assert [cut.kept for cut in cuts] == [cut.kept for cut in planned_cuts(model, 0.5)]  # the dead channels go first
    for cut in cuts:  # every layer of a group shrank to the same channels
        assert {pruned.get_submodule(name).out_channels for name in cut.layers} == {len(cut.kept)}
        assert {pruned.get_submodule(name).num_features for name in cut.batchnorms} == {len(cut.kept)}
        assert all(pruned.get_submodule(name).groups == len(cut.kept) for name in cut.depthwise)
    batch = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert (dead(batch) - model(batch)).abs().max() > 0.01  # the dead channels mattered: the test can fail
        torch.testing.assert_close(pruned(batch), dead(batch), rtol=0, atol=1e-5)


def test_mobilenet_style_groups_chain_adds_and_take_each_depthwise_conv_with_its_expansion():
    traced = channels.traced_with_shapes(MobileNetish().eval(), ModelIO.single(), {"input": torch.randn(2, 1, 8, 8)})
    groups, skipped = channels.ChannelDependencies(traced).groups()
    assert skipped == {"classifier": OUTPUT_REASON}
    by_producers = {tuple(group.producers): group for group in groups}
    chained = by_producers[("blocks.0.project.0", "blocks.1.project.0", "blocks.2.project.0")]  # 24 channels, two adds
    assert chained.width == 24 and chained.depthwise == []
    assert chained.consumers == {"blocks.1.expand.0": 1, "blocks.2.expand.0": 1, "blocks.3.expand.0": 1}
    expansion = by_producers[("blocks.1.expand.0",)]
    assert expansion.depthwise == ["blocks.1.depthwise.0"] and expansion.batchnorms == ["blocks.1.expand.1", "blocks.1.depthwise.1"]
    assert expansion.consumers == {"blocks.1.project.0": 1}
    assert sum(len(group.layers) for group in groups) == 17  # all but the classifier


@pytest.mark.parametrize(
    ("factory", "layers", "macs_below"),
    [(resnet_small, 9, 0.27), (mobilenetish, 17, 0.35)],  # measured x0.253 and x0.286; before: x0.517 (3 layers), x0.959 (2 layers)
    ids=["resnet_small", "mobilenet-style"],
)
def test_half_the_channels_of_nearly_every_layer_go_and_the_stage_reports_the_reduction(context, tmp_path, factory, layers, macs_below):
    output = prune.run(context("pruned"), {"input": as_input(factory(), tmp_path)}, prune.Params(method="channels", amount=0.5))
    metrics = output.metrics
    assert metrics["pruned_layers"] == layers and len(metrics["skipped_layers"]) == 1
    assert metrics["macs_ratio"] < macs_below and metrics["params_ratio"] < macs_below + 0.05
    assert 0.4 < metrics["channels_removed_fraction"] <= 0.5  # the classifier's 10 outputs stay
    assert all(group["channels_after"] == group["channels_before"] // 2 for group in metrics["joint_groups"])
    assert {name for group in metrics["joint_groups"] for name in group["layers"]} < set(metrics["channels"])
    print(f"{factory.__name__}: {layers} layers pruned, MACs x{metrics['macs_ratio']:.3f}, params x{metrics['params_ratio']:.3f}")


def test_resnet18_prunes_all_20_convs_at_half_width():
    model = resnet18(num_classes=10).eval()
    example = {"input": torch.randn(1, 3, 64, 64)}
    macs_before = count_macs(model, ModelIO.single(), example)
    cuts, skipped = channel_cuts.cut_channels(model, ModelIO.single(), example, 0.5, 1)
    assert sum(len(cut.layers) for cut in cuts) == 20 and skipped == {"fc": OUTPUT_REASON}  # was 8 of 21
    assert len([cut for cut in cuts if len(cut.producers) > 1]) == 4  # one residual group per stage
    assert count_macs(model, ModelIO.single(), example) / macs_before < 0.27  # measured x0.266


def save_as_weights(model: nn.Module, folder: Path, factory: str):
    """``model`` saved as weights and its factory (what strip_optimizer makes), in a fresh folder."""
    folder.mkdir()
    return save_torch_weights(model, folder, factory, {})


@pytest.mark.parametrize(
    ("factory", "reference"), [(resnet_small, "pipeline.zoo:resnet_small"), (mobilenetish, "tests.test_joint_pruning:mobilenetish")]
)
def test_replaying_the_history_of_two_joint_prunings_rebuilds_the_architecture(context, tmp_path, factory, reference):
    source = save_as_weights(with_random_statistics(factory()), tmp_path / "slim", reference)
    once = prune.run(context("once"), {"slim": source}, prune.Params(method="channels", amount=0.5)).product
    twice = prune.run(context("twice"), {"once": once}, prune.Params(method="channels", amount=0.5, norm=2)).product
    history = twice.meta["pruning"]
    assert any(len(cut["producers"]) > 1 for cut in history) and any(cut["depthwise"] for cut in history) == (factory is mobilenetish)
    weights = torch.load(twice.path, weights_only=True)
    rebuilt = channel_cuts.replay_cuts(factory(), history)
    assert {name: tensor.shape for name, tensor in rebuilt.state_dict().items()} == {name: tensor.shape for name, tensor in weights.items()}
    reloaded = twice.load()
    with torch.no_grad():
        assert reloaded(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_a_history_saved_before_joint_pruning_still_replays():
    old_cut = {"producer": "layers.0.conv1", "width_before": 16, "kept": [0, 3, 5], "batchnorms": ["layers.0.bn1"],
               "consumers": {"layers.0.conv2": 1}}  # one producer, no depthwise list
    model = channel_cuts.replay_cuts(resnet_small(), [old_cut])
    assert model.layers[0].conv1.weight.shape == (3, 16, 3, 3) and model.layers[0].conv2.in_channels == 3
    assert model.layers[0].bn1.num_features == 3


class InputResidual(nn.Module):
    """Adds the model's input back (a 1-channel residual), concatenates two maps, and returns a feature map too."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(1, 8, 3, padding=1)
        self.back = nn.Conv2d(8, 1, 3, padding=1)
        self.left, self.right = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1)
        self.features = nn.Conv2d(8, 6, 1)
        self.classifier = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.back(torch.relu(self.inner(x)))
        features = self.features(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)), features


def test_the_input_s_channels_concatenations_and_model_outputs_keep_their_size():
    model = InputResidual().eval()
    cuts, skipped = channel_cuts.cut_channels(model, ModelIO.single(), {"input": torch.randn(2, 1, 8, 8)}, 0.5, 1)
    assert [cut.producers for cut in cuts] == [("inner",)]
    assert skipped["back"] == "its channels meet the model's input 'x', which keeps its size"
    concatenated = "its channels are concatenated with other tensors in 'cat' (cat): concatenations are not pruned"
    assert skipped["left"] == skipped["right"] == concatenated
    assert skipped["features"] == skipped["classifier"] == OUTPUT_REASON
    assert model.back.in_channels == 4 and model.back.out_channels == 1 and model.classifier.out_features == 10


def test_a_pruned_resnet_small_goes_through_the_fx_stages(context, tmp_path):
    halved = prune.Params(method="channels", amount=0.5)
    pruned = prune.run(context("pruned"), {"input": as_input(resnet_small(), tmp_path)}, halved).product
    fused = fuse_conv_bn.run(context("fused"), {"pruned": pruned}, fuse_conv_bn.Params(require_fusion=True))
    int8 = quantize.run(context("int8"), {"fused": fused.product}, quantize.Params(mode="static", calibration_batches=2))
    onnx = export_onnx.run(context("onnx"), {"pruned": pruned}, export_onnx.Params())
    assert fused.product.load().get_submodule("layers.1.conv2").out_channels == 16  # 32 halved, BatchNorm folded in
    assert int8.product.path.exists() and onnx.product.path.exists()
