"""Public ``deform`` / ``perturb``: pick a backend and run it.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference
elsewhere; ``"triton"`` forces the kernels (CPU tensors only under ``TRITON_INTERPRET=1``);
``"torch"`` forces the reference.

``auto`` goes through the ``torch.library`` operators ``diffeo_engine::deform`` and
``diffeo_engine::perturb`` (``triton_op``: ``torch.compile`` sees the kernels on CUDA;
elsewhere they call the opaque ``*_reference`` operators), so a function calling them
compiles with ``fullgraph=True``. Static checks run here; value checks (finite,
non-negative ``T``) run inside the reference operator on CPU, where they cannot break a
graph, and before the kernels elsewhere (skipped under ``torch.compile``).
Gradients with respect to float images flow through the reference.
"""

from __future__ import annotations

import os

import torch
from torch.library import custom_op, triton_op

from diffeo_engine import reference
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


def _kernels():
    """The kernel module, imported on first use so the reference works without Triton."""
    from diffeo_engine.kernels import perturb as kernels

    return kernels


def _check_triton_device(images: torch.Tensor) -> None:
    if images.device.type == "cuda" or (images.device.type == "cpu" and _interpreter_enabled()):
        return
    raise ValueError(
        f"backend: 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported), got images on {images.device}; use backend='torch'"
    )


def _noise_arg(sigma: float | None):
    return "matched" if sigma is None else sigma


# ---------------------------------------------------------------- torch.library operators


@custom_op("diffeo_engine::deform_reference", mutates_args=())
def _deform_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    interp: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Opaque to ``torch.compile``: the reference with its value checks, on any device."""
    return reference.deform(
        images, T, cut, seed=seed, ids=ids, interp=interp, out_dtype=out_dtype,
        allow_nonfinite=True,  # checked by the public function, outside the graph
    )  # fmt: skip


@custom_op("diffeo_engine::perturb_reference", mutates_args=())
def _perturb_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    sigma: float | None,
    interp: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.perturb(
        images, T, cut, seed=seed, ids=ids, noise=_noise_arg(sigma), interp=interp,
        out_dtype=out_dtype, allow_nonfinite=True,
    )  # fmt: skip


def _empty_like_output(images: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    fmt = reference.memory_format_of(images)
    return torch.empty(images.shape, dtype=out_dtype, device=images.device, memory_format=fmt)


@_deform_reference.register_fake
def _(images, T, ids, cut, seed, interp, out_dtype):
    return _empty_like_output(images, out_dtype)


@_perturb_reference.register_fake
def _(images, T, ids, cut, seed, sigma, interp, out_dtype):
    return _empty_like_output(images, out_dtype), _empty_like_output(images, out_dtype)


@triton_op("diffeo_engine::deform", mutates_args=())
def _deform_op(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    interp: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``tau x`` by the kernels on CUDA, by the reference operator elsewhere."""
    if images.device.type != "cuda":
        return _deform_reference(images, T, ids, cut, seed, interp, out_dtype)
    tau, _ = _kernels().perturb(
        images, T, ids, cut=cut, seed=seed, noise=None, interp=interp, out_dtype=out_dtype
    )
    return tau


@triton_op("diffeo_engine::perturb", mutates_args=())
def _perturb_op(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    sigma: float | None,
    interp: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)`` by the kernels on CUDA, by the reference operator elsewhere."""
    if images.device.type != "cuda":
        return _perturb_reference(images, T, ids, cut, seed, sigma, interp, out_dtype)
    return _kernels().perturb(
        images, T, ids, cut=cut, seed=seed, noise=_noise_arg(sigma), interp=interp,
        out_dtype=out_dtype,
    )  # fmt: skip


@_deform_op.register_kernel("cpu")
def _(images, T, ids, cut, seed, interp, out_dtype):
    return _deform_reference(images, T, ids, cut, seed, interp, out_dtype)


@_perturb_op.register_kernel("cpu")
def _(images, T, ids, cut, seed, sigma, interp, out_dtype):
    return _perturb_reference(images, T, ids, cut, seed, sigma, interp, out_dtype)


# Autograd with respect to the images: backward through the reference, recomputed.


def _save_inputs(ctx, inputs, output):
    ctx.inputs = inputs


def _reference_vjp(ctx, grads: tuple) -> tuple:
    images, T, ids, cut, seed, *rest = ctx.inputs
    with torch.enable_grad():
        source = images.detach().requires_grad_(True)
        if len(rest) == 2:  # deform: (interp, out_dtype)
            outputs = (reference.deform(source, T, cut, seed=seed, ids=ids, interp=rest[0],
                                        out_dtype=rest[1], allow_nonfinite=True),)  # fmt: skip
        else:  # perturb: (sigma, interp, out_dtype)
            outputs = reference.perturb(
                source, T, cut, seed=seed, ids=ids, noise=_noise_arg(rest[0]), interp=rest[1],
                out_dtype=rest[2], allow_nonfinite=True,
            )  # fmt: skip
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        (grad,) = torch.autograd.grad([o for o, _ in pairs], source, [g for _, g in pairs])
    return (grad,) + (None,) * (len(ctx.inputs) - 1)


def _deform_backward(ctx, grad):
    return _reference_vjp(ctx, (grad,))


def _perturb_backward(ctx, grad_tau, grad_noisy):
    return _reference_vjp(ctx, (grad_tau, grad_noisy))


for _op in (_deform_reference, _deform_op):
    _op.register_autograd(_deform_backward, setup_context=_save_inputs)
for _op in (_perturb_reference, _perturb_op):
    _op.register_autograd(_perturb_backward, setup_context=_save_inputs)


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
    if torch.is_tensor(T) and images.device.type != "cpu" and not torch.compiler.is_compiling():
        check_T(T, B, images.device)  # values: one host sync, skipped when traced
    T = check_T(T, B, images.device, check_values=False)
    ids = check_ids(ids, B, images.device).contiguous()
    return images, T, ids, interp, out_dtype, seed


def _dispatch(images: torch.Tensor, cut: int, backend: str) -> str:
    """``"torch"``, ``"op"`` (the registered operator) or ``"interpreter"``."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        _check_triton_device(images)
        _kernels().check_launchable(images, cut)
        return "op" if images.device.type == "cuda" else "interpreter"
    if images.device.type == "cuda":
        _kernels().check_launchable(images, cut)
    return "op"


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
    if _dispatch(images, cut, backend) == "interpreter":
        check_T(T, T.shape[0], T.device)  # values (the reference operator checks its own)
        tau, _ = _kernels().perturb(
            images, T, ids, cut=cut, seed=seed, noise=None, interp=interp, out_dtype=out_dtype
        )
        return tau
    return _deform_op(images, T, ids, cut, seed, interp, out_dtype)


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
    if _dispatch(images, cut, backend) == "interpreter":
        check_T(T, T.shape[0], T.device)  # values (the reference operator checks its own)
        return _kernels().perturb(
            images, T, ids, cut=cut, seed=seed, noise=_noise_arg(sigma), interp=interp,
            out_dtype=out_dtype,
        )  # fmt: skip
    return _perturb_op(images, T, ids, cut, seed, sigma, interp, out_dtype)
