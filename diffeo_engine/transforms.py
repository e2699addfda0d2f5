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
from diffeo_engine.physics import (
    IMAGE_DTYPES,
    check_choice,
    check_cut,
    check_interp,
    check_scalar_T,
    check_seed,
)
from diffeo_engine.reference import check_noise

__all__ = ["Diffeo", "DiffeoPair", "Perturbation"]


@runtime_checkable
class Perturbation(Protocol):
    """Anything that turns a batch and its ids into ``(tau x, x + eta)``."""

    def __call__(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _check_T_arg(T):
    """A temperature for a transform: a number >= 0, or a tensor (checked per call)."""
    if torch.is_tensor(T):
        return T
    return check_scalar_T(T)


def _check_module_args(T, cut, interp, backend, out_dtype=None):
    if out_dtype is not None and out_dtype not in IMAGE_DTYPES:
        raise TypeError(f"out_dtype: expected None or one of {IMAGE_DTYPES}, got {out_dtype!r}")
    return (
        _check_T_arg(T),
        check_cut(cut),
        check_interp(interp),
        check_choice("backend", backend, ops.BACKENDS),
    )


class Diffeo(nn.Module):
    """Apply a random max-entropy diffeomorphism to a batch ``(B, C, H, W)`` or one ``(C, H, W)``.

    With ``seed=None`` each call draws a fresh seed from torch's generator (augmentation).
    With a fixed ``seed`` the output depends only on ``(seed, ids)``; when ``ids`` are not
    given, a per-module counter of the images seen so far supplies them (call ``k`` on one
    image gets id ``k``), so a per-sample pipeline gives each sample its own field. In a
    ``DataLoader`` with workers the counter is per worker and interleaved by worker id
    (``count * num_workers + worker_id``); workers that are re-created every epoch start
    their counters again, so each epoch sees the same fields (use ``seed=None`` for fresh
    ones). For fields tied to the data-set index pass ``ids`` (the index) explicitly.
    ``reset()`` sets the counter back to 0.
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
        self.T, self.cut, self.interp, self.backend = _check_module_args(
            T, cut, interp, backend, out_dtype
        )
        self.seed = None if seed is None else check_seed(seed)
        self.out_dtype = out_dtype
        self.calls = 0  # images served without explicit ids (the id counter)

    def reset(self) -> None:
        """Restart the id counter: the next image gets id 0 again."""
        self.calls = 0

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, (1,)).item())

    def _counter_ids(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.seed is None:
            return None  # a fresh seed per call already differs
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        ids = (self.calls + torch.arange(n, dtype=torch.int64)) * workers + worker
        self.calls += n
        return ids.to(device)

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        single = torch.is_tensor(images) and images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        if ids is None and torch.is_tensor(batch) and batch.dim() == 4:
            ids = self._counter_ids(batch.shape[0], batch.device)
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
        self.T, self.cut, self.interp, self.backend = _check_module_args(T, cut, interp, backend)
        self.seed = check_seed(seed)
        self.noise = noise
        check_noise(noise)

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
