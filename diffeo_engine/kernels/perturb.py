"""The fused perturbation: coefficients, field, warp and noise of each image in one launch.

``_warp_kernel`` runs on a grid ``(B, G)``: program ``(b, g)`` draws image ``b``'s
coefficients from Philox, then for the tiles ``g, g + G, ...`` synthesises the field,
warps every channel and writes ``tau x`` (and ``x + sigma z`` for fixed-sigma noise).
Matched noise needs ``||tau x - x||`` and ``||z||`` over the whole image first: with
``G = 1`` the same program adds the noise in a second pass over its tiles (``FUSED``);
with ``G > 1`` each program writes its two partial squared norms and
``_matched_noise_kernel`` sums them in a fixed order and adds the noise. ``z`` is
regenerated from its Philox counters, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from diffeo_engine.kernels._philox import (
    COEFF_STREAM_DX,
    COEFF_STREAM_DY,
    coefficients_t,
    id_words,
    noise_tile,
)
from diffeo_engine.kernels.field import field_tile, padded_modes, tables
from diffeo_engine.kernels.warp import (
    bilinear,
    bilinear_offsets,
    nearest_offsets,
    source_points,
    store_values,
)
from diffeo_engine.physics import check_cut
from diffeo_engine.reference import memory_format_of

__all__ = [
    "KERNEL_DTYPES",
    "MAX_CUT",
    "MAX_INDEX",
    "MAX_SIDE",
    "Launch",
    "check_launchable",
    "launches",
    "perturb",
]

MAX_CUT = 64  # coefficient matrices are (CP, CP) per program, CP = next power of two
MAX_INDEX = 2**31  # per-image offsets are int32
MAX_SIDE = 2**24  # pixel coordinates are exact in float32
KERNEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
NOISE_NONE, NOISE_SIGMA, NOISE_MATCHED = 0, 1, 2


@triton.jit
def _tile(t, n_tiles_x, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Rows ``(BH, 1)``, columns ``(1, BW)``, first column and in-image mask of tile ``t``."""
    x_start = (t % n_tiles_x) * BW
    ys = (t // n_tiles_x) * BH + tl.arange(0, BH)[:, None]
    xs = x_start + tl.arange(0, BW)[None, :]
    return ys, xs, x_start, (ys < H) & (xs < W)


@triton.jit
def _add_noise(
    x_img,
    noisy_img,
    seed,
    id_lo,
    id_hi,
    scale,
    t_first,
    t_step,
    n_tiles,
    n_tiles_x,
    C,
    H,
    W,
    sxc,
    sxh,
    sxw,
    soc,
    soh,
    sow,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Write ``x + scale * z`` on the tiles ``t_first, t_first + t_step, ...``."""
    for t in range(t_first, n_tiles, t_step):
        ys, xs, x_start, mask = _tile(t, n_tiles_x, H, W, BH, BW)
        for c in range(C):
            clean = tl.load(x_img + c * sxc + ys * sxh + xs * sxw, mask=mask, other=0)
            z = noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW)
            store_values(
                noisy_img + c * soc + ys * soh + xs * sow, clean.to(tl.float32) + z * scale, mask
            )


@triton.jit
def _warp_kernel(
    x_ptr,
    tau_ptr,
    noisy_ptr,
    part_ptr,
    T_ptr,
    ids_ptr,
    sx_ptr,
    sy_ptr,
    std_ptr,
    seed,
    sigma,
    C,
    H,
    W,
    sxb,
    sxc,
    sxh,
    sxw,
    sob,
    soc,
    soh,
    sow,
    n_tiles_x,
    n_tiles,
    CP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    NEAREST: tl.constexpr,
    NOISE: tl.constexpr,
    FUSED: tl.constexpr,
):
    """Field, warp and noise of image ``program_id(0)`` on its tile group ``program_id(1)``."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    id_lo, id_hi = id_words(ids_ptr, b)
    sqrt_T = tl.sqrt_rn(tl.load(T_ptr + b))
    ct_u = coefficients_t(seed, COEFF_STREAM_DX, id_lo, id_hi, std_ptr, sqrt_T, CP)
    ct_v = coefficients_t(seed, COEFF_STREAM_DY, id_lo, id_hi, std_ptr, sqrt_T, CP)
    x_img = x_ptr + b.to(tl.int64) * sxb
    tau_img = tau_ptr + b.to(tl.int64) * sob
    noisy_img = noisy_ptr + b.to(tl.int64) * sob
    d2 = 0.0
    z2 = 0.0
    for t in range(g, n_tiles, G):
        ys, xs, x_start, mask = _tile(t, n_tiles_x, H, W, BH, BW)
        dx, dy = field_tile(ct_u, ct_v, sx_ptr, sy_ptr, ys, xs, H, W, CP)
        px, py = source_points(dx, dy, ys, xs, H, W)
        if NEAREST:
            o = nearest_offsets(px, py, sxh, sxw)
        else:
            o00, o01, o10, o11, wx, wy = bilinear_offsets(px, py, H, W, sxh, sxw)
        out = ys * soh + xs * sow
        for c in range(C):
            src = x_img + c * sxc
            if NEAREST:
                value = tl.load(src + o, mask=mask, other=0).to(tl.float32)
            else:
                value = bilinear(src, o00, o01, o10, o11, wx, wy, mask)
            store_values(tau_img + c * soc + out, value, mask)
            if NOISE != 0:
                clean = tl.load(src + ys * sxh + xs * sxw, mask=mask, other=0).to(tl.float32)
                z = noise_tile(seed, id_lo, id_hi, c, H, ys, x_start, BW)
                if NOISE == 1:
                    store_values(noisy_img + c * soc + out, clean + z * sigma, mask)
                else:
                    change = tl.where(mask, value - clean, 0.0)
                    z = tl.where(mask, z, 0.0)
                    d2 += tl.sum(change * change)
                    z2 += tl.sum(z * z)
    if NOISE == 2:
        if FUSED:
            scale = tl.div_rn(tl.sqrt_rn(d2), tl.sqrt_rn(z2))
            _add_noise(
                x_img,
                noisy_img,
                seed,
                id_lo,
                id_hi,
                scale,
                g,
                G,
                n_tiles,
                n_tiles_x,
                C,
                H,
                W,
                sxc,
                sxh,
                sxw,
                soc,
                soh,
                sow,
                BH,
                BW,
            )
        else:
            part = part_ptr + (b.to(tl.int64) * G + g) * 2
            tl.store(part, d2)
            tl.store(part + 1, z2)


@triton.jit
def _matched_noise_kernel(
    x_ptr,
    noisy_ptr,
    part_ptr,
    ids_ptr,
    seed,
    C,
    H,
    W,
    sxb,
    sxc,
    sxh,
    sxw,
    sob,
    soc,
    soh,
    sow,
    n_tiles_x,
    n_tiles,
    GP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Second pass of split matched noise: ``x + z ||tau x - x|| / ||z||`` per tile group."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    groups = tl.arange(0, GP)
    part = part_ptr + (b.to(tl.int64) * G + groups) * 2
    d2 = tl.sum(tl.load(part, mask=groups < G, other=0.0))
    z2 = tl.sum(tl.load(part + 1, mask=groups < G, other=0.0))
    scale = tl.div_rn(tl.sqrt_rn(d2), tl.sqrt_rn(z2))
    id_lo, id_hi = id_words(ids_ptr, b)
    _add_noise(
        x_ptr + b.to(tl.int64) * sxb,
        noisy_ptr + b.to(tl.int64) * sob,
        seed,
        id_lo,
        id_hi,
        scale,
        g,
        G,
        n_tiles,
        n_tiles_x,
        C,
        H,
        W,
        sxc,
        sxh,
        sxw,
        soc,
        soh,
        sow,
        BH,
        BW,
    )


# ----------------------------------------------------------------------------- launchers


def check_launchable(images: torch.Tensor, cut: int) -> None:
    """Static limits of the kernels: dtype, ``cut <= MAX_CUT`` and the int32 index range."""
    if images.dtype not in KERNEL_DTYPES:
        raise TypeError(
            "images: the triton backend takes uint8, float16, bfloat16 or float32 images, "
            f"got {images.dtype} (use backend='torch' for it)"
        )
    check_cut(cut, maximum=MAX_CUT)
    _, C, H, W = images.shape
    if C * H * W >= MAX_INDEX:
        raise ValueError(
            f"images: the triton backend needs C*H*W < 2**31 per image, got {C}x{H}x{W} "
            "(use backend='torch' for it)"
        )
    extent = 1 + sum((n - 1) * s for n, s in zip(images.shape[1:], images.stride()[1:]))
    if extent >= MAX_INDEX:
        raise ValueError(
            f"images: the triton backend needs each image to span < 2**31 elements in "
            f"memory, got strides {tuple(images.stride())}; make the tensor contiguous"
        )
    if max(H, W) > MAX_SIDE:
        raise ValueError(f"images: the triton backend needs H, W <= 2**24, got H={H}, W={W}")
    if min(H, W) < 2:
        raise ValueError(f"images: the triton backend needs H, W >= 2, got H={H}, W={W}")


def _tile_shape(H: int, W: int) -> tuple[int, int]:
    """``(BH, BW)``: powers of two in ``[16, 32]`` rows by ``[16, 64]`` columns."""
    return min(32, max(16, triton.next_power_of_2(H))), min(64, max(16, triton.next_power_of_2(W)))


def _programs_per_image(n_images: int, n_tiles: int, sm_count: int | None) -> int:
    """Tile groups per image: enough programs to fill the GPU (one per image elsewhere)."""
    if sm_count is None:
        return 1
    return max(1, min(n_tiles, -(-4 * sm_count // max(n_images, 1))))


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _shared_tables(images: torch.Tensor, cut: int) -> tuple[torch.Tensor, ...]:
    """Sine and mode tables, cached across calls except while being traced."""
    H, W = images.shape[-2:]
    if torch.compiler.is_compiling() or type(images) is not torch.Tensor:
        return tables.__wrapped__(H, W, cut, images.device)
    return tables(H, W, cut, images.device)


def _outputs(images, out_dtype, noise, out):
    if out is None:
        fmt = memory_format_of(images)
        tau = torch.empty(images.shape, dtype=out_dtype, device=images.device, memory_format=fmt)
        noisy = None if noise is None else torch.empty_like(tau)
        return tau, noisy
    tau, noisy = out
    for name, buf in (("out[0]", tau), ("out[1]", noisy)):
        if buf is None:
            if name == "out[1]" and noise is None:
                continue
            raise ValueError(f"{name}: expected an output buffer, got None")
        if buf.shape != images.shape or buf.dtype != out_dtype or buf.device != images.device:
            raise ValueError(
                f"{name}: expected a {out_dtype} tensor of shape {tuple(images.shape)} on "
                f"{images.device}, got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
            )
    if noisy is not None and noisy.stride() != tau.stride():
        raise ValueError("out: expected both buffers to have the same strides")
    return tau, noisy


@dataclass(frozen=True)
class Launch:
    """One kernel launch exactly as :func:`perturb` makes it: ``kernel[grid](*args, **kwargs)``.

    ``loops`` describes the kernel's run-time loops in code order, ``(trips, inner loops)``
    with ``trips`` averaged over the grid's programs: the static cost report
    (:mod:`diffeo_engine.benchmark.static`) multiplies SASS counts by them.
    """

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    loops: tuple = field(default=())


def launches(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    tau: torch.Tensor,
    noisy: torch.Tensor | None,
    *,
    cut: int,
    seed: int,
    noise: str | float | None,
    interp: str,
    programs_per_image: int | None = None,
    sm_count: int | None = None,
) -> list[Launch]:
    """The launches that compute ``tau`` (and ``noisy``) from ``images``: the one place the
    grid, arguments and constexprs are decided. Works on ``meta`` tensors (no memory)."""
    B, C, H, W = images.shape
    BH, BW = _tile_shape(H, W)
    n_tiles_x = triton.cdiv(W, BW)
    n_tiles = n_tiles_x * triton.cdiv(H, BH)
    G = programs_per_image or _programs_per_image(B, n_tiles, sm_count)
    G = max(1, min(G, n_tiles))
    mode = NOISE_NONE if noise is None else NOISE_MATCHED if noise == "matched" else NOISE_SIGMA
    split = mode == NOISE_MATCHED and G > 1
    part = torch.empty((B, G, 2), dtype=torch.float32, device=images.device) if split else tau
    sx, sy, std = _shared_tables(images, cut)
    noisy_arg = tau if noisy is None else noisy
    tiles = n_tiles / G
    channel_loop = ((C, ()),)
    warp_loops = ((tiles, channel_loop),)
    if mode == NOISE_MATCHED and not split:
        warp_loops += ((tiles, channel_loop),)
    plan = [
        Launch(
            _warp_kernel,
            (B, G),
            (
                images, tau, noisy_arg, part, T, ids, sx, sy, std, seed,
                float(noise) if mode == NOISE_SIGMA else 0.0, C, H, W, *images.stride(),
                *tau.stride(), n_tiles_x, n_tiles,
            ),
            dict(
                CP=padded_modes(cut), BH=BH, BW=BW, NEAREST=interp == "nearest", NOISE=mode,
                FUSED=not split, num_warps=4,
            ),
            warp_loops,
        )
    ]  # fmt: skip
    if split:
        plan.append(
            Launch(
                _matched_noise_kernel,
                (B, G),
                (
                    images, noisy, part, ids, seed, C, H, W, *images.stride(), *tau.stride(),
                    n_tiles_x, n_tiles,
                ),
                dict(GP=triton.next_power_of_2(G), BH=BH, BW=BW, num_warps=4),
                ((tiles, channel_loop),),
            )
        )  # fmt: skip
    return plan


def perturb(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    *,
    cut: int,
    seed: int,
    noise: str | float | None,
    interp: str,
    out_dtype: torch.dtype,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    programs_per_image: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernels: ``(tau x, x + eta)``, or ``(tau x, None)`` for ``noise=None``.

    Arguments are already validated (``T`` float32 and ``ids`` int64, shape ``(B,)``, on
    the images' device); ``noise`` is ``None``, ``"matched"`` or a sigma. ``out`` gives
    preallocated buffers, ``programs_per_image`` forces the tile-group count ``G``.
    """
    check_launchable(images, cut)
    tau, noisy = _outputs(images, out_dtype, noise, out)
    if images.numel() == 0:
        return tau, noisy
    plan = launches(
        images, T.contiguous(), ids.contiguous(), tau, noisy, cut=cut, seed=seed, noise=noise,
        interp=interp, programs_per_image=programs_per_image, sm_count=_sm_count(images.device),
    )  # fmt: skip
    for launch in plan:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.kwargs)
    return tau, noisy
