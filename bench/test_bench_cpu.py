"""The CPU path (issue 13) side by side: ``pytest bench/test_bench_cpu.py``.

3x32x32 images, B = 1000 (256 for the published per-image loop), cut 3, matched noise,
float32 / bfloat16 / uint8 in: the eager reference, the same reference compiled
(``DIFFEO_ENGINE_COMPILE=1``, :mod:`diffeo_engine.compiled`; its compile is paid before
timing), the eager ``grid_sample`` pipeline and the published loop. ``extra_info`` carries
pairs/s; compare within one run (a loaded machine moves absolute figures a lot).
"""

import pytest
import torch

import diffeo_engine as de
from diffeo_engine import benchmark as bm

T, CUT, SHAPE = 0.002, 3, (3, 32, 32)
PROVIDERS = ["reference", "reference-compiled", "grid_sample", "published-loop"]


def _images(batch: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(0))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_perturb(benchmark, monkeypatch, provider, dtype):
    batch = 256 if provider == "published-loop" else 1000
    images = _images(batch, dtype)
    ids = torch.arange(batch)
    if provider.startswith("reference"):
        monkeypatch.setenv("DIFFEO_ENGINE_COMPILE", "1" if provider.endswith("compiled") else "0")

        def run():
            return de.perturb(images, T, CUT, seed=1, ids=ids, backend="torch")

    elif provider == "grid_sample":

        def run():
            return bm.grid_sample_perturb(images, T, CUT)

    else:

        def run():
            return bm.published_loop_perturb(images, T, CUT)

    tau, noisy = run()  # first call: compilation, allocation
    assert tau.shape == noisy.shape == images.shape
    benchmark.group = f"cpu-{dtype}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider, batch=batch, pairs_per_s=batch / benchmark.stats.stats.min
    )
