"""Public ``deform`` / ``perturb``: check the arguments once, pick a backend, call it.

``backend="auto"`` runs the Triton kernels on CUDA tensors, the fused CPU kernel
(:mod:`diffeo_engine.kernels.cpu`, numba) on CPU tensors, and the PyTorch reference
elsewhere (float64 images, other devices, or where numba does not import: then with one
warning). ``"triton"``, ``"cpu"`` and ``"torch"`` force one. Eager calls go straight to the
implementation (no ``torch.library`` dispatch, so a first call imports neither
``torch._dynamo`` nor ``triton``); under ``torch.compile`` the operators of
:mod:`diffeo_engine.operators` are traced instead. The kernels check the images for NaN
and inf in their own read of them (a per-image count, one small read back), never in a
separate pass. Gradients with respect to float images flow on every backend
(:func:`diffeo_engine.reference.vjp`, twice differentiable).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import NamedTuple

import torch

from diffeo_engine import operators, reference
from diffeo_engine.physics import (
    IMAGE_DTYPES,
    MEMORY_CHECK_FLOOR,
    _is_integer,
    check_cuts,
    check_field,
    check_finite,
    check_ids,
    check_images,
    check_in_dtype,
    check_interp,
    check_memory,
    check_noise,
    check_out_dtype,
    check_overflow,
    check_scalar_T,
    check_seed,
    check_T,
    perturbation_bytes,
)

__all__ = ["BACKENDS", "deform", "perturb", "resolved_backend"]

BACKENDS = ("auto", "torch", "triton", "cpu")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_cpu_kernel: list = []  # [module] once numba imported, [None] once it failed


def cpu_kernel():
    """:mod:`diffeo_engine.kernels.cpu`, imported on the first CPU call; None (and one
    warning) where numba does not import, so that the reference takes over."""
    if not _cpu_kernel:
        try:
            from diffeo_engine.kernels import cpu
        except ImportError as error:
            warnings.warn(
                f"diffeo_engine: the fused CPU kernel needs numba, which does not import here "
                f"({error}); using the PyTorch reference (same images, several times slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            cpu = None
        _cpu_kernel.append(cpu)
    return _cpu_kernel[0]


def _implementation(images: torch.Tensor, backend: str) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"`` for these images."""
    device = images.device.type
    if backend == "triton":
        if device == "cuda" or (device == "cpu" and _interpreter_enabled()):
            return "triton"
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
            f"set before triton is imported), got images on {images.device}; use "
            "backend='torch'"
        )
    if backend == "cpu":
        if device != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, got images on {images.device}")
        if images.dtype == torch.float64:
            raise TypeError(
                "images: the cpu backend takes uint8, float16, bfloat16 or float32 images, got "
                "torch.float64 (use backend='torch' for it)"
            )
        if cpu_kernel() is None:
            raise ValueError("backend: 'cpu' needs numba, which does not import here")
        return "cpu"
    return resolved_backend(images.device, images.dtype, backend)


