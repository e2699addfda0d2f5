"""The engines the fused kernels are compared with: ``grid_sample`` (eager) and the published
per-image loop of Petrini et al. (2021), both with the law of design.md section 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffeo_engine.benchmark.bytes_model import _out_dtype
from diffeo_engine.physics import mode_variances, sine_table
from diffeo_engine.reference import to_dtype

__all__ = ["grid_sample_perturb", "published_loop_perturb", "published_loop_warp"]


def _coefficient_std(cut: int, T: float, device) -> torch.Tensor:
    """``sqrt(T / (i^2 + j^2))`` on the mode disc, 0 outside: ``(cut, cut)`` float32."""
    return (mode_variances(cut, device) * T).sqrt().to(torch.float32)


def _grid_sample_core(
    images: torch.Tensor,
    coeffs: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, H, W = images.shape
    x = images.to(torch.float32)
    fields = torch.einsum("bsij,xi,yj->bsyx", coeffs, sx, sy)  # u, v (unitless)
    # The source point x - dx with dx = W u, in align_corners=True normalised units.
    base_x = torch.linspace(-1.0, 1.0, W, device=images.device)
    base_y = torch.linspace(-1.0, 1.0, H, device=images.device)
    gx = base_x[None, None, :] - (2.0 * W / (W - 1)) * fields[:, 0]
    gy = base_y[None, :, None] - (2.0 * H / (H - 1)) * fields[:, 1]
    grid = torch.stack((gx, gy), dim=-1)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    z = torch.randn_like(warped)
    scale = (warped - x).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    noisy = x + z * scale[:, None, None, None]
    return to_dtype(warped, out_dtype), to_dtype(noisy, out_dtype)


def grid_sample_perturb(
    images: torch.Tensor,
    T: float,
    cut: int,
    *,
    coeffs: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious eager pipeline: coefficients, ``einsum`` to fields, a normalised grid,
    ``F.grid_sample(bilinear, border, align_corners=True)``, matched noise from
    ``randn_like`` with per-image norms. Same law as :func:`diffeo_engine.perturb`.

    ``coeffs`` ``(B, 2, cut, cut)`` as from :func:`diffeo_engine.sample_coefficients`;
    drawn with ``torch.randn`` (same law) when not given.
    """
    B, _, H, W = images.shape
    if coeffs is None:
        std = _coefficient_std(cut, T, images.device)
        coeffs = torch.randn(B, 2, cut, cut, device=images.device) * std
    sx = sine_table(W, cut, device=images.device)
    sy = sine_table(H, cut, device=images.device)
    return _grid_sample_core(images, coeffs, sx, sy, _out_dtype(images.dtype, out_dtype))


def _published_remap(image: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """One image ``(C, H, W)`` through the gather-based bilinear remap of Petrini et al.'s
    released code (floor/ceil corners, clamped source point ``(x - dx, y - dy)``)."""
    H, W = image.shape[-2:]
    y, x = torch.meshgrid(
        torch.arange(H, dtype=dx.dtype, device=image.device),
        torch.arange(W, dtype=dx.dtype, device=image.device),
        indexing="ij",
    )
    xn = (x - dx).clamp(0, W - 1)
    yn = (y - dy).clamp(0, H - 1)
    xf, yf = xn.floor().long(), yn.floor().long()
    xc, yc = xn.ceil().long(), yn.ceil().long()
    xv, yv = xn - xf, yn - yf
    return (
        (1 - yv) * (1 - xv) * image[..., yf, xf]
        + (1 - yv) * xv * image[..., yf, xc]
        + yv * (1 - xv) * image[..., yc, xf]
        + yv * xv * image[..., yc, xc]
    )


def published_loop_warp(images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``tau x`` one image at a time, for given pixel displacements ``(B, 2, H, W)``."""
    x = images.to(torch.float32)
    return torch.stack(
        [_published_remap(x[b], displacement[b, 0], displacement[b, 1]) for b in range(len(x))]
    )


def published_loop_perturb(
    images: torch.Tensor,
    T: float,
    cut: int,
    *,
    out_dtype: torch.dtype | None = None,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published way: per image, ``randn`` coefficients, ``einsum`` to its field, the
    gather remap, and matched noise. ``tables`` = ``(std, sx, sy)`` cached (as the released
    code caches them with ``lru_cache``)."""
    _, _, H, W = images.shape
    out_dtype = _out_dtype(images.dtype, out_dtype)
    if tables is None:
        tables = (
            _coefficient_std(cut, T, images.device),
            sine_table(W, cut, device=images.device),
            sine_table(H, cut, device=images.device),
        )
    std, sx, sy = tables
    warped, noisy = [], []
    for image in images:
        x = image.to(torch.float32)
        u = torch.einsum("ij,xi,yj->yx", torch.randn(cut, cut, device=x.device) * std, sx, sy)
        v = torch.einsum("ij,xi,yj->yx", torch.randn(cut, cut, device=x.device) * std, sx, sy)
        tx = _published_remap(x, W * u, H * v)
        z = torch.randn_like(x)
        eta = z * ((tx - x).norm() / z.norm())
        warped.append(to_dtype(tx, out_dtype))
        noisy.append(to_dtype(x + eta, out_dtype))
    return torch.stack(warped), torch.stack(noisy)
