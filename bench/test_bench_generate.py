"""``generate`` keeps memory flat: peak RSS does not grow with the number of images written.

Each size runs in a fresh process (peak RSS only ever rises within one) writing ``K``
perturbations of the same small source, so the source's mapped pages are equal in both and
only the amount written changes (8x). Reported through pytest-benchmark's ``extra_info``;
the wall time it records is that of both runs. ``DIFFEO_BENCH_SMOKE=1`` shrinks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SMOKE = os.environ.get("DIFFEO_BENCH_SMOKE") == "1"
N_SOURCE = 32
SIDE = 16 if SMOKE else 32
K_SMALL, K_LARGE = (6, 48) if SMOKE else (8, 64)  # 8x more images written
SHARD = 64  # several shards even in the small run: the writer reaches its steady state
SLACK_MIB = 24  # allocator and page-table noise between two processes

CHILD = """
import json, resource, sys
from diffeo_engine.generate import generate
source, out, K, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
manifest = generate(source, out, T=0.01, cut=4, per_image=K, seed=0, dtype="float32",
                    shard_size=shard, batch_size=32, progress=False)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "images": manifest["total_images"]}))
"""


def _peak(source, out, K) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(out), str(K), str(SHARD)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's unit")
def test_generate_peak_memory_is_flat(benchmark, tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "source.npy"
    np.save(source, rng.integers(0, 256, (N_SOURCE, 3, SIDE, SIDE), dtype=np.uint8))
    bytes_per_id = 2 * 3 * SIDE * SIDE * 4  # tau + noisy, float32

    def both():
        return _peak(source, tmp_path / "small", K_SMALL), _peak(
            source, tmp_path / "large", K_LARGE
        )

    small, large = benchmark.pedantic(both, rounds=1, iterations=1)
    written = [r["images"] * bytes_per_id / 2**20 for r in (small, large)]
    growth = (large["peak_kib"] - small["peak_kib"]) / 1024
    benchmark.extra_info.update(
        images=[small["images"], large["images"]],
        written_MiB=written,
        peak_rss_MiB=[small["peak_kib"] / 1024, large["peak_kib"] / 1024],
        growth_MiB=growth,
    )
    # writing 8x more must not cost memory in proportion: far less than the extra data
    limit = SLACK_MIB if SMOKE else min(SLACK_MIB, 0.25 * (written[1] - written[0]))
    assert growth < limit, (small, large, written)


def test_source_fingerprint_is_cheap_next_to_the_run(benchmark, tmp_path):
    """The fingerprint hashes every row (issue 16 item 2). Per image it must cost a small
    fraction of what ``generate`` spends computing the image anyway, so no size/mtime cache
    is kept. Both are timed here, side by side, on MNIST-sized images."""
    import time

    import torch

    from diffeo_engine import ops
    from diffeo_engine.data.sources import open_source

    n = 2_000 if SMOKE else 20_000  # 1.5 / 15 MiB
    path = tmp_path / "source.npy"
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    np.save(path, images)
    batch = torch.from_numpy(images[:512, None].copy())
    start = time.perf_counter()
    ops.perturb(batch, 0.005, 3, seed=0, out_dtype=torch.uint8)
    compute_per_image = (time.perf_counter() - start) / len(batch)

    benchmark.pedantic(lambda: open_source(path).fingerprint(), rounds=3, iterations=1)
    hash_per_image = benchmark.stats.stats.median / n
    ratio = hash_per_image / compute_per_image
    benchmark.extra_info.update(
        MiB=path.stat().st_size / 2**20,
        hash_us_per_image=hash_per_image * 1e6,
        perturb_us_per_image=compute_per_image * 1e6,
        hash_over_perturb=ratio,
    )
    assert ratio < 0.2, ratio  # measured 0.009 on a loaded 2-core CPU (noisy)
