"""Shared set-up of the benchmark suite: ``pytest bench/ --benchmark-json=FILE``.

Generic for every ``bench/test_bench_*.py``: without CUDA the Triton kernels run in the
interpreter (``TRITON_INTERPRET=1`` set here, before ``triton`` is first imported) and
the suite runs tiny shapes, one round (``DIFFEO_BENCH_SMOKE=1`` forces that on a GPU too).
Every test that uses ``benchmark`` gets the device telemetry (NVML clocks, power,
temperature sampled while it runs; or why they are missing) in ``benchmark.extra_info``,
and the JSON gets the device description and a copy bandwidth measured in the same run.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from diffeo_engine import benchmark as bm

DEVICE, SMOKE = bm.suite_settings()
_SESSION: dict = {}


def _copy_bandwidth() -> dict:
    if "copy" not in _SESSION:
        _SESSION["copy"] = bm.copy_bandwidth(DEVICE, smoke=SMOKE)
    return _SESSION["copy"]


def _device_info() -> dict:
    if "device" not in _SESSION:
        _SESSION["device"] = bm.device_info(DEVICE)
    return _SESSION["device"]


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device benchmarks run on (``DIFFEO_BENCH_DEVICE``, else CUDA if present)."""
    return DEVICE


@pytest.fixture(scope="session")
def bench_smoke() -> bool:
    """True for tiny shapes and one round (no CUDA, or ``DIFFEO_BENCH_SMOKE=1``)."""
    return SMOKE


@pytest.fixture(scope="session")
def copy_bandwidth_GBps() -> float:
    """Device-to-device copy rate (bytes read + written), measured once in this run."""
    return _copy_bandwidth()["copy_bandwidth_GBps"]


@pytest.fixture(scope="session")
def device_telemetry() -> dict:
    """Device name, driver, versions and clocks (see ``diffeo_engine.benchmark.device_info``)."""
    return _device_info()


@pytest.fixture(autouse=True)
def _bench_telemetry(request):
    """Sample NVML while a benchmark test runs; attach the summary to its extra_info."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    bench = request.getfixturevalue("benchmark")
    sampler = bm.ClockSampler(DEVICE)
    sampler.start()
    try:
        yield
    finally:
        sampler.stop()
        bench.extra_info["device"] = _device_info().get("name")
        bench.extra_info["smoke"] = SMOKE
        bench.extra_info["telemetry"] = sampler.summary()


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the hooks below exist only with the plugin
    pass
else:

    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["diffeo_engine_device"] = _device_info()

    def pytest_benchmark_update_json(config, benchmarks, output_json):
        copy = _copy_bandwidth()
        output_json["diffeo_engine"] = {
            "schema": bm.SCHEMA,
            "device": _device_info(),
            "copy_bandwidth_GBps": copy["copy_bandwidth_GBps"],
            "copy": copy,
            "smoke": SMOKE,
        }
