"""Output buffers of the kernels: allocated in the images' layout, or given and checked.

Shared by both launchers (Triton and CPU), so that a caller's ``out=`` buffers obey one
rule whatever the backend.
"""

from __future__ import annotations

import torch

from diffeo_engine.reference import memory_format_of

__all__ = ["outputs"]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Bytes ``[start, end)`` a tensor's elements occupy in its storage."""
    if t.numel() == 0:
        return 0, 0
    lo = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
    hi = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
    start = t.data_ptr() + lo * t.element_size()
    return start, t.data_ptr() + (hi + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ranges of ``a`` and ``b`` intersect (conservative: interleaved
    but disjoint views count as overlapping)."""
    if a.device != b.device or a.device.type == "meta":
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def outputs(images, out_dtype, noise, out):
    """``(tau, noisy or None)``: fresh tensors in the images' layout, or the caller's
    buffers ``out`` checked (shape, dtype, device, strides, and no memory shared with the
    images or with each other)."""
    if out is None:
        fmt = memory_format_of(images)
        tau = torch.empty(images.shape, dtype=out_dtype, device=images.device, memory_format=fmt)
        noisy = None if noise is None else torch.empty_like(tau)
        return tau, noisy
    tau, noisy = out
    for name, buf in (("out[0]", tau), ("out[1]", noisy)):
        if buf is None:
            if name == "out[1]" and noise is None:
                continue
            raise ValueError(f"{name}: expected an output buffer, got None")
        if buf.shape != images.shape or buf.dtype != out_dtype or buf.device != images.device:
            raise ValueError(
                f"{name}: expected a {out_dtype} tensor of shape {tuple(images.shape)} on "
                f"{images.device}, got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
            )
        if _overlap(buf, images):
            raise ValueError(f"{name}: expected a buffer whose memory does not overlap the images")
    if noisy is not None and noisy.stride() != tau.stride():
        raise ValueError("out: expected both buffers to have the same strides")
    if noisy is not None and _overlap(noisy, tau):
        raise ValueError("out: expected two buffers whose memory does not overlap each other")
    return tau, noisy
