"""The fused perturbation: coefficients, field, warp and noise of each image on chip.

A coefficient launch, then one of two shapes of launch, both deterministic (an image
depends on ``(seed, id)`` only, never on the batch or the GPU):

* ``_coefficients_kernel`` (grid ``(B,)``) first draws each image's coefficients once.
* ``_resident_kernel``, grid ``(B,)``, when the image is one tile (``H <= 32``,
  ``W <= 64``) of at most ``MAX_RESIDENT_CHANNELS`` channels and ``cut <= 16``: the
  program synthesises the field, warps every channel and keeps ``x`` and ``z`` of every
  channel in registers, so matched noise reads ``x`` once, draws ``z`` once and writes
  each output once.
* otherwise ``_warp_kernel`` runs ``G`` programs per image (``G`` = the number of tiles:
  a function of the image size only) on a 1-D grid, the programs of one image adjacent.
  For matched noise each program writes its partial squared norms and counts itself done
  on a per-image counter; the image's last program sums the ``G`` partials in float64 in
  program order and writes ``x + z ||tau x - x|| / ||z||`` over all the image's tiles,
  re-reading ``x`` right after its sibling programs read it (from L2) and regenerating
  ``z`` from its Philox counters. One launch for the pass, never a stored ``z``.

Floating-point contraction is off (``enable_fp_fusion=False``): the bilinear weights and
the uint8 rounding are computed in the reference's order, each product rounded; the
bilinear sum, the field sums and ``x + z * scale`` use explicit FMAs (within the
tolerances tests/test_kernels.py checks). The cost of every launch on sm_90 is reported
offline by ``diffeo-engine bench --static`` (:mod:`diffeo_engine.benchmark.static`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
from torch.library import wrap_triton

from diffeo_engine.kernels.field import drawn_modes, padded_modes, tables
from diffeo_engine.kernels.fused import _coefficients_kernel, _resident_kernel, _warp_kernel
from diffeo_engine.kernels.outputs import outputs
from diffeo_engine.physics import check_cut

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
MAX_GRID = 2**31 - 1  # programs along the grid's first axis
MAX_RESIDENT_CHANNELS = 4
MAX_RESIDENT_MODES = 16  # beyond, the (CP, CP) products spill next to the resident channels
KERNEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
NOISE_NONE, NOISE_SIGMA, NOISE_MATCHED = 0, 1, 2
RESIDENT_WARPS = 8  # a 32x32 image: 4 pixels per thread, x and z of every channel in registers
TILE_WARPS = 8  # a 32x32 tile: 4 pixels per thread (a 32x64 one at 4 warps spilled)
TILE_WIDTH = 32


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
    """``(BH, BW)``: powers of two in ``[16, 32]`` rows by ``[16, 64]`` columns; an image
    larger than one such tile is cut in 32 x 32 tiles (fewer registers per thread)."""
    BH = min(32, max(16, triton.next_power_of_2(H)))
    BW = min(64, max(16, triton.next_power_of_2(W)))
    return (BH, BW) if H <= BH and W <= BW else (BH, min(BW, TILE_WIDTH))


def _check_programs(programs_per_image) -> None:
    if programs_per_image is None:
        return
    if isinstance(programs_per_image, bool) or not isinstance(programs_per_image, int):
        raise TypeError(f"programs_per_image: expected an integer >= 1, got {programs_per_image!r}")
    if programs_per_image < 1:
        raise ValueError(f"programs_per_image: expected an integer >= 1, got {programs_per_image}")


def _shared_tables(images: torch.Tensor, cut: int) -> tuple[torch.Tensor, ...]:
    """Sine and mode tables, cached across calls except while being traced."""
    H, W = images.shape[-2:]
    if torch.compiler.is_compiling() or type(images) is not torch.Tensor:
        return tables.__wrapped__(H, W, cut, images.device)
    return tables(H, W, cut, images.device)


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
    cuts: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    programs_per_image: int | None = None,
) -> list[Launch]:
    """The launches that compute ``tau`` (and ``noisy``) from ``images``: the one place the
    grid, arguments and constexprs are decided. Works on ``meta`` tensors (no memory).

    Nothing here depends on the device: ``G`` (programs per image) is the image's tile
    count unless ``programs_per_image`` forces it, so the matched-noise norms are summed in
    the same order on every GPU and at every batch size. ``cut`` sizes the work (the
    batch's largest); ``cuts``, one per image, masks each image's own disc. ``nonfinite``
    (int32, one per image, zeroed) receives the count of non-finite values the kernels read
    or write, in their own pass over the images; None: no check is compiled in.
    """
    _check_programs(programs_per_image)
    B, C, H, W = images.shape
    BH, BW = _tile_shape(H, W)
    CP, CQ = padded_modes(cut), drawn_modes(cut)
    n_tiles_x = triton.cdiv(W, BW)
    n_tiles = n_tiles_x * triton.cdiv(H, BH)
    mode = NOISE_NONE if noise is None else NOISE_MATCHED if noise == "matched" else NOISE_SIGMA
    sigma = float(noise) if mode == NOISE_SIGMA else 0.0
    sx, sy, std = _shared_tables(images, cut)
    noisy_arg = tau if noisy is None else noisy
    check = nonfinite is not None
    bad = ids if nonfinite is None else nonfinite  # any pointer when unused
    options = dict(num_warps=RESIDENT_WARPS, enable_fp_fusion=False)
    fast = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter has no approximations
    coef = torch.empty((B, 2, CQ, CQ), dtype=torch.float32, device=images.device)
    draw = Launch(
        _coefficients_kernel, (B,), (coef, T, ids, ids if cuts is None else cuts, std, seed),
        dict(CQ=CQ, PER_IMAGE_CUT=cuts is not None, num_warps=4 if CQ >= 16 else 1,
             enable_fp_fusion=False),
    )  # fmt: skip
    resident = n_tiles == 1 and C <= MAX_RESIDENT_CHANNELS and CQ <= MAX_RESIDENT_MODES
    if resident and programs_per_image in (None, 1):
        return [
            draw,
            Launch(
                _resident_kernel,
                (B,),
                (images, tau, noisy_arg, coef, ids, sx, sy, bad, seed, sigma, H, W,
                 *images.stride(), *tau.stride()),
                dict(NC=C, CUT=cut, CQ=CQ, CP=CP, BH=BH, BW=BW, NEAREST=interp == "nearest",
                     NOISE=mode, FAST=fast, EVEN=H == BH and W == BW, CHECK=check, **options),
                (),
            ),
        ]  # fmt: skip
    G = min(programs_per_image or n_tiles, n_tiles)
    if B * G > MAX_GRID:
        raise ValueError(
            f"images: the triton backend runs at most {MAX_GRID} programs, got {B} images "
            f"of {G} tiles each; split the batch"
        )
    matched = mode == NOISE_MATCHED
    part = torch.empty((B, G, 2), dtype=torch.float32, device=images.device) if matched else tau
    count = torch.zeros(B, dtype=torch.int32, device=images.device) if matched else ids
    tiles = n_tiles / G
    channels = ((C, ()),)
    loops: tuple = ((tiles, channels),)
    if matched:  # the last program of each image: 1 / G of the programs, every tile
        loops += ((n_tiles / G, channels),)
    return [
        draw,
        Launch(
            _warp_kernel,
            (B * G,),
            (images, tau, noisy_arg, part, count, coef, ids, sx, sy, bad, seed, sigma, C, H,
             W, *images.stride(), *tau.stride(), n_tiles_x, n_tiles, G),
            dict(CUT=cut, CQ=CQ, CP=CP, GP=triton.next_power_of_2(G), BH=BH, BW=BW,
                 NEAREST=interp == "nearest", NOISE=mode, FAST=fast,
                 EVEN=H % BH == 0 and W % BW == 0, CHECK=check,
                 **{**options, "num_warps": TILE_WARPS}),
            loops,
        ),
    ]  # fmt: skip


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
    cuts: torch.Tensor | None = None,
    check: bool = True,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    programs_per_image: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the kernels: ``(tau x, x + eta or None, non-finite count per image or None)``.

    With ``check`` the kernels flag, per image, NaN and inf values among the pixels they read
    and the values they store (an overflow of the output dtype), in their own pass (no
    separate read of the images; one FMA per value, or the matched noise's norm itself);
    the caller reads the flags (one small device-to-host copy) and says what is wrong.
    Without ``check`` nothing is flagged.

    Arguments are already validated (``T`` float32 and ``ids`` int64, shape ``(B,)``, on
    the images' device); ``noise`` is ``None``, ``"matched"`` or a sigma. ``out`` gives
    preallocated buffers (refused if they overlap the images or each other);
    ``programs_per_image`` forces the tile-group count ``G`` (matched-noise norms are then
    summed in another order: equal to float32 rounding, not bit for bit).
    """
    check_launchable(images, cut)
    tau, noisy = outputs(images, out_dtype, noise, out)
    if images.numel() == 0:
        return tau, noisy, None
    plain = images.dtype == torch.uint8 and out_dtype == torch.uint8  # nothing to count
    nonfinite = (
        torch.zeros(images.shape[0], dtype=torch.int32, device=images.device)
        if check and not plain
        else None
    )
    plan = launches(
        images, T.contiguous(), ids.contiguous(), tau, noisy, cut=cut, seed=seed, noise=noise,
        interp=interp, cuts=None if cuts is None else cuts.contiguous(), nonfinite=nonfinite,
        programs_per_image=programs_per_image,
    )  # fmt: skip
    for launch in plan:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.kwargs)
    return tau, noisy, nonfinite
