"""Hostile and careless calls of the Python API (issue 23, items 4 and 5): absurd sizes under
a memory limit, NumPy integers, uint64 ids, devices that are not there, temperatures and
sizes at the edge of the float range, unit-scale floats asked for as uint8, empty sweeps,
empty arrays, warps that overflow. Each test builds its hostile cases from scratch and walks
the whole class (every public entry point that takes the argument), comparing what is
accepted with an independent computation.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import diffeo_engine as de
from diffeo_engine import physics
from diffeo_engine.data.sources import open_source, parse_resize
from diffeo_engine.pictures import load_image
from diffeo_engine.sensitivity.meter import SensitivityMeter

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
NO_CUDA = not torch.cuda.is_available()


def smooth_images(shape, dtype=torch.float32, seed=0, scale=255.0):
    """Smooth random images in ``[0, scale]`` (bilinear upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    coarse = torch.rand(B, C, max(2, H // 3), max(2, W // 3), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear")
    return (fine * scale).to(dtype)


# ---------------------------------------------------------------- absurd sizes (item 5)

# Each line: (label, the argument the error must name, a call). They run in one child
# process whose address space is limited (RLIMIT_AS): an estimate that failed would end in
# a MemoryError, an allocator RuntimeError or a killed process, never in swapping here.
# "mid" sizes (outputs of 12-40 GB) fit many machines' RAM but not the limit: the limit
# itself is read, not only the physical memory.
HOSTILE_SIZES = r"""
import json, resource, sys, warnings
LIMIT = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
import torch
import diffeo_engine as de
from diffeo_engine import physics, reference
from diffeo_engine.pictures import load_image, perturbation_figure
from diffeo_engine.sensitivity.meter import SensitivityMeter
warnings.simplefilter("ignore")

def wide(*shape):  # a huge tensor that takes no memory (stride 0)
    return torch.zeros((1,) * len(shape)).expand(*shape)

side = 2**20
cases = {
    "deform": ("images", lambda: de.deform(wide(1, 1, side, side), 1e-3, 3, seed=0)),
    "deform mid": ("images", lambda: de.deform(wide(1, 3, 2**15, 2**15), 1e-3, 3, seed=0)),
    "deform uint8 mid": ("images", lambda: de.deform(
        torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(4, 3, 2**15, 2**15), 1e-3, 3, seed=0)),
    "deform torch": ("images", lambda: de.deform(
        wide(1, 1, side, side), 1e-3, 3, seed=0, backend="torch")),
    "deform cpu": ("images", lambda: de.deform(
        wide(1, 1, side, side), 1e-3, 3, seed=0, backend="cpu")),
    "perturb": ("images", lambda: de.perturb(wide(2**30, 3, 32, 32), 1e-3, 3, seed=0)),
    "perturb torch": ("images", lambda: de.perturb(
        wide(1, 1, side, side), 1e-3, 3, seed=0, backend="torch")),
    "perturb uint8 out": ("images", lambda: de.perturb(
        wide(1, 1, side, side), 1e-3, 3, seed=0, out_dtype=torch.uint8)),
    "warp": ("images", lambda: de.warp(wide(1, 1, side, side), wide(1, 2, side, side))),
    "sample_coefficients cut": ("cut", lambda: de.sample_coefficients(1, 65536, 0.01, seed=0)),
    "sample_coefficients n": ("n_images", lambda: de.sample_coefficients(2**40, 3, 1e-3, seed=0)),
    "displacement_field": ("H, W", lambda: de.displacement_field(
        torch.zeros(1, 2, 3, 3), side, side)),
    "displacement_field batch": ("H, W", lambda: de.displacement_field(
        wide(2**24, 2, 3, 3), 64, 64)),
    "pixel_variance": ("H, W", lambda: physics.pixel_variance(1e-3, 3, side, side)),
    "pixel_variance cut": ("cut", lambda: physics.pixel_variance(1e-3, 60000, 4, 4)),
    "mode_mask": ("cut", lambda: physics.mode_mask(side)),
    "mode_variances": ("cut", lambda: physics.mode_variances(side)),
    "sine_table": ("n", lambda: physics.sine_table(2**40, 3)),
    "sine_table cut": ("cut", lambda: physics.sine_table(8, 2**38)),
    "Diffeo": ("images", lambda: de.Diffeo(1e-3, 3, seed=0)(wide(1, side, side))),
    "DiffeoPair": ("images", lambda: de.DiffeoPair(1e-3, 3, seed=0)(wide(1, 1, side, side))),
    "meter": ("images", lambda: SensitivityMeter(
        torch.nn.Identity(), T=1e-3, cut=3).update(wide(1, 1, side, side))),
    "figure": ("image", lambda: perturbation_figure(wide(1, side, side))),
    "load_image": ("resize", lambda: load_image(sys.argv[2], resize=(side, side))),
}
out = {}
for label, (name, call) in cases.items():
    try:
        call()
        out[label] = [name, "returned", ""]
    except BaseException as error:
        out[label] = [name, type(error).__name__, str(error)]
print(json.dumps(out))
"""


def test_absurd_sizes_are_refused_by_name_under_a_memory_limit(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 8, 8), np.uint8))
    limit = 8 << 30  # torch, numba and matplotlib import well within it
    done = subprocess.run(
        [sys.executable, "-c", HOSTILE_SIZES, str(limit), str(tmp_path / "one.npy")],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) >= 20
    for label, (name, kind, message) in results.items():
        assert kind == "ValueError", (label, kind, message)
        assert message.startswith(f"{name}: "), (label, message)
        assert "\n" not in message and " GB of memory" in message, (label, message)
        needed = float(message.split(" take about ")[1].split(" GB")[0].replace(",", ""))
        assert needed * 1e9 > limit - (1 << 30), (label, message)  # an honest estimate


def test_memory_estimates_grow_with_what_is_asked_and_small_calls_read_nothing(monkeypatch):
    """The estimate covers the outputs (independently: numel x itemsize x outputs) plus the
    path's temporaries; calls below the floor never look at the machine."""
    shape = (64, 3, 32, 32)
    outputs = 2 * math.prod(shape) * 4
    for path in ("triton", "cpu", "torch"):
        nbytes = physics.perturbation_bytes(shape, torch.float32, outputs=2, path=path)
        assert nbytes >= outputs
        assert (
            physics.perturbation_bytes((128, 3, 32, 32), torch.float32, outputs=2, path=path)
            > nbytes
        )
    assert physics.perturbation_bytes(shape, torch.uint8, outputs=1, path="triton") == (
        math.prod(shape)
    )
    read = []
    monkeypatch.setattr(physics, "memory_limit", lambda device=None: read.append(1) or (0, "x"))
    de.deform(smooth_images((4, 3, 16, 16)), 1e-3, 3, seed=0)
    physics.check_memory("x", physics.MEMORY_CHECK_FLOOR, "cpu", what="a small thing")
    assert read == []
    with pytest.raises(ValueError, match=r"^x: a big thing would take about 0.537 GB"):
        physics.check_memory("x", 2 * physics.MEMORY_CHECK_FLOOR, "cpu", what="a big thing")


def test_the_memory_limit_is_the_machine_or_less():
    limit, what = physics.memory_limit("cpu")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < limit <= physical and "GB" in what
    assert physics.memory_limit("meta") is None


# -------------------------------------------------------------- NumPy integers (item 5)


def _pairs():
    """(label, call with Python numbers, the same call with NumPy scalars)."""
    x = smooth_images((2, 3, 10, 9))
    coeffs = de.sample_coefficients(2, 3, 0.01, seed=4)
    field = de.displacement_field(coeffs, 10, 9)
    i64, i32, f32 = np.int64, np.int32, np.float32
    return [
        ("temperature_range", lambda: de.temperature_range(32, 3),
         lambda: de.temperature_range(i64(32), i32(3))),
        ("typical_displacement", lambda: de.typical_displacement(0.5, 3, 32),
         lambda: de.typical_displacement(np.float64(0.5), i64(3), i32(32))),
        ("typical_temperature", lambda: de.typical_temperature(1.0, 3, 28),
         lambda: de.typical_temperature(i64(1), i32(3), i64(28))),
        ("max_cut", lambda: physics.max_cut(28, 28), lambda: physics.max_cut(i64(28), i32(28))),
        ("sample_coefficients", lambda: de.sample_coefficients(2, 3, 0.01, seed=7, ids=[5, 9]),
         lambda: de.sample_coefficients(i64(2), i32(3), f32(0.01), seed=i64(7),
                                        ids=np.array([5, 9], dtype=np.int64))),
        ("displacement_field", lambda: de.displacement_field(coeffs, 10, 9),
         lambda: de.displacement_field(coeffs, i64(10), i32(9))),
        ("warp", lambda: de.warp(x, field, interp="nearest"),
         lambda: de.warp(x, de.displacement_field(coeffs, i64(10), i64(9)), interp="nearest")),
        ("deform", lambda: de.deform(x, 0.01, 3, seed=1, ids=[3, 4]),
         lambda: de.deform(x, np.float64(0.01), i64(3), seed=i32(1), ids=[i64(3), i32(4)])),
        ("deform torch", lambda: de.deform(x, 0.01, 3, seed=1, backend="torch"),
         lambda: de.deform(x, 0.01, [i64(3), i64(3)], seed=i64(1), backend="torch")),
        ("perturb sigma", lambda: de.perturb(x, 0.01, 3, seed=2, noise=2.0),
         lambda: de.perturb(x, 0.01, i64(3), seed=i64(2), noise=i64(2))),
        ("perturb sigma float32", lambda: de.perturb(x, 0.01, 3, seed=2, noise=0.5),
         lambda: de.perturb(x, 0.01, 3, seed=2, noise=f32(0.5))),
        ("pixel_variance", lambda: physics.pixel_variance(0.01, 3, 10, 9),
         lambda: physics.pixel_variance(np.float64(0.01), i64(3), i32(10), i64(9))),
        ("mode_mask", lambda: physics.mode_mask(5), lambda: physics.mode_mask(i32(5))),
        ("mode_variances", lambda: physics.mode_variances(5),
         lambda: physics.mode_variances(i64(5))),
        ("sine_table", lambda: physics.sine_table(8, 3),
         lambda: physics.sine_table(i64(8), i32(3))),
        ("Diffeo", lambda: de.Diffeo(0.01, 3, seed=0)(x),
         lambda: de.Diffeo(np.float64(0.01), i64(3), seed=i64(0))(x)),
        ("parse_resize", lambda: parse_resize((8, 6)), lambda: parse_resize((i64(8), i32(6)))),
    ]  # fmt: skip


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    ("label", "plain", "numpy"), _pairs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_numpy_scalars_are_accepted_wherever_python_numbers_are(label, plain, numpy):
    assert _same(plain(), numpy()), label


def test_numpy_integers_in_the_meter_and_the_sources(tmp_path):
    x = smooth_images((6, 1, 12, 12))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4))

    def measure(start=0, **kw):
        with SensitivityMeter(model, T=0.01, **kw) as meter:
            meter.update(x[:3], start=start)
            meter.update(x[3:])
            return [(r.name, r.D, r.G) for r in meter.compute().layers]

    plain = measure(cut=3, seed=1, perturbations_per_image=2, error_groups=3)
    numpy = measure(cut=np.int64(3), seed=np.int64(1), perturbations_per_image=np.int32(2),
                    error_groups=np.int64(3), start=np.int64(0))  # fmt: skip
    assert plain == numpy
    np.save(tmp_path / "x.npy", (x[:, 0] * 1).to(torch.uint8).numpy())
    source = open_source(tmp_path / "x.npy")
    assert torch.equal(source.batch(np.int64(1), np.int32(3)), source.batch(1, 3))
    assert torch.equal(
        load_image(str(tmp_path / "x.npy"), index=np.int64(2)), source.batch(2, 3)[0]
    )


