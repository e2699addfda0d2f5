"""Displacement field of one tile, synthesised separably from shared sine tables.

``u = S_y C^T S_x^T`` restricted to the tile's rows and columns: two small ``tl.dot``
products in float32 (``input_precision="ieee"``: no TF32) for 16 modes or more; for
``cut <= 8`` an unrolled sum over the ``CQ x CQ`` modes (``CQ`` = ``cut`` to the next
power of two) with the coefficients read as scalars, which costs a few FMAs per pixel
where the padded products cost shuffles and selects through 16 modes. Either way the
coefficients are drawn on the ``(CQ, CQ)`` block only, not padded to 16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from diffeo_engine.physics import mode_variances, sine_table

MIN_MODES = 16  # tl.dot wants every dimension >= 16


def padded_modes(cut: int) -> int:
    """The mode count the products compute with: a power of two >= 16 and >= ``cut``."""
    return max(MIN_MODES, triton.next_power_of_2(cut))


def drawn_modes(cut: int) -> int:
    """The modes drawn per axis: the power of two >= ``max(cut, 2)``."""
    return max(2, triton.next_power_of_2(cut))


@functools.lru_cache(maxsize=64)
def tables(H: int, W: int, cut: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(S_x, S_y, std)``: sine tables ``(W, CP)``, ``(H, CP)`` and the ``(CQ, CQ)`` mode
    standard deviations per unit ``T``, zero-padded from ``cut`` modes.

    Shared by every image and call with the same ``(H, W, cut, device)``; the kernels only
    read them.
    """
    cp = padded_modes(cut)
    sx = torch.zeros(W, cp, dtype=torch.float32, device=device)
    sy = torch.zeros(H, cp, dtype=torch.float32, device=device)
    cq = drawn_modes(cut)
    std = torch.zeros(cq, cq, dtype=torch.float32, device=device)
    sx[:, :cut] = sine_table(W, cut, device=device)
    sy[:, :cut] = sine_table(H, cut, device=device)
    std[:cut, :cut] = mode_variances(cut, device).sqrt().to(torch.float32)
    return sx, sy, std


@triton.jit
def load_coefficients(coef_ptr, b, CQ: tl.constexpr, CP: tl.constexpr):
    """Image ``b``'s transposed coefficients of ``u`` and ``v`` from the ``(B, 2, CQ, CQ)``
    buffer of ``_coefficients_kernel``, zero-padded to ``(CP, CP)``."""
    j = tl.arange(0, CP)[:, None]
    i = tl.arange(0, CP)[None, :]
    at = coef_ptr + b.to(tl.int64) * (2 * CQ * CQ) + j * CQ + i
    inside = (j < CQ) & (i < CQ)
    return tl.load(at, mask=inside, other=0.0), tl.load(at + CQ * CQ, mask=inside, other=0.0)


@triton.jit
def field_tile_modes(coef_ptr, b, sx_ptr, sy_ptr, ys, xs, H, W, CUT: tl.constexpr,
                     CQ: tl.constexpr, CP: tl.constexpr):  # fmt: skip
    """``(dx, dy)`` on the tile ``ys x xs`` summed over the ``CUT x CUT`` modes, unrolled:
    ``u = sum_j S_y[y, j] (sum_i C[j, i] S_x[x, i])``, the inner sums on a row ``(1, BW)``
    and the coefficients read as scalars from the ``(CQ, CQ)`` block."""
    base = coef_ptr + b.to(tl.int64) * (2 * CQ * CQ)
    u = 0.0
    v = 0.0
    for j in tl.static_range(CUT):
        bu = 0.0
        bv = 0.0
        for i in tl.static_range(CUT):
            sxi = tl.load(sx_ptr + xs * CP + i, mask=xs < W, other=0.0)  # (1, BW)
            bu = tl.fma(sxi, tl.load(base + j * CQ + i), bu)
            bv = tl.fma(sxi, tl.load(base + CQ * CQ + j * CQ + i), bv)
        syj = tl.load(sy_ptr + ys * CP + j, mask=ys < H, other=0.0)  # (BH, 1)
        u = tl.fma(syj, bu, u)
        v = tl.fma(syj, bv, v)
    return u * W.to(tl.float32), v * H.to(tl.float32)


@triton.jit
def field_tile(ct_u, ct_v, sx_ptr, sy_ptr, ys, xs, H, W, CP: tl.constexpr):
    """Displacements ``(dx, dy)`` in pixels on the tile ``ys x xs`` (``(BH, 1, 1)``,
    ``(1, BW // 4, 4)``), as ``(BH, BW // 4, 4)`` tiles.

    ``ct_u``, ``ct_v``: transposed coefficients ``(CP, CP)`` from ``coefficients_t``.
    """
    BH: tl.constexpr = ys.shape[0]
    BW: tl.constexpr = xs.shape[1] * xs.shape[2]
    dx, dy = _field_tile_2d(ct_u, ct_v, sx_ptr, sy_ptr, tl.reshape(ys, (BH, 1)),
                            tl.reshape(xs, (1, BW)), H, W, CP)  # fmt: skip
    return tl.reshape(dx, (BH, BW // 4, 4)), tl.reshape(dy, (BH, BW // 4, 4))


@triton.jit
def _field_tile_2d(ct_u, ct_v, sx_ptr, sy_ptr, ys, xs, H, W, CP: tl.constexpr):
    k = tl.arange(0, CP)
    sy = tl.load(sy_ptr + ys * CP + k[None, :], mask=ys < H, other=0.0)  # (BH, CP): over j
    sxt = tl.load(sx_ptr + xs * CP + k[:, None], mask=xs < W, other=0.0)  # (CP, BW): over i
    u = tl.dot(tl.dot(sy, ct_u, input_precision="ieee"), sxt, input_precision="ieee")
    v = tl.dot(tl.dot(sy, ct_v, input_precision="ieee"), sxt, input_precision="ieee")
    return u * W.to(tl.float32), v * H.to(tl.float32)
