"""ResNet-18/34/50 for small images (CIFAR-style stem, as in Petrini et al. 2021).

A 3x3 stride-1 stem convolution (no max pool), four stages of basic (18, 34) or bottleneck
(50) blocks with strides 1, 2, 2, 2, global average pooling, one linear classifier.
``width`` is the stem/first stage's channel count (64 in the paper). Input
``(B, in_channels, H, W)``; output ``(B, num_classes)``. Modules: ``conv1``, ``bn1``,
``relu``, ``layer{1..4}.{j}`` (a block; inside: ``conv1``, ``bn1``, ``relu1``, ...,
``shortcut``), ``avgpool``, ``flatten``, ``fc``. Every ReLU is its own module, so a hook
on one fires once per forward.
"""

from __future__ import annotations

from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_int

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


_DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)),
           "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}  # fmt: skip


class ResNet(nn.Module):
    def __init__(
        self,
        config: str = "resnet18",
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
    ) -> None:
        super().__init__()
        if config not in _DEPTHS:
            raise ValueError(f"config: expected one of {sorted(_DEPTHS)}, got {config!r}")
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        width = check_int("width", width, 1)
        block, counts = _DEPTHS[config]
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        c_in = width
        for stage, (count, stride) in enumerate(zip(counts, (1, 2, 2, 2)), start=1):
            planes = width * 2 ** (stage - 1)
            blocks = []
            for j in range(count):
                blocks.append(block(c_in, planes, stride if j == 0 else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _factory(config: str):
    def build(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
        return ResNet(config, in_channels=in_channels, num_classes=num_classes, width=width)

    build.__name__ = config
    build.__doc__ = f"{config} with a CIFAR-style stem."
    return build


for _config in _DEPTHS:
    register_model(_config)(_factory(_config))