def test_numpy_booleans_and_floats_are_not_integers():
    x = smooth_images((1, 1, 8, 8))
    for bad in (np.bool_(True), np.float64(3.0), 3.0, True):
        with pytest.raises(TypeError, match="^cut: expected an integer"):
            de.deform(x, 0.01, bad, seed=0)
        with pytest.raises(TypeError, match="^n_images: expected an integer"):
            de.sample_coefficients(bad, 3, 0.01, seed=0)
        with pytest.raises(TypeError, match="^H: expected an integer"):
            physics.pixel_variance(0.01, 3, bad, 8)


# ------------------------------------------------------------------ uint64 ids (item 5)


def test_uint64_ids_below_2_63_are_the_same_ids_and_larger_ones_are_refused_by_name():
    """Decision: any integer dtype is accepted with values in [0, 2**63); a uint64 value
    from 2**63 on is refused naming ``ids`` and the value it has (on the CPU; a CUDA
    tensor is not read, as documented)."""
    x = smooth_images((3, 2, 9, 8))
    small = [0, 7, 2**63 - 1]
    want_tau, want_noisy = de.perturb(x, 0.01, 3, seed=5, ids=torch.tensor(small))
    want_coeffs = de.sample_coefficients(3, 4, 0.01, seed=5, ids=small)
    as_given = (
        torch.tensor(small, dtype=torch.uint64),
        np.array(small, dtype=np.uint64),
        [np.uint64(v) for v in small],
        (int(v) for v in small),
    )
    for ids in as_given:
        tau, noisy = de.perturb(x, 0.01, 3, seed=5, ids=ids)
        assert torch.equal(tau, want_tau) and torch.equal(noisy, want_noisy)
    for ids in (torch.tensor(small, dtype=torch.uint64), np.array(small, dtype=np.uint64)):
        assert torch.equal(de.sample_coefficients(3, 4, 0.01, seed=5, ids=ids), want_coeffs)
    big = 2**63 + 5
    calls = [
        lambda ids: de.deform(x, 0.01, 3, seed=5, ids=ids),
        lambda ids: de.perturb(x, 0.01, 3, seed=5, ids=ids, backend="torch"),
        lambda ids: de.sample_coefficients(3, 3, 0.01, seed=5, ids=ids),
        lambda ids: de.Diffeo(0.01, 3, seed=5)(x, ids=ids),
    ]
    for call in calls:
        for ids in (
            torch.tensor([1, big, 2], dtype=torch.uint64),
            np.array([1, big, 2], dtype=np.uint64),
            [1, np.uint64(big), 2],
            [1, big, 2],
        ):
            with pytest.raises(
                ValueError, match=rf"^ids: expected integers in \[0, 2\*\*63\), got {big}"
            ):
                call(ids)


