"""The ``torch.library`` operators behind :mod:`diffeo_engine.ops`, and their gradients.

Two families, one per backend, each read top to bottom down to its implementation:

* ``diffeo_engine::deform_reference`` / ``perturb_reference`` (``custom_op``): the
  reference (:mod:`diffeo_engine.reference`), opaque to ``torch.compile`` so that its
  value checks never break a graph. Registering them imports neither ``torch._inductor``
  nor ``triton``: importing this module is cheap.
* ``diffeo_engine::deform`` / ``perturb`` (``triton_op``): the Triton kernels
  (``kernels.perturb.perturb``, which checks its own limits and launches), so that
  ``torch.compile`` sees the kernels. Registered on first use (:func:`kernel_ops`),
  because registering a ``triton_op`` imports ``triton``.

Gradients with respect to float images: :func:`reference.vjp`, the adjoint written out,
traceable by ``torch.compile`` and itself differentiable (double backward). ``T``, ``ids``
and the rest get no gradient.
"""

from __future__ import annotations

import functools

import torch
from torch.library import custom_op

from diffeo_engine import reference

__all__ = [
    "deform_reference",
    "kernel_ops",
    "noise_arg",
    "perturb_reference",
    "vjp_reference",
]


def noise_arg(sigma: float | None):
    """The ``noise`` argument of the Python functions from an operator's ``sigma``."""
    return "matched" if sigma is None else sigma


def _empty_like_output(images: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    fmt = reference.memory_format_of(images)
    return torch.empty(images.shape, dtype=out_dtype, device=images.device, memory_format=fmt)


@custom_op("diffeo_engine::deform_reference", mutates_args=())
def deform_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    interp: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``tau x`` by the reference, with its value checks, on any device."""
    return reference.deform(
        images, T, cut, seed=seed, ids=ids, interp=interp, out_dtype=out_dtype,
        allow_nonfinite=True,  # checked by the public function, outside the graph
    )  # fmt: skip


@custom_op("diffeo_engine::perturb_reference", mutates_args=())
def perturb_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    sigma: float | None,
    interp: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)`` by the reference (``sigma`` None: matched noise)."""
    return reference.perturb(
        images, T, cut, seed=seed, ids=ids, noise=noise_arg(sigma), interp=interp,
        out_dtype=out_dtype, allow_nonfinite=True,
    )  # fmt: skip


@deform_reference.register_fake
def _(images, T, ids, cut, seed, interp, out_dtype):
    return _empty_like_output(images, out_dtype)


@perturb_reference.register_fake
def _(images, T, ids, cut, seed, sigma, interp, out_dtype):
    return _empty_like_output(images, out_dtype), _empty_like_output(images, out_dtype)


# ------------------------------------------------------------------------------ gradients


def _save(ctx, inputs, output) -> None:
    images, T, ids, cut, seed, *rest = inputs
    ctx.save_for_backward(images, T, ids)
    ctx.cut, ctx.seed, ctx.rest = cut, seed, rest


@custom_op("diffeo_engine::vjp", mutates_args=())
def vjp_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    seed: int,
    sigma: float | None,
    interp: str,
    noise: bool,
    grad_tau: torch.Tensor | None,
    grad_noisy: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`reference.vjp` as one opaque operator: a compiled backward calls it rather
    than tracing the Philox stream and the scatter into a graph of its own."""
    return reference.vjp(
        images, T, ids, cut, seed, sigma, interp, grad_tau, grad_noisy, noise=noise
    ).contiguous()


@vjp_reference.register_fake
def _(images, T, ids, cut, seed, sigma, interp, noise, grad_tau, grad_noisy):
    return torch.empty(images.shape, dtype=images.dtype, device=images.device)


def _vjp(ctx, grad_tau, grad_noisy, *, noise: bool) -> tuple:
    images, T, ids = ctx.saved_tensors
    sigma, interp = (ctx.rest[0], ctx.rest[1]) if noise else (None, ctx.rest[0])
    args = (images, T, ids, ctx.cut, ctx.seed, sigma, interp)
    if torch.is_grad_enabled():  # create_graph: the written-out VJP, differentiable again
        grad = reference.vjp(*args, grad_tau, grad_noisy, noise=noise)
    else:
        grad = vjp_reference(*args, noise, grad_tau, grad_noisy)
    return (grad,) + (None,) * (len(ctx.rest) + 4)


def _deform_backward(ctx, grad):
    return _vjp(ctx, grad, None, noise=False)


def _perturb_backward(ctx, grad_tau, grad_noisy):
    return _vjp(ctx, grad_tau, grad_noisy, noise=True)


deform_reference.register_autograd(_deform_backward, setup_context=_save)
perturb_reference.register_autograd(_perturb_backward, setup_context=_save)


# ---------------------------------------------------------------------- kernel operators


@functools.cache
def kernel_ops():
    """``(deform, perturb)``: the ``triton_op`` operators, registered on first call."""
    from torch.library import triton_op

    from diffeo_engine.kernels import perturb as kernels

    @triton_op("diffeo_engine::deform", mutates_args=())
    def deform(
        images: torch.Tensor,
        T: torch.Tensor,
        ids: torch.Tensor,
        cut: int,
        seed: int,
        interp: str,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``tau x`` by the kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
        tau, _ = kernels.perturb(
            images, T, ids, cut=cut, seed=seed, noise=None, interp=interp, out_dtype=out_dtype
        )
        return tau

    @triton_op("diffeo_engine::perturb", mutates_args=())
    def perturb(
        images: torch.Tensor,
        T: torch.Tensor,
        ids: torch.Tensor,
        cut: int,
        seed: int,
        sigma: float | None,
        interp: str,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tau x, x + eta)`` by the kernels."""
        return kernels.perturb(
            images, T, ids, cut=cut, seed=seed, noise=noise_arg(sigma), interp=interp,
            out_dtype=out_dtype,
        )  # fmt: skip

    deform.register_autograd(_deform_backward, setup_context=_save)
    perturb.register_autograd(_perturb_backward, setup_context=_save)
    return deform, perturb
