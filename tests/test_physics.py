"""Temperature helpers and the mode disc against design.md section 2, written out by hand."""

import math

import pytest
import torch

from diffeo_engine import physics


def test_temperature_range_formula():
    T_min, T_max = physics.temperature_range(32, 3)
    assert T_min == pytest.approx(1 / (math.pi * 32**2 * math.log(3)))
    assert T_max == pytest.approx(4 / (math.pi**3 * 9 * math.log(3)))


def test_typical_displacement_and_temperature_are_inverse():
    T = physics.typical_temperature(1.7, 5, 28)
    assert physics.typical_displacement(T, 5, 28) == pytest.approx(1.7)
    # T_min gives half a pixel of typical displacement, as the paper defines it
    T_min, _ = physics.temperature_range(28, 5)
    assert physics.typical_displacement(T_min, 5, 28) == pytest.approx(0.5)


def test_mode_mask_is_the_disc():
    cut = 7
    mask = physics.mode_mask(cut)
    for i in range(1, cut + 1):
        for j in range(1, cut + 1):
            assert bool(mask[i - 1, j - 1]) == (math.sqrt(i * i + j * j) < cut + 0.5)


def test_pixel_variance_matches_a_direct_sum():
    T, cut, H, W = 0.3, 4, 5, 6
    var = physics.pixel_variance(T, cut, H, W)
    for y in range(H):
        for x in range(W):
            total = 0.0
            for i in range(1, cut + 1):
                for j in range(1, cut + 1):
                    if i * i + j * j < (cut + 0.5) ** 2:
                        sx = math.sin(i * math.pi * x / (W - 1))
                        sy = math.sin(j * math.pi * y / (H - 1))
                        total += T * sx**2 * sy**2 / (i * i + j * j)
            assert var[y, x].item() == pytest.approx(total, abs=1e-15)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: physics.temperature_range(32, 1), "cut.*log 1 = 0"),
        (lambda: physics.temperature_range(32, 2.5), "cut"),
        (lambda: physics.temperature_range(0, 3), "n"),
        (lambda: physics.typical_displacement(-1.0, 3, 32), "T"),
        (lambda: physics.typical_displacement(float("nan"), 3, 32), "T"),
        (lambda: physics.typical_temperature(-0.5, 3, 32), "delta"),
        (lambda: physics.mode_mask(0), "cut"),
        (lambda: physics.check_T(torch.tensor([0.1, -0.1]), 2, torch.device("cpu")), "T"),
        (lambda: physics.check_T(torch.tensor([0.1, math.inf]), 2, torch.device("cpu")), "T"),
        (lambda: physics.check_T(torch.tensor([1, 2]), 2, torch.device("cpu")), "T"),
        (lambda: physics.check_T(torch.ones(3), 2, torch.device("cpu")), "T"),
    ],
)
def test_bad_parameters(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------- absurd numbers (issue 16)

import warnings  # noqa: E402

import diffeo_engine as de  # noqa: E402

IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(16))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda b: de.deform(IMAGES, 1e30, 3, seed=0, backend=b), ValueError, "T: 1e\\+30 gives"),
        (lambda b: de.deform(IMAGES, 1e39, 3, seed=0, backend=b), ValueError, "T: "),
        (
            lambda b: de.deform(
                IMAGES, torch.tensor(1e39, dtype=torch.float64), 3, seed=0, backend=b
            ),
            ValueError,
            "T: ",
        ),
        (
            lambda b: de.perturb(IMAGES, 0.001, 3, seed=0, noise=1e39, backend=b),
            ValueError,
            "noise: 1e\\+39 overflows float32",
        ),
        (
            lambda b: de.deform(IMAGES, 0.001, 3, seed=0, ids=[0, -1], backend=b),
            ValueError,
            "ids: .*got -1",
        ),
        (
            lambda b: de.deform(IMAGES, 0.001, 3, seed=0, ids=torch.tensor([3, -2]), backend=b),
            ValueError,
            "ids: .*got -2",
        ),
        (
            lambda b: de.deform(IMAGES, 0.001, 3, seed=0, ids=[0, 2**63], backend=b),
            ValueError,
            "ids: expected integers in \\[0, 2\\*\\*63\\)",
        ),
        (
            lambda b: de.deform(IMAGES, 0.001, 3, seed=0, ids=5, backend=b),
            TypeError,
            "ids: expected 2 integers .*got int 5",
        ),
        (
            lambda b: de.deform(IMAGES, 0.001, 3, seed=0, ids=[0.0, 1.0], backend=b),
            TypeError,
            "ids",
        ),
        (lambda b: de.deform(IMAGES, 0.001, 3.0, seed=0, backend=b), TypeError, "cut"),
        (lambda b: de.deform(IMAGES, 0.001, 3, seed=1.0, backend=b), TypeError, "seed"),
        (
            lambda b: de.deform(IMAGES, 0.001, 65, seed=0, backend=b),
            ValueError,
            "cut: expected an integer <= 64 for 16x16 images, got 65 \\(modes beyond cut = 20",
        ),
        (lambda b: de.deform(IMAGES, 0.001, 3000, seed=0, backend=b), ValueError, "cut"),
        (
            lambda b: de.deform(IMAGES.to("meta"), 0.001, 3, seed=0, backend=b),
            ValueError,
            "images: .*meta",
        ),
    ],
)
def test_absurd_numbers_are_refused_naming_the_argument(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


def test_sample_coefficients_refuses_T_that_overflows_instead_of_returning_inf():
    for T in (1e39, torch.tensor([1e39, 0.1], dtype=torch.float64)):
        with pytest.raises(ValueError, match="T: .*overflows float32"):
            de.sample_coefficients(2, 3, T, seed=0)
    finite = de.sample_coefficients(2, 3, torch.tensor([1e30, 0.1], dtype=torch.float64), seed=0)
    assert bool(torch.isfinite(finite).all())  # large but representable: finite


def test_warp_with_a_nan_field_is_a_clear_error():
    field = torch.zeros(2, 2, 16, 16)
    field[1, 0, 3, 4] = math.nan
    with pytest.raises(ValueError, match="displacement: 1 value\\(s\\) are NaN or inf .*image 1"):
        de.warp(IMAGES, field)


def test_a_generator_of_ids_is_read_once_not_consumed_by_validation():
    ids = (i * 7 for i in range(2))
    got = de.deform(IMAGES, 0.001, 3, seed=4, ids=ids)
    assert torch.equal(got, de.deform(IMAGES, 0.001, 3, seed=4, ids=[0, 7]))


def test_T_above_T_max_warns_that_the_image_folds():
    T_max = physics.temperature_range(16, 3)[1]
    with pytest.warns(physics.FoldingWarning, match="above T_max .* folds"):
        de.deform(IMAGES, 2 * T_max, 3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", physics.FoldingWarning)
        de.deform(IMAGES, 0.5 * T_max, 3, seed=0)  # within the range: silent


def test_the_cut_bound_is_where_new_modes_stop():
    """Independent of max_cut's formula: enumerate the modes the grid can tell apart.

    Sine ``i`` on ``n`` pixels ``t = k / (n - 1)`` vanishes for ``i = n - 1`` and equals
    (up to sign) sine ``2(n - 1) - i`` beyond, so the distinct modes are ``i <= n - 2``.
    """
    n = 9
    table = physics.sine_table(n, 3 * n, dtype=torch.float64)
    assert table[:, n - 2].abs().max() < 1e-12  # i = n - 1 vanishes
    for i in range(n, 2 * n - 2):  # i >= n aliases 2(n - 1) - i
        assert torch.allclose(table[:, i - 1].abs(), table[:, 2 * (n - 1) - i - 1].abs())
    for H, W in ((16, 16), (9, 13), (28, 28), (3, 40)):
        distinct = {(i, j) for i in range(1, W - 1) for j in range(1, H - 1)}

        def kept(cut, distinct=distinct):
            return {(i, j) for (i, j) in distinct if math.hypot(i, j) < cut + 0.5}

        bound = physics.max_cut(H, W)
        assert kept(bound) == distinct  # every distinguishable mode is in at max_cut
        assert kept(bound - 1) != distinct  # and one is missing just below it
    with warnings.catch_warnings():
        warnings.simplefilter("error", physics.CutWarning)
        de.deform(IMAGES, 0.0001, physics.max_cut(16, 16), seed=0)  # the bound runs silently
    with pytest.warns(physics.CutWarning, match="cut: 21 is above 20, .* alias"):
        de.deform(IMAGES, 0.0001, 21, seed=0)  # above it: runs (cost bounded), with a warning
    big = torch.rand(1, 1, 60, 60)
    assert physics.max_cut(60, 60) == 82
    with pytest.raises(ValueError, match="cut: expected an integer <= 82 for 60x60 images"):
        de.deform(big, 0.0001, 83, seed=0, backend="torch")


def test_check_device():
    assert physics.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected .*'gpu' \\(did you mean 'cuda'\\?\\)"):
        physics.check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            physics.check_device("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_pixel_in_every_float_dtype(dtype, bad):
    images = torch.rand(4, 3, 5, 6).to(dtype)
    assert physics.check_finite(images) is images
    images[2, 1, 4, 0] = bad
    with pytest.raises(
        ValueError, match=r"images: 1 pixel\(s\) are NaN or inf \(first in image 2\)"
    ):
        physics.check_finite(images)
    assert physics.check_finite(images, allow_nonfinite=True) is images