def test_negative_ids_are_refused_by_every_public_call_that_takes_ids():
    x = smooth_images((2, 1, 8, 8))
    negative = torch.tensor([3, -4])
    for call in (
        lambda: de.deform(x, 0.01, 3, seed=0, ids=negative),
        lambda: de.perturb(x, 0.01, 3, seed=0, ids=negative, backend="torch"),
        lambda: de.sample_coefficients(2, 3, 0.01, seed=0, ids=negative),
        lambda: de.sample_coefficients(2, 3, 0.01, seed=0, ids=negative.to(torch.int32)),
    ):
        with pytest.raises(ValueError, match=r"^ids: expected integers in \[0, 2\*\*63\), got -4"):
            call()


# --------------------------------------------------------- devices that are not there


@pytest.mark.parametrize("device", ["gpu", "GPU:0", "cuda", "cuda:7", "meta", 3])
def test_a_device_that_is_not_there_is_one_error_naming_device(device):
    if str(device).startswith("cuda") and not NO_CUDA and device == "cuda":
        pytest.skip("CUDA is here")
    calls = [
        lambda: de.sample_coefficients(2, 3, 0.01, seed=0, device=device),
        lambda: physics.mode_mask(3, device),
        lambda: physics.mode_variances(3, device),
        lambda: physics.sine_table(8, 3, device=device),
    ]
    for call in calls:
        if device == "meta" and call is not calls[0]:
            continue  # tables of shapes only (compiling kernels offline) are let through
        with pytest.raises((ValueError, TypeError), match=r"^device: ") as error:
            call()
        assert "\n" not in str(error.value)


