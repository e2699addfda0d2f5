"""A fully-connected network (Petrini et al. 2021's ``FC``): flatten, hidden ReLU layers, readout.

Input ``(B, in_channels, H, W)`` with ``input_size = (H, W)``; output ``(B, num_classes)``.
Modules: ``features`` (``Flatten``, then ``Linear``/``ReLU`` pairs), ``classifier``.
"""

from __future__ import annotations

from torch import nn

from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_int, check_int_or_pair

__all__ = ["FCN"]


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
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 1)
        H, W = check_int_or_pair("input_size", input_size)
        width = check_int("width", width, 1)
        depth = check_int("depth", depth, 1)
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = in_channels * H * W
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
