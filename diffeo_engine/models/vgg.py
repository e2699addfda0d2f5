"""VGG-11/13/16/19 for small images (the CIFAR variant of Petrini et al. 2021), with and
without BatchNorm.

3x3 convolutions (padding 1) in five stages separated by 2x2 max pools; the pools round up
(``ceil_mode``) so that 28x28 inputs reach 1x1 like 32x32 ones. Then global average pooling
and one linear classifier. ``width`` is the first stage's channel count (64 in the paper;
every stage scales with it). Input ``(B, in_channels, H, W)``; output ``(B, num_classes)``.
Modules: ``features.{i}`` (conv[, bn], relu, ..., pool), ``pool``, ``flatten``,
``classifier``.
"""

from __future__ import annotations

from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_int

__all__ = ["VGG", "VGG_CONFIGS"]

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    def __init__(
        self,
        config: str = "vgg11",
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"config: expected one of {sorted(VGG_CONFIGS)}, got {config!r}")
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        width = check_int("width", width, 1)
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            c_out = max(1, int(item) * width // 64)
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _factory(config: str, batch_norm: bool):
    def build(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> VGG:
        return VGG(
            config,
            in_channels=in_channels,
            num_classes=num_classes,
            batch_norm=batch_norm,
            width=width,
        )

    name = config + ("_bn" if batch_norm else "")
    build.__name__ = name
    build.__doc__ = f"{config.upper()}{' with BatchNorm' if batch_norm else ''} (CIFAR-style)."
    return build


for _config in VGG_CONFIGS:
    for _bn in (False, True):
        _build = _factory(_config, _bn)
        register_model(_build.__name__)(_build)
