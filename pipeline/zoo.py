"""Reference architectures for demos, tests and benchmarks (no torchvision here: these are our own)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias), BatchNorm, ReLU: the block conv-BN fusion targets."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits: two conv-BN-ReLU blocks, pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width),
            conv_bn_relu(width, width * 2),
            nn.MaxPool2d(2),
            conv_bn_relu(width * 2, width * 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def digits_cnn(num_classes: int = 10, width: int = 32) -> DigitsCNN:
    """The demo baseline for scikit-learn's digits (input [N, 1, 8, 8])."""
    return DigitsCNN(num_classes=num_classes, width=width)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-style network of basic blocks; ``blocks=(2, 2, 2, 2)`` and ``width=64`` is ResNet-18's layout."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        if small_input:  # 8x8 .. 32x32 inputs: a 3x3 stem without downsampling
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers = []
        channels = width
        for stage_index, count in enumerate(blocks):
            out_channels = width * 2**stage_index
            for block_index in range(count):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18 layout for 3x224x224 inputs."""
    return ResNet((2, 2, 2, 2), 64, num_classes, in_channels)


def resnet_small(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ResNet:
    """A small ResNet for 8x8 .. 32x32 inputs (digits, upscaled digits)."""
    return ResNet((1, 1, 1), width, num_classes, in_channels, small_input=True)


class MLP(nn.Module):
    """Flatten, then Linear-BatchNorm-ReLU layers and a classifier: exercises Linear+BN fusion and dynamic INT8."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.BatchNorm1d(size), nn.ReLU()]
            previous = size
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10) -> MLP:
    """An MLP classifier (digits flattened to 64 features by default)."""
    return MLP(in_features, tuple(hidden), num_classes)


class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> LSTM -> the last real token's hidden state -> classes (padding id 0 is skipped)."""

    def __init__(self, vocab_size: int = 64, embedding: int = 32, hidden: int = 64, num_classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding, padding_idx=0)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        last = (tokens != 0).sum(dim=1).clamp(min=1) - 1
        return self.classifier(states[torch.arange(tokens.shape[0]), last])


def lstm_classifier(vocab_size: int = 64, embedding: int = 32, hidden: int = 64, num_classes: int = 3) -> LSTMClassifier:
    """An LSTM text classifier over int64 token ids [batch, seq] (the dynamic-quantization tutorial's shape)."""
    return LSTMClassifier(vocab_size, embedding, hidden, num_classes)


def regression_mlp(in_features: int = 10, hidden: int = 5) -> nn.Sequential:
    """The tutorial regression net: Linear(10, 5) -> ReLU -> Linear(5, 1), one value per example."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class ImageMetaNet(nn.Module):
    """Two inputs, two outputs: ``forward(image, meta) -> (logits, features)``; the CNN's features joined with metadata."""

    def __init__(self, meta_features: int = 4, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, width), nn.MaxPool2d(2), conv_bn_relu(width, width * 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.meta_net = nn.Sequential(nn.Linear(meta_features, width), nn.ReLU())  # not 'meta': torch.fx names placeholders after the forward's arguments
        self.classifier = nn.Linear(width * 3, num_classes)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joined = torch.cat([torch.flatten(self.pool(self.features(image)), 1), self.meta_net(meta)], dim=1)
        return self.classifier(joined), joined


def image_meta_net(meta_features: int = 4, num_classes: int = 10, width: int = 16) -> ImageMetaNet:
    """A digits CNN that also takes a metadata vector and returns (logits, features)."""
    return ImageMetaNet(meta_features, num_classes, width)


def add_weight_outlier(model: DigitsCNN, scale: float = 1000.0, channel: int = 0) -> DigitsCNN:
    """A trained DigitsCNN whose FP32 outputs are unchanged but whose last conv per-channel INT8 weights are ruined, in place.

    The second block's BatchNorm scales ``channel`` down by ``scale`` (ReLU and max pooling commute with a
    positive scale) and the third conv's weights reading that channel grow by ``scale`` to compensate: in
    every output channel of ``features.3.0`` one input channel's weights dominate the per-channel weight
    scale, so INT8 rounds the other weights to zero. Only that layer needs FP32 to recover (an activation
    outlier would need two: a tensor between layers is quantized when its producer or its consumer is).
    """
    norm, conv = model.features[1][1], model.features[3][0]
    with torch.no_grad():
        norm.weight[channel] /= scale
        norm.bias[channel] /= scale
        conv.weight[:, channel] *= scale
    return model
