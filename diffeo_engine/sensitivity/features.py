"""What the meter measures of an activation: its features and the metric between them.

:func:`reduce_features` maps ``(B, C, *positions)`` to ``(B, F)``; with ``metric="cosine"``
each row is then scaled to unit length (Ruderman et al. 2018's cosine distance is half the
squared Euclidean distance of unit vectors).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "METRICS",
    "REDUCTIONS",
    "measured_features",
    "model_float_dtype",
    "model_tensor",
    "reduce_features",
]

REDUCTIONS = ("full", "channel_mean", "spatial_mean")
METRICS = ("euclidean", "cosine")


def reduce_features(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """``(B, C, *positions)`` to the measured ``(B, F)``: as is (``full``), averaged over
    channels (``channel_mean``, dim 1), or averaged over positions (``spatial_mean``,
    dims 2 and up). ``(B, F)`` activations have no positions; ``(B,)`` ones are ``(B, 1)``.
    """
    if values.dim() == 1:
        values = values[:, None]
    if reduce == "channel_mean":
        values = values.mean(dim=1, keepdim=values.dim() == 2)
    elif reduce == "spatial_mean" and values.dim() > 2:
        values = values.mean(dim=tuple(range(2, values.dim())))
    return values.reshape(values.shape[0], -1)


def measured_features(values: torch.Tensor, reduce: str, metric: str) -> torch.Tensor:
    """:func:`reduce_features`, then unit rows for ``metric="cosine"`` (in float64, so the
    norm does not overflow; an all-zero row stays zero)."""
    out = reduce_features(values, reduce)
    if metric == "cosine":
        out = torch.nn.functional.normalize(out.to(torch.float64), dim=1)
    return out


def model_tensor(model: nn.Module) -> torch.Tensor | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor
    return None


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None
