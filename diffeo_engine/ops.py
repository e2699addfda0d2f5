"""Public ``deform`` / ``perturb``: pick a backend and run it.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference
elsewhere; ``"triton"`` forces the kernels (CPU tensors only under ``TRITON_INTERPRET=1``);
``"torch"`` forces the reference.
"""

from __future__ import annotations

import torch

from diffeo_engine import reference

__all__ = ["BACKENDS", "deform", "perturb"]

BACKENDS = ("auto", "torch", "triton")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


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
) -> torch.Tensor:
    """``tau x``: each image deformed by its max-entropy diffeomorphism, keyed by ``(seed, id)``."""
    _check_backend(backend)
    return reference.deform(images, T, cut, seed=seed, ids=ids, interp=interp, out_dtype=out_dtype)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau x, x + eta)`` with matched (``||eta|| = ||tau x - x||``) or fixed-sigma noise."""
    _check_backend(backend)
    return reference.perturb(
        images, T, cut, seed=seed, ids=ids, noise=noise, interp=interp, out_dtype=out_dtype
    )
