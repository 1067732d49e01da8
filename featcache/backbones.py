"""Backbone registry. Every network has ``forward_features(x)`` (pooled penultimate features) and a
final linear layer named ``fc``, so all share torchvision's ResNet key naming."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import FeatcacheError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    feature_dim: int
    in_channels: int | None  # None: takes the data set's channels
    description: str
    build: Callable[[int, int], nn.Module]


def _resnet(block_name: str, layers: list[int], groups: int = 1, width: int = 64):
    """A builder of torchvision's ResNet with the pooled features exposed (torchvision is imported
    when a model is built, not with this module: a cache hit builds none)."""
    def build(num_classes, in_channels):
        from torchvision.models import resnet

        class ResNetFeatures(resnet.ResNet):
            def forward_features(self, x):
                x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
                x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
                return torch.flatten(self.avgpool(x), 1)

            def forward(self, x):
                return self.fc(self.forward_features(x))

        return ResNetFeatures(getattr(resnet, block_name), layers, num_classes=num_classes, groups=groups,
                              width_per_group=width)
    return build


class TinyCNN(nn.Module):
    """Six 3x3 conv layers (32, 32, 64, 64, 128, 128; BN + ReLU, stride 2 before 64 and 128),
    global average pooling, 128-d features. For 8x8 and 28x28 grayscale images."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        widths, layers, previous = [32, 32, 64, 64, 128, 128], [], in_channels
        for i, width in enumerate(widths):
            stride = 2 if i in (2, 4) else 1
            layers += [nn.Conv2d(previous, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, num_classes)

    def forward_features(self, x):
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


class _CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-32 for 32x32 images (He et al. 2016: 3 stages x 5 basic blocks, 16/32/64 channels,
    1x1 projection shortcuts), 64-d features, as used by the CIFAR-LT literature."""

    def __init__(self, num_classes: int, in_channels: int = 3, blocks: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[_CifarBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                          for i in range(blocks)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward_features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in [
    ArchSpec("resnet10", 512, 3, "ResNet-10 (BasicBlock [1,1,1,1]), as in the paper", _resnet("BasicBlock", [1, 1, 1, 1])),
    ArchSpec("resnet18", 512, 3, "torchvision ResNet-18", _resnet("BasicBlock", [2, 2, 2, 2])),
    ArchSpec("resnet34", 512, 3, "torchvision ResNet-34", _resnet("BasicBlock", [3, 4, 6, 3])),
    ArchSpec("resnet50", 2048, 3, "torchvision ResNet-50", _resnet("Bottleneck", [3, 4, 6, 3])),
    ArchSpec("resnet101", 2048, 3, "torchvision ResNet-101", _resnet("Bottleneck", [3, 4, 23, 3])),
    ArchSpec("resnet152", 2048, 3, "torchvision ResNet-152", _resnet("Bottleneck", [3, 8, 36, 3])),
    ArchSpec("resnext50_32x4d", 2048, 3, "torchvision ResNeXt-50 32x4d",
             _resnet("Bottleneck", [3, 4, 6, 3], groups=32, width=4)),
    ArchSpec("resnext101_32x8d", 2048, 3, "torchvision ResNeXt-101 32x8d",
             _resnet("Bottleneck", [3, 4, 23, 3], groups=32, width=8)),
    ArchSpec("resnet32", 64, None, "CIFAR ResNet-32 (3x5 basic blocks, 64-d)", CifarResNet),
    ArchSpec("tinycnn", 128, None, "6-conv CNN for small grayscale images (128-d)", TinyCNN),
]}


def get_arch(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise FeatcacheError(f"unknown --arch {name!r}; choose one of {', '.join(ARCHS)}, timm/NAME or open_clip/MODEL")
    return ARCHS[name]


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    spec = get_arch(name)
    return spec.build(num_classes, spec.in_channels or in_channels)


def model_channels(name: str, data_channels: int) -> int:
    """The channels the network takes for data with ``data_channels`` channels."""
    return get_arch(name).in_channels or data_channels
