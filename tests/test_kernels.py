"""The Triton kernels against the PyTorch reference, image for image.

Both draw from the same Philox streams, so for the same ``(seed, ids)`` they must give the
same images to float tolerance. Without CUDA the kernels run under ``TRITON_INTERPRET=1``
(conftest), on small shapes; ``gpu`` tests cover large batches on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from diffeo_engine import reference, rng
from diffeo_engine.kernels import _philox
from diffeo_engine.kernels import perturb as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 20211206

# One ulp of the output dtype, relative to the value: kernel and reference round the same
# float32 value, which differs by ~1e-6 between them (other summation order in the field and
# the norms), so a value next to a rounding boundary of a narrow dtype may land one ulp away.
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_images(shape, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    x = x.to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def run_kernels(images, T, ids, cut, *, noise="matched", interp="bilinear", out_dtype=None, G=None):
    """Launch into poisoned buffers and check that every element was written.

    Float outputs start as NaN; uint8 outputs are run twice, from 0xAB and from 0x00, and
    must agree (an element left unwritten would keep its poison).
    """
    out_dtype = out_dtype or (torch.float32 if images.dtype == torch.uint8 else images.dtype)
    poisons = [0xAB, 0x00] if out_dtype == torch.uint8 else [float("nan")]
    results = []
    for poison in poisons:
        fmt = reference.memory_format_of(images)
        bufs = [
            torch.full_like(images, poison, dtype=out_dtype, memory_format=fmt)
            for _ in range(2 if noise is not None else 1)
        ]
        tau, noisy, _ = kernels.perturb(
            images, T, ids, cut=cut, seed=SEED, noise=noise, interp=interp,
            out_dtype=out_dtype, out=(bufs[0], bufs[1] if noise is not None else None),
            programs_per_image=G,
        )  # fmt: skip
        assert tau is bufs[0]
        outs = [tau] if noisy is None else [tau, noisy]
        for out in outs:
            assert out.stride() == images.contiguous(memory_format=fmt).stride()
            if out.is_floating_point():
                assert not out.isnan().any(), "an output element was not written"
        results.append(outs)
    for first, second in zip(results[0], results[-1]):
        assert torch.equal(first, second), "an output element was not written"
    return results[0]


def assert_agrees(out, ref, value_range):
    """float: |diff| < 1e-4 of the range (+ one output ulp); uint8: off by at most one level."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.uint8:
        assert (out.int() - ref.int()).abs().max() <= 1
        return
    ulp = ULP[ref.dtype]
    out, ref = out.float(), ref.float()
    tol = 1e-4 * value_range + ulp * ref.abs()
    err = (out - ref).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


def boundary_pixels(images, T, cut, ids, eps=1e-4):
    """Pixels whose clamped sampled point lies within ``eps`` of a rounding boundary."""
    B, _, H, W = images.shape
    coeffs = reference.sample_coefficients(B, cut, T, seed=SEED, ids=ids, device=images.device)
    d = reference.displacement_field(coeffs, H, W)
    xs = (torch.arange(W, device=d.device) - d[:, 0]).clamp(0, W - 1) + 0.5
    ys = (torch.arange(H, device=d.device)[:, None] - d[:, 1]).clamp(0, H - 1) + 0.5
    near = ((xs - xs.round()).abs() < eps) | ((ys - ys.round()).abs() < eps)
    return near[:, None]  # (B, 1, H, W)


def check_case(shape, dtype, layout, cut, interp, noise, *, out_dtype=None, T=None, G=None):
    images = make_images(shape, dtype, layout)
    B = shape[0]
    if T is None:
        T = torch.linspace(0.5, 1.5, B) * 4 / (math.pi**3 * cut**2 * max(math.log(cut), 0.5))
    T = T.to(DEVICE)
    ids = (torch.arange(B) * 7919 - 3 + (1 << 40)).to(DEVICE)  # non-default, above 2**32
    outs = run_kernels(images, T, ids, cut, noise=noise, interp=interp, out_dtype=out_dtype, G=G)
    kwargs = dict(seed=SEED, ids=ids, interp=interp, out_dtype=out_dtype)
    if noise is None:
        refs = [reference.deform(images, T, cut, **kwargs)]
    else:
        refs = list(reference.perturb(images, T, cut, noise=noise, **kwargs))
    value_range = 255.0 if dtype == torch.uint8 else 1.0
    if interp == "nearest":
        near = boundary_pixels(images, T, cut, ids)
        exact = ~near.expand_as(refs[0])
        assert torch.equal(outs[0][exact], refs[0][exact])
        if noise is not None and not near.any():
            assert_agrees(outs[1], refs[1], value_range)
        elif noise is not None and outs[1].dtype == torch.float32:
            # a pixel sampled on the other side of a rounding boundary changes the matched
            # norm, not the noise direction
            eta = (outs[1] - images.float()).flatten(1)
            eta_ref = (refs[1] - images.float()).flatten(1)
            unit = eta / eta.norm(dim=1, keepdim=True)
            unit_ref = eta_ref / eta_ref.norm(dim=1, keepdim=True)
            torch.testing.assert_close(unit, unit_ref, atol=1e-4, rtol=0)
    else:
        for out, ref in zip(outs, refs):
            assert_agrees(out, ref, value_range)
    if noise == "matched" and outs[0].dtype == torch.float32:
        change = (outs[0] - images.float()).flatten(1).norm(dim=1)
        eta = (outs[1] - images.float()).flatten(1).norm(dim=1)
        torch.testing.assert_close(eta, change, rtol=1e-4, atol=1e-6 * value_range)
        if min(shape[-2:]) > 2:  # on a 2x2 image every pixel is on the border: no motion
            assert (change > 0).all()


