"""The perturbations of the scale-detection tasks (Tomasini, Petrini, Cagnetta, Wyart
2022/23) and the one-hot inputs of their analytical model.

**Diffeomorphism (scale detection).** Each active pixel moves by one pixel: ``+-1`` in 1D,
to one of its four nearest neighbours in 2D, periodically. Among the 4 (1D) or 16 (2D)
joint moves, the valid ones keep the label (a task-1 sample stays outside the gap), keep
the pixels distinct, and change the image (an adjacent pair swapping places does not); one
is drawn uniformly among them from ``(seed, id)``. For task 1 a common translation of both
pixels is always valid; for task 2 a valid move exists whenever ``xi >= 4``. A sample with
no valid move (only possible for task 2 with ``xi <= 3``) is left unchanged, with zero
noise (:meth:`ScaleDetectionPerturbation.move` reports it). The authors' code instead
clamps pixels at the borders and keeps a pixel in place when its move would change its
block; moving every pixel by exactly one is what the paper describes.

**Noise.** ``eta = z ||tau x - x|| / ||z||`` per sample with ``z`` standard normal over all
pixels, keyed by ``(seed, id)``; or ``eta = sigma z`` with a fixed ``noise=sigma``. With
``rectify=True`` ``z`` is replaced by ``relu(z)`` before normalising (the authors' code for
this task rectifies its noise); the norm is still matched exactly.

**Analytical model.** :func:`one_hot_signals` gives one-hot signals; :class:`OneHotShift`
moves the active pixel by ``+-1`` and adds matched Gaussian noise. The rectification of the
noise ("a ReLU on the input") lives in the network:
:class:`diffeo_engine.models.ConstantFilterCNN` starts with the module ``input_relu``, so
this perturbation's noise is plain matched Gaussian noise (``rectify`` is off by default).
The authors' noise (``diffeo_cluster_mean.py``) is ``relu(sigma z)`` with one ``sigma`` per
batch (the deformation's mean power per pixel), so its power is about half the
deformation's and varies per sample; ours matches each sample's norm exactly.

Random streams (offsets from ``rng.USER_STREAM_BASE``): :data:`MOVE_STREAM`,
:data:`NOISE_STREAM`, :data:`ONE_HOT_MOVE_STREAM`, :data:`ONE_HOT_NOISE_STREAM`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from diffeo_engine.data.scale_detection import (
    _check_task_args,
    _coords,
    _squeeze,
    _unflatten,
    scale_detection_labels,
)
from diffeo_engine.physics import check_choice, check_float, check_ids, check_int, check_seed
from diffeo_engine.rng import stream_normals, stream_uniforms

__all__ = [
    "MOVE_STREAM",
    "NOISE_STREAM",
    "ONE_HOT_MOVE_STREAM",
    "ONE_HOT_NOISE_STREAM",
    "OneHotShift",
    "ScaleDetectionPerturbation",
    "one_hot_signals",
]

MOVE_STREAM = 100
NOISE_STREAM = 101
ONE_HOT_MOVE_STREAM = 110
ONE_HOT_NOISE_STREAM = 111


# ----------------------------------------------------------------------------- perturbations


def _check_noise(noise):
    if isinstance(noise, str):
        return check_choice("noise", noise, ("matched",))
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise TypeError(f"noise: expected 'matched' or a fixed sigma >= 0, got {noise!r}")
    return check_float("noise", noise, 0.0)


def _check_batch(images, dim: int) -> torch.Tensor:
    if not torch.is_tensor(images):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    want = "(B, 1, L)" if dim == 1 else "(B, 1, L, L)"
    if images.dim() != dim + 2 or images.shape[1] != 1:
        raise ValueError(f"images: expected shape {want}, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor, got dtype {images.dtype}")
    return images


def _active_pixels(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and values of the ``count`` non-zero pixels of each row."""
    nonzero = (flat != 0).sum(1)
    if flat.shape[0] and not bool((nonzero == count).all()):
        bad = int(torch.nonzero(nonzero != count)[0, 0])
        raise ValueError(
            f"images: expected exactly {count} active (non-zero) pixel(s) per sample, "
            f"sample {bad} has {int(nonzero[bad])}"
        )
    index = torch.topk((flat != 0).to(torch.int8), count, dim=1).indices.sort(dim=1).values
    return index, flat.gather(1, index)


