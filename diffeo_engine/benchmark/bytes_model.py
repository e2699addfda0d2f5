"""The minimum-bytes model of design.md section 6: the one place bytes per pair are counted.

A pair reads the images once and writes ``tau x`` and ``x + eta`` once; ``tau x`` alone
reads once and writes once. Throughput in GB/s and fractions of the copy bandwidth (timed
runs and the static report's model estimates alike) are computed against these counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["BYTES_MODEL", "deform_bytes", "pair_bytes"]

BYTES_MODEL = (
    "pair: read x once, write tau x and x + eta once; deform: read x once, write tau x once"
)


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise TypeError(f"dtype: expected a torch.dtype or its name, got {value!r}")


def _numel(shape: Sequence[int]) -> int:
    if not shape or any(isinstance(s, bool) or int(s) != s or s < 0 for s in shape):
        raise ValueError(f"shape: expected a non-empty sequence of sizes >= 0, got {shape!r}")
    return math.prod(int(s) for s in shape)


def _out_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype | str | None) -> torch.dtype:
    if out_dtype is None:
        return torch.float32 if in_dtype == torch.uint8 else in_dtype
    return _dtype(out_dtype)


def pair_bytes(
    shape: Sequence[int],
    in_dtype: torch.dtype | str,
    out_dtype: torch.dtype | str | None = None,
) -> int:
    """Minimum bytes to make perturbed pairs: read the images once, write ``tau x`` and
    ``x + eta`` once (design.md section 6).

    ``shape`` is one image ``(C, H, W)`` or a batch ``(B, C, H, W)``; ``out_dtype`` defaults
    as in :func:`diffeo_engine.perturb` (float32 for uint8 input, else the input's).
    """
    in_dtype = _dtype(in_dtype)
    n = _numel(shape)
    return n * in_dtype.itemsize + 2 * n * _out_dtype(in_dtype, out_dtype).itemsize


def deform_bytes(
    shape: Sequence[int],
    in_dtype: torch.dtype | str,
    out_dtype: torch.dtype | str | None = None,
) -> int:
    """Minimum bytes for ``tau x`` alone: read the images once, write ``tau x`` once."""
    in_dtype = _dtype(in_dtype)
    n = _numel(shape)
    return n * in_dtype.itemsize + n * _out_dtype(in_dtype, out_dtype).itemsize
