"""Side-by-side throughput of perturbation engines against the device's own copy ceiling,
and an offline cost report of the Triton kernels.

Each engine is timed on random data, inputs rotated among several buffers so that caches
do not flatter small sizes, and reported under the minimum-bytes model of design.md
section 6 as a fraction of a device-to-device copy measured in the same run. One file per
job: ``bytes_model``, ``baselines`` (grid_sample, the published loop), ``providers`` (the
matrix), ``timing``, ``device`` (NVML, versions), ``run``, ``report``, ``static`` (the
sm_90 / sm_80 cost report of every kernel variant, no GPU needed) and ``command``
(``diffeo-engine bench``). The pytest-benchmark suite under ``bench/`` is built on it.
"""

from __future__ import annotations

import time  # noqa: F401  (tests sleep through ``bm.time``)

from diffeo_engine.benchmark.baselines import (
    grid_sample_perturb,
    published_loop_perturb,
    published_loop_warp,
)
from diffeo_engine.benchmark.bytes_model import BYTES_MODEL, deform_bytes, pair_bytes
from diffeo_engine.benchmark.command import add_command
from diffeo_engine.benchmark.device import ClockSampler, device_info
from diffeo_engine.benchmark.providers import (
    DTYPES,
    ISSUE_CUTS,
    ISSUE_DTYPES,
    ISSUE_SHAPES,
    MAX_ENTROPY,
    PROVIDERS,
    SMOKE_CUTS,
    SMOKE_DTYPES,
    SMOKE_SHAPES,
    Case,
    PlanItem,
    Provider,
    plan,
    suite_settings,
)
from diffeo_engine.benchmark.report import format_table, result_filename, write_plot
from diffeo_engine.benchmark.run import SCHEMA, merge_results, run_benchmarks
from diffeo_engine.benchmark.timing import Runner, copy_bandwidth, time_callable

__all__ = [
    "BYTES_MODEL",
    "DTYPES",
    "ISSUE_CUTS",
    "ISSUE_DTYPES",
    "ISSUE_SHAPES",
    "MAX_ENTROPY",
    "PROVIDERS",
    "SCHEMA",
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
