"""What a result was measured on: device, driver, clocks (NVML), software versions.

NVML needs nvidia-ml-py; where it or CUDA is missing the record says why.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading

import torch

from diffeo_engine.versions import versions

__all__ = ["ClockSampler", "device_info"]


def _nvml():
    """``(pynvml, None)`` or ``(None, why not)``."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return None, f"NVML could not start: {error}"
    return pynvml, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(nvml, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            text = str(uuid)
            return nvml.nvmlDeviceGetHandleByUUID(
                text if text.startswith("GPU-") else f"GPU-{text}"
            )
        except Exception:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def device_info(device: str | torch.device) -> dict:
    """What the figures were measured on: device, driver, clocks, versions.

    NVML fields (driver, clocks, power, temperature) need nvidia-ml-py; where it or CUDA is
    missing, ``nvml`` says why and the rest is recorded.
    """
    device = torch.device(device)
    info: dict = {"type": device.type, "versions": versions(detail=True)}
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    info["host"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type != "cuda":
        info["name"] = f"CPU ({info['host']['processor']})"
        info["nvml"] = {"available": False, "reason": "not a CUDA device"}
        return info
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update(
        name=props.name,
        index=index,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        total_memory_bytes=props.total_memory,
        l2_cache_bytes=getattr(props, "L2_cache_size", None),
    )
    nvml, why = _nvml()
    if nvml is None:
        info["nvml"] = {"available": False, "reason": why}
        return info
    handle = _nvml_handle(nvml, device)
    cuda_driver = _try(nvml.nvmlSystemGetCudaDriverVersion)
    info["nvml"] = {
        "available": True,
        "driver": _text(_try(nvml.nvmlSystemGetDriverVersion)),
        "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}" if cuda_driver else None,
        "name": _text(_try(nvml.nvmlDeviceGetName, handle)),
        "max_sm_clock_MHz": _try(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        "max_mem_clock_MHz": _try(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_limit_mW": _try(nvml.nvmlDeviceGetEnforcedPowerLimit, handle),
        "idle": _nvml_sample(nvml, handle),
    }
    return info


def _nvml_sample(nvml, handle) -> dict:
    memory = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
    power = _try(nvml.nvmlDeviceGetPowerUsage, handle)
    return {
        "sm_clock_MHz": _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "mem_clock_MHz": _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        "power_W": power / 1e3 if power is not None else None,
        "temperature_C": _try(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "memory_used_bytes": memory.used if memory is not None else None,
    }


class ClockSampler:
    """Samples SM / memory clocks, power, temperature and memory used with NVML in a
    background thread while started; :meth:`summary` gives min / median / max of each.

    Without CUDA or nvidia-ml-py it samples nothing and the summary says why.
    """

    def __init__(self, device: str | torch.device, interval_s: float = 0.01):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if self.device.type != "cuda":
            self.nvml, self.reason, self.handle = None, "not a CUDA device", None
        else:
            self.nvml, self.reason = _nvml()
            self.handle = _try(_nvml_handle, self.nvml, self.device) if self.nvml else None
            if self.nvml is not None and self.handle is None:
                self.nvml, self.reason = None, "NVML has no handle for this device"

    def _loop(self) -> None:
        while True:
            self.samples.append(_nvml_sample(self.nvml, self.handle))
            if self._stop.wait(self.interval_s):
                break

    def start(self) -> None:
        if self.nvml is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ClockSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        if self.nvml is None:
            return {"available": False, "reason": self.reason}
        out: dict = {"available": True, "samples": len(self.samples)}
        for key in ("sm_clock_MHz", "mem_clock_MHz", "power_W", "temperature_C"):
            values = [s[key] for s in self.samples if s.get(key) is not None]
            if values:
                out[key] = {
                    "min": min(values),
                    "median": statistics.median(values),
                    "max": max(values),
                }
        used = [s["memory_used_bytes"] for s in self.samples if s.get("memory_used_bytes")]
        if used:
            out["memory_used_bytes_max"] = max(used)
        return out
