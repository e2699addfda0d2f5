"""Displacement field of one tile, synthesised separably from shared sine tables.

``u = S_y C^T S_x^T`` restricted to the tile's rows and columns: two small ``tl.dot``
products in float32 (``input_precision="ieee"``: no TF32), no per-pixel double sum.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from diffeo_engine.physics import mode_variances, sine_table

MIN_MODES = 16  # tl.dot wants every dimension >= 16


def padded_modes(cut: int) -> int:
    """The mode count the kernels compute with: a power of two >= 16 and >= ``cut``."""
    return max(MIN_MODES, triton.next_power_of_2(cut))


@functools.lru_cache(maxsize=64)
def tables(H: int, W: int, cut: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(S_x, S_y, std)``: sine tables ``(W, CP)``, ``(H, CP)`` and the ``(CP, CP)`` mode
    standard deviations per unit ``T``, zero-padded from ``cut`` to ``CP`` modes.

    Shared by every image and call with the same ``(H, W, cut, device)``; the kernels only
    read them.
    """
    cp = padded_modes(cut)
    sx = torch.zeros(W, cp, dtype=torch.float32, device=device)
    sy = torch.zeros(H, cp, dtype=torch.float32, device=device)
    std = torch.zeros(cp, cp, dtype=torch.float32, device=device)
    sx[:, :cut] = sine_table(W, cut, device=device)
    sy[:, :cut] = sine_table(H, cut, device=device)
    std[:cut, :cut] = mode_variances(cut, device).sqrt().to(torch.float32)
    return sx, sy, std


@triton.jit
def field_tile(ct_u, ct_v, sx_ptr, sy_ptr, ys, xs, H, W, CP: tl.constexpr):
    """Displacements ``(dx, dy)`` in pixels on the tile ``ys x xs`` (``(BH, 1)``, ``(1, BW)``).

    ``ct_u``, ``ct_v``: transposed coefficients ``(CP, CP)`` from ``coefficients_t``.
    """
    k = tl.arange(0, CP)
    sy = tl.load(sy_ptr + ys * CP + k[None, :], mask=ys < H, other=0.0)  # (BH, CP): over j
    sxt = tl.load(sx_ptr + xs * CP + k[:, None], mask=xs < W, other=0.0)  # (CP, BW): over i
    u = tl.dot(tl.dot(sy, ct_u, input_precision="ieee"), sxt, input_precision="ieee")
    v = tl.dot(tl.dot(sy, ct_v, input_precision="ieee"), sxt, input_precision="ieee")
    return u * W.to(tl.float32), v * H.to(tl.float32)
