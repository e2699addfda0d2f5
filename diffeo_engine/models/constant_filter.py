"""The analytical model of Tomasini, Petrini, Cagnetta, Wyart (2022/23): a constant-filter CNN.

A 1D CNN with one channel, ``depth`` layers of filter size ``f`` and stride ``s``, every
weight equal to ``s / f`` (so each layer conserves the total mass of a positive signal), no
bias, a ReLU after every layer. It is never trained.

Where the noise is rectified: the paper's noise is "rectified by a ReLU on the input". Here
that ReLU is part of the network, the module ``input_relu`` applied to the input before the
first convolution (``rectify_input=True``, the default). The perturbation stays plain
matched Gaussian noise (``||eta|| = ||tau x - x||`` exactly, as everywhere in the library),
and the network sees ``relu(x + eta)``; on positive inputs (one-hot signals, their shifts)
the ReLU is the identity, so only the noise is rectified. Every representation after it is
non-negative and the later ReLUs act as the identity: the net is linear on what it sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_choice, check_int

__all__ = ["ConstantFilterCNN", "ConstantFilterLayer", "circular_pad_widths"]


def circular_pad_widths(filter_size: int) -> tuple[int, int]:
    """Left/right circular padding of the authors' code: ``(f-1)//2`` each side for odd
    ``f``; ``f/2 - 1`` left and ``f/2`` right for even ``f``, so that a stride-``s`` layer
    maps ``n`` positions to ``ceil(n / s)``."""
    if filter_size % 2:
        return (filter_size - 1) // 2, (filter_size - 1) // 2
    return filter_size // 2 - 1, filter_size // 2


class ConstantFilterLayer(nn.Module):
    """One layer: (circular) padding, convolution with the constant filter, ReLU."""

    def __init__(self, filter_size: int, stride: int, padding: str) -> None:
        super().__init__()
        self.filter_size, self.stride, self.padding = filter_size, stride, padding
        weight = torch.full((1, 1, filter_size), stride / filter_size)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "circular":
            x = F.pad(x, circular_pad_widths(self.filter_size), mode="circular")
        elif x.shape[-1] < self.filter_size:
            raise ValueError(
                f"input: a layer with filter size {self.filter_size} and no padding needs "
                f">= {self.filter_size} positions, got {x.shape[-1]}"
            )
        return F.relu(F.conv1d(x, self.weight.to(x.dtype), stride=self.stride))

    def extra_repr(self) -> str:
        return f"filter_size={self.filter_size}, stride={self.stride}, padding={self.padding!r}"


class ConstantFilterCNN(nn.Module):
    """Input ``(B, 1, L)`` -> the last layer's representation ``(B, 1, L_depth)``.

    With circular padding (default) ``L_k = ceil(L_{k-1} / stride)``; with
    ``padding="none"``, ``L_k = (L_{k-1} - filter_size) // stride + 1``. Layer ``k`` (1-based)
    is the module ``features.{k-1}``; ``input_relu`` rectifies the input (module docstring).
    """

    def __init__(
        self,
        depth: int = 6,
        filter_size: int = 2,
        stride: int = 2,
        *,
        padding: str = "circular",
        rectify_input: bool = True,
    ) -> None:
        super().__init__()
        depth = check_int("depth", depth, 1)
        filter_size = check_int("filter_size", filter_size, 1)
        stride = check_int("stride", stride, 1, filter_size)
        padding = check_choice("padding", padding, ("circular", "none"))
        if not isinstance(rectify_input, bool):
            raise TypeError(f"rectify_input: expected a bool, got {rectify_input!r}")
        self.depth, self.filter_size, self.stride = depth, filter_size, stride
        self.input_relu = nn.ReLU() if rectify_input else nn.Identity()
        self.features = nn.Sequential(
            *(ConstantFilterLayer(filter_size, stride, padding) for _ in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] != 1:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x: expected a 1D signal batch of shape (B, 1, L), got {shape}")
        return self.features(self.input_relu(x))


@register_model("constant_filter_cnn")
def constant_filter_cnn(
    depth: int = 6,
    filter_size: int = 2,
    stride: int = 2,
    padding: str = "circular",
    rectify_input: bool = True,
) -> ConstantFilterCNN:
    """The analytical model of Tomasini et al.: every weight ``stride / filter_size``."""
    return ConstantFilterCNN(
        depth, filter_size, stride, padding=padding, rectify_input=rectify_input
    )
