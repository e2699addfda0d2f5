"""The Triton programs of the fused perturbation (launched by :mod:`.perturb`, which says
when each runs): the coefficient draw, the resident whole-image program and the tiled one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffeo_engine.kernels._philox import (
    coefficients_both_t,
    id_words,
    noise_tile,
)
from diffeo_engine.kernels.field import (
    field_tile,
    field_tile_modes,
    load_coefficients,
)
from diffeo_engine.kernels.warp import (
    bilinear,
    bilinear_offsets,
    gather,
    nearest_offsets,
    poison,
    poison_stored,
    source_points,
    store_values,
)


@triton.jit
def _tile(t, n_tiles_x, H, W, BH: tl.constexpr, BW: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``(BH, 1, 1)``, columns ``(1, BW // 4, 4)``, first column and in-image mask of
    tile ``t`` (a constant when ``EVEN``: the tiles cover the image exactly, no access is
    masked). Columns in quads: a thread holds the four pixels of one Philox call."""
    x_start = (t % n_tiles_x) * BW
    ys = (t // n_tiles_x) * BH + tl.arange(0, BH)[:, None, None]
    xs = x_start + 4 * tl.arange(0, BW // 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    if EVEN:
        return ys, xs, x_start, tl.full((BH, BW // 4, 4), 1, tl.int1)
    else:
        return ys, xs, x_start, (ys < H) & (xs < W)


@triton.jit
def _field(coef_ptr, b, sx_ptr, sy_ptr, ys, xs, H, W, CUT: tl.constexpr, CQ: tl.constexpr,
           CP: tl.constexpr):  # fmt: skip
    """The tile's displacements: unrolled over the modes for ``cut <= 8``, else products."""
    if CQ <= 8:
        return field_tile_modes(coef_ptr, b, sx_ptr, sy_ptr, ys, xs, H, W, CUT, CQ, CP)
    else:
        ct_u, ct_v = load_coefficients(coef_ptr, b, CQ, CP)
        return field_tile(ct_u, ct_v, sx_ptr, sy_ptr, ys, xs, H, W, CP)


@triton.jit
def _offsets(dx, dy, ys, xs, H, W, sxh, sxw, NEAREST: tl.constexpr):
    """Source offsets and weights of a tile: four corners, or the nearest pixel four times."""
    px, py = source_points(dx, dy, ys, xs, H, W)
    if NEAREST:
        o = nearest_offsets(px, py, sxh, sxw)
        return o, o, o, o, px, py
    else:
        return bilinear_offsets(px, py, H, W, sxh, sxw)


@triton.jit
def _sample(src, o00, o01, o10, o11, wx, wy, mask, NEAREST: tl.constexpr, FLAT: tl.constexpr):
    if NEAREST:
        return gather(src, o00, mask, FLAT)
    else:
        return bilinear(src, o00, o01, o10, o11, wx, wy, mask, FLAT)


@triton.jit
def _channel(x_img, tau_img, noisy_img, c: tl.constexpr, sxc, soc, o00, o01, o10, o11, wx, wy,
             here, out, mask, seed, id_lo, id_hi, sigma, H, ys, x_start, acc,
             BW: tl.constexpr, NEAREST: tl.constexpr, NOISE: tl.constexpr,
             FAST: tl.constexpr, FLAT: tl.constexpr, CHECK: tl.constexpr):  # fmt: skip
    """Channel ``c`` of a resident image: write ``tau x`` (and ``x + sigma z``); return
    ``tau x``, ``x``, ``z`` and ``acc`` poisoned (:func:`_check_channel`)."""
    src = x_img + c * sxc
    value = _sample(src, o00, o01, o10, o11, wx, wy, mask, NEAREST, FLAT)
    store_values(tau_img + c * soc + out, value, mask)
    clean = value
    z = value
    if NOISE != 0 or CHECK:
        clean = tl.load(src + here, mask=mask, other=0).to(tl.float32)
    if CHECK:
        acc = _check_channel(tau_img, clean, value, acc, NOISE)
    if NOISE != 0:
        z = noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW, FAST)
        if NOISE == 1:
            acc = _store_noisy(noisy_img + c * soc + out, z, sigma, clean, mask, acc, CHECK,
                               1)  # fmt: skip
    return value, clean, z, acc


@triton.jit
def _tracked(ptr, NOISE: tl.constexpr):
    """Whether values must be poisoned one by one: not with matched noise into float32,
    where the norm ``sum (tau x - x)^2`` turns NaN or inf for any non-finite pixel or
    ``tau x``, and a finite norm bounds ``|z| scale`` far below float32's last ulp, so
    ``x + z scale`` cannot overflow either."""
    return NOISE != 2 or ptr.dtype.element_ty != tl.float32


@triton.jit
def _check_channel(tau_img, clean, value, acc, NOISE: tl.constexpr):
    """Poison ``acc`` with the pixels read (unless the matched norm sees them) and with
    ``tau x`` as stored (where :func:`_tracked`)."""
    if NOISE != 2:
        acc = poison(clean, acc)
    if _tracked(tau_img, NOISE):
        acc = poison_stored(tau_img, value, acc)
    return acc


@triton.jit
def _store_flag(bad_ptr, b, acc, norm, TRACKED: tl.constexpr):
    """``bad_ptr[b] = 1`` when the poisoned accumulator (``TRACKED``) or the norm is not
    finite: each thread sums its own quad of pixels (in registers) and stores 1 if it saw
    one (every writer writes 1: no race, and no reduction across threads)."""
    if TRACKED:  # noqa: SIM108 (constexpr branches, kept as statements for Triton)
        quad = tl.sum(acc, axis=2) + norm  # the quad axis lies within one thread
    else:
        quad = norm + tl.zeros((1,), tl.float32)
    bad = ~(tl.abs(quad) < float("inf"))
    flag = b + tl.zeros(quad.shape, tl.int32)
    tl.store(bad_ptr + flag, tl.full(quad.shape, 1, tl.int32), mask=bad)


@triton.jit
def _squares(value, clean, z, d2, z2, mask):
    """Running per-pixel sums of ``(tau x - x)^2`` and ``z^2`` (zero off the image)."""
    change = tl.where(mask, value - clean, 0.0)
    z = tl.where(mask, z, 0.0)
    return tl.fma(change, change, d2), tl.fma(z, z, z2)


@triton.jit
def _resident_kernel(x_ptr, tau_ptr, noisy_ptr, coef_ptr, ids_ptr, sx_ptr, sy_ptr, bad_ptr,
                     seed, sigma, H, W, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                     NC: tl.constexpr, CUT: tl.constexpr, CQ: tl.constexpr, CP: tl.constexpr,
                     BH: tl.constexpr,
                     BW: tl.constexpr, NEAREST: tl.constexpr, NOISE: tl.constexpr,
                     FAST: tl.constexpr, EVEN: tl.constexpr, CHECK: tl.constexpr):  # fmt: skip
    """Image ``program_id(0)`` whole, its ``NC`` channels' ``x`` and ``z`` kept on chip;
    with ``CHECK`` the count of non-finite values read or written goes to ``bad_ptr[b]``."""
    b = tl.program_id(0)
    id_lo, id_hi = id_words(ids_ptr, b)
    x_img = x_ptr + b.to(tl.int64) * sxb
    tau_img = tau_ptr + b.to(tl.int64) * sob
    noisy_img = noisy_ptr + b.to(tl.int64) * sob
    ys, xs, x_start, mask = _tile(0, 1, H, W, BH, BW, EVEN)
    dx, dy = _field(coef_ptr, b, sx_ptr, sy_ptr, ys, xs, H, W, CUT, CQ, CP)
    o00, o01, o10, o11, wx, wy = _offsets(dx, dy, ys, xs, H, W, sxh, sxw, NEAREST)
    here = ys * sxh + xs * sxw
    out = ys * soh + xs * sow
    acc = tl.zeros((BH, BW // 4, 4), tl.float32)
    t0, x0, z0, acc = _channel(x_img, tau_img, noisy_img, 0, sxc, soc, o00, o01, o10, o11, wx,
                               wy, here, out, mask, seed, id_lo, id_hi, sigma, H, ys, x_start,
                               acc, BW, NEAREST, NOISE, FAST, CP <= 16, CHECK)  # fmt: skip
    d2, z2 = _squares(t0, x0, z0, 0.0, 0.0, mask)
    x1, z1, x2, z2_, x3, z3 = x0, z0, x0, z0, x0, z0
    if NC > 1:
        t1, x1, z1, acc = _channel(x_img, tau_img, noisy_img, 1, sxc, soc, o00, o01, o10, o11,
                                   wx, wy, here, out, mask, seed, id_lo, id_hi, sigma, H, ys,
                                   x_start, acc, BW, NEAREST, NOISE, FAST, CP <= 16,
                                   CHECK)  # fmt: skip
        d2, z2 = _squares(t1, x1, z1, d2, z2, mask)
    if NC > 2:
        t2, x2, z2_, acc = _channel(x_img, tau_img, noisy_img, 2, sxc, soc, o00, o01, o10, o11,
                                    wx, wy, here, out, mask, seed, id_lo, id_hi, sigma, H, ys,
                                    x_start, acc, BW, NEAREST, NOISE, FAST, CP <= 16,
                                    CHECK)  # fmt: skip
        d2, z2 = _squares(t2, x2, z2_, d2, z2, mask)
    if NC > 3:
        t3, x3, z3, acc = _channel(x_img, tau_img, noisy_img, 3, sxc, soc, o00, o01, o10, o11,
                                   wx, wy, here, out, mask, seed, id_lo, id_hi, sigma, H, ys,
                                   x_start, acc, BW, NEAREST, NOISE, FAST, CP <= 16,
                                   CHECK)  # fmt: skip
        d2, z2 = _squares(t3, x3, z3, d2, z2, mask)
    norm = 0.0
    if NOISE == 2:
        change = tl.sum(d2)
        norm = change
        scale = tl.div_rn(tl.sqrt_rn(change), tl.sqrt_rn(tl.sum(z2)))
        acc = _store_noisy(noisy_img + out, z0, scale, x0, mask, acc, CHECK, 2)
        if NC > 1:
            acc = _store_noisy(noisy_img + soc + out, z1, scale, x1, mask, acc, CHECK, 2)
        if NC > 2:
            acc = _store_noisy(noisy_img + 2 * soc + out, z2_, scale, x2, mask, acc, CHECK,
                               2)  # fmt: skip
        if NC > 3:
            acc = _store_noisy(noisy_img + 3 * soc + out, z3, scale, x3, mask, acc, CHECK, 2)
    if CHECK:
        _store_flag(bad_ptr, b, acc, norm, _tracked(tau_ptr, NOISE))


@triton.jit
def _store_noisy(ptr, z, scale, clean, mask, acc, CHECK: tl.constexpr, NOISE: tl.constexpr):
    """Store ``x + scale z``; poison ``acc`` with it as stored (``CHECK``, where
    :func:`_tracked`)."""
    noisy = tl.fma(z, scale, clean)
    store_values(ptr, noisy, mask)
    if CHECK:  # noqa: SIM102 (two constexpr conditions, kept apart for Triton)
        if _tracked(ptr, NOISE):
            acc = poison_stored(ptr, noisy, acc)
    return acc


@triton.jit
def _coefficients_kernel(coef_ptr, T_ptr, ids_ptr, cuts_ptr, std_ptr, seed, CQ: tl.constexpr,
                         PER_IMAGE_CUT: tl.constexpr):  # fmt: skip
    """Image ``program_id(0)``'s transposed coefficients of ``u`` and ``v``, ``(2, CQ, CQ)``;
    with ``PER_IMAGE_CUT`` the modes outside the image's own disc are 0."""
    b = tl.program_id(0)
    id_lo, id_hi = id_words(ids_ptr, b)
    sqrt_T = tl.sqrt_rn(tl.load(T_ptr + b))
    coef = coefficients_both_t(seed, id_lo, id_hi, std_ptr, sqrt_T, CQ)  # [s, j - 1, i - 1]
    if PER_IMAGE_CUT:
        cut = tl.load(cuts_ptr + b)
        j = tl.arange(0, CQ)[None, :, None] + 1
        i = tl.arange(0, CQ)[None, None, :] + 1
        coef = tl.where(i * i + j * j <= cut * (cut + 1), coef, 0.0)  # < (cut + 1/2)^2
    k = tl.arange(0, 2 * CQ * CQ)
    tl.store(coef_ptr + b.to(tl.int64) * (2 * CQ * CQ) + k, tl.reshape(coef, (2 * CQ * CQ,)))


@triton.jit
def _add_noise(x_img, noisy_img, seed, id_lo, id_hi, scale, n_tiles, n_tiles_x, C, H, W,
               sxc, sxh, sxw, soc, soh, sow, BH: tl.constexpr, BW: tl.constexpr,
               FAST: tl.constexpr, EVEN: tl.constexpr, CHECK: tl.constexpr):  # fmt: skip
    """Write ``x + scale * z`` on every tile of the image; return an accumulator poisoned by
    the values stored (``CHECK``)."""
    acc = tl.zeros((BH, BW // 4, 4), tl.float32)
    for t in range(0, n_tiles):
        ys, xs, x_start, mask = _tile(t, n_tiles_x, H, W, BH, BW, EVEN)
        for c in range(C):
            clean = tl.load(x_img + c * sxc + ys * sxh + xs * sxw, mask=mask, other=0)
            z = noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW, FAST)
            acc = _store_noisy(noisy_img + c * soc + ys * soh + xs * sow, z, scale,
                               clean.to(tl.float32), mask, acc, CHECK, 2)  # fmt: skip
    return acc


@triton.jit
def _warp_kernel(x_ptr, tau_ptr, noisy_ptr, part_ptr, count_ptr, coef_ptr, ids_ptr, sx_ptr,
                 sy_ptr, bad_ptr, seed, sigma, C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                 n_tiles_x, n_tiles, G, CUT: tl.constexpr, CQ: tl.constexpr, CP: tl.constexpr,
                 GP: tl.constexpr,
                 BH: tl.constexpr, BW: tl.constexpr, NEAREST: tl.constexpr,
                 NOISE: tl.constexpr, FAST: tl.constexpr, EVEN: tl.constexpr,
                 CHECK: tl.constexpr):  # fmt: skip
    """Field, warp and noise of image ``pid // G`` on its tiles ``pid % G``, ``+ G``, ...;
    with ``CHECK`` a program that read or stored a value that is not finite sets
    ``bad_ptr[b]`` to 1 (with matched noise the image's last program, from the norms and
    the noise it stores)."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    id_lo, id_hi = id_words(ids_ptr, b)
    x_img = x_ptr + b.to(tl.int64) * sxb
    tau_img = tau_ptr + b.to(tl.int64) * sob
    noisy_img = noisy_ptr + b.to(tl.int64) * sob
    d2 = tl.zeros((BH, BW // 4, 4), tl.float32)
    z2 = tl.zeros((BH, BW // 4, 4), tl.float32)
    acc = tl.zeros((BH, BW // 4, 4), tl.float32)
    for t in range(g, n_tiles, G):
        ys, xs, x_start, mask = _tile(t, n_tiles_x, H, W, BH, BW, EVEN)
        dx, dy = _field(coef_ptr, b, sx_ptr, sy_ptr, ys, xs, H, W, CUT, CQ, CP)
        o00, o01, o10, o11, wx, wy = _offsets(dx, dy, ys, xs, H, W, sxh, sxw, NEAREST)
        out = ys * soh + xs * sow
        for c in range(C):
            src = x_img + c * sxc
            value = _sample(src, o00, o01, o10, o11, wx, wy, mask, NEAREST, CP <= 16)
            store_values(tau_img + c * soc + out, value, mask)
            if NOISE != 0 or CHECK:
                clean = tl.load(src + ys * sxh + xs * sxw, mask=mask, other=0).to(tl.float32)
            if CHECK:
                acc = _check_channel(tau_img, clean, value, acc, NOISE)
            if NOISE != 0:
                z = noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW, FAST)
                if NOISE == 1:
                    acc = _store_noisy(noisy_img + c * soc + out, z, sigma, clean, mask, acc,
                                       CHECK, 1)  # fmt: skip
                else:
                    d2, z2 = _squares(value, clean, z, d2, z2, mask)
    norm = tl.zeros((), tl.float32)
    if NOISE == 2:
        part = part_ptr + (b.to(tl.int64) * G + g) * 2
        tl.store(part, tl.sum(d2))
        tl.store(part + 1, tl.sum(z2))
        tl.debug_barrier()  # every thread's partial is out before the count says so
        done = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
        if done == G - 1:  # the image's last program: the norms are complete
            groups = tl.arange(0, GP)
            parts = part_ptr + (b.to(tl.int64) * G + groups) * 2
            d2s = tl.load(parts, mask=groups < G, other=0.0, cache_modifier=".cg")
            z2s = tl.load(parts + 1, mask=groups < G, other=0.0, cache_modifier=".cg")
            d2_all = tl.sum(d2s.to(tl.float64))
            z2_all = tl.sum(z2s.to(tl.float64))
            scale = (tl.sqrt(d2_all) / tl.sqrt(z2_all)).to(tl.float32)
            norm = d2_all.to(tl.float32)
            acc += _add_noise(x_img, noisy_img, seed, id_lo, id_hi, scale, n_tiles, n_tiles_x,
                              C, H, W, sxc, sxh, sxw, soc, soh, sow, BH, BW, FAST, EVEN,
                              CHECK)  # fmt: skip
    if CHECK:
        _store_flag(bad_ptr, b, acc, norm, _tracked(tau_ptr, NOISE))