def resolved_backend(device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> str:
    """What a call on images of this device and dtype runs: ``"triton"``, ``"cpu"`` or
    ``"torch"`` (a forced backend is itself; ``"auto"`` as described above). Generated data
    sets record it beside each shard."""
    if _check_backend(backend) != "auto":
        return backend
    device = torch.device(device).type
    if device == "cuda":
        return "triton"
    if device == "cpu" and dtype != torch.float64 and cpu_kernel() is not None:
        return "cpu"
    return "torch"


def _check_size(images, cut, out_dtype, backend: str, outputs: int) -> None:
    """Refuse, naming ``images``, a call whose outputs and the temporaries of the path that
    will run exceed what the device can give (:func:`physics.check_memory`), before
    anything is allocated: a few integer operations per call. Malformed arguments are left
    to the checks that name them."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.dtype not in IMAGE_DTYPES:
        return
    if torch.compiler.is_compiling():
        return  # traced: sizes may be symbolic; the eager call checked them
    largest = cut if type(cut) is int else 64
    if (images.numel() + images.shape[0] * largest * largest) * 256 <= MEMORY_CHECK_FLOOR:
        return  # a bound on every path's estimate (perturbation_bytes): nothing to weigh
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in IMAGE_DTYPES:
        out_dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    if backend == "cpu" and images.dtype == torch.float64:
        return  # refused by name below
    path = resolved_backend(images.device, images.dtype, backend)
    chunk = reference._CPU_CHUNK if images.device.type == "cpu" else None
    nbytes = perturbation_bytes(
        images.shape, out_dtype, outputs=outputs, path=path,
        cut=int(cut) if _is_integer(cut) else 64, chunk=chunk,
    )  # fmt: skip
    B, C, H, W = images.shape
    kind = "perturbing" if outputs == 2 else "deforming"
    check_memory(
        "images", nbytes, images.device,
        what=f"{kind} {B} image(s) of {C}x{H}x{W} (backend {path!r})",
    )  # fmt: skip


if torch.cuda.is_available() or _interpreter_enabled():
    # registered at import, so that a trace never registers it (without triton,
    # backend="torch" and "cpu" work and "triton" raises the ImportError when used)
    with contextlib.suppress(ImportError):
        operators.kernel_ops()


class _Call(NamedTuple):
    """The checked arguments of one call. A scalar ``T`` stays a float and default ids stay
    None until an implementation needs tensors (:meth:`T_tensor`, :meth:`ids_tensor`): a
    call on one image pays for no tensor it does not use."""

    images: torch.Tensor
    T: torch.Tensor | float
    ids: torch.Tensor | None
    cut: int
    cuts: torch.Tensor | None
    seed: int
    sigma: float | None
    noise: bool  # perturb (True) or deform (False)
    interp: str
    out_dtype: torch.dtype
    implementation: str
    allow_nonfinite: bool

    def T_tensor(self) -> torch.Tensor:
        if torch.is_tensor(self.T):
            return self.T
        B, device = self.images.shape[0], self.images.device
        return torch.full((B,), self.T, dtype=torch.float32, device=device)

    def ids_tensor(self) -> torch.Tensor:
        if self.ids is not None:
            return self.ids
        return torch.arange(self.images.shape[0], dtype=torch.int64, device=self.images.device)


def _checked(images, T, cut, seed, ids, sigma, noise, interp, out_dtype, backend, allow_nonfinite):
    images = check_images(images)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    interp = check_interp(interp)
    out_dtype = check_out_dtype(out_dtype, images)
    seed = check_seed(seed)
    B, _, H, W = images.shape
    cut, cuts = check_cuts(cut, B, images.device)
    if ids is not None:
        ids = check_ids(ids, B, images.device).contiguous()
    check_field(T, cut, H, W, cuts)  # before T becomes a tensor
    if torch.is_tensor(T):
        T = check_T(T, B, images.device, check_values=not torch.compiler.is_compiling())
    else:
        T = check_in_dtype("T", check_scalar_T(T), torch.float32, what="temperatures are float32")
    implementation = _implementation(images, backend)
    return _Call(
        images, T, ids, cut, cuts, seed, sigma, noise, interp, out_dtype, implementation,
        allow_nonfinite,
    )  # fmt: skip


def _launch(call: _Call, images: torch.Tensor):
    """``(tau, noisy or None, non-finite count per image or None)`` from the kernels."""
    noise = operators.noise_arg(call.sigma) if call.noise else None
    common = dict(cut=call.cut, cuts=call.cuts, seed=call.seed, noise=noise, interp=call.interp,
                  out_dtype=call.out_dtype)  # fmt: skip
    if call.implementation == "triton":
        from diffeo_engine.kernels import perturb as kernels

        return kernels.perturb(
            images, call.T_tensor(), call.ids_tensor(), check=not call.allow_nonfinite, **common
        )
    return cpu_kernel().perturb(images, call.T, call.ids, **common)


def _check_results(call: _Call, images, outputs, nonfinite) -> None:
    """Refuse NaN/inf pixels and overflowing outputs (unless ``allow_nonfinite``) from the
    kernels' own count: nothing is read again unless the count says something is wrong."""
    if call.allow_nonfinite or nonfinite is None:  # None: nothing that could be wrong
        return
    if not bool(nonfinite.any()):  # the one small read back
        return
    check_finite(images)
    for out in outputs:
        check_overflow(images, out)


class _KernelFunction(torch.autograd.Function):
    """A kernel's outputs, differentiable in the images through :func:`reference.vjp`."""

    @staticmethod
    def forward(ctx, images, T, ids, cuts, call):
        tau, noisy, nonfinite = _launch(call, images)
        outputs = (tau,) if noisy is None else (tau, noisy)
        _check_results(call, images, outputs, nonfinite)
        ctx.save_for_backward(images, T, ids, cuts)
        ctx.call = call
        return outputs[0] if noisy is None else outputs

    @staticmethod
    def backward(ctx, grad_tau, grad_noisy=None):
        images, T, ids, cuts = ctx.saved_tensors
        call = ctx.call
        grad = reference.vjp(
            images, T, ids, call.cut, call.seed, call.sigma, call.interp, grad_tau, grad_noisy,
            noise=call.noise, cuts=cuts,
        )  # fmt: skip
        return grad, None, None, None, None


def _traced(call: _Call):
    """Under ``torch.compile``: the operators, which the tracer can see."""
    c = call._replace(T=call.T_tensor(), ids=call.ids_tensor())
    if c.implementation == "triton":
        deform_op, perturb_op = operators.kernel_ops()
        if c.noise:
            return perturb_op(
                c.images, c.T, c.ids, c.cut, c.cuts, c.seed, c.sigma, c.interp, c.out_dtype
            )
        return deform_op(c.images, c.T, c.ids, c.cut, c.cuts, c.seed, c.interp, c.out_dtype)
    if c.noise:
        return operators.perturb_opaque(
            c.images, c.T, c.ids, c.cut, c.cuts, c.seed, c.sigma, c.interp, c.out_dtype,
            c.implementation,
        )  # fmt: skip
    return operators.deform_opaque(
        c.images, c.T, c.ids, c.cut, c.cuts, c.seed, c.interp, c.out_dtype, c.implementation
    )


def _run(call: _Call):
    if torch.compiler.is_compiling():
        return _traced(call)
    if call.implementation == "torch":
        function = reference.perturb if call.noise else reference.deform
        extra = {"noise": operators.noise_arg(call.sigma)} if call.noise else {}
        return function(
            call.images, call.T, call.cut if call.cuts is None else call.cuts, seed=call.seed,
            ids=call.ids, interp=call.interp, out_dtype=call.out_dtype,
            allow_nonfinite=call.allow_nonfinite, **extra,
        )  # fmt: skip
    if torch.is_grad_enabled() and call.images.requires_grad:
        T, ids = call.T_tensor(), call.ids_tensor()
        return _KernelFunction.apply(call.images, T, ids, call.cuts, call)
    tau, noisy, nonfinite = _launch(call, call.images)
    outputs = (tau,) if noisy is None else (tau, noisy)
    _check_results(call, call.images, outputs, nonfinite)
    return tau if noisy is None else (tau, noisy)


def deform(
    images: torch.Tensor,
    T,
    cut,
    *,
    seed: int,
    ids=None,
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """``tau x``: each image deformed by its max-entropy diffeomorphism, keyed by ``(seed, id)``.

    ``T`` is a float or one per image; ``cut`` an integer or one per image (each image keeps
    its own disc of modes, whatever the others of its batch). ``out_dtype=torch.uint8`` of
    float images costs one ``aminmax`` pass over them (only in that combination): images
    all within ``[-1, 1]`` are refused, since uint8 keeps the 0..255 scale. A call whose
    outputs and temporaries exceed the device's memory is refused before any allocation.
    """
    _check_backend(backend)
    _check_size(images, cut, out_dtype, backend, 1)
    if backend == "torch":
        return reference.deform(
            images, T, cut, seed=seed, ids=ids, interp=interp, out_dtype=out_dtype,
            allow_nonfinite=allow_nonfinite,
        )  # fmt: skip
    call = _checked(
        images, T, cut, seed, ids, None, False, interp, out_dtype, backend, allow_nonfinite
    )
    return _run(call)


def perturb(
    images: torch.Tensor,
    T,
    cut,
    *,
    seed: int,
    ids=None,
    noise="matched",
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)`` with matched (``||eta|| = ||tau x - x||``) or fixed-sigma noise."""
    _check_backend(backend)
    _check_size(images, cut, out_dtype, backend, 2)
    if backend == "torch":
        return reference.perturb(
            images, T, cut, seed=seed, ids=ids, noise=noise, interp=interp, out_dtype=out_dtype,
            allow_nonfinite=allow_nonfinite,
        )  # fmt: skip
    sigma = check_noise(noise)
    call = _checked(
        images, T, cut, seed, ids, sigma, True, interp, out_dtype, backend, allow_nonfinite
    )
    return _run(call)
