"""The fused CPU kernel (numba): coefficients, field, warp and noise of each image in one pass.

The reference's computation (:mod:`diffeo_engine.reference`, design.md section 2) written as
one loop nest per image, so that nothing batch-sized is ever materialised (no field, noise
or Philox words of the batch): an image is decoded once into a float32 scratch (counting
its NaN and inf pixels on the way), its coefficients drawn, its field synthesised
separably in float64 and rounded once, every channel warped in float32 exactly as the
reference does, its noise drawn channel by channel and its outputs stored in their dtype
and layout (counting values that overflowed). Images are independent: a parallel loop over
chunks of images, or a serial loop for small batches (no thread start for one image).

Randomness is :mod:`diffeo_engine.rng`'s Philox4x32-10, bit for bit (uint32 words held in
uint64, 32x32-bit products zero-extended, so that LLVM vectorises them); Box-Muller turns
them into float32 normals with float32 polynomials for ``log``, ``sin`` and ``cos``
(branch-free, so the loops vectorise; within ~3 float32 ulps of the reference's). Floats
differ from the reference's only by those ulps and by the float64 summation order of the
field and the norms (tests/test_cpu_kernel.py states the tolerances). An image's outputs do
not depend on its batch, the thread count or the chunking: bit for bit.

Compiled on first use and cached on disk by numba (``cache=True``: beside this file, or in
the user's cache folder when the package is read-only), one specialisation per input and
output dtype; on a terminal :func:`perturb` says so when a call has to compile.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from diffeo_engine.kernels.outputs import outputs
from diffeo_engine.physics import mode_variances, sine_table
from diffeo_engine.rng import (
    _TWO_PI,
    _U1_FLOOR,
    _UNIFORM_SCALE,
    COEFF_STREAM_DX,
    NOISE_STREAM_BASE,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
)

__all__ = ["CHUNK", "SERIAL_BELOW", "perturb"]

CHUNK = 8  # images per task of the parallel loop (scratch is allocated once per task)
SERIAL_BELOW = 4  # smaller batches run on the calling thread: starting threads costs ~10 us

# input / output kinds (array dtypes: uint8, uint16 for both halves, float32, float64)
UINT8, FLOAT16, BFLOAT16, FLOAT32, FLOAT64 = 0, 1, 2, 3, 4
KINDS = {
    torch.uint8: UINT8,
    torch.float16: FLOAT16,
    torch.bfloat16: BFLOAT16,
    torch.float32: FLOAT32,
    torch.float64: FLOAT64,
}
NOISE_NONE, NOISE_SIGMA, NOISE_MATCHED = 0, 1, 2

_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")

_M32 = np.uint64(0xFFFFFFFF)
_RA = np.uint64(PHILOX_ROUND_A)
_RB = np.uint64(PHILOX_ROUND_B)
_KA = np.uint64(PHILOX_KEY_A)
_KB = np.uint64(PHILOX_KEY_B)
_S32 = np.uint64(32)
_HALF_RANGE = np.uint64(1 << 31)
# Triton's (and rng's) uniform scale and Box-Muller constants, as float32
_SCALE32 = np.float32(_UNIFORM_SCALE)
_TWO_PI32 = np.float32(_TWO_PI)
_U1_FLOOR32 = np.float32(_U1_FLOOR)
_MINUS_TWO = np.float32(-2.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_FLOAT32_MAX = np.float32(3.4028234663852886e38)
# Box-Muller in float32, as the reference rounds it (16 lanes a vector), to ~3 ulps.
# log: u = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
# |s| < 0.172, the series to s^9; ln 2 split so that e ln 2 is exact to float32
_MANTISSA = np.int32(0x007FFFFF)
_EXPONENT_ONE = np.int32(0x3F800000)
_SQRT2 = np.float32(math.sqrt(2.0))
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187045e-06)
_ATANH = tuple(np.float32(1.0 / k) for k in (3, 5, 7, 9))
# sin / cos: Cody-Waite reduction by pi/2 (three parts, k * part exact for k <= 4) to
# [-pi/4, pi/4], then the minimax polynomials of Cephes' sinf / cosf
_TWO_OVER_PI = np.float32(2.0 / math.pi)
_PIO2 = (np.float32(1.5703125), np.float32(4.837512969970703125e-4),
         np.float32(7.54978995489188216e-8))  # fmt: skip
_SIN = (np.float32(-1.6666654611e-1), np.float32(8.3321608736e-3),
        np.float32(-1.9515295891e-4))  # fmt: skip
_COS = (np.float32(4.166664568298827e-2), np.float32(-1.388731625493765e-3),
        np.float32(2.443315711809948e-5))  # fmt: skip
# exact powers of two for decoding halves: _POW2[k + 140] = 2**k
_POW2 = np.array([2.0**k for k in range(-140, 128)], dtype=np.float64)


# ------------------------------------------------------------------ Philox and Box-Muller


@njit(**_OPTIONS)
def _philox(c0, c1, n, id_lo, id_hi, k0, k1, w0, w1, w2, w3):
    """Philox4x32-10 of counters ``(c0[e], c1[e], id_lo, id_hi)`` under key ``(k0, k1)``,
    ``e < n``, into the uint32 words ``w0..w3`` (rng.philox4x32's integers, bit for bit)."""
    for e in range(n):
        a0 = np.uint64(c0[e])
        a1 = np.uint64(c1[e])
        a2 = id_lo
        a3 = id_hi
        key0 = k0
        key1 = k1
        for _ in range(10):
            pb = _RB * a2
            pa = _RA * a0
            a0 = (pb >> _S32) ^ a1 ^ key0
            a1 = pb & _M32
            a2 = (pa >> _S32) ^ a3 ^ key1
            a3 = pa & _M32
            key0 = (key0 + _KA) & _M32
            key1 = (key1 + _KB) & _M32
        w0[e] = a0
        w1[e] = a1
        w2[e] = a2
        w3[e] = a3


@njit(**_OPTIONS)
def _uniform(word):
    """Triton's ``uint_to_uniform_float`` of a uint32 word: float32 in ``[0, 1)``."""
    w = np.uint64(word)
    magnitude = w if w < _HALF_RANGE else _M32 - w  # |signed|, with ~x for negative x
    return np.float32(np.int64(magnitude)) * _SCALE32


_FAST_POLYNOMIALS = dict(_OPTIONS, fastmath={"contract"})  # FMAs: same on every call


@njit(**_FAST_POLYNOMIALS)
def _sincos(theta):
    """``(sin, cos)`` of a float32 angle in ``[0, 2 pi)``, branch-free, to ~2 float32 ulps."""
    k = np.floor(theta * _TWO_OVER_PI + _HALF)
    r = ((theta - k * _PIO2[0]) - k * _PIO2[1]) - k * _PIO2[2]
    r2 = r * r
    s = r + r * r2 * (_SIN[0] + r2 * (_SIN[1] + r2 * _SIN[2]))
    c = _ONE - _HALF * r2 + r2 * r2 * (_COS[0] + r2 * (_COS[1] + r2 * _COS[2]))
    q = np.int32(k) & 3
    sin = c if q & 1 else s
    cos = s if q & 1 else c
    sin = -sin if q >= 2 else sin
    cos = -cos if (q + 1) & 2 else cos
    return sin, cos


@njit(**_FAST_POLYNOMIALS)
def _normals(wa, wb, n, out, u1, mantissa, exponent):
    """Box-Muller (Triton's ``pair_uniform_to_normal``) of the word pairs ``(wa, wb)``:
    float32 ``out[2p] = radius cos theta`` and ``out[2p + 1] = radius sin theta``, the
    pair's two normals side by side. ``u1`` (float32), ``mantissa`` and ``exponent``
    (int32) are scratch: ``log`` splits each float into its exponent and mantissa through
    an integer view, so that every loop here vectorises."""
    for p in range(n):
        u1[p] = max(_uniform(wa[p]), _U1_FLOOR32)
    bits = u1.view(np.int32)
    for p in range(n):
        exponent[p] = (bits[p] >> 23) - 127
        mantissa[p] = (bits[p] & _MANTISSA) | _EXPONENT_ONE
    m_values = mantissa.view(np.float32)
    for p in range(n):
        m = m_values[p]
        big = m > _SQRT2
        m = m * _HALF if big else m
        e = np.float32(exponent[p] + 1 if big else exponent[p])
        s = (m - _ONE) / (m + _ONE)
        s2 = s * s
        series = s2 * (_ATANH[0] + s2 * (_ATANH[1] + s2 * (_ATANH[2] + s2 * _ATANH[3])))
        log_u1 = e * _LN2_HI + (e * _LN2_LO + (s + s) + (s + s) * series)
        radius = np.sqrt(log_u1 * _MINUS_TWO)
        sin, cos = _sincos(_uniform(wb[p]) * _TWO_PI32)
        out[2 * p] = radius * cos
        out[2 * p + 1] = radius * sin


# ------------------------------------------------------------------- loads and stores


@njit(**_OPTIONS)
def _half_value(bits, kind):
    """The float32 value of float16 (``kind`` FLOAT16) or bfloat16 bits, exactly."""
    h = np.int64(bits)
    if kind == FLOAT16:
        exp, mantissa, implicit, bias = (h >> 10) & 0x1F, h & 0x3FF, 1024, 25
        top = 0x1F
    else:
        exp, mantissa, implicit, bias = (h >> 7) & 0xFF, h & 0x7F, 128, 134
        top = 0xFF
    if exp == top:
        value = np.inf if mantissa == 0 else np.nan
    elif exp == 0:
        value = mantissa * _POW2[1 - bias + 140]
    else:
        value = (implicit + mantissa) * _POW2[exp - bias + 140]
    return np.float32(-value if h & 0x8000 else value)


@njit(**_OPTIONS)
def _half_bits(bits, kind):
    """float32 bits (uint32 in int64) to float16 or bfloat16 bits, rounding to nearest even
    as torch does (NaN: torch's quiet NaN)."""
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    if kind == BFLOAT16:
        if a > 0x7F800000:
            return 0x7FC0
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # 65520 and above round to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # a normal half: rebias the exponent, round 13 mantissa bits
        a -= 0x38000000
        return sign | ((a + 0xFFF + ((a >> 13) & 1)) >> 13)
    # a subnormal half (or zero): round a * 2^24 to an integer, half to even
    exp = a >> 23
    if exp < 102:  # below 2^-25: rounds to 0
        return sign
    mantissa = (a & 0x7FFFFF) | 0x800000
    shift = 126 - exp  # value * 2^24 = mantissa >> shift
    whole = mantissa >> shift
    rest = mantissa - (whole << shift)
    halfway = 1 << (shift - 1)
    if rest > halfway or (rest == halfway and whole & 1):
        whole += 1
    return sign | whole


@njit(**_OPTIONS)
def _load(x, base, sc, sh, sw, C, H, W, kind, xf):
    """Image at ``base`` (element strides ``sc, sh, sw``) into the float32 NCHW scratch
    ``xf``; returns how many of its values are NaN or inf."""
    bad = 0
    direct = sw == 1 and kind not in (FLOAT16, BFLOAT16)  # contiguous rows: vectorised
    plane = direct and sh == W  # and a channel is one run: one loop
    for c in range(C):
        for y in range(1 if plane else H):
            row = base + c * sc + y * sh
            out = (c * H + y) * W
            n = H * W if plane else W
            if direct:
                source = x[row : row + n]
                target = xf[out : out + n]
                for i in range(n):
                    v = np.float32(source[i])
                    target[i] = v
                    bad += not (abs(v) <= _FLOAT32_MAX)
                continue
            for i in range(W):
                if kind in (FLOAT16, BFLOAT16):
                    v = _half_value(x[row + i * sw], kind)
                else:
                    v = np.float32(x[row + i * sw])
                xf[out + i] = v
                bad += not (abs(v) <= _FLOAT32_MAX)
    return bad


@njit(**_OPTIONS)
def _store(values, out, base, sc, sh, sw, C, H, W, kind):
    """The float32 NCHW scratch ``values`` into the output at ``base`` in its dtype (uint8:
    half up and saturated, as ``reference.to_dtype``); returns how many stored values are
    not finite (float outputs only)."""
    bad = 0
    bits = values.view(np.uint32)
    direct = sw == 1 and kind in (FLOAT32, UINT8)  # contiguous rows: vectorised
    plane = direct and sh == W  # and a channel is one run: one loop
    for c in range(C):
        for y in range(1 if plane else H):
            row = base + c * sc + y * sh
            src = (c * H + y) * W
            n = H * W if plane else W
            if direct and kind == FLOAT32:
                source = values[src : src + n]
                target = out[row : row + n]
                for i in range(n):
                    v = source[i]
                    target[i] = v
                    bad += not (abs(v) <= _FLOAT32_MAX)
                continue
            if direct:  # uint8: half up and saturated
                source = values[src : src + n]
                target = out[row : row + n]
                for i in range(n):
                    r = min(max(np.floor(source[i] + _HALF), _ZERO), np.float32(255.0))
                    target[i] = np.uint8(r) if r == r else np.uint8(0)
                continue
            for i in range(W):
                v = values[src + i]
                if kind == UINT8:
                    r = np.floor(v + _HALF)
                    r = min(max(r, _ZERO), np.float32(255.0))
                    out[row + i * sw] = np.uint8(r) if r == r else np.uint8(0)
                elif kind in (FLOAT16, BFLOAT16):
                    h = _half_bits(np.int64(bits[src + i]), kind)
                    out[row + i * sw] = h
                    top = 0x7C00 if kind == FLOAT16 else 0x7F80
                    bad += (h & top) == top
                else:
                    out[row + i * sw] = v
                    bad += not (abs(v) <= _FLOAT32_MAX)
    return bad


# ------------------------------------------------------------------ the steps of an image


@njit(**_OPTIONS)
def _coefficients(na, std, sqrt_T, cut, coef):
    """``coef[s, i, j]`` (float64) from the normals ``na`` of every mode of the ``(cm, cm)``
    square, both streams (the cosine of each mode's pair, ``na[2 k]``): ``normal * std *
    sqrt(T)`` in float32 as the reference, 0 outside the image's own disc
    ``i^2 + j^2 < (cut + 1/2)^2`` (1-based)."""
    cm = std.shape[0]
    inside = cut * (cut + 1)
    for s in range(2):
        for i in range(cm):
            for j in range(cm):
                normal = na[2 * ((s * cm + i) * cm + j)]  # the cosine of the mode's pair
                kept = i < cut and j < cut and (i + 1) ** 2 + (j + 1) ** 2 <= inside
                value = (normal * std[i, j]) * sqrt_T
                coef[s, i, j] = np.float64(value) if kept else 0.0


@njit(**_OPTIONS)
def _field_rows(coef, sx, cut, W, rows):
    """The first half of the separable field: ``rows[s, j, x] = sum_i C[s, i, j] sx[x, i]``."""
    for s in range(2):
        for j in range(cut):
            for i in range(W):
                rows[s, j, i] = 0.0
            for m in range(cut):
                c = coef[s, m, j]
                for i in range(W):
                    rows[s, j, i] += c * sx[m, i]


@njit(**_OPTIONS)
def _warp(rows, sy, cut, H, W, C, nearest, u, v, px, py, source, out):
    """``tau x`` of every channel, row by row: each pixel's source point ``(x - dx, y - dy)``
    from the field's second half (``dx = W sum_j S_y[y, j] rows[0, j, x]``, rounded to
    float32 once) clamped to the image (a vectorised pass per row), then the nearest pixel
    or the bilinear sum with the reference's weights and order (``((1 - wy)(1 - wx)) x00
    + ...``, each product rounded: no contraction here), the point read once for all the
    pixel's channels. Offsets are unsigned: no negative-index wrap-around in the loop."""
    HW = np.uint64(H * W)
    x_limit = np.float32(W - 1)
    y_limit = np.float32(H - 1)
    width = np.uint64(W)
    for y in range(H):
        u[:] = 0.0
        v[:] = 0.0
        for j in range(cut):
            a = sy[j, y]
            row_u = rows[0, j]
            row_v = rows[1, j]
            for i in range(W):
                u[i] += a * row_u[i]
                v[i] += a * row_v[i]
        fy = np.float32(y)
        for i in range(W):
            px[i] = min(max(np.float32(i) - np.float32(u[i] * W), _ZERO), x_limit)
            py[i] = min(max(fy - np.float32(v[i] * H), _ZERO), y_limit)
        here = np.uint64(y) * width
        for i in range(W):
            at = here + np.uint64(i)
            if nearest:
                o = np.uint64(np.floor(py[i] + _HALF)) * width + np.uint64(np.floor(px[i] + _HALF))
                for c in range(C):
                    base = np.uint64(c) * HW
                    out[base + at] = source[base + o]
                continue
            x0 = np.floor(px[i])
            y0 = np.floor(py[i])
            wx = px[i] - x0
            wy = py[i] - y0
            w00 = (_ONE - wy) * (_ONE - wx)
            w01 = (_ONE - wy) * wx
            w10 = wy * (_ONE - wx)
            w11 = wy * wx
            o = np.uint64(y0) * width + np.uint64(x0)
            ox = np.uint64(1) if x0 < x_limit else np.uint64(0)
            oy = width if y0 < y_limit else np.uint64(0)
            for c in range(C):
                base = np.uint64(c) * HW
                k = base + o
                out[base + at] = (
                    w00 * source[k] + w01 * source[k + ox] + w10 * source[k + oy]
                    + w11 * source[k + oy + ox]
                )  # fmt: skip


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _sum_squares(a, b):
    """``sum (a - b)^2`` in float64 (``a - b`` in float32, as the reference), vectorised:
    the order of the sum is fixed by this code, not by the batch or the threads."""
    total = 0.0
    for p in range(a.shape[0]):
        d = np.float64(a[p] - b[p])
        total += d * d
    return total


@njit(**_OPTIONS)
def _noise_channel(c0, c1, H, W, id_lo, id_hi, k0, k1, z, w, pairs, normals, bm):
    """The noise ``z`` of one channel: four normals per Philox call, lane ``x & 3`` at
    counter ``x >> 2`` (as :func:`rng._noise`). The words are laid out as pairs in pixel
    order (pair ``2e + h`` is ``(w[2h][e], w[2h + 1][e])``), so that Box-Muller writes the
    normals of a row in their pixel order: no scatter."""
    nq = (W + 3) // 4
    n_row = H * nq
    _philox(c0, c1, n_row, id_lo, id_hi, k0, k1, w[0], w[1], w[2], w[3])
    wa = pairs[0]
    wb = pairs[1]
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    for e in range(n_row):
        wa[2 * e] = w0[e]
        wa[2 * e + 1] = w2[e]
        wb[2 * e] = w1[e]
        wb[2 * e + 1] = w3[e]
    if W % 4 == 0:  # rows without padding: the normals are the channel
        _normals(wa, wb, 2 * n_row, z, bm[0], bm[1], bm[2])
        return
    _normals(wa, wb, 2 * n_row, normals, bm[0], bm[1], bm[2])
    for y in range(H):
        z[y * W : (y + 1) * W] = normals[4 * nq * y : 4 * nq * y + W]


# --------------------------------------------------------------------------- the images


@njit(**_OPTIONS)
def _images(lo, hi, x, x_strides, tau, noisy, out_strides, T, ids, cuts, std, sx, sy,
            seed_lo, seed_hi, sigma, noise, nearest, in_kind, out_kind, C, H, W,
            coef_c0, coef_c1, noise_c0, noise_c1, nonfinite):  # fmt: skip
    """Images ``lo..hi-1``, one after the other, with scratch allocated once."""
    k0 = np.uint64(seed_lo)  # the Philox key: the seed's low and high words
    k1 = np.uint64(seed_hi)
    HW = H * W
    cm = std.shape[0]
    n_modes = 2 * cm * cm
    n_row = H * ((W + 3) // 4)  # Philox calls per channel of noise
    n_words = max(n_modes, n_row)
    xf = np.empty(C * HW, np.float32)
    tauf = np.empty(C * HW, np.float32)
    zf = np.empty(C * HW if noise != NOISE_NONE else 1, np.float32)
    zeros = np.zeros(C * HW if noise == NOISE_MATCHED else 1, np.float32)
    w = np.empty((4, n_words), np.uint32)
    pairs = np.empty((2, 2 * n_words), np.uint32)
    normals = np.empty(4 * n_words, np.float32)
    u1 = np.empty(2 * n_words, np.float32)
    mantissa = np.empty(2 * n_words, np.int32)
    exponent = np.empty(2 * n_words, np.int32)
    bm = (u1, mantissa, exponent)
    coef = np.empty((2, cm, cm), np.float64)
    rows = np.empty((2, cm, W), np.float64)
    u = np.empty(W, np.float64)
    v = np.empty(W, np.float64)
    px = np.empty(W, np.float32)
    py = np.empty(W, np.float32)
    sxb, sxc, sxh, sxw = x_strides
    sob, soc, soh, sow = out_strides
    for b in range(lo, hi):
        bad = _load(x, b * sxb, sxc, sxh, sxw, C, H, W, in_kind, xf)
        image_id = np.uint64(ids[b])
        id_lo = image_id & _M32
        id_hi = (image_id >> _S32) & _M32
        cut = cuts[b]
        _philox(coef_c0, coef_c1, n_modes, id_lo, id_hi, k0, k1, w[0], w[1], w[2], w[3])
        _normals(w[0], w[1], n_modes, normals, u1, mantissa, exponent)
        _coefficients(normals, std, np.sqrt(np.float32(T[b])), cut, coef)
        _field_rows(coef, sx, cut, W, rows)
        _warp(rows, sy, cut, H, W, C, nearest, u, v, px, py, xf, tauf)
        if noise != NOISE_NONE:
            for c in range(C):
                _noise_channel(noise_c0[c * n_row :], noise_c1[c * n_row :], H, W, id_lo,
                               id_hi, k0, k1, zf[c * HW : (c + 1) * HW], w, pairs, normals,
                               bm)  # fmt: skip
        bad += _store(tauf, tau, b * sob, soc, soh, sow, C, H, W, out_kind)
        if noise != NOISE_NONE:
            if noise == NOISE_MATCHED:
                change2 = _sum_squares(tauf, xf)
                z2 = _sum_squares(zf, zeros)
                scale = np.float32(np.sqrt(change2) / np.sqrt(z2))
            else:
                scale = np.float32(sigma)
            for p in range(C * HW):
                tauf[p] = xf[p] + zf[p] * scale
            bad += _store(tauf, noisy, b * sob, soc, soh, sow, C, H, W, out_kind)
        nonfinite[b] = bad


@njit(parallel=True, **_OPTIONS)
def _images_parallel(x, x_strides, tau, noisy, out_strides, T, ids, cuts, std, sx, sy,
                     k0, k1, sigma, noise, nearest, in_kind, out_kind, C, H, W,
                     coef_c0, coef_c1, noise_c0, noise_c1, nonfinite):  # fmt: skip
    """:func:`_images` over chunks of ``CHUNK`` images, the chunks in parallel."""
    B = ids.shape[0]
    n_chunks = (B + CHUNK - 1) // CHUNK
    for k in prange(n_chunks):
        _images(k * CHUNK, min(B, (k + 1) * CHUNK), x, x_strides, tau, noisy, out_strides,
                T, ids, cuts, std, sx, sy, k0, k1, sigma, noise, nearest, in_kind, out_kind,
                C, H, W, coef_c0, coef_c1, noise_c0, noise_c1, nonfinite)  # fmt: skip


# ----------------------------------------------------------------------------- launcher


@functools.lru_cache(maxsize=64)
def _tables(H: int, W: int, cut: int, C: int):
    """Shared by every image and call with these sizes: the float32 mode std, the float64
    sine tables, and the Philox counters of the coefficients and of the noise."""
    std = mode_variances(cut).sqrt().to(torch.float32).numpy()
    sx = sine_table(W, cut, dtype=torch.float64).T.contiguous().numpy()  # (cut, W)
    sy = sine_table(H, cut, dtype=torch.float64).T.contiguous().numpy()  # (cut, H)
    i = np.arange(cut, dtype=np.uint64)
    modes = ((i[:, None] << np.uint64(16)) | i[None, :]).reshape(-1)  # [i - 1, j - 1]
    coef_c0 = np.concatenate([modes, modes])
    coef_c1 = np.repeat(np.arange(2, dtype=np.uint64) + np.uint64(COEFF_STREAM_DX), cut * cut)
    nq = (W + 3) // 4
    noise_c0 = np.tile(np.arange(nq, dtype=np.uint64), C * H)
    noise_c1 = np.repeat(np.arange(C * H, dtype=np.uint64) + np.uint64(NOISE_STREAM_BASE), nq)
    return std, sx, sy, coef_c0, coef_c1, noise_c0, noise_c1


def _flat(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of the memory a tensor spans, from its first element (halves as
    uint16 bits: numba has no float16 arrays on the CPU)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    if t.is_contiguous():
        flat = t.numpy().reshape(-1)
    else:
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        flat = torch.as_strided(t, (span,), (1,), t.storage_offset()).numpy()
    return flat.view(np.uint16) if flat.dtype == np.int16 else flat


_parallel_pid: list[int] = []  # the process that started numba's threads (fork safety)


def _threads(B: int) -> int:
    """Threads for a batch: torch's setting (1 in DataLoader workers), never in a process
    forked after numba's OpenMP threads started (GNU OpenMP is not fork-safe)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if B < SERIAL_BELOW or threads <= 1 or (B + CHUNK - 1) // CHUNK < 2:
        return 1
    if _parallel_pid and _parallel_pid[0] != os.getpid():
        return 1
    return threads


_seen: set = set()


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


NOTE_AFTER_S = 1.0  # a first call slower than this is compiling, not loading from the cache


@contextlib.contextmanager
def _compiling_note(key):
    """On the first call of a specialisation in a process, say on a terminal's stderr that
    the kernel is being compiled if it takes longer than a cache load would (never into a
    pipe or a log, whose lines belong to the caller)."""
    if key in _seen or not _stderr_is_terminal():
        _seen.add(key)
        yield
        return
    _seen.add(key)
    note = threading.Timer(
        NOTE_AFTER_S,
        lambda: print(
            f"diffeo-engine: compiling the CPU kernel for {key[0]} -> {key[1]} images "
            "(once per machine, then cached; about 15 s)",
            file=sys.stderr,
            flush=True,
        ),
    )
    note.daemon = True
    note.start()
    try:
        yield
    finally:
        note.cancel()


def perturb(
    images: torch.Tensor,
    T: torch.Tensor | float,
    ids: torch.Tensor | None,
    *,
    cut: int,
    seed: int,
    noise: str | float | None,
    interp: str,
    out_dtype: torch.dtype,
    cuts: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """``(tau x, x + eta or None, non-finite count per image)`` on CPU tensors.

    Arguments are already validated (``T`` a float or float32 of shape ``(B,)``, ``ids``
    int64 of shape ``(B,)`` or None for ``0..B-1``, ``cut`` the batch's largest, ``cuts``
    one per image or None); ``noise`` is None,
    ``"matched"`` or a sigma. The count holds, per image, its NaN and inf pixels plus the
    stored values that are not finite (an overflow of the output dtype). ``out`` gives
    preallocated buffers (checked as the Triton launcher checks them).
    """
    B, C, H, W = images.shape
    tau, noisy = outputs(images, out_dtype, noise, out)
    nonfinite = np.zeros(B, dtype=np.int64)
    if images.numel() == 0:
        return tau, noisy, nonfinite
    mode = NOISE_NONE if noise is None else NOISE_MATCHED if noise == "matched" else NOISE_SIGMA
    sigma = float(noise) if mode == NOISE_SIGMA else 0.0
    std, sx, sy, coef_c0, coef_c1, noise_c0, noise_c1 = _tables(H, W, cut, C)
    per_image = np.full(B, cut, np.int64) if cuts is None else cuts.numpy()
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    args = (
        _flat(images), tuple(images.stride()), _flat(tau),
        _flat(tau if noisy is None else noisy), tuple(tau.stride()),
        np.full(B, T, np.float32) if isinstance(T, float) else T.numpy(),
        np.arange(B, dtype=np.int64) if ids is None else ids.numpy(),
        per_image, std, sx, sy, k0, k1, sigma, mode,
        interp == "nearest", KINDS[images.dtype], KINDS[out_dtype], C, H, W,
        coef_c0, coef_c1, noise_c0, noise_c1, nonfinite,
    )  # fmt: skip
    threads = _threads(B)
    key = (images.dtype, out_dtype, threads > 1)
    if key in _seen:
        _launch(threads, B, args)
    else:
        with _compiling_note(key):
            _launch(threads, B, args)
    return tau, noisy, nonfinite


def _launch(threads: int, B: int, args: tuple) -> None:
    if threads == 1:
        _images(0, B, *args)
        return
    if not _parallel_pid:
        _parallel_pid.append(os.getpid())
    numba.set_num_threads(threads)
    with numba.parallel_chunksize(1):
        _images_parallel(*args)
