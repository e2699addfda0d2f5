"""The scale-detection CNNs of Tomasini, Petrini, Cagnetta, Wyart (2022/23), in 1D and 2D.

``depth`` convolutional layers of filter size ``f`` and ``width`` channels, circular
padding, an activation (``relu`` or ``tanh``) after every layer, global pooling over
positions, and a readout. ``strided="all"`` (default) gives every layer stride ``s``, so
that ``depth = log2 L`` layers of ``f = s = 2`` end on one position (the receptive field
of the last layer is the whole signal). ``strided="first"`` strides only the first layer,
which is what the released code builds: ``ConvNetGAPMF_1d`` is called with
``idx_strides = list(range(nbl))`` and compares the layer index ``1, 2, ...`` with
``idx_strides[0] = 0``, which never matches (UmbertoTomasini/scale_detection_1d,
``convolutional_nets.py``, ``ScaleDetection_SGD.py``).

Parametrisation follows the authors' released code: weights are drawn ``N(0, 1)`` and
divided by ``sqrt(fan_in)`` in the forward pass, biases ``N(0, 1)``, and each activation is
multiplied by ``gain``: the authors' ``sqrt(f)`` for ReLU, i.e. ``sqrt(2)`` at ``f = 2``
(the default here), and LeCun's scaled-tanh constant 1.7159 for tanh (their released code
has no tanh net; with gain 1 or ``sqrt(2)`` a 6-layer tanh net of width 64 did not learn
task 2 at ``L = 64`` in 15 epochs of SGD, with 1.7159 it reached zero training error).
The readout is ``linear`` (``nn.Linear``) or ``mean_field``
(``alpha * (b + y . beta / width)``, ``beta ~ N(0, 1)``, the authors' choice, to be
trained with a learning rate proportional to ``width``).

Layer ``k`` (1-based) is the module ``features.{k-1}``, whose output is the activation;
then ``pool`` and ``readout``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffeo_engine.models.constant_filter import circular_pad_widths
from diffeo_engine.models.registry import register_model
from diffeo_engine.physics import check_choice, check_float, check_int

__all__ = ["MeanFieldReadout", "ScaleDetectionCNN", "ScaleDetectionLayer", "weight_norm_penalty"]

_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
TANH_GAIN = 1.7159  # LeCun's scaled tanh


class ScaleDetectionLayer(nn.Module):
    """Circular padding, NTK-scaled convolution (+ bias), ``gain * activation``."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        filter_size: int,
        stride: int,
        activation: str,
        gain: float,
        padding: str,
        bias: bool,
    ) -> None:
        super().__init__()
        self.dim, self.filter_size, self.stride = dim, filter_size, stride
        self.activation, self.gain, self.padding = activation, gain, padding
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *(filter_size,) * dim))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias else None
        self.fan_in = in_channels * filter_size**dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "circular":
            x = F.pad(x, circular_pad_widths(self.filter_size) * self.dim, mode="circular")
        conv = F.conv1d if self.dim == 1 else F.conv2d
        y = conv(x, self.weight / math.sqrt(self.fan_in), self.bias, stride=self.stride)
        return self.gain * _ACTIVATIONS[self.activation](y)

    def extra_repr(self) -> str:
        c_out, c_in = self.weight.shape[:2]
        return (
            f"{c_in}, {c_out}, filter_size={self.filter_size}, stride={self.stride}, "
            f"activation={self.activation!r}, gain={self.gain:.4g}, padding={self.padding!r}, "
            f"bias={self.bias is not None}"
        )


class MeanFieldReadout(nn.Module):
    """``alpha * (b + y @ beta / width)`` with ``beta ~ N(0, 1)``: the authors' readout."""

    def __init__(self, width: int, out_dim: int, alpha: float, bias: bool) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = nn.Parameter(torch.randn(width, out_dim))
        self.bias = nn.Parameter(torch.randn(out_dim)) if bias else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        out = y @ self.beta / self.beta.shape[0]
        if self.bias is not None:
            out = out + self.bias
        return self.alpha * out


