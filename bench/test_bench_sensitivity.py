"""The streaming meter against the published full-batch estimator: time and peak memory.

``pytest bench/test_bench_sensitivity.py --benchmark-json=FILE``. The published approach
(Petrini et al. 2021; Tomasini et al. 2022) runs the whole probe set through the network at
once for ``x``, ``tau x`` and ``x + eta``, keeps every measured activation, then takes
``cdist`` over all pairs: its memory grows with the number of images (and ``cdist`` with
its square). The meter streams batches into float64 sums: its memory stays flat.

Sizes: issue 4 asks for 500 and 5000 CIFAR-sized images through a ResNet-18-style
network. Those run on CUDA, or on CPU with ``DIFFEO_BENCH_SENSITIVITY_FULL=1``; otherwise
(no CUDA, or ``DIFFEO_BENCH_SMOKE=1``) the suite's smoke mode shrinks everything (a
narrow network, 16 and 48 images) so that CI can run it. The published approach is
skipped where its activations would not fit in ``DIFFEO_BENCH_MAX_GB`` (default: half the
machine's memory), with the estimate in the skip reason.

Peak memory is the process's resident-set high-water mark above the level before the run
(``/proc/self/clear_refs`` resets it on Linux; elsewhere a 2 ms sampling thread), and on
CUDA ``torch.cuda.max_memory_allocated``. ``extra_info`` carries ``peak_MiB``,
``images_per_s`` and the output layer's ``D``.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from diffeo_engine import ops
from diffeo_engine.models import get_model
from diffeo_engine.sensitivity import SensitivityMeter

CUDA = torch.cuda.is_available()
FULL = os.environ.get("DIFFEO_BENCH_SENSITIVITY_FULL") == "1" or (
    CUDA and os.environ.get("DIFFEO_BENCH_SMOKE") != "1"
)
DEVICE = torch.device("cuda" if CUDA and FULL else "cpu")
COUNTS = (500, 5000) if FULL else (16, 48)
WIDTH = 64 if FULL else 8
BATCH = 100 if FULL else 8
SIZE = 32
T, CUT, SEED = 3e-3, 3, 0


# ------------------------------------------------------------------------------ model


def make_model() -> nn.Module:
    """The registry's CIFAR ``resnet18`` at ``WIDTH`` channels, in eval mode."""
    return get_model("resnet18", width=WIDTH, seed=0).to(DEVICE).eval()


def probe_images(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, SIZE, SIZE, generator=gen).to(DEVICE)


# ----------------------------------------------------------------------------- memory


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a ``/proc`` file (``VmHWM`` of ``/proc/self/status``, ...) in bytes."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory (and CUDA allocations) above the level at entry, in MiB."""

    def __enter__(self) -> PeakMemory:
        self.base = _proc_bytes("/proc/self/status", "VmRSS") or 0
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            self.reset = True
        except OSError:
            pass
        self.sampled, self.stop = self.base, threading.Event()
        if not self.reset:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.sampled = max(self.sampled, _proc_bytes("/proc/self/status", "VmRSS") or 0)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        peak = (_proc_bytes("/proc/self/status", "VmHWM") or 0) if self.reset else self.sampled
        self.host_MiB = max(peak - self.base, 0) / 2**20
        self.cuda_MiB = None
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            self.cuda_MiB = (torch.cuda.max_memory_allocated() - self.cuda_base) / 2**20

    @property
    def MiB(self) -> float:
        return self.cuda_MiB if self.cuda_MiB is not None else self.host_MiB


def _available_bytes() -> int:
    limit = os.environ.get("DIFFEO_BENCH_MAX_GB")
    if limit:
        return int(float(limit) * 2**30)
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_properties(DEVICE).total_memory // 2
    total = _proc_bytes("/proc/meminfo", "MemTotal")
    return total // 2 if total else 8 * 2**30


# -------------------------------------------------------------------------- the runs


def leaf_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and next(m.children(), None) is None]


def run_meter(model: nn.Module, x: torch.Tensor) -> dict:
    with SensitivityMeter(model, layers="leaves", T=T, cut=CUT, seed=SEED) as meter:
        for start in range(0, x.shape[0], BATCH):
            meter.update(x[start : start + BATCH])
        result = meter.compute()
    return {r.name: r.D for r in result.layers}