def _add_noise(images, tau, seed, ids, stream, noise, rectify) -> torch.Tensor:
    """``x + eta``: matched (``||eta|| = ||tau x - x||`` per sample) or fixed-sigma noise."""
    B = images.shape[0]
    flat_x, flat_t = images.reshape(B, -1), tau.reshape(B, -1)
    z = stream_normals(seed, ids, stream, flat_x.shape[1], device=images.device)
    z = z.to(torch.float64)
    if rectify:
        z = torch.relu(z)
    if noise == "matched":
        target = (flat_t.to(torch.float64) - flat_x.to(torch.float64)).norm(dim=1, keepdim=True)
        z = z * (target / z.norm(dim=1, keepdim=True).clamp_min(1e-300))
    else:
        z = z * noise
    return (flat_x.to(torch.float64) + z).to(images.dtype).reshape(images.shape)


class ScaleDetectionPerturbation(nn.Module):
    """``(images, ids) -> (tau x, x + eta)`` for scale-detection inputs (module docstring).

    The active pixels are found in the images themselves (exactly two non-zero pixels per
    sample), so any batch of the task works; each keeps its value when it moves.
    """

    def __init__(
        self,
        L: int,
        xi,
        *,
        task: int = 2,
        dim: int = 1,
        gap: float = 0.0,
        distance: str = "Linf",
        seed: int = 0,
        noise="matched",
        rectify: bool = False,
    ) -> None:
        super().__init__()
        L, xi, task, dim, gap, distance = _check_task_args(L, xi, task, dim, gap, distance)
        self.L, self.xi, self.task, self.dim = L, xi, task, dim
        self.gap, self.distance, self.seed = gap, distance, check_seed(seed)
        self.noise = _check_noise(noise)
        if not isinstance(rectify, bool):
            raise TypeError(f"rectify: expected a bool, got {rectify!r}")
        self.rectify = rectify
        unit = torch.eye(dim, dtype=torch.int64)
        steps = torch.cat([-unit, unit])  # (2, 1) in 1D, the four neighbours in 2D
        # joint moves: (K, 2, dim), K = 4 (1D) or 16 (2D), pixel 0's step varies slowest
        self._moves = torch.stack([torch.stack([s0, s1]) for s0 in steps for s1 in steps])

    def _labels(self, positions: torch.Tensor) -> torch.Tensor:
        return scale_detection_labels(
            _squeeze(positions, self.dim),
            self.L,
            self.xi,
            task=self.task,
            gap=self.gap,
            distance=self.distance,
        )

    def move(self, positions: torch.Tensor, ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Moved positions (same layout as ``positions``) and a mask of the moved samples."""
        c = _coords(positions, self.dim).to(torch.int64)
        B = c.shape[0]
        ids = check_ids(ids, B, c.device)
        moves = self._moves.to(c.device)
        K = moves.shape[0]
        new = (c[:, None] + moves[None]) % self.L  # (B, K, 2, dim)
        distinct = (new[:, :, 0] != new[:, :, 1]).any(-1)
        swapped = (new[:, :, 0] == c[:, None, 1]).all(-1) & (new[:, :, 1] == c[:, None, 0]).all(-1)
        old_label = self._labels(c)
        new_label = self._labels(new.reshape(B * K, 2, self.dim)).reshape(B, K)
        valid = distinct & ~swapped & (new_label == old_label[:, None])
        n_valid = valid.sum(1)
        u = stream_uniforms(self.seed, ids, MOVE_STREAM, 1, device=c.device)[:, 0]
        rank = torch.minimum((u.to(torch.float64) * n_valid).floor().to(torch.int64), n_valid - 1)
        choice = torch.argmax((valid.cumsum(1) > rank[:, None]).to(torch.int8), dim=1)
        moved = n_valid > 0
        out = torch.where(moved[:, None, None], new[torch.arange(B), choice], c)
        return _squeeze(out, self.dim), moved

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = _check_batch(images, self.dim)
        if images.shape[-1] != self.L or (self.dim == 2 and images.shape[-2] != self.L):
            raise ValueError(
                f"images: expected signals of size L={self.L}, got {tuple(images.shape[2:])}"
            )
        B = images.shape[0]
        ids = check_ids(ids, B, images.device)
        flat = images.reshape(B, -1)
        index, values = _active_pixels(flat, 2)
        new, _ = self.move(_squeeze(_unflatten(index, self.L, self.dim), self.dim), ids)
        c = _coords(new, self.dim)
        new_index = c[..., 0] if self.dim == 1 else c[..., 0] * self.L + c[..., 1]
        tau = torch.zeros_like(flat).scatter_(1, new_index, values).reshape(images.shape)
        return tau, _add_noise(images, tau, self.seed, ids, NOISE_STREAM, self.noise, self.rectify)

    def extra_repr(self) -> str:
        return (
            f"L={self.L}, xi={self.xi}, task={self.task}, dim={self.dim}, gap={self.gap}, "
            f"seed={self.seed}, noise={self.noise!r}, rectify={self.rectify}"
        )


# ----------------------------------------------------------------------------- analytical model


def one_hot_signals(
    L: int, n: int | None = None, *, value: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` one-hot signals ``(n, 1, L)`` (default ``n = L``), sample ``i`` active at
    ``i mod L``, and those positions ``(n,)``."""
    L = check_int("L", L, 2)
    n = L if n is None else check_int("n", n, 1)
    value = check_float("value", value, 0.0, strict=True)
    positions = torch.arange(n, dtype=torch.int64) % L
    x = torch.zeros(n, 1, L)
    x[torch.arange(n), 0, positions] = value
    return x, positions


class OneHotShift(nn.Module):
    """``(images, ids) -> (tau x, x + eta)`` for one-hot signals ``(B, 1, L)``.

    ``tau`` moves the single active pixel by ``+1`` or ``-1`` (drawn from ``(seed, id)``),
    periodically; with ``periodic=False`` a pixel at an end moves inwards. Noise as in the
    module docstring; its rectification belongs to the network (``ConstantFilterCNN``).
    """

    def __init__(
        self, *, seed: int = 0, periodic: bool = True, noise="matched", rectify: bool = False
    ) -> None:
        super().__init__()
        self.seed = check_seed(seed)
        if not isinstance(periodic, bool):
            raise TypeError(f"periodic: expected a bool, got {periodic!r}")
        if not isinstance(rectify, bool):
            raise TypeError(f"rectify: expected a bool, got {rectify!r}")
        self.periodic, self.rectify = periodic, rectify
        self.noise = _check_noise(noise)

    def move(self, positions: torch.Tensor, L: int, ids=None) -> torch.Tensor:
        """Moved positions ``(B,)`` of the active pixels ``positions`` in signals of size ``L``."""
        L = check_int("L", L, 2)
        ids = check_ids(ids, positions.shape[0], positions.device)
        u = stream_uniforms(self.seed, ids, ONE_HOT_MOVE_STREAM, 1, device=positions.device)
        step = torch.where(u[:, 0] < 0.5, -1, 1)
        if self.periodic:
            return (positions + step) % L
        step = torch.where(positions == 0, 1, torch.where(positions == L - 1, -1, step))
        return positions + step

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = _check_batch(images, 1)
        B, L = images.shape[0], images.shape[-1]
        ids = check_ids(ids, B, images.device)
        flat = images.reshape(B, L)
        index, values = _active_pixels(flat, 1)
        new = self.move(index[:, 0], L, ids)
        tau = torch.zeros_like(flat).scatter_(1, new[:, None], values).reshape(images.shape)
        noisy = _add_noise(
            images, tau, self.seed, ids, ONE_HOT_NOISE_STREAM, self.noise, self.rectify
        )
        return tau, noisy

    def extra_repr(self) -> str:
        return (
            f"seed={self.seed}, periodic={self.periodic}, noise={self.noise!r}, "
            f"rectify={self.rectify}"
        )
