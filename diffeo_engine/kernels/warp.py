"""Sampling and storing one tile: the reference's clamp, bilinear / nearest and rounding.

Offsets and weights are computed once per tile and reused for every channel. All
arithmetic is float32 whatever the image dtype, in the reference's formula order (the
bilinear sum with explicit fused multiply-adds; the kernels otherwise compile with
contraction off), so a zero field reproduces the input bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def source_points(dx, dy, ys, xs, H, W):
    """The sampled point ``(x - dx, y - dy)`` clamped to ``[0, W-1] x [0, H-1]``."""
    px = tl.minimum(tl.maximum(xs.to(tl.float32) - dx, 0.0), (W - 1).to(tl.float32))
    py = tl.minimum(tl.maximum(ys.to(tl.float32) - dy, 0.0), (H - 1).to(tl.float32))
    return px, py


@triton.jit
def nearest_offsets(px, py, sh, sw):
    """Offset of the nearest pixel, rounding half up as ``floor(p + 0.5)``."""
    return tl.floor(py + 0.5).to(tl.int32) * sh + tl.floor(px + 0.5).to(tl.int32) * sw


@triton.jit
def bilinear_offsets(px, py, H, W, sh, sw):
    """Offsets of the four neighbours (``x1 = min(x0 + 1, W - 1)``) and the weights."""
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = tl.minimum(x0 + 1, W - 1)
    y1 = tl.minimum(y0 + 1, H - 1)
    row0 = y0 * sh
    row1 = y1 * sh
    return row0 + x0 * sw, row0 + x1 * sw, row1 + x0 * sw, row1 + x1 * sw, px - x0f, py - y0f


@triton.jit
def gather(src, offsets, mask, FLAT: tl.constexpr):
    """``src[offsets]`` as float32. ``FLAT``: gathered as a flat (row-major) vector, since
    on Triton 3.6 a tile-shaped gather gets a column-major layout (a warp reads 32 rows of
    one column); not with the 32- and 64-mode products, beside which it spills."""
    if FLAT:
        n: tl.constexpr = offsets.numel
        flat = tl.load(src + tl.reshape(offsets, (n,)), mask=tl.reshape(mask, (n,)), other=0)
        return tl.reshape(flat, offsets.shape).to(tl.float32)
    else:
        return tl.load(src + offsets, mask=mask, other=0).to(tl.float32)


@triton.jit
def bilinear(src, o00, o01, o10, o11, wx, wy, mask, FLAT: tl.constexpr):
    """Bilinear value in float32: ``reference._warp_values``' weights (each rounded as
    there) and order of terms, the sum accumulated with fused multiply-adds. Each step
    rounds once instead of twice, so the value may differ from the reference's by a few
    float32 ulps (a uint8 output by one level next to a rounding boundary): the tolerance
    tests/test_kernels.py allows. A zero field still gives the input exactly (weights 1, 0,
    0, 0: ``fma(0, a, v) = v``)."""
    a00 = gather(src, o00, mask, FLAT)
    a01 = gather(src, o01, mask, FLAT)
    a10 = gather(src, o10, mask, FLAT)
    a11 = gather(src, o11, mask, FLAT)
    value = tl.fma((1 - wy) * wx, a01, (1 - wy) * (1 - wx) * a00)
    value = tl.fma(wy * (1 - wx), a10, value)
    return tl.fma(wy * wx, a11, value)


@triton.jit
def store_values(ptr, values, mask):
    """Store float32 values in the buffer's dtype; uint8 rounds half up and saturates."""
    if ptr.dtype.element_ty == tl.uint8:
        values = tl.minimum(tl.maximum(tl.floor(values + 0.5), 0.0), 255.0)
    tl.store(ptr, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def poison(values, acc):
    """``acc + 0 * values``: NaN once a value is NaN or inf (``0 * inf`` is NaN), finite
    otherwise; one FMA per value, the check the kernels fold into their pass."""
    return tl.fma(values, 0.0, acc)


@triton.jit
def poison_stored(ptr, values, acc):
    """:func:`poison` of the values as the buffer holds them: an overflow of float16 or
    bfloat16 shows only after the conversion; uint8 saturates (nothing to check)."""
    if ptr.dtype.element_ty == tl.uint8:
        return acc
    elif ptr.dtype.element_ty == tl.float32:
        return poison(values, acc)
    else:
        return poison(values.to(ptr.dtype.element_ty).to(tl.float32), acc)
