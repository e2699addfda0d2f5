"""Timing: rotating input buffers, steady-state medians with their spread, the copy ceiling.

CUDA events around groups of back-to-back calls (or ``triton.testing.do_bench``), a host
clock on CPU; every timing reports the median and the min-max over rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from diffeo_engine.benchmark.bytes_model import deform_bytes, pair_bytes
from diffeo_engine.benchmark.device import ClockSampler
from diffeo_engine.benchmark.providers import PROVIDERS, Case

__all__ = ["Runner", "copy_bandwidth", "time_callable"]


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
    """Median seconds per call of ``fn`` after warm-up, with the min-max over rounds.

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
        "min_s": min(times),
        "max_s": max(times),
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
