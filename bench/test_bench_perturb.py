"""Throughput of every perturbation provider over issue 6's matrix (tiny shapes in smoke).

``pytest bench/test_bench_perturb.py --benchmark-json=FILE``. Each round runs ``inner``
calls back to back on rotating input buffers, then synchronises; ``extra_info`` carries
pairs/s, effective GB/s under the minimum-bytes model and the fraction of the copy
bandwidth measured in the same session (see ``diffeo_engine.benchmark``).
"""

import math
import time

import pytest
import torch

from diffeo_engine import benchmark as bm

DEVICE, SMOKE = bm.suite_settings()

if SMOKE:
    SHAPES, DTYPES, CUTS = bm.SMOKE_SHAPES, bm.SMOKE_DTYPES, bm.SMOKE_CUTS
else:
    SHAPES, DTYPES, CUTS = bm.ISSUE_SHAPES, bm.ISSUE_DTYPES, bm.ISSUE_CUTS

ITEMS = bm.plan(SHAPES, DTYPES, CUTS, list(bm.PROVIDERS), DEVICE)
FIRST = ITEMS[0].case
ROUNDS, WARMUP_ROUNDS, GROUP_S = (1, 0, 0.0) if SMOKE else (15, 2, 0.01)


@pytest.mark.parametrize("item", ITEMS, ids=[item.id for item in ITEMS])
def test_perturb(benchmark, item, copy_bandwidth_GBps):
    if item.skip is not None:
        pytest.skip(f"{item.provider}: {item.skip}")
    compiled = item.provider == "grid_sample-compiled"
    same_case = (item.case.shape, item.case.dtype, item.case.cut) == (
        FIRST.shape,
        FIRST.dtype,
        FIRST.cut,
    )
    if SMOKE and compiled and not same_case:
        pytest.skip("grid_sample-compiled: smoke compiles one case only (compile time)")
    runner = bm.Runner(item.provider, item.case)
    try:
        start = time.perf_counter()
        runner.group(1)  # compilation, autotuning, first allocation
    except Exception as error:
        if compiled:
            pytest.skip(f"grid_sample-compiled: torch.compile failed: {error}")
        raise
    first = time.perf_counter() - start
    estimate = first
    if not SMOKE:
        start = time.perf_counter()
        runner.group(3)
        estimate = (time.perf_counter() - start) / 3
    inner = max(1, min(1000, math.ceil(GROUP_S / max(estimate, 1e-9))))

    case = item.case
    benchmark.group = f"{case.batch}x{'x'.join(map(str, case.shape))}-{case.dtype}-cut{case.cut}"
    benchmark.extra_info.update(
        provider=item.provider,
        kind=runner.provider.kind,
        law=runner.provider.law,
        shape=list(case.shape),
        batch=case.batch,
        dtype=case.dtype_label,
        cut=case.cut,
        T=case.T,
        bytes_per_pair=runner.bytes_per_item,
        n_buffers=runner.n_buffers,
        calls_per_round=inner,
        copy_bandwidth_GBps=copy_bandwidth_GBps,
    )
    benchmark.pedantic(
        runner.group, args=(inner,), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        per_call = stats.median / inner
        pairs = case.batch / per_call
        gbps = pairs * runner.bytes_per_item / 1e9
        benchmark.extra_info.update(
            pairs_per_s=pairs,
            effective_GBps=gbps,
            fraction_of_copy=gbps / copy_bandwidth_GBps,
        )
    if DEVICE.type == "cuda":
        del runner
        torch.cuda.empty_cache()
