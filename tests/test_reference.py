"""The PyTorch reference against independent computations of design.md section 2."""

import math

import pytest
import torch

import diffeo_engine as de
from diffeo_engine import physics, reference

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def random_images(generator, shape, dtype=torch.float32):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)


def loop_warp(image, dx, dy, interp="bilinear"):
    """design.md's formula, one pixel at a time in float64."""
    C, H, W = image.shape
    out = torch.empty(C, H, W, dtype=torch.float64)
    a = image.to(torch.float64)
    for y in range(H):
        for x in range(W):
            px = min(max(x - float(dx[y, x]), 0.0), W - 1.0)
            py = min(max(y - float(dy[y, x]), 0.0), H - 1.0)
            if interp == "nearest":
                out[:, y, x] = a[:, math.floor(py + 0.5), math.floor(px + 0.5)]
                continue
            x0, y0 = math.floor(px), math.floor(py)
            x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
            wx, wy = px - x0, py - y0
            out[:, y, x] = (
                (1 - wy) * (1 - wx) * a[:, y0, x0]
                + (1 - wy) * wx * a[:, y0, x1]
                + wy * (1 - wx) * a[:, y1, x0]
                + wy * wx * a[:, y1, x1]
            )
    return out


@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
@pytest.mark.parametrize(("H", "W"), [(7, 9), (5, 5), (2, 3)])
def test_warp_matches_a_plain_loop(generator, interp, H, W):
    B, C = 3, 2
    images = random_images(generator, (B, C, H, W), torch.float64)
    # displacements of several pixels so that many points clamp at the border
    displacement = 3 * torch.randn(B, 2, H, W, generator=generator, dtype=torch.float64)
    out = reference.warp(images, displacement, interp=interp)
    assert out.dtype == torch.float64
    clamped = 0
    for b in range(B):
        expected = loop_warp(images[b], displacement[b, 0], displacement[b, 1], interp)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)
        xs = torch.arange(W) - displacement[b, 0]
        clamped += int(((xs < 0) | (xs > W - 1)).sum())
    assert clamped > 0


def test_displacement_field_matches_a_double_sum(generator):
    B, cut, H, W = 2, 4, 6, 5
    coeffs = torch.randn(B, 2, cut, cut, generator=generator, dtype=torch.float64)
    field = reference.displacement_field(coeffs, H, W)
    assert field.shape == (B, 2, H, W)
    for b in range(B):
        for s, scale in ((0, W), (1, H)):
            for y in range(H):
                for x in range(W):
                    total = sum(
                        coeffs[b, s, i - 1, j - 1].item()
                        * math.sin(i * math.pi * x / (W - 1))
                        * math.sin(j * math.pi * y / (H - 1))
                        for i in range(1, cut + 1)
                        for j in range(1, cut + 1)
                    )
                    assert field[b, s, y, x].item() == pytest.approx(scale * total, abs=1e-12)


def test_field_law_matches_the_exact_variance():
    T, cut, H, W, n = 0.02, 5, 9, 12, 20000
    coeffs = de.sample_coefficients(n, cut, T, seed=3).to(torch.float64)
    field = reference.displacement_field(coeffs, H, W)
    exact = physics.pixel_variance(T, cut, H, W)
    inside = exact > 0.05 * exact.max()  # away from the border, where the variance vanishes
    for s, scale in ((0, W), (1, H)):
        empirical = field[:, s].var(dim=0) / scale**2
        rel = (empirical[inside] / exact[inside] - 1).abs()
        assert float(rel.max()) < 0.06, float(rel.max())
        assert float(rel.mean()) < 0.02
        assert (
            float(field[:, s].mean(dim=0).abs().max())
            < 5 * math.sqrt(float(exact.max()) / n) * scale
        )
    # the field vanishes on the border
    assert float(field[..., 0, :].abs().max()) < 1e-9
    assert float(field[..., :, -1].abs().max()) < 1e-9


