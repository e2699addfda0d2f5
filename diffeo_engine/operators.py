"""The ``torch.library`` operators behind :mod:`diffeo_engine.ops`, for ``torch.compile``.

Eager calls never come here (:mod:`~diffeo_engine.ops` calls the implementations
directly, so a first call imports neither ``torch._dynamo`` nor ``triton``); a traced call
does, and each family reads top to bottom down to its implementation:

* ``diffeo_engine::deform_opaque`` / ``perturb_opaque`` (``custom_op``): the fused CPU
  kernel (``backend="cpu"``) or the reference (``"torch"``), opaque to ``torch.compile``
  so that their value checks never break a graph. Registering them imports neither
  ``torch._inductor`` nor ``triton``.
* ``diffeo_engine::deform`` / ``perturb`` (``triton_op``): the Triton kernels, so that
  ``torch.compile`` sees them. Registered on first use (:func:`kernel_ops`), because
  registering a ``triton_op`` imports ``triton``.

Gradients with respect to float images: :func:`reference.vjp`, the adjoint written out,
traceable and itself differentiable (double backward). ``T``, ``ids``, ``cuts`` and the
rest get no gradient.
"""

from __future__ import annotations

import functools

import torch
from torch.library import custom_op

from diffeo_engine import reference
from diffeo_engine.physics import check_T

__all__ = ["deform_opaque", "kernel_ops", "noise_arg", "perturb_opaque", "vjp_reference"]


def noise_arg(sigma: float | None):
    """The ``noise`` argument of the Python functions from an operator's ``sigma``."""
    return "matched" if sigma is None else sigma


def _empty_like_output(images: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    fmt = reference.memory_format_of(images)
    return torch.empty(images.shape, dtype=out_dtype, device=images.device, memory_format=fmt)


def _opaque(images, T, ids, cut, cuts, seed, sigma, interp, out_dtype, backend, noise: bool):
    """The CPU kernel or the reference on checked arguments (imported here: layer 1)."""
    if backend == "cpu":
        from diffeo_engine.kernels import cpu

        check_T(T, images.shape[0], images.device)  # its values, as the reference does
        tau, noisy, _ = cpu.perturb(
            images, T, ids, cut=cut, cuts=cuts, seed=seed,
            noise=noise_arg(sigma) if noise else None, interp=interp, out_dtype=out_dtype,
        )  # fmt: skip
        return (tau, noisy) if noise else tau
    function = reference.perturb if noise else reference.deform
    extra = {"noise": noise_arg(sigma)} if noise else {}
    return function(
        images, T, cut if cuts is None else cuts, seed=seed, ids=ids, interp=interp,
        out_dtype=out_dtype, allow_nonfinite=True, **extra,
    )  # fmt: skip


@custom_op("diffeo_engine::deform_opaque", mutates_args=())
def deform_opaque(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    cuts: torch.Tensor | None,
    seed: int,
    interp: str,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """``tau x`` by the CPU kernel or the reference (value checks by the caller)."""
    return _opaque(images, T, ids, cut, cuts, seed, None, interp, out_dtype, backend, False)


@custom_op("diffeo_engine::perturb_opaque", mutates_args=())
def perturb_opaque(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    cuts: torch.Tensor | None,
    seed: int,
    sigma: float | None,
    interp: str,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)`` by the CPU kernel or the reference (``sigma`` None: matched)."""
    return _opaque(images, T, ids, cut, cuts, seed, sigma, interp, out_dtype, backend, True)


@deform_opaque.register_fake
def _(images, T, ids, cut, cuts, seed, interp, out_dtype, backend):
    return _empty_like_output(images, out_dtype)


@perturb_opaque.register_fake
def _(images, T, ids, cut, cuts, seed, sigma, interp, out_dtype, backend):
    return _empty_like_output(images, out_dtype), _empty_like_output(images, out_dtype)


# ------------------------------------------------------------------------------ gradients


def _save(ctx, inputs, output) -> None:
    images, T, ids, cut, cuts, seed, *rest = inputs
    ctx.save_for_backward(images, T, ids, cuts)
    ctx.cut, ctx.seed, ctx.rest = cut, seed, rest


@custom_op("diffeo_engine::vjp", mutates_args=())
def vjp_reference(
    images: torch.Tensor,
    T: torch.Tensor,
    ids: torch.Tensor,
    cut: int,
    cuts: torch.Tensor | None,
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
        images, T, ids, cut, seed, sigma, interp, grad_tau, grad_noisy, noise=noise, cuts=cuts
    ).contiguous()


@vjp_reference.register_fake
def _(images, T, ids, cut, cuts, seed, sigma, interp, noise, grad_tau, grad_noisy):
    return torch.empty(images.shape, dtype=images.dtype, device=images.device)


def _vjp(ctx, grad_tau, grad_noisy, *, noise: bool) -> tuple:
    images, T, ids, cuts = ctx.saved_tensors
    sigma, interp = (ctx.rest[0], ctx.rest[1]) if noise else (None, ctx.rest[0])
    if torch.is_grad_enabled():  # create_graph: the written-out VJP, differentiable again
        grad = reference.vjp(
            images, T, ids, ctx.cut, ctx.seed, sigma, interp, grad_tau, grad_noisy,
            noise=noise, cuts=cuts,
        )  # fmt: skip
    else:
        grad = vjp_reference(
            images, T, ids, ctx.cut, cuts, ctx.seed, sigma, interp, noise, grad_tau, grad_noisy
        )
    return (grad,) + (None,) * (len(ctx.rest) + 5)


def _deform_backward(ctx, grad):
    return _vjp(ctx, grad, None, noise=False)


def _perturb_backward(ctx, grad_tau, grad_noisy):
    return _vjp(ctx, grad_tau, grad_noisy, noise=True)


deform_opaque.register_autograd(_deform_backward, setup_context=_save)
perturb_opaque.register_autograd(_perturb_backward, setup_context=_save)


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
        cuts: torch.Tensor | None,
        seed: int,
        interp: str,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``tau x`` by the kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
        tau, _, _ = kernels.perturb(
            images, T, ids, cut=cut, cuts=cuts, seed=seed, noise=None, interp=interp,
            out_dtype=out_dtype, check=False,  # a graph reads nothing back
        )  # fmt: skip
        return tau

    @triton_op("diffeo_engine::perturb", mutates_args=())
    def perturb(
        images: torch.Tensor,
        T: torch.Tensor,
        ids: torch.Tensor,
        cut: int,
        cuts: torch.Tensor | None,
        seed: int,
        sigma: float | None,
        interp: str,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tau x, x + eta)`` by the kernels."""
        tau, noisy, _ = kernels.perturb(
            images, T, ids, cut=cut, cuts=cuts, seed=seed, noise=noise_arg(sigma),
            interp=interp, out_dtype=out_dtype, check=False,  # a graph reads nothing back
        )  # fmt: skip
        return tau, noisy

    deform.register_autograd(_deform_backward, setup_context=_save)
    perturb.register_autograd(_perturb_backward, setup_context=_save)
    return deform, perturb
