"""Public ``deform`` / ``perturb``: check the arguments, pick a backend, call it.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference
elsewhere; ``"triton"`` forces the kernels (CPU tensors only under ``TRITON_INTERPRET=1``);
``"torch"`` forces the reference. The path to a kernel reads top to bottom: this module
checks what needs no tensor values, then calls an operator of :mod:`diffeo_engine.operators`
(``torch.library``: ``torch.compile`` traces through with ``fullgraph=True``), whose body
calls ``kernels.perturb.perturb`` (it checks the kernels' limits and launches) or the
reference. Value checks (finite, non-negative ``T``) run inside the reference operator, or
here before the kernels (skipped under ``torch.compile``). Gradients with respect to float
images flow on every backend (:func:`diffeo_engine.reference.vjp`, twice differentiable).
"""

from __future__ import annotations

import contextlib
import os

import torch

from diffeo_engine import operators, reference
from diffeo_engine.physics import (
    check_cut,
    check_field,
    check_finite,
    check_ids,
    check_images,
    check_interp,
    check_out_dtype,
    check_seed,
    check_T,
)

__all__ = ["BACKENDS", "deform", "perturb"]

BACKENDS = ("auto", "torch", "triton")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_triton_device(images: torch.Tensor) -> None:
    if images.device.type == "cuda" or (images.device.type == "cpu" and _interpreter_enabled()):
        return
    raise ValueError(
        f"backend: 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported), got images on {images.device}; use backend='torch'"
    )


# ------------------------------------------------------------------------------ public API


def _static_args(images, T, cut, seed, ids, interp, out_dtype):
    """Checks that need no tensor values; returns the arguments the operators take."""
    images = check_images(images)
    interp = check_interp(interp)
    out_dtype = check_out_dtype(out_dtype, images)
    seed = check_seed(seed)
    check_cut(cut)
    check_field(T, cut, images.shape[-2], images.shape[-1], ids)  # before T becomes a tensor
    B = images.shape[0]
    T = check_T(T, B, images.device, check_values=False)
    ids = check_ids(ids, B, images.device).contiguous()
    return images, T, ids, interp, out_dtype, seed


def _uses_kernels(images: torch.Tensor, backend: str) -> bool:
    """The kernel operators (CUDA under ``auto``, or ``triton``) or the reference ones."""
    if backend == "triton":
        _check_triton_device(images)
        return True
    return images.device.type == "cuda"


def _kernel_op(name: str):
    """``torch.ops.diffeo_engine.<name>``, the kernels' operator, registered on first use
    (at import where CUDA or the interpreter is there: a trace never registers it)."""
    if not torch.compiler.is_compiling():
        operators.kernel_ops()
    return getattr(torch.ops.diffeo_engine, name)


if torch.cuda.is_available() or _interpreter_enabled():
    # no triton: backend="torch" works, "triton" raises the ImportError when used
    with contextlib.suppress(ImportError):
        operators.kernel_ops()


def _check_values(T: torch.Tensor, kernels: bool) -> None:
    """``T``'s values before the kernels (one host sync; the reference checks its own)."""
    if kernels and not torch.compiler.is_compiling():
        check_T(T, T.shape[0], T.device)


def deform(
    images: torch.Tensor,
    T,
    cut: int,
    *,
    seed: int,
    ids=None,
    interp: str = "bilinear",
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """``tau x``: each image deformed by its max-entropy diffeomorphism, keyed by ``(seed, id)``."""
    _check_backend(backend)
    if backend == "torch":
        return reference.deform(
            images, T, cut, seed=seed, ids=ids, interp=interp, out_dtype=out_dtype,
            allow_nonfinite=allow_nonfinite,
        )  # fmt: skip
    images, T, ids, interp, out_dtype, seed = _static_args(
        images, T, cut, seed, ids, interp, out_dtype
    )
    check_finite(images, allow_nonfinite=allow_nonfinite)
    kernels = _uses_kernels(images, backend)
    _check_values(T, kernels)
    op = _kernel_op("deform") if kernels else operators.deform_reference
    return op(images, T, ids, cut, seed, interp, out_dtype)


def perturb(
    images: torch.Tensor,
    T,
    cut: int,
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
    if backend == "torch":
        return reference.perturb(
            images, T, cut, seed=seed, ids=ids, noise=noise, interp=interp, out_dtype=out_dtype,
            allow_nonfinite=allow_nonfinite,
        )  # fmt: skip
    sigma = reference.check_noise(noise)
    images, T, ids, interp, out_dtype, seed = _static_args(
        images, T, cut, seed, ids, interp, out_dtype
    )
    check_finite(images, allow_nonfinite=allow_nonfinite)
    kernels = _uses_kernels(images, backend)
    _check_values(T, kernels)
    op = _kernel_op("perturb") if kernels else operators.perturb_reference
    return op(images, T, ids, cut, seed, sigma, interp, out_dtype)
