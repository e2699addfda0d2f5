"""Tiny networks for the sensitivity tests, importable as ``test_sensitivity_models:NAME``
(the CLI's ``module.path:factory`` form). No tests live here."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-pool-linear, with a ReLU called twice (a shared module)."""

    def __init__(self, channels: int = 3, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(channels: int = 3, width: int = 4, dtype: str = "float64") -> nn.Module:
    """A seeded :class:`TinyCNN` in eval mode (float64 by default for 1e-9 comparisons)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = TinyCNN(channels, width)
    return model.to(getattr(torch, dtype)).eval()


def tiny_1d(channels: int = 2) -> nn.Module:
    """A float64 1D network: conv1d-tanh-conv1d."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        model = nn.Sequential(
            nn.Conv1d(channels, 3, 5, padding=2), nn.Tanh(), nn.Conv1d(3, 2, 3, padding=1)
        )
    return model.double().eval()
