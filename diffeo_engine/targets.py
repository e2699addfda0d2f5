"""Move the other parts of a sample with an image's field: masks, keypoints, boxes.

One displacement field ``d`` (``(B, 2, H, W)`` pixels, :func:`sample_displacement` or
:func:`diffeo_engine.reference.displacement_field`) moves every part of a sample. The warp
reads the image at ``q - d(q)`` for each output pixel ``q``, so

* a **mask** is warped the same way at the nearest pixel (:func:`warp_mask`): labels are
  never blended;
* a **point** ``p`` of the source moves to the ``q`` with ``q - d(q) = p``
  (:func:`move_keypoints`, :func:`inverse_displacement`), found by Newton's method from
  ``q = p``; the solution is unique while the map has no folds (design.md section 2:
  ``T_max`` is where typical draws start to fold);
* a **box** becomes the bounding box of its moved outline, clipped to the canvas
  (:func:`move_boxes`).

Between pixel centres ``d`` is interpolated bilinearly (the warp only reads it at pixel
centres, where the interpolation is exact); outside ``[0, W-1] x [0, H-1]`` it takes the
border value, which is 0 for the max-entropy field. Coordinates follow torchvision's
conventions: keypoints in pixel units with pixel ``(x, y)`` centred at ``(x, y)`` (the frame
of design.md section 2), boxes with pixel ``(x, y)`` covering ``[x, x+1) x [y, y+1)`` so
that ``(0, 0, W, H)`` is the whole canvas.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffeo_engine.physics import check_int_or_pair
from diffeo_engine.reference import displacement_field, sample_coefficients, warp

__all__ = [
    "BOX_FORMATS",
    "InversionWarning",
    "check_box_format",
    "convert_boxes",
    "inverse_displacement",
    "move_boxes",
    "move_keypoints",
    "sample_displacement",
    "warp_mask",
]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
INVERSE_TOLERANCE = 1e-6  # pixels: a point is moved once |q - d(q) - p| is below this
NEWTON_ITERATIONS = 50
HALVINGS = 20  # step halvings per Newton iteration before a point is left where it is
BOX_SPACING = 0.1  # pixels between the samples of a box outline


class InversionWarning(UserWarning):
    """``q - d(q) = p`` could not be solved for some point (the field folds there)."""


def sample_displacement(
    n_images: int,
    cut,
    T,
    size,
    *,
    seed: int,
    ids=None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The displacement ``(B, 2, H, W)`` (float32 pixels) that ``deform`` applies for these
    ``(seed, ids, T, cut)`` to ``H x W`` images (``size`` is ``(H, W)`` or one integer).

    :func:`~diffeo_engine.reference.sample_coefficients` then
    :func:`~diffeo_engine.reference.displacement_field` in float64, rounded once to float32
    as the kernels do, so that masks, boxes and keypoints move with the image's own field.
    ``cut`` and ``T`` may give one value per image.
    """
    H, W = check_int_or_pair("size", size, minimum=2)
    coeffs = sample_coefficients(n_images, cut, T, seed=seed, ids=ids, device=device)
    return displacement_field(coeffs.to(torch.float64), H, W).to(torch.float32)


def _check_displacement_tensor(displacement) -> tuple[int, int, int]:
    if not torch.is_tensor(displacement) or not displacement.is_floating_point():
        raise TypeError("displacement: expected a floating-point tensor of shape (B, 2, H, W)")
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(
            f"displacement: expected shape (B, 2, H, W), got {tuple(displacement.shape)}"
        )
    B, _, H, W = displacement.shape
    if H < 2 or W < 2:
        raise ValueError(f"displacement: expected H >= 2 and W >= 2, got H={H}, W={W}")
    if not bool(torch.isfinite(displacement).all()):
        raise ValueError("displacement: expected a finite field in pixels, got NaN or inf")
    return B, H, W