# ------------------------------------------- temperatures and sizes at the float edge


def test_temperature_range_refuses_crossed_bounds_exactly_where_they_cross():
    """``T_min > T_max`` iff ``pi^2 cut^2 > 4 n^2`` (design.md section 2, rearranged); the
    crossed pair is returned, unchanged, with ``strict=False``."""
    for n in (2, 3, 4, 5, 7, 8, 16, 28, 32.5):
        for cut in range(2, 40):
            T_min = 1 / (math.pi * n * n * math.log(cut))
            T_max = 4 / (math.pi**3 * cut * cut * math.log(cut))
            crossed = math.pi**2 * cut**2 > 4 * n**2
            assert de.temperature_range(n, cut, strict=False) == pytest.approx((T_min, T_max))
            if crossed:
                with pytest.raises(ValueError, match=rf"^cut: {cut} is above 2 n / pi"):
                    de.temperature_range(n, cut)
            else:
                assert de.temperature_range(n, cut) == pytest.approx((T_min, T_max))


class _NoFloat(numbers.Real):
    """A real number whose conversion to float fails (a careless user's type)."""

    def __float__(self):
        raise ValueError("no float for you")

    # the abstract methods of numbers.Real, none of them used
    __abs__ = __add__ = __ceil__ = __eq__ = __floor__ = __floordiv__ = __le__ = __lt__ = __mod__ = (
        __mul__
    ) = __neg__ = __pos__ = __pow__ = __radd__ = __rfloordiv__ = __rmod__ = __rmul__ = __round__ = (
        __rpow__
    ) = __rtruediv__ = __truediv__ = __trunc__ = lambda *a: 0
    __hash__ = object.__hash__


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda v: de.temperature_range(v, 3), "n"),
        (lambda v: de.typical_displacement(0.01, 3, v), "n"),
        (lambda v: de.typical_displacement(v, 3, 32), "T"),
        (lambda v: de.typical_temperature(v, 3, 32), "delta"),
        (lambda v: de.typical_temperature(1.0, 3, v), "n"),
        (lambda v: physics.check_float("sigma", v), "sigma"),
        (lambda v: de.perturb(smooth_images((1, 1, 4, 4)), 0.01, 2, seed=0, noise=v), "noise"),
    ],
)
def test_huge_tiny_and_unconvertible_numbers_are_one_error_naming_the_argument(call, name):
    for value in (10**400, -(10**400), 1e308 * 10, float("nan"), _NoFloat(), "4", None, 1e-320):
        try:
            result = call(value)
        except (ValueError, TypeError) as error:
            assert str(error).startswith(f"{name}: "), (value, error)
            assert "\n" not in str(error) and len(str(error)) < 300
        else:  # accepted: then the answer is a finite float (a tiny value may be fine)
            values = result if isinstance(result, tuple) else (result,)
            for v in values:
                if torch.is_tensor(v):
                    assert bool(torch.isfinite(v).all()), (value, name)
                else:
                    assert math.isfinite(v) and v >= 0, (value, result)
    assert de.temperature_range(Fraction(64, 2), 3) == de.temperature_range(32, 3)