def run_published(model: nn.Module, x: torch.Tensor) -> dict:
    """Whole set at once, every leaf's activations kept, ``cdist`` over all pairs."""
    names = leaf_names(model)
    modules = dict(model.named_modules())
    tau, noisy = ops.perturb(x, T, CUT, seed=SEED)

    def features(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out, handles = {}, []
        for name in names:

            def hook(module, args, output, name=name):
                key, i = name, 1
                while key in out:
                    key, i = f"{name}#{i}", i + 1
                out[key] = output.detach().flatten(1)

            handles.append(modules[name].register_forward_hook(hook))
        with torch.no_grad():
            out["output"] = model(inputs)
        for handle in handles:
            handle.remove()
        return out

    clean, warped = features(x), features(tau)
    features(noisy)  # the published pass also runs x + eta (for G), kept for timing
    result = {}
    for name, f in clean.items():
        den = torch.cdist(f, f).square().mean()
        result[name] = float((warped[name] - f).square().sum(1).mean() / den)
    return result


def _activation_bytes(model: nn.Module) -> int:
    """Bytes of every leaf activation for one image (float32)."""
    sizes = []
    handles = [
        m.register_forward_hook(lambda m, a, o: sizes.append(o.numel()))
        for n, m in model.named_modules()
        if n and next(m.children(), None) is None
    ]
    with torch.no_grad():
        model(probe_images(2)[:1])
    for handle in handles:
        handle.remove()
    return 4 * sum(sizes)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n_images", COUNTS)
@pytest.mark.parametrize("approach", ["meter", "published"])
def test_sensitivity_time_and_memory(benchmark, approach, n_images):
    model = make_model()
    x = probe_images(n_images)
    if approach == "published":
        need = 3 * n_images * _activation_bytes(model) + 3 * n_images**2 * 4
        if need > _available_bytes():
            pytest.skip(
                f"published: needs about {need / 2**30:.1f} GiB of activations "
                f"(> DIFFEO_BENCH_MAX_GB or half the memory); the meter streams them"
            )
    fn = run_meter if approach == "meter" else run_published
    fn(model, x[: min(n_images, 2 * BATCH)])  # warm-up: allocator, kernels
    holder = {}

    def once():
        with PeakMemory() as peak:
            start = time.perf_counter()
            holder["D"] = fn(model, x)
            _sync()
            holder["s"] = time.perf_counter() - start
        holder["peak"] = peak

    benchmark.group = f"sensitivity-{n_images}"
    benchmark.pedantic(once, rounds=1, iterations=1)
    peak = holder["peak"]
    benchmark.extra_info.update(
        approach=approach,
        images=n_images,
        width=WIDTH,
        batch=BATCH if approach == "meter" else n_images,
        layers=len(holder["D"]),
        peak_MiB=round(peak.MiB, 1),
        host_peak_MiB=round(peak.host_MiB, 1),
        images_per_s=n_images / holder["s"],
        D_output=holder["D"]["output"],
        device=str(DEVICE),
        torch_threads=torch.get_num_threads(),
    )
    assert holder["D"]["output"] > 0


def test_meter_overhead_over_bare_forward(benchmark):
    """The meter against bare forward passes of the same ``3B`` batches (target < 15%
    on a GPU); ``extra_info['overhead']`` is ``meter / bare - 1``."""
    model = make_model()
    n = COUNTS[0]
    x = probe_images(n)
    batches = []
    for start in range(0, n, BATCH):
        chunk = x[start : start + BATCH]
        ids = torch.arange(start, start + chunk.shape[0], device=DEVICE)
        batches.append(torch.cat([chunk, *ops.perturb(chunk, T, CUT, seed=SEED, ids=ids)]))

    def bare() -> float:
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        _sync()
        return time.perf_counter() - start

    def metered() -> float:
        _sync()
        start = time.perf_counter()
        run_meter(model, x)
        _sync()
        return time.perf_counter() - start

    bare()
    bare_s = min(bare() for _ in range(2))
    timings = []
    benchmark.group = "sensitivity-overhead"
    benchmark.pedantic(lambda: timings.append(metered()), rounds=2, iterations=1)
    benchmark.extra_info.update(
        images=n,
        bare_forward_s=bare_s,
        meter_s=min(timings),
        overhead=min(timings) / bare_s - 1,
        includes="perturbation + hooks + float64 sums over every leaf",
        device=str(DEVICE),
        torch_threads=torch.get_num_threads(),
    )


def test_meter_agrees_with_published():
    """Same perturbed images, so ``meter = published * (N - 1) / N`` (float32 nets)."""
    model = make_model()
    n = COUNTS[0]
    x = probe_images(n)
    meter, published = run_meter(model, x), run_published(model, x)
    assert set(meter) == set(published)
    for name, D in published.items():
        assert abs(meter[name] - D * (n - 1) / n) <= 2e-3 * abs(D), name