def warp_mask(masks: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Masks ``(B, H, W)`` or ``(B, K, H, W)`` of any dtype (labels, bool, one-hot, float)
    warped at the nearest pixel: the output holds only values of the input, in its dtype.

    The pixel each output pixel reads is found by :func:`~diffeo_engine.reference.warp`
    with ``interp="nearest"`` on an image of pixel indices (float32, exact up to ``2**24``
    pixels, else float64), so the rounding is the warp's own: a mask moves exactly as a
    float image warped with ``interp="nearest"`` and the same field would.
    """
    B, H, W = _check_displacement_tensor(displacement)
    if not torch.is_tensor(masks):
        raise TypeError(f"masks: expected a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() not in (3, 4) or masks.shape[0] != B or tuple(masks.shape[-2:]) != (H, W):
        raise ValueError(
            f"masks: expected shape ({B}, H, W) or ({B}, K, H, W) with H, W = {H}, {W} (the "
            f"displacement's), got {tuple(masks.shape)}"
        )
    if masks.device != displacement.device:
        raise ValueError(
            f"masks: expected a tensor on {displacement.device} (the displacement's device), "
            f"got {masks.device}"
        )
    dtype = torch.float32 if H * W <= 1 << 24 else torch.float64
    pixels = torch.arange(H * W, dtype=dtype, device=masks.device).reshape(1, 1, H, W)
    source = warp(pixels.expand(B, 1, H, W), displacement, interp="nearest").long()
    flat = masks.reshape(B, -1, H * W)
    index = source.reshape(B, 1, H * W).expand(B, flat.shape[1], H * W)
    return flat.gather(2, index).reshape(masks.shape)


def _field_and_slopes(field: torch.Tensor, image: torch.Tensor, q: torch.Tensor) -> tuple:
    """``d``, ``dd/dx`` and ``dd/dy`` at real points ``q`` ``(P, 2)`` (x, y) of images
    ``image`` ``(P,)``; ``field`` is ``(B, H, W, 2)``. Bilinear in the pixel cell of the point
    (the point clamped to the grid, where ``d`` is then constant: slope 0 across the edge)."""
    _, H, W, _ = field.shape
    x = q[:, 0].clamp(0, W - 1)
    y = q[:, 1].clamp(0, H - 1)
    x0, y0 = x.floor().clamp(max=W - 2), y.floor().clamp(max=H - 2)
    wx, wy = (x - x0)[:, None], (y - y0)[:, None]
    corner = image * (H * W) + y0.long() * W + x0.long()
    flat = field.reshape(-1, 2)
    a, b, c, e = flat[corner], flat[corner + 1], flat[corner + W], flat[corner + W + 1]
    value = (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * c + wx * e)
    inside_x = ((q[:, 0] > 0) & (q[:, 0] < W - 1))[:, None]
    inside_y = ((q[:, 1] > 0) & (q[:, 1] < H - 1))[:, None]
    slope_x = ((1 - wy) * (b - a) + wy * (e - c)) * inside_x
    slope_y = ((1 - wx) * (c - a) + wx * (e - b)) * inside_y
    return value, slope_x, slope_y


def _newton_step(residual, slope_x, slope_y) -> torch.Tensor:
    """``J^-1 F`` for ``J = I - grad d``; the fixed-point step ``F`` where ``J`` is singular."""
    a, b = 1 - slope_x[:, 0], -slope_y[:, 0]  # the row of q_x - d_x
    c, e = -slope_x[:, 1], 1 - slope_y[:, 1]  # the row of q_y - d_y
    det = a * e - b * c
    regular = det.abs() > 1e-12
    det = torch.where(regular, det, torch.ones_like(det))
    newton = torch.stack(
        ((e * residual[:, 0] - b * residual[:, 1]) / det,
         (a * residual[:, 1] - c * residual[:, 0]) / det),
        dim=1,
    )  # fmt: skip
    return torch.where(regular[:, None], newton, residual)


def _solve(field: torch.Tensor, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``q`` with ``q - d(q) = p`` for float64 points ``p`` ``(P, 2)``.

    Newton's method on the bilinear field, each step halved until the residual decreases.
    (The fixed-point iteration ``q <- p + d(q)`` alone diverges wherever the field stretches
    by more than a pixel per pixel, which some draws do below ``T_max``; Newton converges
    on every field without folds.) One :class:`InversionWarning` if a point does not reach
    the tolerance, which only happens where the field folds.
    """
    q = points.clone()
    value, slope_x, slope_y = _field_and_slopes(field, image, q)
    residual = q - value - points
    error = residual.abs().amax(dim=1)
    active = (error >= INVERSE_TOLERANCE).nonzero().squeeze(1)
    stalled = active[:0]  # points no halved step improves: left where they are
    for _ in range(NEWTON_ITERATIONS):
        if active.numel() == 0:
            break
        start, target, where = q[active], points[active], image[active]
        step = _newton_step(residual[active], slope_x[active], slope_y[active])
        size = torch.ones_like(error[active])
        for _ in range(HALVINGS):
            trial = start - size[:, None] * step
            trial_value, trial_sx, trial_sy = _field_and_slopes(field, where, trial)
            trial_residual = trial - trial_value - target
            trial_error = trial_residual.abs().amax(dim=1)
            better = trial_error < error[active]
            if bool(better.all()):
                break
            size = torch.where(better, size, size / 2)
        taken = active[better]
        q[taken], residual[taken], error[taken] = (
            trial[better], trial_residual[better], trial_error[better],
        )  # fmt: skip
        slope_x[taken], slope_y[taken] = trial_sx[better], trial_sy[better]
        stalled = torch.cat((stalled, active[~better]))
        active = taken[error[taken] >= INVERSE_TOLERANCE]
    failed = torch.cat((stalled, active))
    if failed.numel():
        warnings.warn(
            f"keypoints: {failed.numel()} point(s) could not be moved to within "
            f"{INVERSE_TOLERANCE:g} px (largest residual {float(error[failed].max()):.3g} px): "
            "the field folds the image there (T above T_max for this draw)",
            InversionWarning,
            stacklevel=4,
        )
    return q


def _move_points(points: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Points ``(B, P, 2)`` float64 moved by each image's field; non-finite points stay."""
    B, P, _ = points.shape
    field = displacement.to(torch.float64).permute(0, 2, 3, 1).contiguous()
    image = torch.arange(B, device=points.device).repeat_interleave(P)
    flat = points.reshape(B * P, 2)
    finite = torch.isfinite(flat).all(dim=1)
    moved = flat.clone()
    moved[finite] = _solve(field, image[finite], flat[finite])
    return moved.reshape(B, P, 2)


def _check_points(name: str, values, B: int, width: int, shape: str) -> torch.Tensor:
    if not torch.is_tensor(values):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(values).__name__}")
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{name}: expected a real tensor, got dtype {values.dtype}")
    if values.dim() < 2 or values.shape[0] != B or values.shape[-1] != width:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(values.shape)}")
    return values


