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