# ------------------------------------------------------------------- the Philox twin


@triton.jit
def _draws_kernel(coef_ptr, noise_ptr, ids_ptr, std_ptr, seed, C, H, W,
                  CP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                  FAST: tl.constexpr = False):  # fmt: skip
    b = tl.program_id(0)
    id_lo, id_hi = _philox.id_words(ids_ptr, b)
    k = tl.arange(0, CP)
    ct = _philox.coefficients_t(seed, _philox.COEFF_STREAM_DY, id_lo, id_hi, std_ptr, 1.0, CP)
    tl.store(coef_ptr + b * CP * CP + k[:, None] * CP + k[None, :], ct)
    ys = tl.arange(0, BH)[:, None, None]
    xs = 4 * tl.arange(0, BW // 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    for c in range(C):
        z = _philox.noise_tile(seed, id_lo, id_hi, c, H, ys, 0, BW, FAST)
        tl.store(noise_ptr + ((b * C + c) * H + ys) * W + xs, z, mask=(ys < H) & (xs < W))


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345])
def test_philox_draws_match_rng(seed):
    """Coefficient and noise normals drawn in a kernel are the rng module's, lane by lane."""
    ids = torch.tensor([0, 3, -1, (1 << 33) + 5], device=DEVICE)
    B, C, H, W, CP = 4, 2, 5, 13, 16
    std = torch.ones(CP, CP, device=DEVICE)
    coef = torch.full((B, CP, CP), float("nan"), device=DEVICE)
    noise = torch.full((B, C, H, W), float("nan"), device=DEVICE)
    _draws_kernel[(B,)](coef, noise, ids, std, seed, C, H, W, CP=CP, BH=8, BW=16)
    normals = rng.coefficient_normals(seed, ids, CP)[:, rng.COEFF_STREAM_DY]
    torch.testing.assert_close(coef.transpose(1, 2), normals, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(noise, rng.noise_normals(seed, ids, (C, H, W)), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_fast_noise_is_within_its_stated_tolerance_on_gpu():
    """Compiled kernels draw the noise with the special-function unit's log/cos/sin: the
    same words, normals within 1e-5 of the accurate ones (the bound the docs state), small
    radii (u1 near 1) included."""
    ids = torch.arange(64, device=DEVICE) * 7919
    B, C, H, W, CP = 64, 3, 32, 32, 16
    std = torch.ones(CP, CP, device=DEVICE)
    coef = torch.empty((B, CP, CP), device=DEVICE)
    noise = torch.full((B, C, H, W), float("nan"), device=DEVICE)
    _draws_kernel[(B,)](coef, noise, ids, std, 5, C, H, W, CP=CP, BH=32, BW=32, FAST=True)
    exact = rng.noise_normals(5, ids, (C, H, W))
    assert (noise - exact).abs().max().item() <= 1e-5


# ------------------------------------------------------------- agreement with reference


@pytest.mark.parametrize(
    "shape, dtype, layout, cut, interp, noise, out_dtype, G",
    [
        ((1, 1, 2, 2), torch.float32, "contiguous", 1, "bilinear", "matched", None, None),
        ((3, 3, 17, 23), torch.uint8, "contiguous", 3, "bilinear", "matched", None, None),
        ((3, 3, 17, 23), torch.uint8, "channels_last", 3, "bilinear", 0.1, torch.uint8, None),
        ((2, 5, 32, 32), torch.float16, "channels_last", 15, "bilinear", "matched", None, None),
        ((2, 5, 32, 32), torch.bfloat16, "contiguous", 32, "bilinear", 0.05, None, None),
        ((1, 3, 40, 24), torch.float32, "channels_last", 32, "nearest", "matched", None, 2),
        ((1, 3, 40, 24), torch.float32, "contiguous", 15, "bilinear", None, None, 2),
        ((3, 3, 17, 23), torch.float32, "contiguous", 3, "nearest", None, None, None),
    ],
)
def test_kernels_match_reference(shape, dtype, layout, cut, interp, noise, out_dtype, G):
    check_case(shape, dtype, layout, cut, interp, noise, out_dtype=out_dtype, G=G)


def test_split_matched_noise_over_uneven_tile_groups():
    """Matched noise with partial norms summed across 4 tile groups of 3x3 tiles."""
    check_case((2, 1, 40, 130), torch.float32, "contiguous", 5, "bilinear", "matched", G=4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_zero_temperature_is_identity_bit_for_bit(dtype):
    images = make_images((2, 3, 17, 23), dtype, "channels_last")
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    T = torch.zeros(2, device=DEVICE)
    ids = torch.arange(2, device=DEVICE)
    tau, noisy = run_kernels(images, T, ids, 7, noise="matched")
    assert torch.equal(tau, images.to(out_dtype))
    assert torch.equal(noisy, images.to(out_dtype))  # ||tau x - x|| = 0: no noise


def test_noise_lanes_do_not_depend_on_tiling():
    """Forcing several tile groups gives the same images as one program per image."""
    images = make_images((1, 2, 40, 70), torch.float32)
    T, ids = torch.tensor([0.01], device=DEVICE), torch.tensor([9], device=DEVICE)
    one = run_kernels(images, T, ids, 4, noise=0.2, G=1)
    many = run_kernels(images, T, ids, 4, noise=0.2, G=3)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (3, 2, 40, 70)])
def test_an_image_does_not_depend_on_its_batch(shape):
    """Matched noise, whole-image and tiled: each image of a batch equals, bit for bit, the
    same image perturbed alone (the norms are summed in a fixed order whatever B is)."""
    images = make_images(shape, torch.float32)
    T = torch.tensor([0.01, 0.02, 0.005], device=DEVICE)
    ids = torch.tensor([3, 1 << 35, 77], device=DEVICE)
    tau, noisy = run_kernels(images, T, ids, 5)
    for b in range(shape[0]):
        one = run_kernels(images[b : b + 1].clone(), T[b : b + 1], ids[b : b + 1], 5)
        assert torch.equal(one[0][0], tau[b]) and torch.equal(one[1][0], noisy[b])


def test_out_buffers_overlapping_the_input_are_refused():
    images = make_images((2, 3, 8, 8), torch.float32)
    T, ids = torch.full((2,), 0.01, device=DEVICE), torch.arange(2, device=DEVICE)
    kw = dict(cut=3, seed=SEED, noise="matched", interp="bilinear", out_dtype=torch.float32)
    other = torch.empty_like(images)
    with pytest.raises(ValueError, match=r"out\[0\].*overlap the images"):
        kernels.perturb(images, T, ids, out=(images, other), **kw)
    with pytest.raises(ValueError, match=r"out\[1\].*overlap the images"):
        kernels.perturb(images, T, ids, out=(other, images[:, :, :, :].view_as(images)), **kw)
    wide = torch.empty((2, 3, 8, 16), device=DEVICE)
    with pytest.raises(ValueError, match="overlap each other"):
        kernels.perturb(images, T, ids, out=(wide[..., :8], wide[..., 1:9]), **kw)
    pair = torch.empty((2, 2, 3, 8, 8), device=DEVICE)  # one allocation, disjoint halves
    tau, noisy, _ = kernels.perturb(images, T, ids, out=(pair[0], pair[1]), **kw)
    assert torch.isfinite(tau).all() and torch.isfinite(noisy).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_match_reference_sweep(dtype, layout):
    """Every dtype and layout over the shapes, cuts and modes of the test matrix."""
    cases = [
        ((1, 1, 2, 2), 1, "nearest", 0.3),
        ((3, 3, 17, 23), 3, "bilinear", None),
        ((2, 5, 32, 32), 15, "bilinear", "matched"),
        ((1, 3, 40, 24), 32, "bilinear", "matched"),
    ]
    for shape, cut, interp, noise in cases:
        check_case(shape, dtype, layout, cut, interp, noise)
    if dtype == torch.uint8:
        check_case((3, 3, 17, 23), dtype, layout, 3, "bilinear", "matched", out_dtype=dtype)


# -------------------------------------------------------------------------- bad input


def test_limits_raise_clear_errors():
    images = make_images((1, 1, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="cut"):
        kernels.check_launchable(images, kernels.MAX_CUT + 1)
    with pytest.raises(TypeError, match="float64"):
        kernels.check_launchable(images.double(), 3)
    huge = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(1, 2, 2**15, 2**15)
    with pytest.raises(ValueError, match=r"C\*H\*W < 2\*\*31"):
        kernels.check_launchable(huge, 3)
    kernels.check_launchable(images, kernels.MAX_CUT)


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, W", [(4096, 32, 32), (64, 224, 224)])
def test_large_batches_on_gpu(B, H, W):
    images = make_images((B, 3, H, W), torch.float32)
    T = torch.full((B,), 4 / (math.pi**3 * 25 * math.log(5)), device=DEVICE)
    ids = torch.arange(B, device=DEVICE) + 10**6
    tau, noisy = run_kernels(images, T, ids, 5, noise="matched")
    ref_tau, ref_noisy = reference.perturb(images, T, 5, seed=SEED, ids=ids)
    assert_agrees(tau, ref_tau, 1.0)
    assert_agrees(noisy, ref_noisy, 1.0)
    change = (tau - images).flatten(1).norm(dim=1)
    torch.testing.assert_close((noisy - images).flatten(1).norm(dim=1), change, rtol=1e-4, atol=0)