def _out_dtype(values: torch.Tensor) -> torch.dtype:
    return values.dtype if values.is_floating_point() else torch.float32


def move_keypoints(points: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Keypoints ``(B, ..., 2)`` (x, y in pixels, pixel centres at integers) moved with
    the images: point ``p`` goes to the ``q`` with ``q - d(q) = p``, solved to 1e-6 px (an
    :class:`InversionWarning` if it cannot be, which happens only where the field folds).
    NaN points (missing keypoints) stay NaN. Float points keep their dtype; integer points
    come back as float32.
    """
    B, _, _ = _check_displacement_tensor(displacement)
    points = _check_points("keypoints", points, B, 2, f"({B}, ..., 2)")
    moved = _move_points(
        points.to(device=displacement.device, dtype=torch.float64).reshape(B, -1, 2),
        displacement,
    )
    return moved.reshape(points.shape).to(device=points.device, dtype=_out_dtype(points))


def inverse_displacement(displacement: torch.Tensor) -> torch.Tensor:
    """``e`` ``(B, 2, H, W)`` with ``p + e(p) - d(p + e(p)) = p`` at every pixel ``p``: the
    source pixel ``p`` is found at ``p + e(p)`` in the warped image (where ``d`` reads it).
    Solved as in :func:`move_keypoints`; float32 out.
    """
    B, H, W = _check_displacement_tensor(displacement)
    y, x = torch.meshgrid(
        torch.arange(H, dtype=torch.float64, device=displacement.device),
        torch.arange(W, dtype=torch.float64, device=displacement.device),
        indexing="ij",
    )
    grid = torch.stack((x, y), dim=-1).reshape(1, H * W, 2).expand(B, H * W, 2)
    moved = _move_points(grid, displacement)
    return (moved - grid).reshape(B, H, W, 2).permute(0, 3, 1, 2).to(torch.float32)


def check_box_format(box_format) -> str:
    """``"xyxy"``, ``"xywh"`` or ``"cxcywh"`` (any case, as torchvision spells them)."""
    if not isinstance(box_format, str):
        raise TypeError(f"box_format: expected one of {list(BOX_FORMATS)}, got {box_format!r}")
    if box_format.lower() not in BOX_FORMATS:
        raise ValueError(f"box_format: expected one of {list(BOX_FORMATS)}, got {box_format!r}")
    return box_format.lower()


def convert_boxes(boxes: torch.Tensor, old: str, new: str) -> torch.Tensor:
    """Boxes ``(..., 4)`` from one of :data:`BOX_FORMATS` to another."""
    old, new = check_box_format(old), check_box_format(new)
    a, b, c, d = boxes.unbind(-1)
    if old == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif old == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if new == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif new == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return torch.stack((a, b, c, d), dim=-1)


def _side_points(xyxy: torch.Tensor, side: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points ``(..., k, 2)`` at fractions ``t`` ``(..., k)`` along a side of each xyxy box
    ``(..., 4)``: side 0 is the top, 1 the bottom (left to right), 2 the left, 3 the right
    (top to bottom). The corners are exact (``a (1 - t) + b t``)."""
    x1, y1, x2, y2 = (v[..., None] for v in xyxy.unbind(-1))
    side = side[..., None]
    along_x, along_y = x1 * (1 - t) + x2 * t, y1 * (1 - t) + y2 * t
    x = torch.where(side < 2, along_x, torch.where(side == 2, x1, x2))
    y = torch.where(side >= 2, along_y, torch.where(side == 0, y1, y2))
    return torch.stack(torch.broadcast_tensors(x, y), dim=-1)


def _moved_box_points(xyxy, side, t, displacement):
    """:func:`_side_points` moved with each image's field, in the box frame."""
    B = xyxy.shape[0]
    points = _side_points(xyxy, side, t) - 0.5  # to the pixel-centre frame of the field
    moved = _move_points(points.reshape(B, -1, 2), displacement) + 0.5
    return moved.reshape(points.shape)


def move_boxes(
    boxes: torch.Tensor,
    displacement: torch.Tensor,
    *,
    box_format: str = "xyxy",
    spacing: float = BOX_SPACING,
) -> torch.Tensor:
    """Boxes ``(B, N, 4)`` moved with the images: each becomes the bounding box of its moved
    outline, clipped to the canvas ``[0, W] x [0, H]``, in ``box_format``.

    Each side of the outline is sampled at most a pixel apart (corners included; every box
    of the call gets as many samples per side as the longest side needs), and again every
    ``spacing`` pixels within a pixel of the two samples that reach each extreme (left,
    top, right, bottom); each sample moves as a keypoint (:func:`move_keypoints`, after the
    half-pixel shift from the box frame, where pixel ``x`` covers ``[x, x+1)``, to the
    pixel-centre frame). A diffeomorphism maps the outline to the outline of the moved box,
    so its bounding box is the moved region's. Float boxes keep their dtype; integer boxes
    come back as float32.
    """
    B, H, W = _check_displacement_tensor(displacement)
    box_format = check_box_format(box_format)
    boxes = _check_points("boxes", boxes, B, 4, f"({B}, N, 4)")
    if boxes.dim() != 3:
        raise ValueError(f"boxes: expected shape ({B}, N, 4), got {tuple(boxes.shape)}")
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not spacing > 0:
        raise ValueError(f"spacing: expected a number of pixels > 0, got {spacing!r}")
    values = boxes.to(device=displacement.device, dtype=torch.float64)
    xyxy = convert_boxes(values, box_format, "xyxy")
    if not bool(torch.isfinite(xyxy).all()):
        raise ValueError("boxes: expected finite coordinates, got NaN or inf")
    if bool((xyxy[..., 2] < xyxy[..., 0]).any() | (xyxy[..., 3] < xyxy[..., 1]).any()):
        raise ValueError(
            f"boxes: expected x1 <= x2 and y1 <= y2 (as {box_format}), got a box with negative size"
        )
    N = xyxy.shape[1]
    if N == 0:
        return boxes.to(dtype=_out_dtype(boxes)).clone()
    # coarse: every side sampled at most a pixel apart (as many samples for every box)
    longest = float(torch.maximum(xyxy[..., 2] - xyxy[..., 0], xyxy[..., 3] - xyxy[..., 1]).max())
    m = max(2, math.ceil(longest) + 1)
    t = torch.linspace(0, 1, m, dtype=torch.float64, device=xyxy.device)
    sides = torch.arange(4, device=xyxy.device)
    coarse = _moved_box_points(
        xyxy[:, :, None], sides.expand(B, N, 4), t.expand(B, N, 4, m), displacement
    ).reshape(B, N, 4 * m, 2)
    # fine: around the two coarse samples reaching each extreme, every `spacing` pixels
    signed = torch.cat((coarse, -coarse), dim=-1)  # min x, min y, then -max x, -max y
    best = signed.topk(min(2, 4 * m), dim=2, largest=False).indices  # (B, N, 2, 4)
    best = best.transpose(2, 3).reshape(B, N, -1)  # (B, N, C) candidates
    side, index = best // m, best % m
    F = 2 * math.ceil(1.0 / spacing) + 1
    offsets = torch.linspace(-1, 1, F, dtype=torch.float64, device=xyxy.device)
    t_fine = ((index[..., None] + offsets) / (m - 1)).clamp(0, 1)  # (B, N, C, F)
    fine = _moved_box_points(xyxy[:, :, None], side, t_fine, displacement)
    moved = torch.cat((coarse, fine.reshape(B, N, -1, 2)), dim=2)
    low, high = moved.amin(dim=2), moved.amax(dim=2)  # (B, N, 2)
    canvas = torch.tensor([W, H], dtype=torch.float64, device=moved.device)
    low = torch.minimum(low.clamp(min=0), canvas)
    high = torch.minimum(high.clamp(min=0), canvas)
    out = convert_boxes(torch.cat((low, high), dim=-1), "xyxy", box_format)
    return out.to(device=boxes.device, dtype=_out_dtype(boxes))
