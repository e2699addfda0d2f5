"""AlexNet for small images, as in Petrini et al. 2021 (the CIFAR variant).

Five 3x3 convolutions (the first with stride 2) and three max pools, then a three-layer
classifier with dropout. Input ``(B, in_channels, H, W)`` with ``input_size = (H, W)``;
output ``(B, num_classes)``. Modules: ``features.{i}``, ``flatten``, ``classifier.{i}``.
"""

from __future__ import annotations

from torch import nn

from diffeo_engine.models.lenet import flat_features
from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_float, check_int, check_int_or_pair

__all__ = ["AlexNet"]


class AlexNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size=32,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        size = check_int_or_pair("input_size", input_size)
        hidden = check_int("hidden", hidden, 1)
        dropout = check_float("dropout", dropout, 0.0)
        if dropout >= 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(flat_features(self.features, in_channels, size), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@register_model("alexnet")
def alexnet(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size=32,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> AlexNet:
    """AlexNet for 28x28 / 32x32 inputs (max pools round up, so both sizes work)."""
    return AlexNet(in_channels, num_classes, input_size, hidden, dropout)
