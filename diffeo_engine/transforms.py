"""``nn.Module`` transforms in the torchvision-v2 style, and the perturbation protocol.

A *perturbation* is any callable ``(images, ids) -> (tau x, x + eta)`` whose output depends
only on ``(seed, ids)``; the sensitivity meter and the generator accept any of them.
:class:`DiffeoPair` is the max-entropy one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from diffeo_engine import ops
from diffeo_engine.physics import check_cut, check_seed

__all__ = ["Diffeo", "DiffeoPair", "Perturbation"]


@runtime_checkable
class Perturbation(Protocol):
    """Anything that turns a batch and its ids into ``(tau x, x + eta)``."""

    def __call__(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Diffeo(nn.Module):
    """Apply a random max-entropy diffeomorphism to a batch ``(B, C, H, W)`` or one ``(C, H, W)``.

    With ``seed=None`` each call draws a fresh seed from torch's generator (augmentation);
    with a fixed ``seed`` the output depends only on ``(seed, ids)``.
    """

    def __init__(
        self,
        T: float,
        cut: int,
        *,
        seed: int | None = None,
        interp: str = "bilinear",
        out_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.T, self.cut = T, check_cut(cut)
        self.seed = None if seed is None else check_seed(seed)
        self.interp, self.out_dtype, self.backend = interp, out_dtype, backend

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, (1,)).item())

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        single = torch.is_tensor(images) and images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        out = ops.deform(
            batch,
            self.T,
            self.cut,
            seed=self._seed(),
            ids=ids,
            interp=self.interp,
            out_dtype=self.out_dtype,
            backend=self.backend,
        )
        return out[0] if single else out

    def extra_repr(self) -> str:
        return f"T={self.T}, cut={self.cut}, seed={self.seed}, interp={self.interp!r}"


class DiffeoPair(nn.Module):
    """The max-entropy perturbation pair ``(tau x, x + eta)`` as a :class:`Perturbation`."""

    def __init__(
        self,
        T,
        cut: int,
        *,
        seed: int = 0,
        noise="matched",
        interp: str = "bilinear",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.T, self.cut, self.seed = T, check_cut(cut), check_seed(seed)
        self.noise, self.interp, self.backend = noise, interp, backend

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_dtype = torch.float32 if images.dtype == torch.uint8 else None
        return ops.perturb(
            images,
            self.T,
            self.cut,
            seed=self.seed,
            ids=ids,
            noise=self.noise,
            interp=self.interp,
            out_dtype=out_dtype,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"T={self.T}, cut={self.cut}, seed={self.seed}, noise={self.noise!r}"