def test_coefficients_outside_the_disc_are_zero_and_carry_the_variance():
    cut, n = 6, 4000
    T = torch.linspace(0.5, 2.0, n)
    coeffs = de.sample_coefficients(n, cut, T, seed=9)
    outside = ~physics.mode_mask(cut)
    assert bool((coeffs[:, :, outside] == 0).all())
    assert bool((coeffs[:, :, ~outside] != 0).all())
    scaled = coeffs.to(torch.float64) / T.to(torch.float64).sqrt()[:, None, None, None]
    var = scaled.var(dim=0).mean(dim=0)
    expected = physics.mode_variances(cut)
    torch.testing.assert_close(var[~outside], expected[~outside], rtol=0.08, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
def test_zero_temperature_is_the_identity_bit_for_bit(generator, dtype, interp):
    images = random_images(generator, (3, 2, 7, 5), dtype)
    out = de.deform(images, 0.0, 4, seed=1, interp=interp, out_dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, images)
    tau_x, noisy = de.perturb(images, 0.0, 4, seed=1, out_dtype=dtype)
    assert torch.equal(tau_x, images) and torch.equal(noisy, images)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_matched_noise_has_the_norm_of_the_change(generator, dtype):
    images = random_images(generator, (5, 3, 11, 13), dtype)
    T = torch.tensor([0.0, 0.001, 0.01, 0.02, 0.05])
    tau_x, noisy = de.perturb(images, T, 5, seed=2, ids=torch.arange(10, 15))
    assert tau_x.dtype == noisy.dtype == torch.float32
    clean = images.to(torch.float32)
    change = (tau_x - clean).flatten(1).norm(dim=1)
    eta = (noisy - clean).flatten(1).norm(dim=1)
    torch.testing.assert_close(eta, change, rtol=1e-5, atol=1e-5)
    assert change[0] == 0 and bool((change[1:] > 0).all())


def test_fixed_sigma_noise(generator):
    images = random_images(generator, (64, 1, 16, 16))
    _, noisy = de.perturb(images, 0.01, 3, seed=2, noise=0.25)
    eta = noisy - images
    assert float(eta.std()) == pytest.approx(0.25, rel=0.02)


def test_uint8_output_rounds_and_saturates(generator):
    images = random_images(generator, (4, 3, 9, 9), torch.uint8)
    as_float = de.deform(images, 0.02, 3, seed=4)
    as_uint8 = de.deform(images, 0.02, 3, seed=4, out_dtype=torch.uint8)
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(as_uint8, torch.floor(as_float + 0.5).clamp(0, 255).to(torch.uint8))
    _, noisy = de.perturb(images, 0.02, 3, seed=4, noise=300.0, out_dtype=torch.uint8)
    assert int(noisy.min()) == 0 and int(noisy.max()) == 255


def test_same_seed_and_id_give_the_same_image_in_any_batch(generator):
    images = random_images(generator, (6, 2, 10, 8))
    full = de.perturb(images, 0.03, 4, seed=5, ids=torch.arange(100, 106))
    for part in ([4], [5, 0, 2], [3, 1]):
        index = torch.tensor(part)
        sub = de.perturb(images[index], 0.03, 4, seed=5, ids=100 + index)
        for got, want in zip(sub, full):
            assert torch.equal(got, want[index])


def test_different_ids_or_seeds_give_different_fields():
    a = de.sample_coefficients(2, 3, 1.0, seed=1, ids=torch.tensor([0, 1]))
    assert not torch.equal(a[0], a[1])
    b = de.sample_coefficients(2, 3, 1.0, seed=2, ids=torch.tensor([0, 1]))
    assert not torch.equal(a, b)


def test_a_mode_keeps_its_coefficient_when_cut_grows():
    small = de.sample_coefficients(3, 3, 1.0, seed=8)
    large = de.sample_coefficients(3, 9, 1.0, seed=8)
    mask = physics.mode_mask(3)
    assert torch.equal(small[:, :, mask], large[:, :, :3, :3][:, :, mask])


def test_channels_last_and_rectangular_images(generator):
    images = random_images(generator, (2, 3, 6, 11))
    cl = images.contiguous(memory_format=torch.channels_last)
    out = de.deform(cl, 0.05, 3, seed=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, de.deform(images, 0.05, 3, seed=1))


def test_empty_batch_returns_empty():
    images = torch.rand(0, 3, 8, 8)
    assert de.deform(images, 0.1, 3, seed=0).shape == (0, 3, 8, 8)
    tau_x, noisy = de.perturb(images, 0.1, 3, seed=0)
    assert tau_x.shape == noisy.shape == (0, 3, 8, 8)


IMAGES = torch.rand(2, 1, 5, 5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: de.deform(torch.rand(5, 5), 0.1, 3, seed=0), "images.*shape"),
        (lambda: de.deform(torch.rand(2, 1, 1, 5), 0.1, 3, seed=0), "images.*H >= 2"),
        (lambda: de.deform(torch.zeros(2, 1, 5, 5, dtype=torch.int32), 0.1, 3, seed=0), "uint8"),
        (lambda: de.deform([[1.0]], 0.1, 3, seed=0), "images"),
        (lambda: de.warp(IMAGES, torch.zeros(2, 2, 5, 4)), "displacement.*shape"),
        (lambda: de.warp(IMAGES, torch.zeros(2, 2, 5, 5, dtype=torch.int64)), "displacement"),
        (lambda: de.warp(IMAGES, torch.zeros(2, 2, 5, 5), interp="cubic"), "interp"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=0, ids=torch.arange(3)), "ids.*shape"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=0, ids=torch.tensor([0.0, 1.0])), "ids.*dtype"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=-1), "seed"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=2**63), "seed"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=1.0), "seed"),
        (lambda: de.deform(IMAGES, float("nan"), 3, seed=0), "T"),
        (lambda: de.deform(IMAGES, float("inf"), 3, seed=0), "T"),
        (lambda: de.deform(IMAGES, -0.1, 3, seed=0), "T"),
        (lambda: de.deform(IMAGES, torch.tensor([0.1, float("nan")]), 3, seed=0), "T"),
        (lambda: de.deform(IMAGES, 0.1, 0, seed=0), "cut"),
        (lambda: de.deform(IMAGES, 0.1, 2.0, seed=0), "cut"),
        (lambda: de.perturb(IMAGES, 0.1, 3, seed=0, noise="loud"), "noise"),
        (lambda: de.perturb(IMAGES, 0.1, 3, seed=0, noise=-1.0), "noise"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=0, out_dtype=torch.int16), "out_dtype"),
        (lambda: de.deform(IMAGES, 0.1, 3, seed=0, backend="cuda"), "backend"),
        (lambda: de.sample_coefficients(-1, 3, 0.1, seed=0), "n_images"),
        (lambda: de.displacement_field(torch.zeros(2, 3, 4, 4), 5, 5), "coeffs"),
        (lambda: de.displacement_field(torch.zeros(2, 2, 4, 4), 1, 5), "H"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_devices_that_differ_raise():
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="ids.*device"):
        de.deform(IMAGES, 0.1, 3, seed=0, ids=torch.arange(2, device=meta))
    with pytest.raises(ValueError, match="T.*device"):
        de.deform(IMAGES, torch.full((2,), 0.1, device=meta), 3, seed=0)
    with pytest.raises(ValueError, match="displacement.*device"):
        de.warp(IMAGES, torch.zeros(2, 2, 5, 5, device=meta))
