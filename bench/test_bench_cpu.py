"""The CPU path (issue 25) side by side:
``DIFFEO_BENCH_CPU=1 pytest bench/test_bench_cpu.py --benchmark-verbose``.

Batches: 3x32x32 at B = 1000 (256 for the published per-image loop) and 3x224x224 at
B = 64, cut 3, matched noise, float32 (and bfloat16 / uint8 in at 32x32): the fused CPU
kernel through the public call (``backend="cpu"``, the default on CPU), the eager
reference, the eager ``grid_sample`` pipeline and the published loop. One image per call:
``perturb``, the ``Diffeo`` transform on a CHW image and the ``grid_sample`` pipeline on
that image. ``extra_info`` carries pairs/s (and microseconds per call); compare within one
run: a loaded machine moves absolute figures a lot. Without ``DIFFEO_BENCH_CPU=1`` (CI)
every case runs once on a batch of 4, so that the harness cannot rot.
"""

import os

import pytest
import torch

import diffeo_engine as de
from diffeo_engine import benchmark as bm

T, CUT = 0.002, 3
FULL = os.environ.get("DIFFEO_BENCH_CPU") == "1"
ROUNDS = 5 if FULL else 1
BATCHES = {
    "fused-cpu": {(3, 32, 32): 1000, (3, 224, 224): 64},
    "torch-reference": {(3, 32, 32): 1000, (3, 224, 224): 64},
    "grid_sample": {(3, 32, 32): 1000, (3, 224, 224): 64},
    "published-loop": {(3, 32, 32): 256, (3, 224, 224): 16},
}
CASES = [
    (provider, shape, dtype)
    for provider in BATCHES
    for shape in BATCHES[provider]
    for dtype in (
        [torch.float32, torch.bfloat16, torch.uint8] if shape[1] == 32 else [torch.float32]
    )
]


def _images(batch: int, shape, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


def _pipeline(provider: str, images: torch.Tensor, ids: torch.Tensor):
    if provider == "fused-cpu":
        return lambda: de.perturb(images, T, CUT, seed=1, ids=ids, backend="cpu")
    if provider == "torch-reference":
        return lambda: de.perturb(images, T, CUT, seed=1, ids=ids, backend="torch")
    if provider == "grid_sample":
        return lambda: bm.grid_sample_perturb(images, T, CUT)
    return lambda: bm.published_loop_perturb(images, T, CUT)


@pytest.mark.parametrize(
    ("provider", "shape", "dtype"),
    CASES,
    ids=[f"{p}-{'x'.join(map(str, s))}-{str(d).removeprefix('torch.')}" for p, s, d in CASES],
)
def test_cpu_batch(benchmark, provider, shape, dtype):
    batch = BATCHES[provider][shape] if FULL else 4
    images = _images(batch, shape, dtype)
    run = _pipeline(provider, images, torch.arange(batch))
    tau, noisy = run()  # the first call: JIT cache load, allocation
    assert tau.shape == noisy.shape == images.shape
    benchmark.group = f"cpu-{'x'.join(map(str, shape))}-{dtype}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1 if FULL else 0)
    benchmark.extra_info.update(
        provider=provider, batch=batch, pairs_per_s=batch / benchmark.stats.stats.median
    )


@pytest.mark.parametrize("provider", ["perturb", "Diffeo", "grid_sample"])
def test_one_image_per_call(benchmark, provider):
    """What a DataLoader worker pays per sample: one 3x32x32 image per call."""
    image = _images(1, (3, 32, 32), torch.float32)
    if provider == "perturb":

        def run():
            return de.perturb(image, T, CUT, seed=1, ids=[7])

    elif provider == "Diffeo":
        transform = de.Diffeo(T, CUT, seed=1)
        chw = image[0]

        def run():
            return transform(chw)

    else:

        def run():
            return bm.grid_sample_perturb(image, T, CUT)

    run()
    benchmark.group = "cpu-one-image-per-call"
    benchmark.pedantic(run, rounds=ROUNDS * 20, iterations=50 if FULL else 1)
    per_call = benchmark.stats.stats.median
    benchmark.extra_info.update(provider=provider, microseconds_per_call=per_call * 1e6)
