"""The pooling-vs-strided CNN pair of Ruderman, Rabinowitz, Morcos, Zoran (2018), small.

Three 3x3 convolutions (padding 1) of ``width``, ``2 width``, ``4 width`` channels, each
followed by a ReLU and, with ``downsample="pool"``, a 2x2 max pool; with
``downsample="stride"`` each convolution has stride 2 instead and there is no pooling, so
both nets have the same weights and output sizes. Then global average pooling and a linear
classifier. Modules: ``features.{i}``, ``pool``, ``classifier``; the ReLUs are
``features.1``, ``features.4``, ``features.7`` (pool) or ``features.1/3/5`` (stride).
"""

from __future__ import annotations

from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_choice, check_int

__all__ = ["PoolingCNN"]


class PoolingCNN(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        downsample: str = "pool",
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        width = check_int("width", width, 1)
        self.downsample = check_choice("downsample", downsample, ("pool", "stride"))
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width):
            stride = 2 if self.downsample == "stride" else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
            if self.downsample == "pool":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("pooling_cnn")
def pooling_cnn(
    in_channels: int = 1, num_classes: int = 10, width: int = 16, downsample: str = "pool"
) -> PoolingCNN:
    """Ruderman et al.'s comparison: max pooling (``"pool"``) or strided convolutions."""
    return PoolingCNN(in_channels, num_classes, width, downsample)
