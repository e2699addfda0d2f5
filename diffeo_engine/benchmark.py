"""Side-by-side throughput of perturbation engines, against the device's own copy ceiling.

Every provider computes the same thing (design.md section 2: the max-entropy warp and
matched noise) unless its ``law`` says otherwise; each is timed on random data, inputs
rotated among several buffers so that caches do not flatter small sizes, and reported
under the minimum-bytes model of design.md section 6 as a fraction of a device-to-device
copy measured in the same run. ``diffeo-engine bench`` (see :func:`add_command`) and the
pytest-benchmark suite under ``bench/`` are both built on this module.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import diffeo_engine
from diffeo_engine import ops
from diffeo_engine.physics import mode_variances, sine_table, temperature_range
from diffeo_engine.reference import to_dtype

__all__ = [
    "DTYPES",
    "ISSUE_CUTS",
    "ISSUE_DTYPES",
    "ISSUE_SHAPES",
    "PROVIDERS",
    "SMOKE_CUTS",
    "SMOKE_DTYPES",
    "SMOKE_SHAPES",
    "Case",
    "ClockSampler",
    "PlanItem",
    "Provider",
    "Runner",
    "add_command",
    "copy_bandwidth",
    "deform_bytes",
    "device_info",
    "format_table",
    "grid_sample_perturb",
    "merge_results",
    "pair_bytes",
    "plan",
    "published_loop_perturb",
    "published_loop_warp",
    "result_filename",
    "run_benchmarks",
    "suite_settings",
    "time_callable",
    "write_plot",
]

SCHEMA = "diffeo-engine-bench/1"

# label -> (input dtype, output dtype); "uint8" is uint8 in, float32 out.
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "uint8": (torch.uint8, torch.float32),
}

# The matrix of issue 6, as (B, C, H, W).
ISSUE_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (256, 3, 32, 32),
    (4096, 3, 32, 32),
    (16384, 3, 32, 32),
    (4096, 1, 28, 28),
    (256, 3, 224, 224),
)
ISSUE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "uint8")
ISSUE_CUTS: tuple[int, ...] = (3, 15)

# CPU smoke: tiny shapes (one of them not square), every dtype and cut, one round.
SMOKE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((4, 3, 8, 8), (3, 1, 7, 9))
SMOKE_DTYPES = ISSUE_DTYPES
SMOKE_CUTS = ISSUE_CUTS

PUBLISHED_MAX_BATCH = 256  # the per-image Python loop runs at small batch only


# ------------------------------------------------------------------------ bytes model


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise TypeError(f"dtype: expected a torch.dtype or its name, got {value!r}")


def _numel(shape: Sequence[int]) -> int:
    if not shape or any(isinstance(s, bool) or int(s) != s or s < 0 for s in shape):
        raise ValueError(f"shape: expected a non-empty sequence of sizes >= 0, got {shape!r}")
    return math.prod(int(s) for s in shape)


def _out_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype | str | None) -> torch.dtype:
    if out_dtype is None:
        return torch.float32 if in_dtype == torch.uint8 else in_dtype
    return _dtype(out_dtype)


def pair_bytes(
    shape: Sequence[int],
    in_dtype: torch.dtype | str,
    out_dtype: torch.dtype | str | None = None,
) -> int:
    """Minimum bytes to make perturbed pairs: read the images once, write ``tau x`` and
    ``x + eta`` once (design.md section 6).

    ``shape`` is one image ``(C, H, W)`` or a batch ``(B, C, H, W)``; ``out_dtype`` defaults
    as in :func:`diffeo_engine.perturb` (float32 for uint8 input, else the input's).
    """
    in_dtype = _dtype(in_dtype)
    n = _numel(shape)
    return n * in_dtype.itemsize + 2 * n * _out_dtype(in_dtype, out_dtype).itemsize


def deform_bytes(
    shape: Sequence[int],
    in_dtype: torch.dtype | str,
    out_dtype: torch.dtype | str | None = None,
) -> int:
    """Minimum bytes for ``tau x`` alone: read the images once, write ``tau x`` once."""
    in_dtype = _dtype(in_dtype)
    n = _numel(shape)
    return n * in_dtype.itemsize + n * _out_dtype(in_dtype, out_dtype).itemsize


# -------------------------------------------------------------------------- providers


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


@dataclass(frozen=True)
class Case:
    """One point of the matrix: ``batch`` images of ``shape = (C, H, W)``."""

    batch: int
    shape: tuple[int, int, int]
    dtype: str  # a key of DTYPES
    cut: int
    device: str
    seed: int = 0

    @property
    def in_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def out_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def T(self) -> float:
        """Mid-range temperature (geometric mean of ``temperature_range``) for the side."""
        t_min, t_max = temperature_range(min(self.shape[1:]), self.cut)
        return math.sqrt(t_min * t_max)

    @property
    def dtype_label(self) -> str:
        if self.in_dtype == self.out_dtype:
            return self.dtype
        return f"{self.dtype}->{str(self.out_dtype).removeprefix('torch.')}"


Build = Callable[[Case], Callable[[torch.Tensor, torch.Tensor], object]]


@dataclass(frozen=True)
class Provider:
    """A way of making perturbed images; ``build(case)`` returns ``fn(images, ids)``."""

    name: str
    kind: str  # "pair" (tau x and x + eta) or "deform" (tau x only)
    law: str  # "max-entropy" when identical to design.md section 2, else what it is
    build: Build
    unavailable: Callable[[torch.device], str | None]
    max_batch: int | None = None


def _always(device: torch.device) -> str | None:
    return None


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skipped: triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"skipped: the triton backend cannot run on {device.type} "
        "(needs CUDA, or CPU with TRITON_INTERPRET=1 set before triton is imported)"
    )


def _compile_unavailable(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return "skipped: torch.compile is not available"
    return None


def _kornia_unavailable(device: torch.device) -> str | None:
    try:
        import kornia  # noqa: F401
    except ImportError:
        return "skipped: kornia is not installed"
    return None


def _build_fused(case: Case):
    T, cut, seed, out = case.T, case.cut, case.seed, case.out_dtype
    return lambda images, ids: ops.perturb(
        images, T, cut, seed=seed, ids=ids, out_dtype=out, backend="triton"
    )


def _build_fused_deform(case: Case):
    T, cut, seed, out = case.T, case.cut, case.seed, case.out_dtype
    return lambda images, ids: ops.deform(
        images, T, cut, seed=seed, ids=ids, out_dtype=out, backend="triton"
    )


def _build_reference(case: Case):
    T, cut, seed, out = case.T, case.cut, case.seed, case.out_dtype
    return lambda images, ids: ops.perturb(
        images, T, cut, seed=seed, ids=ids, out_dtype=out, backend="torch"
    )


def _grid_sample_tables(case: Case):
    _, H, W = case.shape
    std = _coefficient_std(case.cut, case.T, case.device)
    sx = sine_table(W, case.cut, device=case.device)
    sy = sine_table(H, case.cut, device=case.device)
    return std, sx, sy


def _build_grid_sample(case: Case):
    std, sx, sy = _grid_sample_tables(case)
    cut, out = case.cut, case.out_dtype

    def run(images, ids):
        coeffs = torch.randn(images.shape[0], 2, cut, cut, device=images.device) * std
        return _grid_sample_core(images, coeffs, sx, sy, out)

    return run


def _build_grid_sample_compiled(case: Case):
    std, sx, sy = _grid_sample_tables(case)
    cut, out = case.cut, case.out_dtype

    def pipeline(images, std, sx, sy):
        coeffs = torch.randn(images.shape[0], 2, cut, cut, device=images.device) * std
        return _grid_sample_core(images, coeffs, sx, sy, out)

    # A fresh compile per case: static shapes, and no silent fall-back to eager when the
    # recompilation limit of one code object is reached across the matrix.
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, dynamic=False)
    return lambda images, ids: compiled(images, std, sx, sy)


def _build_published(case: Case):
    tables = _grid_sample_tables(case)
    T, cut, out = case.T, case.cut, case.out_dtype
    return lambda images, ids: published_loop_perturb(images, T, cut, out_dtype=out, tables=tables)


def _build_kornia(case: Case):
    from kornia.geometry.transform import elastic_transform2d

    _, H, W = case.shape
    side = min(H, W)
    k = max(3, min(63, side // 2 * 2 - 1))  # odd, and its reflect padding fits the image
    sigma = float(k) / 4
    out = case.out_dtype

    def run(images, ids):
        x = images.to(torch.float32)
        noise = torch.rand(x.shape[0], 2, H, W, device=x.device) * 2 - 1
        warped = elastic_transform2d(
            x, noise, kernel_size=(k, k), sigma=(sigma, sigma), alpha=(1.0, 1.0)
        )
        z = torch.randn_like(warped)
        scale = (warped - x).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
        return to_dtype(warped, out), to_dtype(x + z * scale[:, None, None, None], out)

    return run


MAX_ENTROPY = "max-entropy"
PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("fused", "pair", MAX_ENTROPY, _build_fused, _triton_unavailable),
        Provider("fused-deform", "deform", MAX_ENTROPY, _build_fused_deform, _triton_unavailable),
        Provider("torch-reference", "pair", MAX_ENTROPY, _build_reference, _always),
        Provider("grid_sample", "pair", MAX_ENTROPY, _build_grid_sample, _always),
        Provider(
            "grid_sample-compiled",
            "pair",
            MAX_ENTROPY,
            _build_grid_sample_compiled,
            _compile_unavailable,
        ),
        Provider(
            "published-loop",
            "pair",
            MAX_ENTROPY,
            _build_published,
            _always,
            max_batch=PUBLISHED_MAX_BATCH,
        ),
        Provider(
            "kornia",
            "pair",
            "different law: kornia elastic_transform2d (Gaussian-smoothed uniform noise), "
            "matched noise",
            _build_kornia,
            _kornia_unavailable,
        ),
    )
}


@dataclass(frozen=True)
class PlanItem:
    """A provider at a case, or the reason it is not run there."""

    provider: str
    case: Case
    requested_batch: int
    skip: str | None = None

    @property
    def id(self) -> str:
        C, H, W = self.case.shape
        shape = f"{self.requested_batch}x{C}x{H}x{W}"
        return f"{self.provider}-{shape}-{self.case.dtype}-cut{self.case.cut}"


def plan(
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[str],
    cuts: Sequence[int],
    providers: Sequence[str],
    device: str | torch.device,
    *,
    seed: int = 0,
) -> list[PlanItem]:
    """Every (provider, case) of the matrix; ``shapes`` are ``(B, C, H, W)``.

    A provider with a ``max_batch`` runs at ``min(B, max_batch)``, once per image shape,
    dtype and cut (a larger ``B`` that would repeat the same measurement is skipped).
    """
    device = torch.device(device)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}, expected some of {list(PROVIDERS)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtypes: unknown {bad}, expected some of {list(DTYPES)}")
    items, seen = [], set()
    for name in providers:
        provider = PROVIDERS[name]
        reason = provider.unavailable(device)
        for shape in shapes:
            if len(shape) != 4 or any(int(s) < 1 for s in shape):
                raise ValueError(f"shapes: expected (B, C, H, W) sizes >= 1, got {shape!r}")
            B, C, H, W = (int(s) for s in shape)
            for dtype in dtypes:
                for cut in cuts:
                    batch = B if provider.max_batch is None else min(B, provider.max_batch)
                    case = Case(batch, (C, H, W), dtype, int(cut), str(device), seed)
                    skip = reason
                    if skip is None and (name, case) in seen:
                        skip = f"skipped: {name} runs at batch {batch} only (measured already)"
                    seen.add((name, case))
                    items.append(PlanItem(name, case, B, skip))
    return items


def suite_settings() -> tuple[torch.device, bool]:
    """``(device, smoke)`` of the pytest suite under ``bench/``: ``DIFFEO_BENCH_DEVICE``
    (default CUDA if present, else CPU); smoke (tiny shapes, one round) without CUDA or
    with ``DIFFEO_BENCH_SMOKE=1``."""
    cuda = torch.cuda.is_available()
    device = torch.device(os.environ.get("DIFFEO_BENCH_DEVICE") or ("cuda" if cuda else "cpu"))
    smoke = os.environ.get("DIFFEO_BENCH_SMOKE") == "1" or device.type != "cuda"
    return device, smoke


# ----------------------------------------------------------------------------- timing


class Runner:
    """A provider at a case with its rotating input buffers: ``step()`` runs one call on
    the next buffer; ``sync()`` waits for the device."""

    def __init__(self, provider: str, case: Case, *, n_buffers: int | None = None):
        self.provider = PROVIDERS[provider]
        self.case = case
        self.device = torch.device(case.device)
        self.fn = self.provider.build(case)
        self.n_buffers = n_buffers or _buffer_count(case, self.device)
        gen = torch.Generator(device=self.device).manual_seed(1234 + case.seed)
        C, H, W = case.shape
        B = case.batch
        self.inputs = []
        for k in range(self.n_buffers):
            if case.in_dtype == torch.uint8:
                x = torch.randint(0, 256, (B, C, H, W), generator=gen, device=self.device)
                x = x.to(torch.uint8)
            else:
                x = torch.rand((B, C, H, W), generator=gen, device=self.device).to(case.in_dtype)
            ids = torch.arange(k * B, (k + 1) * B, device=self.device, dtype=torch.int64)
            self.inputs.append((x, ids))
        self._next = 0

    def step(self):
        images, ids = self.inputs[self._next]
        self._next = (self._next + 1) % self.n_buffers
        return self.fn(images, ids)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def group(self, inner: int) -> None:
        """``inner`` calls back to back, then a sync: what a pytest-benchmark round times."""
        for _ in range(inner):
            self.step()
        self.sync()

    @property
    def bytes_per_item(self) -> int:
        make = pair_bytes if self.provider.kind == "pair" else deform_bytes
        return make(self.case.shape, self.case.in_dtype, self.case.out_dtype)


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (64 << 20))


def _buffer_count(case: Case, device: torch.device) -> int:
    """Enough input buffers that one pass over them is at least 3x the last-level cache."""
    per_batch = case.batch * math.prod(case.shape) * case.in_dtype.itemsize
    if device.type != "cuda":
        return 2
    wanted = math.ceil(3 * _l2_bytes(device) / max(per_batch, 1))
    budget = max(1, (2 << 30) // max(per_batch, 1))  # at most ~2 GiB of inputs
    return max(2, min(wanted, 32, budget))


def time_callable(
    fn: Callable[[], object],
    device: str | torch.device,
    *,
    warmup_s: float = 0.1,
    reps: int = 25,
    group_s: float = 0.005,
    max_s: float = 5.0,
    smoke: bool = False,
    timer: str = "events",
    sampler: ClockSampler | None = None,
) -> dict:
    """Median seconds per call of ``fn`` after warm-up.

    CUDA (``timer="events"``): CUDA events around groups of back-to-back calls (at least
    ``group_s`` each), median over ``reps`` groups: steady-state throughput. ``timer=
    "do_bench"``: ``triton.testing.do_bench`` (median, L2 flushed between calls). CPU:
    ``time.perf_counter`` around the same groups. ``smoke``: one warm-up call, one round.
    ``sampler`` runs (telemetry) only while the timed region runs.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # Warm-up (compilation, autotuning, allocator) and a first estimate of one call.
    start = time.perf_counter()
    fn()
    sync()
    calls = 1
    while not smoke and (time.perf_counter() - start < warmup_s or calls < 3):
        fn()
        calls += 1
        if calls % 4 == 0:
            sync()
    sync()
    estimate = (time.perf_counter() - start) / calls
    if smoke:
        reps, inner = 1, 1
    else:
        inner = max(1, min(1000, math.ceil(group_s / max(estimate, 1e-9))))
        reps = max(3, min(reps, math.floor(max_s / max(estimate * inner, 1e-9))))

    if sampler is not None:
        sampler.start()
    try:
        if cuda and timer == "do_bench":
            from triton.testing import do_bench

            ms = do_bench(fn, warmup=25, rep=max(1, int(reps * estimate * 1e3)), return_mode="all")
            times = [t / 1e3 for t in ms]
            inner = 1
        elif cuda:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            for begin, end in events:
                begin.record()
                for _ in range(inner):
                    fn()
                end.record()
            sync()
            times = [b.elapsed_time(e) / 1e3 / inner for b, e in events]
        else:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
    finally:
        if sampler is not None:
            sampler.stop()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {
        "median_s": statistics.median(times),
        "p20_s": q[0],
        "p80_s": q[-1],
        "reps": len(times),
        "inner": inner,
        "warmup_calls": calls,
        "timer": ("do_bench" if timer == "do_bench" else "cuda-events") if cuda else "perf_counter",
    }


def copy_bandwidth(
    device: str | torch.device, *, nbytes: int | None = None, smoke: bool = False
) -> dict:
    """Device-to-device copy rate, counting bytes read and written, in GB/s (1e9 B/s).

    CUDA: a 1 GiB copy (less if memory is short). CPU: 64 MiB (4 MiB in smoke).
    """
    device = torch.device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(1 << 30, free // 8))
        else:
            nbytes = (4 << 20) if smoke else (64 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    # Timed properly even in smoke (it is cheap): a cold first copy measures page faults.
    timing = time_callable(
        lambda: dst.copy_(src), device, group_s=0.02, warmup_s=0.02 if smoke else 0.1
    )
    moved = 2 * n * 4
    return {
        "copy_bandwidth_GBps": moved / timing["median_s"] / 1e9,
        "bytes_per_copy": moved,
        "timing": timing,
    }


# -------------------------------------------------------------------------- telemetry


def _nvml():
    """``(pynvml, None)`` or ``(None, why not)``."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return None, f"NVML could not start: {error}"
    return pynvml, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(nvml, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            text = str(uuid)
            return nvml.nvmlDeviceGetHandleByUUID(
                text if text.startswith("GPU-") else f"GPU-{text}"
            )
        except Exception:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def _versions() -> dict:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffeo_engine": diffeo_engine.__version__,
        "cuda_runtime": torch.version.cuda,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    try:
        import kornia

        versions["kornia"] = kornia.__version__
    except ImportError:
        pass
    return versions


def device_info(device: str | torch.device) -> dict:
    """What the figures were measured on: device, driver, clocks, versions.

    NVML fields (driver, clocks, power, temperature) need nvidia-ml-py; where it or CUDA is
    missing, ``nvml`` says why and the rest is recorded.
    """
    device = torch.device(device)
    info: dict = {"type": device.type, "versions": _versions()}
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    info["host"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type != "cuda":
        info["name"] = f"CPU ({info['host']['processor']})"
        info["nvml"] = {"available": False, "reason": "not a CUDA device"}
        return info
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update(
        name=props.name,
        index=index,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        total_memory_bytes=props.total_memory,
        l2_cache_bytes=getattr(props, "L2_cache_size", None),
    )
    nvml, why = _nvml()
    if nvml is None:
        info["nvml"] = {"available": False, "reason": why}
        return info
    handle = _nvml_handle(nvml, device)
    cuda_driver = _try(nvml.nvmlSystemGetCudaDriverVersion)
    info["nvml"] = {
        "available": True,
        "driver": _text(_try(nvml.nvmlSystemGetDriverVersion)),
        "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
        "name": _text(_try(nvml.nvmlDeviceGetName, handle)),
        "max_sm_clock_MHz": _try(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        "max_mem_clock_MHz": _try(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_limit_mW": _try(nvml.nvmlDeviceGetEnforcedPowerLimit, handle),
        "idle": _nvml_sample(nvml, handle),
    }
    return info


def _nvml_sample(nvml, handle) -> dict:
    memory = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
    power = _try(nvml.nvmlDeviceGetPowerUsage, handle)
    return {
        "sm_clock_MHz": _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "mem_clock_MHz": _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_W": power / 1e3 if power is not None else None,
        "temperature_C": _try(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "memory_used_bytes": memory.used if memory is not None else None,
    }


class ClockSampler:
    """Samples SM / memory clocks, power, temperature and memory used with NVML in a
    background thread while started; :meth:`summary` gives min / median / max of each.

    Without CUDA or nvidia-ml-py it samples nothing and the summary says why.
    """

    def __init__(self, device: str | torch.device, interval_s: float = 0.01):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if self.device.type != "cuda":
            self.nvml, self.reason, self.handle = None, "not a CUDA device", None
        else:
            self.nvml, self.reason = _nvml()
            self.handle = _try(_nvml_handle, self.nvml, self.device) if self.nvml else None
            if self.nvml is not None and self.handle is None:
                self.nvml, self.reason = None, "NVML has no handle for this device"

    def _loop(self) -> None:
        while True:
            self.samples.append(_nvml_sample(self.nvml, self.handle))
            if self._stop.wait(self.interval_s):
                break

    def start(self) -> None:
        if self.nvml is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ClockSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        if self.nvml is None:
            return {"available": False, "reason": self.reason}
        out: dict = {"available": True, "samples": len(self.samples)}
        for key in ("sm_clock_MHz", "mem_clock_MHz", "power_W", "temperature_C"):
            values = [s[key] for s in self.samples if s.get(key) is not None]
            if values:
                out[key] = {
                    "min": min(values),
                    "median": statistics.median(values),
                    "max": max(values),
                }
        used = [s["memory_used_bytes"] for s in self.samples if s.get("memory_used_bytes")]
        if used:
            out["memory_used_bytes_max"] = max(used)
        return out


# ---------------------------------------------------------------------------- running


def _measure(item: PlanItem, copy_GBps: float, *, smoke: bool, timer: str) -> dict:
    runner = Runner(item.provider, item.case)
    provider = runner.provider
    sampler = ClockSampler(item.case.device)
    timing = time_callable(runner.step, item.case.device, smoke=smoke, timer=timer, sampler=sampler)
    case = item.case
    per_s = case.batch / timing["median_s"]
    gbps = per_s * runner.bytes_per_item / 1e9
    record = {
        "provider": item.provider,
        "kind": provider.kind,
        "law": provider.law,
        "shape": list(case.shape),
        "batch": case.batch,
        "dtype": case.dtype_label,
        "in_dtype": str(case.in_dtype).removeprefix("torch."),
        "out_dtype": str(case.out_dtype).removeprefix("torch."),
        "cut": case.cut,
        "T": case.T,
        "pairs_per_s": per_s,
        "bytes_per_pair": runner.bytes_per_item,
        "effective_GBps": gbps,
        "fraction_of_copy": gbps / copy_GBps if copy_GBps else None,
        "n_buffers": runner.n_buffers,
        "timing": timing,
        "telemetry": sampler.summary(),
    }
    if provider.kind == "deform":
        record["note"] = "tau x only: pairs_per_s counts images, bytes per deform_bytes"
    if case.batch != item.requested_batch:
        record["note"] = f"run at batch {case.batch} (small batch only)"
    del runner
    return record


def _add_ratios(results: list[dict]) -> None:
    """Ratios of each pair provider's pairs/s to the baselines at the same case."""
    by_key = {}
    for r in results:
        key = (r["provider"], tuple(r["shape"]), r["dtype"], r["cut"])
        by_key.setdefault(key, {})[r["batch"]] = r
    for r in results:
        if r["kind"] != "pair":
            continue
        for base, field in (
            ("grid_sample", "vs_grid_sample"),
            ("grid_sample-compiled", "vs_grid_sample_compiled"),
            ("published-loop", "vs_published_loop"),
        ):
            if r["provider"] == base:
                continue
            runs = by_key.get((base, tuple(r["shape"]), r["dtype"], r["cut"]), {})
            # Same batch where measured; the published loop is measured at small batch only.
            other = runs.get(r["batch"]) or (
                next(iter(runs.values())) if base == "published-loop" and runs else None
            )
            if other and other["pairs_per_s"]:
                r[field] = r["pairs_per_s"] / other["pairs_per_s"]


def run_benchmarks(
    shapes: Sequence[Sequence[int]] = ISSUE_SHAPES,
    dtypes: Sequence[str] = ISSUE_DTYPES,
    cuts: Sequence[int] = ISSUE_CUTS,
    providers: Sequence[str] = tuple(PROVIDERS),
    *,
    device: str | torch.device | None = None,
    smoke: bool = False,
    seed: int = 0,
    timer: str = "events",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every provider over the matrix (``shapes`` as ``(B, C, H, W)``) in one run.

    Returns design.md section 5's structure: ``device``, ``copy_bandwidth_GBps`` (measured
    here, first), ``results`` (one record per provider, shape, dtype, cut), plus
    ``skipped`` (provider, case and why) and the settings.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    items = plan(shapes, dtypes, cuts, providers, device, seed=seed)
    say = progress or (lambda _: None)
    say(f"measuring copy bandwidth on {device}")
    copy = copy_bandwidth(device, smoke=smoke)
    copy_GBps = copy["copy_bandwidth_GBps"]
    results, skipped = [], []
    for item in items:
        where = {
            "provider": item.provider,
            "shape": list(item.case.shape),
            "batch": item.requested_batch,
            "dtype": item.case.dtype_label,
            "cut": item.case.cut,
        }
        if item.skip is not None:
            skipped.append({**where, "reason": item.skip})
            continue
        say(f"{item.id}")
        try:
            results.append(_measure(item, copy_GBps, smoke=smoke, timer=timer))
        except Exception as error:  # one failing provider must not lose the whole run
            what = "skipped: torch.compile failed" if "compiled" in item.provider else "error"
            skipped.append({**where, "reason": f"{what}: {type(error).__name__}: {error}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _add_ratios(results)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "copy_bandwidth_GBps": copy_GBps,
        "copy": copy,
        "settings": {
            "shapes": [list(s) for s in shapes],
            "dtypes": list(dtypes),
            "cuts": list(cuts),
            "providers": list(providers),
            "seed": seed,
            "smoke": smoke,
            "timer": timer,
            "bytes_model": "pair: read x once, write tau x and x + eta once; "
            "deform: read x once, write tau x once",
        },
        "results": results,
        "skipped": skipped,
    }


def merge_results(docs: Sequence[dict]) -> dict:
    """One document from several runs (parts of a matrix run as separate commands).

    Each record keeps the ``copy_bandwidth_GBps`` of its own run (its ``fraction_of_copy``
    is against that); the top level gives the median over runs and lists each part.
    """
    if not docs:
        raise ValueError("docs: expected at least one result document")
    results, skipped, parts = [], [], []
    for doc in docs:
        for r in doc["results"]:
            r = {k: v for k, v in r.items() if not k.startswith("vs_")}
            r.setdefault("copy_bandwidth_GBps", doc["copy_bandwidth_GBps"])
            results.append(r)
        skipped.extend(doc.get("skipped", []))
        parts.append(
            {
                "created": doc.get("created"),
                "copy_bandwidth_GBps": doc["copy_bandwidth_GBps"],
                "settings": doc.get("settings"),
                "device": doc.get("device"),
            }
        )
    _add_ratios(results)
    names = {json.dumps(p["device"].get("name")) for p in parts if p.get("device")}
    if len(names) > 1:
        raise ValueError(f"docs: expected runs on one device, got {sorted(names)}")
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": docs[0]["device"],
        "copy_bandwidth_GBps": statistics.median(p["copy_bandwidth_GBps"] for p in parts),
        "parts": parts,
        "results": results,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------- reports


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(doc: dict, *, markdown: bool = False) -> str:
    """The results as a fixed-width (or Markdown) table, skipped providers listed after."""
    head = ["provider", "shape", "B", "dtype", "cut", "pairs/s", "GB/s", "% copy"]
    head += ["x grid_s", "x compiled", "x loop"]
    rows = []
    for r in doc["results"]:
        C, H, W = r["shape"]
        rows.append(
            [
                r["provider"] + ("" if r["law"] == MAX_ENTROPY else " *"),
                f"{C}x{H}x{W}",
                str(r["batch"]),
                r["dtype"],
                str(r["cut"]),
                _fmt(r["pairs_per_s"], ".3g"),
                _fmt(r["effective_GBps"], ".4g"),
                _fmt(None if r["fraction_of_copy"] is None else 100 * r["fraction_of_copy"], ".3g"),
                _fmt(r.get("vs_grid_sample"), ".3g"),
                _fmt(r.get("vs_grid_sample_compiled"), ".3g"),
                _fmt(r.get("vs_published_loop"), ".3g"),
            ]
        )
    name = doc["device"].get("name", "?")
    lines = [f"device: {name}; copy bandwidth {doc['copy_bandwidth_GBps']:.1f} GB/s (read+write)"]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if any(r["law"] != MAX_ENTROPY for r in doc["results"]):
        lines.append("* different law from design.md section 2 (not comparable semantics)")
    reasons: dict[str, set] = {}
    for s in doc.get("skipped", []):
        reasons.setdefault(s["provider"], set()).add(s["reason"])
    for provider, why in reasons.items():
        for reason in sorted(why):
            if "measured already" not in reason:
                lines.append(f"{provider}: {reason}")
    return "\n".join(lines)


def write_plot(doc: dict, path: str | Path) -> Path | None:
    """Pairs/s and fraction of copy per case and provider as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = doc["results"]
    if not results:
        return None
    cases = []
    for r in results:
        key = (tuple(r["shape"]), r["batch"], r["dtype"], r["cut"])
        if key not in cases and r["provider"] != "published-loop":
            cases.append(key)
    providers = list(dict.fromkeys(r["provider"] for r in results))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(cases) + 3), 8), sharex=True)
    width = 0.8 / max(len(providers), 1)
    for k, provider in enumerate(providers):
        for ax, field, scale in ((axes[0], "pairs_per_s", 1), (axes[1], "fraction_of_copy", 100)):
            xs, ys = [], []
            for n, (shape, batch, dtype, cut) in enumerate(cases):
                for r in results:
                    same = (tuple(r["shape"]), r["dtype"], r["cut"]) == (shape, dtype, cut)
                    ok = r["provider"] == provider and same and r[field] is not None
                    if ok and (r["batch"] == batch or provider == "published-loop"):
                        xs.append(n + (k - len(providers) / 2) * width)
                        ys.append(r[field] * scale)
                        break
            ax.bar(xs, ys, width=width, label=provider)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("pairs / s")
    axes[1].set_ylabel("% of measured copy bandwidth")
    axes[0].legend(fontsize=7, ncol=2)
    labels = [f"{'x'.join(map(str, s))} B={b}\n{d} cut={c}" for s, b, d, c in cases]
    axes[1].set_xticks(range(len(cases)), labels, rotation=90, fontsize=6)
    axes[0].set_title(
        f"{doc['device'].get('name', '?')}: copy {doc['copy_bandwidth_GBps']:.0f} GB/s"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_filename(doc: dict, date: datetime.date | None = None) -> str:
    """``<gpu>-<yyyy-mm-dd>.json``, the name results are committed under in bench/results."""
    name = doc["device"].get("name", "device")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
    return f"{slug}-{(date or datetime.date.today()).isoformat()}.json"


# ------------------------------------------------------------------------ command line


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW, e.g. 4096x3x32x32, got {text!r}")
    return shape  # type: ignore[return-value]


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def _run_bench(args: argparse.Namespace) -> int:
    if args.merge:
        doc = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = device.type == "cuda"
        small = args.smoke or not cuda
        if not cuda and not args.smoke and args.shapes is None:
            print("no CUDA device: tiny shapes (the issue's matrix is for a GPU)", file=sys.stderr)
        providers = _split(args.providers) or list(PROVIDERS)
        dtypes = _split(args.dtypes) or list(SMOKE_DTYPES if small else ISSUE_DTYPES)
        doc = run_benchmarks(
            args.shapes or (SMOKE_SHAPES if small else ISSUE_SHAPES),
            dtypes,
            args.cut or (SMOKE_CUTS if small else ISSUE_CUTS),
            providers,
            device=device,
            smoke=args.smoke,
            seed=args.seed,
            timer=args.timer,
            progress=(lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            if args.verbose
            else None,
        )
        doc["command"] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    print(format_table(doc))
    if args.out:
        out = Path(args.out)
        if out.is_dir() or args.out.endswith(("/", os.sep)):
            out.mkdir(parents=True, exist_ok=True)
            out = out / result_filename(doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(format_table(doc, markdown=True) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
        if not args.no_plot:
            png = write_plot(doc, out.with_suffix(".png"))
            print(f"wrote {png}" if png else "no plot: matplotlib is not installed")
    return 0


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers (``diffeo-engine bench``)."""
    p = subparsers.add_parser(
        "bench",
        help="time perturbation engines side by side against the device's copy bandwidth",
        description=(
            "Time fused (Triton), torch-reference, grid_sample (eager and compiled), the "
            "published per-image loop and kornia on random data; report pairs/s, effective "
            "GB/s under the minimum-bytes model and the fraction of the copy bandwidth "
            "measured in the same run. Default: the issue's matrix on CUDA, tiny shapes on CPU."
        ),
    )
    p.add_argument("--out", help="JSON file (or folder: <gpu>-<date>.json); .md/.png beside it")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--providers", nargs="+", default=None, help=f"some of {', '.join(PROVIDERS)}")
    p.add_argument(
        "--shapes", nargs="+", type=_parse_shape, default=None, help="BxCxHxW, e.g. 4096x3x32x32"
    )
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 uint8")
    p.add_argument("--cut", nargs="+", type=int, default=None, help="cut-offs (default 3 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timer", choices=("events", "do_bench"), default="events")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSON files instead")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--verbose", "-v", action="store_true", help="print progress to stderr")
    p.set_defaults(run=_run_bench)
    return p
