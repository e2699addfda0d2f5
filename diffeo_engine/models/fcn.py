"""Fully-connected networks of Petrini et al. (2021): flatten, hidden ReLU layers, readout.

* :class:`FCN` (``"fcn"``), their CIFAR-10 ``FC``: PyTorch's default ``nn.Linear`` layers.
  Modules: ``features`` (``Flatten``, then ``Linear``/``ReLU`` pairs), ``classifier``.
* :class:`NTKFCN` (``"fcn_ntk"``), their MNIST ``DenseNetL4`` (``depth + 1`` layers,
  leonardopetrini/diffeo-sota ``models/simplenets.py``): weights and biases drawn
  ``N(0, 1)``, hidden layers ``relu(x W / sqrt(fan_in) + b)``, the readout ``x W / fan_in``
  (mean-field, no bias). Modules: ``features.{0..depth-1}`` (:class:`NTKDense` + ReLU),
  ``classifier``.

Input ``(B, in_channels, H, W)`` with ``input_size = (H, W)``; output ``(B, num_classes)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_int, check_int_or_pair

__all__ = ["FCN", "NTKFCN", "NTKDense"]


def _checked_sizes(in_channels, num_classes, input_size, width, depth) -> tuple[int, ...]:
    """The checked sizes of a fully-connected net: ``(inputs, num_classes, width, depth)``."""
    in_channels = check_int("in_channels", in_channels, 1)
    num_classes = check_int("num_classes", num_classes, 1)
    H, W = check_int_or_pair("input_size", input_size)
    width = check_int("width", width, 1)
    depth = check_int("depth", depth, 1)
    return in_channels * H * W, num_classes, width, depth


class FCN(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size=32,
        width: int = 500,
        depth: int = 2,
    ) -> None:
        super().__init__()
        n_in, num_classes, width, depth = _checked_sizes(
            in_channels, num_classes, input_size, width, depth
        )
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(n_in, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("fcn")
def fcn(
    in_channels: int = 3, num_classes: int = 10, input_size=32, width: int = 500, depth: int = 2
) -> FCN:
    """Fully-connected net: ``depth`` hidden layers of ``width`` ReLU units."""
    return FCN(in_channels, num_classes, input_size, width, depth)


class NTKDense(nn.Module):
    """``x W / sqrt(fan_in) + b`` (``readout=False``) or ``x W / fan_in`` (``readout=True``),
    ``W ~ N(0, 1)`` of shape ``(fan_in, out)``, ``b ~ N(0, 1)``: the authors' ``DenseBlock``
    before its ReLU."""

    def __init__(self, fan_in: int, out: int, *, readout: bool = False) -> None:
        super().__init__()
        self.readout = readout
        self.weight = nn.Parameter(torch.randn(fan_in, out))
        self.bias = None if readout else nn.Parameter(torch.randn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fan_in = self.weight.shape[0]
        if self.readout:
            return x @ self.weight / fan_in
        return x @ self.weight / math.sqrt(fan_in) + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, readout={self.readout}"


class NTKFCN(nn.Module):
    """Petrini et al.'s MNIST fully-connected net (``DenseNetL4`` at ``depth=3``, ``width=64``)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size=28,
        width: int = 64,
        depth: int = 3,
    ) -> None:
        super().__init__()
        n_in, num_classes, width, depth = _checked_sizes(
            in_channels, num_classes, input_size, width, depth
        )
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [NTKDense(n_in, width), nn.ReLU()]
            n_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = NTKDense(n_in, num_classes, readout=True)

    def forward(self, x):
        return self.classifier(self.features(self.flatten(x)))


@register_model("fcn_ntk")
def fcn_ntk(
    in_channels: int = 1, num_classes: int = 10, input_size=28, width: int = 64, depth: int = 3
) -> NTKFCN:
    """Petrini et al.'s MNIST FCN, ``DenseNetL{depth + 1}``: NTK-scaled hidden layers of
    ``width`` ReLU units and a mean-field readout."""
    return NTKFCN(in_channels, num_classes, input_size, width, depth)