class ScaleDetectionCNN(nn.Module):
    """Input ``(B, in_channels, L)`` (``dim=1``) or ``(B, in_channels, H, W)`` (``dim=2``).

    Output ``(B,)`` when ``out_dim == 1`` (a score for hinge-loss ``+-1`` labels), else
    ``(B, out_dim)`` logits.
    """

    def __init__(
        self,
        dim: int = 1,
        *,
        in_channels: int = 1,
        width: int = 64,
        depth: int = 5,
        filter_size: int = 2,
        stride: int = 2,
        activation: str = "relu",
        gain: float | None = None,
        padding: str = "circular",
        bias: bool = True,
        pooling: str = "mean",
        readout: str = "linear",
        out_dim: int = 1,
        alpha: float = 1.0,
        strided: str = "all",
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1, 2)
        in_channels = check_int("in_channels", in_channels, 1)
        self.width = check_int("width", width, 1)
        self.depth = check_int("depth", depth, 1)
        filter_size = check_int("filter_size", filter_size, 1)
        stride = check_int("stride", stride, 1)
        self.activation = check_choice("activation", activation, tuple(_ACTIVATIONS))
        if gain is None:
            gain = math.sqrt(2.0) if activation == "relu" else TANH_GAIN
        gain = check_float("gain", gain, 0.0, strict=True)
        padding = check_choice("padding", padding, ("circular", "none"))
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        self.pooling = check_choice("pooling", pooling, ("mean", "max"))
        readout = check_choice("readout", readout, ("linear", "mean_field"))
        self.out_dim = check_int("out_dim", out_dim, 1)
        alpha = check_float("alpha", alpha, 0.0, strict=True)
        self.strided = check_choice("strided", strided, ("all", "first"))

        channels = [in_channels] + [self.width] * self.depth
        self.features = nn.Sequential(
            *(
                ScaleDetectionLayer(
                    self.dim,
                    c_in,
                    c_out,
                    filter_size,
                    stride if (i == 0 or self.strided == "all") else 1,
                    activation,
                    gain,
                    padding,
                    bias,
                )
                for i, (c_in, c_out) in enumerate(itertools.pairwise(channels))
            )
        )
        self.pool = (
            (nn.AdaptiveAvgPool1d(1) if self.dim == 1 else nn.AdaptiveAvgPool2d(1))
            if self.pooling == "mean"
            else (nn.AdaptiveMaxPool1d(1) if self.dim == 1 else nn.AdaptiveMaxPool2d(1))
        )
        self.readout = (
            nn.Linear(self.width, self.out_dim, bias=bias)
            if readout == "linear"
            else MeanFieldReadout(self.width, self.out_dim, alpha, bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != self.dim + 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            want = "(B, C, L)" if self.dim == 1 else "(B, C, H, W)"
            raise ValueError(f"x: expected a batch of shape {want}, got {shape}")
        y = self.pool(self.features(x)).flatten(1)
        out = self.readout(y)
        return out[:, 0] if self.out_dim == 1 else out


def weight_norm_penalty(model: ScaleDetectionCNN, p: float = 2.0) -> torch.Tensor:
    """``sum_k sum |W_k|^p / (width^(p/2) depth)`` over the convolution weights ``W_k`` (as
    stored, ``N(0, 1)`` at initialisation; biases and readout left out): the ridge term of
    Tomasini et al.'s released training (``w_norm`` in ``ScaleDetection_SGD.py``, added to
    the loss times ``ridge = 0.01`` with ``p = 2``)."""
    if not isinstance(model, ScaleDetectionCNN):
        raise TypeError(f"model: expected a ScaleDetectionCNN, got {type(model).__name__}")
    p = check_float("p", p, 0.0, strict=True)
    total = sum(layer.weight.abs().pow(p).sum() for layer in model.features)
    return total / (model.width ** (p / 2) * model.depth)


def _factory(dim: int):
    def build(
        in_channels: int = 1,
        width: int = 64,
        depth: int = 5,
        filter_size: int = 2,
        stride: int = 2,
        activation: str = "relu",
        gain: float | None = None,
        padding: str = "circular",
        bias: bool = True,
        pooling: str = "mean",
        readout: str = "linear",
        out_dim: int = 1,
        alpha: float = 1.0,
        strided: str = "all",
    ) -> ScaleDetectionCNN:
        return ScaleDetectionCNN(
            dim,
            in_channels=in_channels,
            width=width,
            depth=depth,
            filter_size=filter_size,
            stride=stride,
            activation=activation,
            gain=gain,
            padding=padding,
            bias=bias,
            pooling=pooling,
            readout=readout,
            out_dim=out_dim,
            alpha=alpha,
            strided=strided,
        )

    build.__name__ = f"scale_detection_cnn{dim}d"
    build.__doc__ = f"The {dim}D scale-detection CNN of Tomasini et al. (see ScaleDetectionCNN)."
    return build


scale_detection_cnn1d = register_model("scale_detection_cnn1d")(_factory(1))
scale_detection_cnn2d = register_model("scale_detection_cnn2d")(_factory(2))
