"""``cut`` per image (issue 22): each image keeps its own disc of modes, whatever the others
of its batch; on every backend an image's output equals a single-image call's."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffeo_engine as de
from diffeo_engine import ops, physics, reference

CUTS = [3, 1, 7, 5, 3, 2]
T = [0.004, 0.01, 0.002, 0.003, 0.0, 0.008]
IDS = [11, 2**40 + 3, 7, 0, 5, 123456]


def images_for(dtype=torch.float32, shape=(6, 3, 13, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


def test_coefficients_keep_each_image_disc_and_its_draws():
    cuts = torch.tensor(CUTS)
    coeffs = de.sample_coefficients(6, cuts, torch.tensor(T), seed=4, ids=IDS)
    assert coeffs.shape == (6, 2, 7, 7)
    for b, cut in enumerate(CUTS):
        own = de.sample_coefficients(1, cut, T[b], seed=4, ids=[IDS[b]])[0]
        assert torch.equal(coeffs[b, :, :cut, :cut], own)
        k = torch.arange(1, 8)
        outside = (k[:, None] ** 2 + k[None, :] ** 2) >= (cut + 0.5) ** 2
        assert torch.all(coeffs[b][:, outside] == 0)
        if T[b] > 0 and cut > 1:
            assert torch.all(coeffs[b][:, ~outside] != 0)


def test_image_mode_masks_against_the_disc_formula():
    cuts = torch.tensor([1, 2, 3, 8, 15])
    masks = physics.image_mode_masks(cuts, 15)
    for b, cut in enumerate(cuts.tolist()):
        padded = torch.zeros(15, 15, dtype=torch.bool)
        padded[:cut, :cut] = physics.mode_mask(cut)
        assert torch.equal(masks[b], padded)


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("noise", ["matched", 0.05, None])
def test_mixed_cuts_equal_single_image_calls(backend, noise):
    x = images_for()
    cuts = torch.tensor(CUTS)
    if noise is None:
        batch = ops.deform(x, torch.tensor(T), cuts, seed=9, ids=IDS, backend=backend)
        batch = (batch,)
    else:
        batch = ops.perturb(x, torch.tensor(T), cuts, seed=9, ids=IDS, noise=noise, backend=backend)
    for b, cut in enumerate(CUTS):
        kw = dict(seed=9, ids=[IDS[b]], backend=backend)
        if noise is None:
            single = (ops.deform(x[b : b + 1], T[b], cut, **kw),)
        else:
            single = ops.perturb(x[b : b + 1], T[b], cut, noise=noise, **kw)
        for got, want in zip(batch, single):
            assert torch.equal(got[b : b + 1], want), (b, cut)
    if backend != "torch":  # and every backend agrees with the reference
        kw = dict(seed=9, ids=IDS, backend="torch")
        if noise is None:
            want = (reference.deform(x, torch.tensor(T), cuts, seed=9, ids=IDS),)
        else:
            want = reference.perturb(x, torch.tensor(T), cuts, noise=noise, seed=9, ids=IDS)
        for got, ref in zip(batch, want):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_zero_T_image_of_a_mixed_batch_is_the_identity_bit_for_bit():
    x = images_for()
    out = ops.deform(x, torch.tensor(T), torch.tensor(CUTS), seed=1, ids=IDS)
    assert torch.equal(out[4], x[4])  # T = 0
    assert not torch.equal(out[1], x[1])  # cut 1 keeps mode (1, 1): the image moves


def test_cut_one_keeps_mode_one_one():
    # sqrt(1 + 1) < 1.5: the disc of cut 1 holds mode (1, 1), so the image does move
    coeffs = de.sample_coefficients(1, torch.tensor([1]), 0.01, seed=0)
    assert coeffs.shape == (1, 2, 1, 1) and torch.all(coeffs != 0)


def test_bad_per_image_cuts_are_refused_naming_cut():
    x = images_for()
    with pytest.raises(TypeError, match="cut: expected an integer"):
        ops.deform(x, 0.01, torch.tensor([3.0] * 6), seed=0)
    with pytest.raises(
        ValueError, match=r"cut: expected an integer or one per image, shape \(6,\)"
    ):
        ops.deform(x, 0.01, torch.tensor([3, 4]), seed=0)
    with pytest.raises(ValueError, match="cut: expected an integer >= 1"):
        ops.deform(x, 0.01, torch.tensor([3, 0, 3, 3, 3, 3]), seed=0)
    with pytest.raises(TypeError, match="cut"):
        ops.deform(x, 0.01, [3, 2.5, 3, 3, 3, 3], seed=0)
    # a list of integers is one per image too
    assert torch.equal(
        ops.deform(x, 0.01, CUTS, seed=0, ids=IDS),
        ops.deform(x, 0.01, torch.tensor(CUTS), seed=0, ids=IDS),
    )


def test_folding_is_judged_per_image():
    x = images_for(shape=(2, 1, 32, 32))
    T_max_3 = de.temperature_range(32, 3)[1]
    T_max_9 = de.temperature_range(32, 9)[1]
    T_between = 0.5 * (T_max_3 + T_max_9)  # below T_max at cut 3, above it at cut 9
    assert T_max_9 < T_between < T_max_3
    with pytest.warns(physics.FoldingWarning, match="image 1"):
        ops.deform(x, T_between, torch.tensor([3, 9]), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", physics.FoldingWarning)
        ops.deform(x, T_between, torch.tensor([3, 3]), seed=0)
