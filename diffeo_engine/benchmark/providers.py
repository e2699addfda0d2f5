"""The benchmark matrix: cases, the providers timed at each, and the plan of a run.

Every provider computes the same thing (design.md section 2: the max-entropy warp and
matched noise) unless its ``law`` says otherwise.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffeo_engine import ops
from diffeo_engine.benchmark.baselines import (
    _coefficient_std,
    _grid_sample_core,
    published_loop_perturb,
)
from diffeo_engine.physics import sine_table, temperature_range
from diffeo_engine.reference import to_dtype

__all__ = [
    "DTYPES",
    "ISSUE_CUTS",
    "ISSUE_DTYPES",
    "ISSUE_SHAPES",
    "MAX_ENTROPY",
    "PROVIDERS",
    "SMOKE_CUTS",
    "SMOKE_DTYPES",
    "SMOKE_SHAPES",
    "Case",
    "PlanItem",
    "Provider",
    "plan",
    "suite_settings",
]

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
        """Mid-range temperature (geometric mean of ``temperature_range``) for the side
        (crossed bounds allowed: a timing case on tiny images may have a cut above 2n/pi)."""
        t_min, t_max = temperature_range(min(self.shape[1:]), self.cut, strict=False)
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


def _torchvision_unavailable(device: torch.device) -> str | None:
    try:
        from torchvision.transforms import v2  # noqa: F401
    except ImportError:
        return "skipped: torchvision is not installed"
    except Exception as error:  # a wheel built for another torch fails while registering ops
        return f"skipped: torchvision does not import here ({type(error).__name__}: {error})"
    return None


def _cpu_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"skipped: the cpu backend runs on CPU tensors, not {device.type}"
    if ops.cpu_kernel() is None:
        return "skipped: numba does not import here"
    return None


def _build_public(backend: str):
    """The public ``perturb`` call, argument and finite checks included."""

    def build(case: Case):
        T, cut, seed, out = case.T, case.cut, case.seed, case.out_dtype
        return lambda images, ids: ops.perturb(
            images, T, cut, seed=seed, ids=ids, out_dtype=out, backend=backend
        )

    return build


def _build_kernel_only(backend: str):
    """The launcher alone on pre-checked arguments: no argument checks, no non-finite
    count (Triton) and nothing read back, beside the public call."""

    def build(case: Case):
        if backend == "triton":
            from diffeo_engine.kernels import perturb as kernels

            launch = functools.partial(kernels.perturb, check=False)
        else:
            launch = ops.cpu_kernel().perturb
        T = torch.full((case.batch,), case.T, dtype=torch.float32, device=case.device)
        cut, seed, out = case.cut, case.seed, case.out_dtype
        return lambda images, ids: launch(
            images, T, ids, cut=cut, seed=seed, noise="matched", interp="bilinear",
            out_dtype=out,
        )[:2]  # fmt: skip

    return build


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


def _elastic_side(case: Case) -> int:
    return min(case.shape[1:])


def _build_kornia(case: Case):
    """kornia's ``RandomElasticTransform``, one independent field per image (``p=1``)."""
    from kornia.augmentation import RandomElasticTransform

    side = _elastic_side(case)
    k = max(3, min(63, side // 2 * 2 - 1))  # odd, and its reflect padding fits the image
    sigma = float(k) / 4
    augment = RandomElasticTransform(
        kernel_size=(k, k), sigma=(sigma, sigma), alpha=(1.0, 1.0), p=1.0, same_on_batch=False
    )
    out = case.out_dtype
    return lambda images, ids: to_dtype(augment(images.to(torch.float32)), out)


def _build_torchvision_elastic(case: Case):
    """torchvision v2 ``ElasticTransform`` (its default ``alpha=50``, ``sigma=5`` px, or
    less where the blur kernel would not fit the image); it draws one field per call, so
    independent fields take one call per image."""
    from torchvision.transforms import v2

    sigma = min(5.0, max(0.25, (_elastic_side(case) - 2) / 8))
    augment = v2.ElasticTransform(alpha=50.0, sigma=sigma)
    out = case.out_dtype

    def run(images, ids):
        x = images.to(torch.float32)
        return to_dtype(torch.stack([augment(image) for image in x]), out)

    return run


MAX_ENTROPY = "max-entropy"
PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("fused", "pair", MAX_ENTROPY, _build_public("triton"), _triton_unavailable),
        Provider(
            "fused-kernel", "pair", MAX_ENTROPY, _build_kernel_only("triton"), _triton_unavailable
        ),
        Provider("fused-cpu", "pair", MAX_ENTROPY, _build_public("cpu"), _cpu_unavailable),
        Provider(
            "fused-cpu-kernel", "pair", MAX_ENTROPY, _build_kernel_only("cpu"), _cpu_unavailable
        ),
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
            "deform",
            "different law: kornia RandomElasticTransform (Gaussian-smoothed uniform noise), "
            "one field per image",
            _build_kornia,
            _kornia_unavailable,
        ),
        Provider(
            "torchvision-elastic",
            "deform",
            "different law: torchvision v2 ElasticTransform (Gaussian-smoothed uniform noise), "
            "one call per image for independent fields",
            _build_torchvision_elastic,
            _torchvision_unavailable,
            max_batch=PUBLISHED_MAX_BATCH,
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
