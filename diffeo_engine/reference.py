"""The perturbation in plain PyTorch: design.md section 2 in code, on any device.

This is the specification the Triton kernels are tested against. It draws from the same
Philox streams (:mod:`diffeo_engine.rng`), so for the same ``(seed, ids)`` both paths
produce the same images up to float rounding. Batched throughout: one independent
field per image, no Python loop over images.
"""

from __future__ import annotations

import functools

import torch

from diffeo_engine import rng
from diffeo_engine.physics import (
    _largest,
    check_cuts,
    check_device,
    check_displacement,
    check_field,
    check_finite,
    check_ids,
    check_images,
    check_int,
    check_interp,
    check_memory,
    check_noise,
    check_out_dtype,
    check_overflow,
    check_seed,
    check_T,
    image_mode_masks,
    mode_variances,
    perturbation_bytes,
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

# bytes per coefficient drawn: the float32 result and the int64 Philox temporaries (measured)
_COEFFICIENT_BYTES = 132


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
    ``cut`` may give one value per image: the tensor is sized by the largest and each image
    keeps its own disc (a mode's draw does not depend on ``cut``).
    """
    n_images = check_int("n_images", n_images, 0)
    seed = check_seed(seed)
    if device is None:
        device = ids.device if torch.is_tensor(ids) else (T.device if torch.is_tensor(T) else "cpu")
    device = check_device(device)
    cut, cuts = check_cuts(cut, n_images, device, maximum=rng.MAX_CUT)
    parts = {"n_images": n_images, "cut": 2 * cut * cut}
    check_memory(
        _largest(parts), n_images * 2 * cut * cut * _COEFFICIENT_BYTES, device,
        what=f"drawing {n_images} image(s) of (2, {cut}, {cut}) coefficients",
    )  # fmt: skip
    ids = check_ids(ids, n_images, device)
    T = check_T(T, n_images, device)
    std = _image_std(_std(cut, device), cuts)
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
    H, W = check_int("H", H, 2), check_int("W", W, 2)
    B, cut = coeffs.shape[0], coeffs.shape[-1]
    item = coeffs.element_size()
    parts = {"H, W": 3 * B * 2 * H * W * item, "coeffs": 2 * B * 2 * cut * max(H, W) * item}
    check_memory(
        _largest(parts), sum(parts.values()), coeffs.device,
        what=f"the {H}x{W} fields of {B} image(s) (cut = {cut})",
    )  # fmt: skip
    sx = sine_table(W, cut, device=coeffs.device, dtype=coeffs.dtype)  # (W, cut): over i
    sy = sine_table(H, cut, device=coeffs.device, dtype=coeffs.dtype)  # (H, cut): over j
    return _field(coeffs, sx, sy)


def _field(coeffs: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """``S_y C^T S_x^T`` per image and component, scaled to pixels (W for dx, H for dy)."""
    if torch.compiler.is_compiling():  # Inductor fuses these sums; nothing is stored
        rows = (coeffs[..., None] * sx.T[:, None, :]).sum(2)  # (B, 2, j, x): over i
        fields = (rows[:, :, None] * sy[:, :, None]).sum(3)  # (B, 2, y, x): over j
    else:  # eager: BLAS, without a (B, 2, H, cut, W) temporary
        fields = torch.einsum("bsij,xi,yj->bsyx", coeffs, sx, sy)
    return torch.stack((fields[:, 0] * sx.shape[0], fields[:, 1] * sy.shape[0]), dim=1)


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
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """``(tau x)[c, y, x] = x[c, y - dy, x - dx]``, the point clamped to the image (edge
    replication), sampled bilinearly or at the nearest pixel (rounding half up).

    As ``deform``: NaN or inf pixels, and finite images whose warp overflows ``out_dtype``
    (float32 images beyond 65504 as float16), are refused unless ``allow_nonfinite``."""
    images = check_images(images)
    interp = check_interp(interp)
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
    nbytes = perturbation_bytes(images.shape, torch.float64, outputs=1, path="torch")
    check_memory(  # before any pass over the images
        "images", nbytes, images.device,
        what=f"warping {B} image(s) of {'x'.join(map(str, images.shape[1:]))}",
    )  # fmt: skip
    check_finite(images, allow_nonfinite=allow_nonfinite)
    out_dtype = check_out_dtype(out_dtype, images)
    check_displacement(displacement)
    values = _warp_values(images, displacement, interp)
    out = to_dtype(values, out_dtype).contiguous(memory_format=memory_format_of(images))
    if not allow_nonfinite:
        check_overflow(images, out)
    return out


def _cached(make):
    """``make(*args)`` computed once per arguments (the device among them), except while
    ``torch.compile`` traces: shared tables of every call, never written to."""
    cached = functools.lru_cache(maxsize=64)(make)

    def tables(*args):
        return make(*args) if torch.compiler.is_compiling() else cached(*args)

    return tables


@_cached
def _std(cut: int, device) -> torch.Tensor:
    """The coefficient standard deviations per unit ``T``, float32 ``(cut, cut)``."""
    return mode_variances(cut, device).sqrt().to(torch.float32)


def _image_std(std: torch.Tensor, cuts: torch.Tensor | None) -> torch.Tensor:
    """``std`` for every image: ``(cut, cut)`` shared, or ``(B, 1, cut, cut)`` with the modes
    outside each image's own disc set to 0 (per-image ``cut``)."""
    if cuts is None:
        return std
    return (std * image_mode_masks(cuts, std.shape[-1]))[:, None]


@_cached
def _tables(cut: int, H: int, W: int, device) -> tuple[torch.Tensor, ...]:
    """The float64 sine tables of :func:`displacement_field`, shared by every image."""
    sx = sine_table(W, cut, device=device, dtype=torch.float64)
    sy = sine_table(H, cut, device=device, dtype=torch.float64)
    return sx, sy


def _displacement(T, ids, key, std, sx, sy) -> torch.Tensor:
    """Each image's displacement, float32 ``(B, 2, H, W)``: the coefficients exactly as
    :func:`sample_coefficients` draws them (``std`` from :func:`_image_std`), the field in
    float64 and rounded once, so that an image's field does not depend on its batch."""
    normals = rng._coefficient_normals(key, ids, sx.shape[-1])
    coeffs = normals * std * T.sqrt()[:, None, None, None]
    return _field(coeffs.to(torch.float64), sx, sy).to(torch.float32)


def _deform_core(images, T, ids, key, std, sx, sy, *, interp: str) -> torch.Tensor:
    """``tau x`` in the compute dtype on checked arguments."""
    return _warp_values(images, _displacement(T, ids, key, std, sx, sy), interp)


def _perturb_core(images, T, ids, key, std, sx, sy, sigma, *, interp: str) -> tuple:
    """``(tau x, x + eta)`` in the compute dtype on checked arguments (``sigma < 0``:
    matched noise).

    The norms are taken in float64 so that they do not depend on the batch either.
    """
    _, C, H, W = images.shape
    warped = _warp_values(images, _displacement(T, ids, key, std, sx, sy), interp)
    clean = images.to(warped.dtype)
    z = rng._noise(key, ids, C, H, W).to(warped.dtype)
    change = (warped - clean).to(torch.float64).square().sum((1, 2, 3)).sqrt()
    matched = change / z.to(torch.float64).square().sum((1, 2, 3)).sqrt()
    scale = torch.where(sigma < 0, matched.to(warped.dtype), sigma.to(warped.dtype))
    eta = z * scale[:, None, None, None]
    return warped, clean + eta


_CPU_CHUNK = 128  # images per eager pass on CPU: the int64 Philox temporaries fit in cache


def _concat(chunks: list):
    if torch.is_tensor(chunks[0]):
        return torch.cat(chunks)
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def _run(core, images, T, cut, seed, ids, *extra, interp, out_dtype, allow_nonfinite):
    """Check the shared arguments and run ``core`` (in chunks of images on the CPU: image by
    image the results are the same, and the passes stay in cache)."""
    B, _, H, W = images.shape
    cut, cuts = check_cuts(cut, B, images.device, maximum=rng.MAX_CUT)
    seed = check_seed(seed)
    ids = check_ids(ids, B, images.device)
    check_field(T, cut, H, W, cuts)
    T = check_T(T, B, images.device)
    key = torch.tensor(seed, dtype=torch.int64, device=images.device)
    std = _image_std(_std(cut, images.device), cuts)
    tables = _tables(cut, H, W, images.device)
    step = _CPU_CHUNK if images.device.type == "cpu" else max(B, 1)
    chunks = []
    for i in range(0, B, step):
        part = slice(i, i + step)
        chunk_std = std if cuts is None else std[part]
        chunks.append(
            core(images[part], T[part], ids[part], key, chunk_std, *tables, *extra, interp=interp)
        )
    if not chunks:
        chunks.append(core(images, T, ids, key, std, *tables, *extra, interp=interp))
    values = chunks[0] if len(chunks) == 1 else _concat(chunks)
    fmt = memory_format_of(images)
    outputs = [values] if torch.is_tensor(values) else list(values)
    outputs = [to_dtype(v, out_dtype).contiguous(memory_format=fmt) for v in outputs]
    if not allow_nonfinite:
        for out in outputs:
            check_overflow(images, out)
    return outputs[0] if torch.is_tensor(values) else tuple(outputs)


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
    interp = check_interp(interp)
    out_dtype = check_out_dtype(out_dtype, images)
    return _run(
        _deform_core, images, T, cut, seed, ids, interp=interp, out_dtype=out_dtype,
        allow_nonfinite=allow_nonfinite,
    )  # fmt: skip


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
    sigma_t = torch.tensor(
        -1.0 if sigma is None else sigma, dtype=torch.float64, device=images.device
    )
    return _run(
        _perturb_core, images, T, cut, seed, ids, sigma_t, interp=interp, out_dtype=out_dtype,
        allow_nonfinite=allow_nonfinite,
    )  # fmt: skip


# ------------------------------------------------------------------------------ gradients


def _scatter_warp_vjp(grad: torch.Tensor, displacement: torch.Tensor, interp: str):
    """``W^T g``: the adjoint of the warp, each output pixel's gradient sent back to the
    source pixels it read, with its bilinear weights. Linear in ``g`` and made of
    differentiable operations, so it can itself be differentiated (double backward)."""
    B, C, H, W = grad.shape
    dtype = grad.dtype
    d = displacement.to(dtype)
    y = torch.arange(H, dtype=dtype, device=grad.device)[:, None]
    x = torch.arange(W, dtype=dtype, device=grad.device)[None, :]
    xs = (x - d[:, 0]).clamp(0, W - 1)
    ys = (y - d[:, 1]).clamp(0, H - 1)
    out = torch.zeros(B, C, H * W, dtype=dtype, device=grad.device)

    def send(yi, xi, weight):
        index = (yi * W + xi).reshape(B, 1, H * W).expand(B, C, H * W)
        return out.scatter_add(2, index, (grad * weight).reshape(B, C, H * W))

    if interp == "nearest":
        one = torch.ones((), dtype=dtype, device=grad.device)
        out = send(torch.floor(ys + 0.5).long(), torch.floor(xs + 0.5).long(), one)
        return out.reshape(B, C, H, W)
    x0, y0 = xs.floor(), ys.floor()
    wx, wy = (xs - x0)[:, None], (ys - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
    for yi, xi, weight in (
        (y0, x0, (1 - wy) * (1 - wx)),
        (y0, x1, (1 - wy) * wx),
        (y1, x0, wy * (1 - wx)),
        (y1, x1, wy * wx),
    ):
        out = send(yi, xi, weight)
    return out.reshape(B, C, H, W)


def vjp(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    sigma: float | None,
    interp: str,
    grad_tau: torch.Tensor | None,
    grad_noisy: torch.Tensor | None = None,
    *,
    noise: bool = True,
    cuts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of ``<grad_tau, tau x> + <grad_noisy, x + eta>`` with respect to ``x``
    (``sigma`` None: matched noise), written out, with no value checks (so that
    ``torch.compile`` traces it) and differentiable again in ``x`` and the grads.

    ``tau x = W x`` is linear; with matched noise ``eta = z ||W x - x|| / ||z||`` adds
    ``(z . g) / ||z|| * (W^T - 1) u`` for ``u = (W x - x) / ||W x - x||`` (0 where no change).
    ``T``, ``ids`` and ``cuts`` (per-image cuts, or None) as checked by the forward;
    ``noise=False`` is ``deform``'s.
    """
    _, C, H, W = images.shape
    dtype = _compute_dtype(images)
    key = torch.tensor(seed, dtype=torch.int64, device=images.device)
    std = _image_std(_std(cut, images.device), cuts)
    displacement = _displacement(T, ids, key, std, *_tables(cut, H, W, images.device))
    grad = torch.zeros(images.shape, dtype=dtype, device=images.device)
    if grad_tau is not None:
        grad = grad + _scatter_warp_vjp(grad_tau.to(dtype), displacement, interp)
    if noise and grad_noisy is not None:
        g = grad_noisy.to(dtype)
        grad = grad + g
        if sigma is None:
            clean = images.to(dtype)
            change = _warp_values(clean, displacement, interp) - clean
            norm = change.to(torch.float64).square().sum((1, 2, 3)).sqrt()
            unit = change / torch.where(norm > 0, norm, 1.0).to(dtype)[:, None, None, None]
            z = rng._noise(key, ids, C, H, W).to(dtype)
            z_norm = z.to(torch.float64).square().sum((1, 2, 3)).sqrt()
            a = ((z * g).sum((1, 2, 3)) / z_norm.to(dtype))[:, None, None, None]
            grad = grad + a * (_scatter_warp_vjp(unit, displacement, interp) - unit)
    return grad.to(images.dtype)