def test_results_that_would_overflow_a_float_are_refused_not_inf():
    for call, name in (
        (lambda: de.typical_displacement(1e308, 3, 32), "T"),
        (lambda: de.typical_displacement(1e300, 3, 1e300), "T"),
        (lambda: de.typical_temperature(1e300, 3, 32), "delta"),
        (lambda: de.typical_temperature(1.0, 3, 1e300), "n"),
        (lambda: de.temperature_range(1e300, 3), "n"),
        (lambda: de.temperature_range(1e-300, 3), "n"),
        (lambda: de.temperature_range(32, 10**400), "cut"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()


@pytest.mark.parametrize("side", [1, 0, -3])
def test_a_pixel_grid_side_below_two_is_refused_not_nan(side):
    for call, name in (
        (lambda: physics.pixel_variance(0.01, 3, side, 8), "H"),
        (lambda: physics.pixel_variance(0.01, 3, 8, side), "W"),
        (lambda: physics.sine_table(side, 3), "n"),
        (lambda: de.displacement_field(torch.zeros(1, 2, 3, 3), side, 8), "H"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: expected an integer >= 2, got {side}"):
            call()
    two = physics.pixel_variance(0.01, 3, 2, 2)  # the field vanishes on the border
    assert float(two.abs().max()) < 1e-30


# -------------------------------------------- uint8 output of unit-scale floats (item 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_uint8_output_of_unit_scale_floats_is_refused_naming_out_dtype(dtype):
    unit = smooth_images((2, 3, 9, 8), dtype, seed=1, scale=1.0)
    signed = (unit.float() * 2 - 1).to(dtype)
    calls = [
        lambda x: de.deform(x, 0.01, 3, seed=0, out_dtype=torch.uint8),
        lambda x: de.deform(x, 0.01, 3, seed=0, out_dtype=torch.uint8, backend="torch"),
        lambda x: de.perturb(x, 0.01, 3, seed=0, out_dtype=torch.uint8),
        lambda x: de.perturb(x, 0.01, 3, seed=0, noise=0.0, out_dtype=torch.uint8),
        lambda x: de.warp(x, torch.zeros(2, 2, 9, 8), out_dtype=torch.uint8),
        lambda x: de.Diffeo(0.01, 3, seed=0, out_dtype=torch.uint8)(x),
    ]
    if dtype == torch.float64:
        calls = calls[1:2] + calls[4:5]  # float64 runs on the reference only
    for x in (unit, signed, torch.ones_like(unit)):
        for call in calls:
            with pytest.raises(ValueError, match=r"^out_dtype: uint8 output keeps the 0\.\.255"):
                call(x)


def test_uint8_output_of_0_255_floats_rounds_the_float_output():
    """The refusal is only for the unit scale: 0..255 floats (and all-zero ones) still give
    the float result rounded half up and saturated (an independent rounding here)."""
    x = smooth_images((3, 3, 10, 10), seed=2)
    x[0] = 0.0
    for backend in ("auto", "torch"):
        as_float = de.deform(x, 0.01, 3, seed=0, backend=backend)
        as_uint8 = de.deform(x, 0.01, 3, seed=0, out_dtype=torch.uint8, backend=backend)
        assert torch.equal(as_uint8, torch.floor(as_float + 0.5).clamp(0, 255).to(torch.uint8))
    assert physics.check_out_dtype(torch.uint8, x) == torch.uint8


def test_the_uint8_scale_rule_is_one_rule_with_generates_stricter_variant():
    check = physics.check_uint8_scale
    kw = dict(where="w", fix="f")
    for low, high in ((0.0, 1.0), (0.0, 0.5), (-1.0, 1.0), (-0.2, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="round every pixel to 0 or 1"):
            check("out_dtype", low, high, **kw)
    for low, high in ((0.0, 0.0), (0.0, 255.0), (0.0, 1.5), (-3.0, 250.0), (-1.5, 0.5)):
        check("out_dtype", low, high, **kw)
    with pytest.raises(ValueError, match="clamp negative pixels to 0"):
        check("dtype", -3.0, 250.0, refuse_negative=True, **kw)
    check("dtype", 0.0, 0.0, refuse_negative=True, **kw)
    check("dtype", float("nan"), float("nan"), **kw)  # left to the finite-value checks


# --------------------------------------------------------- warps that overflow (item 4)


def test_warp_refuses_nonfinite_pixels_and_outputs_that_overflow_like_deform():
    x = smooth_images((2, 1, 8, 8)) * 400  # finite float32 beyond the float16 range
    zero = torch.zeros(2, 2, 8, 8)
    with pytest.raises(ValueError, match="^images: the perturbation of image 0 overflows float16"):
        de.warp(x, zero, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows bfloat16"):
        de.warp(torch.full((1, 1, 4, 4), 3.4e38), torch.zeros(1, 2, 4, 4), out_dtype=torch.bfloat16)
    y = x.clone()
    y[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^images: 1 pixel\(s\) are NaN or inf .first in image 1"):
        de.warp(y, zero)
    assert torch.isnan(de.warp(y, zero, allow_nonfinite=True)[1, 0, 3, 3])
    assert torch.equal(de.warp(x, zero), x)  # the zero field is the identity


# -------------------------------------------------------- empty sweeps and sources


def test_an_empty_sweep_is_refused_instead_of_measuring_nothing():
    model = torch.nn.Linear(4, 2)
    for settings in ([], (), iter([])):
        with pytest.raises(ValueError, match=r"^settings: expected at least one \(T, cut\)"):
            SensitivityMeter(model, settings=settings)
    with pytest.raises(TypeError, match="^settings: expected a list"):
        SensitivityMeter(model, settings=3)
    with pytest.raises(ValueError, match="^perturbation: expected a callable or a non-empty"):
        SensitivityMeter(model, perturbation=[])


def test_empty_and_truncated_array_files_are_one_error_naming_the_input(tmp_path):
    (tmp_path / "zero.npy").write_bytes(b"")
    (tmp_path / "magic.npy").write_bytes(b"\x93NUMPY")
    np.save(tmp_path / "rows.npy", np.zeros((0, 8, 8), np.uint8))
    np.save(tmp_path / "rows4.npy", np.zeros((0, 3, 8, 8), np.float32))
    np.savez(tmp_path / "stored.npz", x=np.zeros((0, 8, 8), np.uint8))
    np.savez_compressed(tmp_path / "packed.npz", x=np.zeros((0, 8, 8, 3), np.uint8))
    full = tmp_path / "full.npy"
    np.save(full, np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "cut.npy").write_bytes(full.read_bytes()[:100])
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    for name in ("zero.npy", "magic.npy", "rows.npy", "rows4.npy", "stored.npz", "packed.npz",
                 "cut.npy", "empty.npz"):  # fmt: skip
        with pytest.raises(ValueError, match=r"^input: .*" + name.split(".")[0]) as error:
            open_source(tmp_path / name)
        assert "\n" not in str(error.value)
    assert len(open_source(full)) == 4
