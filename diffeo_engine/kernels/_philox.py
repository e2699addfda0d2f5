"""Philox draws inside Triton kernels, the twins of :mod:`diffeo_engine.rng`.

Same key, counter words and Box-Muller as the PyTorch generator, so a kernel and the
reference draw bit-identical integers for the same ``(seed, id)`` (design.md section 3).

``FAST`` noise (compiled kernels; the interpreter has no hardware approximations) takes
Box-Muller's ``log``, ``cos`` and ``sin`` from the special-function unit
(``lg2.approx``, ``cos.approx``, ``sin.approx``) instead of the accurate libdevice
routines: the same integers and formula, normals within 1e-5 of the accurate ones (the
PTX ISA bounds the absolute errors of ``sin.approx``/``cos.approx`` at 2^-20.5 and of
``lg2.approx`` at about 2^-22; near ``u1 = 1``, where the latter would dominate the small
radius, a short series replaces it), about a sixth of the instructions. The field's
coefficients always use the accurate forms.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from diffeo_engine import rng

NOISE_STREAM_BASE = tl.constexpr(rng.NOISE_STREAM_BASE)
COEFF_STREAM_DX = tl.constexpr(rng.COEFF_STREAM_DX)
COEFF_STREAM_DY = tl.constexpr(rng.COEFF_STREAM_DY)


@triton.jit
def id_words(ids_ptr, b):
    """Low and high 32-bit words of image ``b``'s int64 id."""
    image_id = tl.load(ids_ptr + b).to(tl.int64)
    return image_id.to(tl.uint32), (image_id >> 32).to(tl.uint32)


@triton.jit
def _fast_pair(u1, u2):
    """``tl.pair_uniform_to_normal`` with the special-function unit's log, cos and sin.

    ``lg2.approx`` has an absolute error near ``u1 = 1``, where the radius is small and the
    error would dominate it: there (``1 - u1 < 2^-7``) ``ln u1`` comes from three terms of
    ``log(1 - w)`` instead (relative error below 1e-7)."""
    u1 = tl.maximum(1.0e-7, u1)
    w = 1.0 - u1  # exact for u1 >= 1/2
    series = w * (2.0 + w * (1.0 + w * 0.6666666865348816))  # -2 log(1 - w)
    lg2 = libdevice.fast_log2f(u1) * -1.3862943611198906  # -2 ln 2 log2(u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt(tl.where(w < 0.0078125, series, lg2))
    return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)


@triton.jit
def _pair(w1, w2, FAST: tl.constexpr):
    u1 = tl.uint_to_uniform_float(w1)
    u2 = tl.uint_to_uniform_float(w2)
    if FAST:
        return _fast_pair(u1, u2)
    else:
        return tl.pair_uniform_to_normal(u1, u2)


@triton.jit
def _normals4(seed, counter, stream, id_lo, id_hi, FAST: tl.constexpr = False):
    """Four standard normals from the words at ``(counter, stream, id)``: lanes 0..3."""
    zero = tl.zeros(counter.shape, tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, counter, zero + stream, zero + id_lo, zero + id_hi)
    n0, n1 = _pair(r0, r1, FAST)
    n2, n3 = _pair(r2, r3, FAST)
    return n0, n1, n2, n3


@triton.jit
def coefficients_t(seed, stream, id_lo, id_hi, std_ptr, sqrt_T, CP: tl.constexpr):
    """Transposed coefficients ``(CP, CP)``: row ``j - 1``, column ``i - 1``.

    Mode ``(i, j)`` sits at counter ``((i - 1) << 16) | (j - 1)``; ``std_ptr`` is the
    ``(CP, CP)`` table ``sqrt(1 / (i^2 + j^2))`` on the disc, 0 elsewhere (``[i-1, j-1]``).
    """
    j = tl.arange(0, CP)[:, None]
    i = tl.arange(0, CP)[None, :]
    counter = ((i << 16) | j).to(tl.uint32)
    n, _, _, _ = _normals4(seed, counter, stream, id_lo, id_hi)
    return n * tl.load(std_ptr + i * CP + j) * sqrt_T


@triton.jit
def coefficients_both_t(seed, id_lo, id_hi, std_ptr, sqrt_T, CP: tl.constexpr):
    """``coefficients_t`` of ``dx`` and ``dy`` at once, ``(2, CP, CP)``: one tensor, so
    that no thread draws a normal another one draws too."""
    s = tl.arange(0, 2)[:, None, None]
    j = tl.arange(0, CP)[None, :, None]
    i = tl.arange(0, CP)[None, None, :]
    tl.static_assert(COEFF_STREAM_DY == COEFF_STREAM_DX + 1)
    counter = (((i << 16) | j) + 0 * s).to(tl.uint32)
    stream = (s + COEFF_STREAM_DX).to(tl.uint32)
    n, _, _, _ = _normals4(seed, counter, stream, id_lo, id_hi)
    return n * tl.load(std_ptr + i * CP + j) * sqrt_T


@triton.jit
def noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW: tl.constexpr, FAST: tl.constexpr = False):
    """The noise ``z[c, ys, x_start : x_start + BW]`` as a ``(BH, BW // 4, 4)`` tile:
    pixel ``x_start + 4 q + l`` at ``[:, q, l]`` (``ys`` is ``(BH, 1)`` or ``(BH, 1, 1)``).

    ``x_start`` is a multiple of 4: one Philox call per four pixels, lanes joined.
    """
    rows = tl.reshape(ys, (ys.shape[0], 1))
    quads = (x_start // 4 + tl.arange(0, BW // 4))[None, :]
    stream = NOISE_STREAM_BASE + c * H + rows  # (BH, 1)
    counter = (quads + 0 * stream).to(tl.uint32)
    n0, n1, n2, n3 = _normals4(seed, counter, stream.to(tl.uint32), id_lo, id_hi, FAST)
    # join stacks on a new last axis: [..., a, b] = (n0, n2 | n1, n3)[b][a] is lane 2 a + b
    lanes = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # (BH, BW / 4, 2, 2)
    return tl.reshape(lanes, (rows.shape[0], BW // 4, 4))
