"""The perturbation in plain PyTorch: design.md section 2 in code, on any device.

This is the specification the Triton kernels are tested against. It draws from the same
Philox streams (:mod:`diffeo_engine.rng`), so for the same ``(seed, ids)`` both paths
produce the same images up to float rounding. Batched throughout: one independent
field per image, no Python loop over images.
"""

from __future__ import annotations

import torch

from diffeo_engine import rng
from diffeo_engine.physics import (
    check_cut,
    check_displacement,
    check_field,
    check_finite,
    check_ids,
    check_images,
    check_in_dtype,
    check_interp,
    check_out_dtype,
    check_seed,
    check_T,
    mode_variances,
    sine_table,
)

__all__ = [
    "check_noise",
    "deform",
    "displacement_field",
    "memory_format_of",
    "perturb",
    "sample_coefficients",
    "to_dtype",
    "warp",
]


def sample_coefficients(
    n_images: int,
    cut: int,
    T,
    *,
    seed: int,
    ids=None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coefficients ``(B, 2, cut, cut)`` of the fields ``u`` (``[:, 0]``) and ``v`` (``[:, 1]``).

    ``[b, :, i - 1, j - 1]`` is mode ``(i, j)`` (``i`` along x), drawn as
    ``N(0, T_b / (i^2 + j^2))`` on the disc ``sqrt(i^2 + j^2) < cut + 1/2`` and 0 outside.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise ValueError(f"n_images: expected an integer >= 0, got {n_images!r}")
    cut = check_cut(cut, maximum=rng.MAX_CUT)
    seed = check_seed(seed)
    if device is None:
        device = ids.device if torch.is_tensor(ids) else (T.device if torch.is_tensor(T) else "cpu")
    device = torch.device(device)
    ids = check_ids(ids, n_images, device)
    T = check_T(T, n_images, device)
    std = mode_variances(cut, device).sqrt().to(torch.float32)
    normals = rng.coefficient_normals(seed, ids, cut)
    return normals * std * T.sqrt()[:, None, None, None]


def displacement_field(coeffs: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Displacements in pixels ``(B, 2, H, W)``: ``[:, 0] = dx = W u``, ``[:, 1] = dy = H v``.

    Computed in the coefficients' dtype, separably through the shared sine tables.
    """
    if not torch.is_tensor(coeffs) or not coeffs.is_floating_point():
        raise TypeError("coeffs: expected a floating-point tensor of shape (B, 2, cut, cut)")
    if coeffs.dim() != 4 or coeffs.shape[1] != 2 or coeffs.shape[2] != coeffs.shape[3]:
        raise ValueError(f"coeffs: expected shape (B, 2, cut, cut), got {tuple(coeffs.shape)}")
    for name, n in (("H", H), ("W", W)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"{name}: expected an integer >= 2, got {n!r}")
    cut = coeffs.shape[-1]
    sx = sine_table(W, cut, device=coeffs.device, dtype=coeffs.dtype)  # (W, cut): over i
    sy = sine_table(H, cut, device=coeffs.device, dtype=coeffs.dtype)  # (H, cut): over j
    fields = torch.einsum("bsij,xi,yj->bsyx", coeffs, sx, sy)
    scale = torch.tensor([W, H], dtype=coeffs.dtype, device=coeffs.device)
    return fields * scale[None, :, None, None]


def to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float values to the output dtype; uint8 rounds half up and saturates."""
    if dtype == torch.uint8:
        return torch.floor(values + 0.5).clamp_(0, 255).to(torch.uint8)
    return values.to(dtype)


def _compute_dtype(images: torch.Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def memory_format_of(images: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for channels-last images, else contiguous: outputs keep the layout."""
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _warp_values(images: torch.Tensor, displacement: torch.Tensor, interp: str) -> torch.Tensor:
    """The warped images in the compute dtype (float32, or float64 for float64 input)."""
    B, C, H, W = images.shape
    dtype = _compute_dtype(images)
    source = images.to(dtype).reshape(B, C, H * W)
    d = displacement.to(dtype)
    y = torch.arange(H, dtype=dtype, device=images.device)[:, None]
    x = torch.arange(W, dtype=dtype, device=images.device)[None, :]
    xs = (x - d[:, 0]).clamp(0, W - 1)  # (B, H, W)
    ys = (y - d[:, 1]).clamp(0, H - 1)

    def gather(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        index = (yi * W + xi).reshape(B, 1, H * W).expand(B, C, H * W)
        return source.gather(2, index).reshape(B, C, H, W)

    if interp == "nearest":
        return gather(torch.floor(ys + 0.5).long(), torch.floor(xs + 0.5).long())
    x0, y0 = xs.floor(), ys.floor()
    wx, wy = (xs - x0)[:, None], (ys - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp_(max=W - 1), (y0 + 1).clamp_(max=H - 1)
    return (
        (1 - wy) * (1 - wx) * gather(y0, x0)
        + (1 - wy) * wx * gather(y0, x1)
        + wy * (1 - wx) * gather(y1, x0)
        + wy * wx * gather(y1, x1)
    )


def warp(
    images: torch.Tensor,
    displacement: torch.Tensor,
    *,
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(tau x)[c, y, x] = x[c, y - dy, x - dx]``, the point clamped to the image (edge
    replication), sampled bilinearly or at the nearest pixel (rounding half up)."""
    images = check_images(images)
    interp = check_interp(interp)
    out_dtype = check_out_dtype(out_dtype, images)
    if not torch.is_tensor(displacement) or not displacement.is_floating_point():
        raise TypeError("displacement: expected a floating-point tensor of shape (B, 2, H, W)")
    B, _, H, W = images.shape
    if displacement.shape != (B, 2, H, W):
        raise ValueError(
            f"displacement: expected shape {(B, 2, H, W)} to match the images, "
            f"got {tuple(displacement.shape)}"
        )
    if displacement.device != images.device:
        raise ValueError(
            f"displacement: expected a tensor on {images.device} (the images' device), "
            f"got {displacement.device}"
        )
    check_displacement(displacement)
    values = _warp_values(images, displacement, interp)
    return to_dtype(values, out_dtype).contiguous(memory_format=memory_format_of(images))


def check_noise(noise) -> float | None:
    """``"matched"`` (returns None) or a fixed ``sigma >= 0`` (returns it)."""
    if isinstance(noise, str):
        if noise != "matched":
            raise ValueError(f"noise: expected 'matched' or a sigma >= 0, got {noise!r}")
        return None
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"noise: expected 'matched' or a float sigma >= 0, got {noise!r}")
    if not float(noise) >= 0 or noise == float("inf"):
        raise ValueError(f"noise: expected a finite sigma >= 0, got {noise}")
    return check_in_dtype("noise", float(noise), torch.float32, what="noise is drawn in float32")


def _fields_for(images: torch.Tensor, T, cut: int, seed: int, ids) -> tuple:
    B, _, H, W = images.shape
    ids = check_ids(ids, B, images.device)
    check_field(T, cut, H, W, ids)
    coeffs = sample_coefficients(B, cut, T, seed=seed, ids=ids, device=images.device)
    # float64 then one rounding: an image's field does not depend on the batch it sits in
    return ids, displacement_field(coeffs.to(torch.float64), H, W).to(torch.float32)


def deform(
    images: torch.Tensor,
    T,
    cut: int,
    *,
    seed: int,
    ids=None,
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """``tau x`` for each image, its field drawn from Philox keyed by ``(seed, id)``."""
    images = check_finite(check_images(images), allow_nonfinite=allow_nonfinite)
    _, displacement = _fields_for(images, T, cut, seed, ids)
    return warp(images, displacement, interp=interp, out_dtype=out_dtype)


def perturb(
    images: torch.Tensor,
    T,
    cut: int,
    *,
    seed: int,
    ids=None,
    noise="matched",
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)``: ``eta = z ||tau x - x|| / ||z||`` per image (``noise="matched"``)
    or ``eta = sigma z`` (``noise=sigma``), ``z`` from the image's Philox noise streams.

    The norm is that of the change before rounding to ``out_dtype``. NaN or inf pixels
    are refused unless ``allow_nonfinite`` (see ``physics.check_finite``).
    """
    images = check_finite(check_images(images), allow_nonfinite=allow_nonfinite)
    interp = check_interp(interp)
    sigma = check_noise(noise)
    out_dtype = check_out_dtype(out_dtype, images)
    B, C, H, W = images.shape
    ids, displacement = _fields_for(images, T, cut, seed, ids)
    warped = _warp_values(images, displacement, interp)
    clean = images.to(warped.dtype)
    z = rng.noise_normals(seed, ids, (C, H, W)).to(warped.dtype)
    if sigma is None:  # norms in float64 so that they do not depend on the batch either
        change = (warped - clean).reshape(B, C * H * W).to(torch.float64).norm(dim=1)
        scale = change / z.reshape(B, C * H * W).to(torch.float64).norm(dim=1)
        eta = z * scale.to(warped.dtype)[:, None, None, None]
    else:
        eta = z * sigma
    memory_format = memory_format_of(images)
    return (
        to_dtype(warped, out_dtype).contiguous(memory_format=memory_format),
        to_dtype(clean + eta, out_dtype).contiguous(memory_format=memory_format),
    )
