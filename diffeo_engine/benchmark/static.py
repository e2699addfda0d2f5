"""Offline cost report of the Triton kernels: what an H100 (sm_90) would run, without a GPU.

Every launch :func:`diffeo_engine.kernels.perturb.launches` makes for a case is compiled
through ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (and sm_80), binding the very
arguments the launcher passes (on ``meta`` tensors) with Triton's own JIT binder, so the
signature, integer specialisations, constexprs and grid are the launcher's. From the cubin
and the bundled ``cuobjdump`` / ``ptxas`` it reports registers, spills, shared memory,
programs per SM, the SASS instruction mix, global load/store widths and the dynamic
instructions per output channel-pixel (static counts times the launcher's loop trip
counts). From these, a clearly labelled *model estimate* of the fraction of copy bandwidth
an H100 would reach: issue-bound (instructions over the SMs' issue rate) or memory-bound
(the minimum bytes over the copy rate). No figure here is a GPU measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch

from diffeo_engine.benchmark.bytes_model import deform_bytes, pair_bytes
from diffeo_engine.benchmark.sass import parse_sass, sass_cost

__all__ = [
    "H100_MODEL",
    "STATIC_CASES",
    "StaticCase",
    "compile_launch",
    "format_static_table",
    "parse_sass",
    "sass_cost",
    "static_report",
]

STATIC_SCHEMA = "diffeo-engine-static/1"


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One launcher input: ``shape = (B, C, H, W)``, dtypes, cut, noise and interpolation."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None
    cut: int = 3
    noise: str | float | None = "matched"
    interp: str = "bilinear"
    layout: str = "contiguous"
    seed: int = 0

    @property
    def out(self) -> torch.dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        return torch.float32 if self.dtype == torch.uint8 else self.dtype

    @property
    def name(self) -> str:
        B, C, H, W = self.shape
        dt = str(self.dtype).removeprefix("torch.")
        if self.out != self.dtype:
            dt += "->" + str(self.out).removeprefix("torch.")
        noise = "deform" if self.noise is None else str(self.noise)
        extra = "" if self.interp == "bilinear" else f"-{self.interp}"
        extra += "" if self.layout == "contiguous" else f"-{self.layout}"
        return f"{B}x{C}x{H}x{W}-{dt}-cut{self.cut}-{noise}{extra}"


def _issue_cases() -> tuple[StaticCase, ...]:
    """Issue 11's matrix: 3x32x32 (B = 4096) and 3x224x224 (B = 256) float32, uint8 in,
    bfloat16; cut 3, 15 and 64; deform only and matched noise."""
    cases = []
    for shape in ((4096, 3, 32, 32), (256, 3, 224, 224)):
        for dtype in (torch.float32, torch.uint8, torch.bfloat16):
            for cut in (3, 15, 64):
                for noise in ("matched", None):
                    cases.append(StaticCase(shape, dtype, cut=cut, noise=noise))
    cases.append(StaticCase((4096, 3, 32, 32), cut=3, noise=0.1))
    cases.append(StaticCase((4096, 3, 32, 32), cut=3, interp="nearest"))
    return tuple(cases)


STATIC_CASES = _issue_cases()


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """Figures the model estimate uses; each says where it comes from."""

    name: str
    sms: int
    clock_GHz: float
    issue_per_sm_per_cycle: int
    copy_GBps: float
    l2_bytes: int
    regs_per_sm: int
    max_warps_per_sm: int
    max_programs_per_sm: int
    shared_per_sm: int
    source: str


H100_MODEL = DeviceModel(
    name="H100 80GB HBM3 (sm_90)",
    sms=132,
    clock_GHz=1.755,
    issue_per_sm_per_cycle=4,
    copy_GBps=3000.0,
    l2_bytes=50 << 20,
    regs_per_sm=65536,
    max_warps_per_sm=64,
    max_programs_per_sm=32,
    shared_per_sm=228 << 10,
    source=(
        "132 SMs, 50 MB L2 and a device-to-device copy of about 3.0 TB/s (read + write) as "
        "read on this workplace's H100 on 2026-11-13 (.library/device/KINDS.md, another "
        "session); 1.755 GHz sustained SM clock and 4 warp-instructions issued per SM per "
        "cycle are datasheet assumptions"
    ),
)
A100_LIMITS = dataclasses.replace(
    H100_MODEL,
    name="A100 (sm_80): occupancy limits only",
    sms=108,
    shared_per_sm=164 << 10,
    source="sm_80 occupancy limits (no throughput estimate is made for sm_80)",
)
TARGETS = {90: H100_MODEL, 80: A100_LIMITS}


# ------------------------------------------------------------------------------ compile


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _mock(arg):
    from triton.runtime.jit import MockTensor

    return MockTensor(arg.dtype) if torch.is_tensor(arg) else arg


def compile_launch(launch, capability: int = 90):
    """Compile one :class:`~diffeo_engine.kernels.perturb.Launch` for ``sm_<capability>``
    exactly as the JIT would bind its arguments (``CompiledKernel``, no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*map(_mock, launch.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def _resources(kernel, capability: int) -> dict:
    """Registers, stack and shared memory of the real cubin (``cuobjdump -res-usage``), and
    the spill bytes ``ptxas -v`` reports for the same PTX with Triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _run([str(_tools() / "cuobjdump"), "-res-usage", str(cubin)])
        sass = _run([str(_tools() / "cuobjdump"), "-sass", str(cubin)])
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        arch = "sm_90a" if capability == 90 else f"sm_{capability}"
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        from triton.backends.nvidia.compiler import get_ptxas

        log = _run(
            [get_ptxas(capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "check.cubin")]
        )  # fmt: skip
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared_static = int(re.search(r"SHARED:(\d+)", usage).group(1))
    stores = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    check_regs = re.search(r"Used (\d+) registers", log)
    return {
        "registers": regs,
        "stack_bytes": stack,
        "spill_store_bytes": int(stores.group(1)) if stores else None,
        "spill_load_bytes": int(stores.group(2)) if stores else None,
        "ptxas_check_registers": int(check_regs.group(1)) if check_regs else None,
        "shared_bytes": max(int(kernel.metadata.shared), shared_static),
        "num_warps": kernel.metadata.num_warps,
        "fp_fusion": kernel.metadata.enable_fp_fusion,
    }, sass


def _programs_per_sm(res: dict, model: DeviceModel) -> dict:
    warps = res["num_warps"]
    regs_per_warp = math.ceil(max(res["registers"], 1) * 32 / 256) * 256
    by_regs = model.regs_per_sm // (regs_per_warp * warps)
    by_warps = model.max_warps_per_sm // warps
    by_shared = model.shared_per_sm // (res["shared_bytes"] + 1024) if res["shared_bytes"] else 99
    limits = {"registers": by_regs, "warps": by_warps, "shared": by_shared}
    limits["programs"] = model.max_programs_per_sm
    limiter = min(limits, key=limits.get)
    return {"programs_per_sm": limits[limiter], "limited_by": limiter}


# --------------------------------------------------------------------------------- report


def _meta_inputs(case: StaticCase):
    B = case.shape[0]
    images = torch.empty(case.shape, dtype=case.dtype, device="meta")
    if case.layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    T = torch.empty(B, dtype=torch.float32, device="meta")
    ids = torch.empty(B, dtype=torch.int64, device="meta")
    tau = torch.empty_like(images, dtype=case.out)
    noisy = None if case.noise is None else torch.empty_like(tau)
    return images, T, ids, tau, noisy


def case_launches(case: StaticCase, sm_count: int = H100_MODEL.sms) -> list:
    """The launches the launcher makes for ``case`` on a device with ``sm_count`` SMs, as
    the public call makes them: with the non-finite count (``allow_nonfinite=False``)
    wherever there is something to count (not uint8 in and out)."""
    from diffeo_engine.kernels import perturb as kernels

    images, T, ids, tau, noisy = _meta_inputs(case)
    kernels.check_launchable(images, case.cut)
    kw = {"sm_count": sm_count} if "sm_count" in kernels.launches.__kwdefaults__ else {}
    if not (images.dtype == torch.uint8 and tau.dtype == torch.uint8):
        kw["nonfinite"] = torch.empty(images.shape[0], dtype=torch.int32, device="meta")
    return kernels.launches(
        images, T, ids, tau, noisy, cut=case.cut, seed=case.seed, noise=case.noise,
        interp=case.interp, **kw,
    )  # fmt: skip


def _launch_record(launch, capability: int) -> dict:
    kernel = compile_launch(launch, capability)
    res, sass = _resources(kernel, capability)
    model = TARGETS[capability]
    cost = sass_cost(sass, launch.loops)
    threads = 32 * res["num_warps"]
    programs = math.prod(launch.grid)
    record = {
        "kernel": launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else str(launch),
        "grid": list(launch.grid),
        "constexprs": {k: v for k, v in launch.kwargs.items()},
        "loop_trips": _plain(launch.loops),
        **res,
        **_programs_per_sm(res, model),
        **cost,
        "threads_per_program": threads,
        "programs": programs,
    }
    return record


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _case_record(case: StaticCase, capability: int) -> dict:
    launches = case_launches(case)
    records = [_launch_record(launch, capability) for launch in launches]
    B, C, H, W = case.shape
    channel_pixels = B * C * H * W
    out = {
        "case": case.name,
        "shape": list(case.shape),
        "in_dtype": str(case.dtype).removeprefix("torch."),
        "out_dtype": str(case.out).removeprefix("torch."),
        "cut": case.cut,
        "noise": case.noise,
        "interp": case.interp,
        "target": f"sm_{capability}",
        "launches": records,
        "max_registers": max(r["registers"] for r in records),
        "spill_bytes": sum(
            (r["spill_store_bytes"] or 0) + (r["spill_load_bytes"] or 0) for r in records
        ),
        "min_programs_per_sm": min(r["programs_per_sm"] for r in records),
    }
    if all(r["dynamic_per_thread"] is not None for r in records):
        thread_instr = sum(
            r["dynamic_per_thread"] * r["threads_per_program"] * r["programs"] for r in records
        )
        out["dynamic_instructions_per_channel_pixel"] = thread_instr / channel_pixels
        mix: Counter = Counter()
        for r in records:
            for k, v in r["dynamic_mix_per_thread"].items():
                mix[k] += v * r["threads_per_program"] * r["programs"] / channel_pixels
        out["dynamic_mix_per_channel_pixel"] = {k: round(v, 2) for k, v in sorted(mix.items())}
        if capability == 90:
            out["model_estimate"] = _estimate(case, thread_instr, records)
    else:
        out["dynamic_instructions_per_channel_pixel"] = None
    return out


def _estimate(case: StaticCase, thread_instr: float, records: list[dict]) -> dict:
    """Model estimate (not a measurement) of an H100's time and fraction of copy bandwidth."""
    m = H100_MODEL
    B, C, H, W = case.shape
    make = deform_bytes if case.noise is None else pair_bytes
    bytes_min = make((B, C, H, W), case.dtype, case.out)
    reread = 0
    kernels = [r["kernel"] for r in records]
    x_bytes = B * C * H * W * case.dtype.itemsize
    if "_matched_noise_kernel" in kernels and x_bytes > m.l2_bytes:
        reread = x_bytes  # the second launch reads x again after the whole batch went by
    note = None
    if case.noise == "matched" and "_warp_kernel" in kernels and not reread:
        note = (
            "x is read a second time by each image's last program right after its sibling "
            "programs read it: counted as an L2 hit, not HBM traffic (unverified offline)"
        )
    t_issue = thread_instr / 32 / (m.sms * m.issue_per_sm_per_cycle * m.clock_GHz * 1e9)
    t_memory = (bytes_min + reread) / (m.copy_GBps * 1e9)
    bound = "issue-bound" if t_issue > t_memory else "memory-bound"
    t = max(t_issue, t_memory)
    issue_rate = 32 * m.sms * m.issue_per_sm_per_cycle * m.clock_GHz * 1e9  # thread-instr/s
    return {
        "label": "model estimate (static SASS counts x loop trips; not a GPU measurement)",
        "bytes_min": bytes_min,
        "bytes_reread_x": reread,
        "note": note,
        "t_issue_us": t_issue * 1e6,
        "t_memory_us": t_memory * 1e6,
        "bound": bound,
        "fraction_of_copy": bytes_min / (m.copy_GBps * 1e9) / t,
        # instructions per channel-pixel at which issuing takes as long as the minimum bytes
        "memory_bound_line_per_channel_pixel": (
            bytes_min / (m.copy_GBps * 1e9) * issue_rate / (B * C * H * W)
        ),
    }


def static_report(cases=STATIC_CASES, capabilities=(90, 80), progress=None) -> dict:
    """Compile every case's launches for each target and report; JSON-ready."""
    import triton

    from diffeo_engine.versions import versions

    say = progress or (lambda _: None)
    results = []
    for capability in capabilities:
        for case in cases:
            say(f"sm_{capability} {case.name}")
            results.append(_case_record(case, capability))
    return {
        "schema": STATIC_SCHEMA,
        "label": "offline static analysis: compiled, never run; throughput is a model estimate",
        "triton": triton.__version__,
        "versions": versions(detail=True),
        "model": dataclasses.asdict(H100_MODEL),
        "results": results,
    }


def format_static_table(doc: dict) -> str:
    """One row per case and target: registers, spills, programs/SM, instructions per
    channel-pixel, the memory-bound line and the model estimate."""
    head = ["target", "case", "launches", "regs", "spill B", "prog/SM", "instr/cpx",
            "line", "bound", "% copy (model est.)"]  # fmt: skip
    rows = []
    for r in doc["results"]:
        est = r.get("model_estimate") or {}
        dyn = r.get("dynamic_instructions_per_channel_pixel")
        rows.append(
            [
                r["target"],
                r["case"],
                str(len(r["launches"])),
                str(r["max_registers"]),
                str(r["spill_bytes"]),
                str(r["min_programs_per_sm"]),
                "-" if dyn is None else f"{dyn:.0f}",
                f"{est['memory_bound_line_per_channel_pixel']:.0f}" if est else "-",
                est.get("bound", "-"),
                f"{100 * est['fraction_of_copy']:.0f}" if est else "-",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [
        "Static cost report (compiled offline, never run). '% copy' is a MODEL ESTIMATE for an "
        "H100, not a measurement.",
        "  ".join(h.ljust(w) for h, w in zip(head, widths)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_static(doc: dict, path: str | os.PathLike) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    path.with_suffix(".md").write_text("```\n" + format_static_table(doc) + "\n```\n")
    return path
