"""LeNet-5 as in Petrini et al. 2021: two 5x5 convolutions (no padding) with max pooling,
then three fully-connected layers.

Input ``(B, in_channels, H, W)`` with ``input_size = (H, W)`` (28 or 32 typically);
output ``(B, num_classes)``. Modules: ``features.{0..5}`` (conv, relu, pool, conv, relu,
pool), ``flatten``, ``classifier.{0..4}`` (linear, relu, linear, relu, linear).
"""

from __future__ import annotations

import torch
from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_int, check_int_or_pair

__all__ = ["LeNet", "flat_features"]


def flat_features(features: nn.Module, in_channels: int, size: tuple[int, int]) -> int:
    """Number of features ``features`` outputs for one ``in_channels x H x W`` input."""
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, in_channels, *size))
        except RuntimeError as err:
            raise ValueError(f"input_size: {size} is too small for this network ({err})") from None
    if out.numel() == 0:
        raise ValueError(f"input_size: {size} is too small for this network")
    return out.numel()


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size=32) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        size = check_int_or_pair("input_size", input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, in_channels, size), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@register_model("lenet")
def lenet(in_channels: int = 3, num_classes: int = 10, input_size=32) -> LeNet:
    """LeNet-5 (Petrini et al. 2021's variant)."""
    return LeNet(in_channels, num_classes, input_size)
