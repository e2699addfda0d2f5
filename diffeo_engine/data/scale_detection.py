"""The scale-detection tasks of Tomasini, Petrini, Cagnetta, Wyart (2022/23): labels,
signals and the data set. Their perturbations and the one-hot inputs of the analytical
model are in :mod:`diffeo_engine.data.scale_perturbations` (re-exported here).

**Data.** A signal of length ``L`` (1D, shape ``(1, L)``) or an ``L x L`` image (2D, shape
``(1, L, L)``) is zero except for two distinct *active pixels* of value ``value``. The
default value is ``sqrt(N / 2)`` with ``N`` the number of pixels (``L`` in 1D, ``L**2`` in
2D), so that ``||x||^2 = N`` (unit power per pixel). In 1D that is the authors'
``sqrt(L / 2)``; the 2D analogue keeps the same normalisation.

* task 2: label ``+1`` when both pixels fall in the same block of size ``xi`` (blocks
  ``[k xi, (k+1) xi)`` along each axis; ``L`` must be a multiple of ``xi``), else ``-1``;
* task 1: label ``+1`` when the periodic distance of the pixels is ``< xi - gap``, ``-1``
  when it is ``>= xi + gap``; pairs in between are excluded (the ``gap`` of the authors'
  code). In 2D the per-axis periodic offsets combine as ``L2`` (Euclidean) or ``Linf``
  (the largest), the options of Petrini et al.'s two-point data set.

Like the authors' code, the data set is a selection of distinct unordered pairs; with
``balanced`` (default) it holds as many ``+1`` as ``-1`` samples and alternates them, so
every even-length prefix, and both parts of :meth:`ScaleDetection.split`, are balanced.
The selection depends only on the arguments and ``seed`` (Philox keys, no global RNG).

Random streams (offsets from ``rng.USER_STREAM_BASE``): :data:`SELECT_STREAM`,
:data:`SAMPLE_STREAM`.

"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from diffeo_engine.physics import _is_integer, check_choice, check_float, check_int, check_seed
from diffeo_engine.rng import stream_uniforms

__all__ = [
    "SAMPLE_STREAM",
    "SELECT_STREAM",
    "ScaleDetection",
    "default_value",
    "positions_to_images",
    "scale_detection_labels",
]

SELECT_STREAM = 102
SAMPLE_STREAM = 103

ENUMERATE_LIMIT = 1 << 20  # pairs enumerated exactly up to this count, sampled beyond
_SAMPLE_CHUNK = 1 << 16
_SAMPLE_ROUNDS = 256


# ----------------------------------------------------------------------------- checks


def _check_task_args(L, xi, task, dim, gap, distance):
    dim = check_int("dim", dim, 1, 2)
    L = check_int("L", L, 3)
    if task not in (1, 2) or isinstance(task, bool):
        raise ValueError(f"task: expected 1 (periodic distance) or 2 (same block), got {task!r}")
    distance = check_choice("distance", distance, ("L2", "Linf"))
    gap = check_float("gap", gap, 0.0)
    if task == 2:
        xi = check_int("xi", xi, 1, L)
        if L % xi:
            raise ValueError(f"xi: expected a divisor of L={L} for task 2 (blocks of size xi)")
        if gap:
            raise ValueError(f"gap: applies to task 1 only, expected 0 for task 2, got {gap}")
    else:
        xi = check_float("xi", xi, 0.0, strict=True)
        if gap >= xi:
            raise ValueError(f"gap: expected a gap smaller than xi={xi}, got {gap}")
    return L, xi, int(task), dim, gap, distance


def default_value(L: int, dim: int = 1) -> float:
    """The active pixels' value ``sqrt(N / 2)``, ``N = L**dim``: ``||x||^2 = N``."""
    return math.sqrt(L**dim / 2)


def _coords(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Positions as ``(N, 2, dim)``: 1D positions may come as ``(N, 2)``."""
    if not torch.is_tensor(positions) or positions.dtype.is_floating_point:
        raise TypeError("positions: expected an integer tensor")
    if dim == 1 and positions.dim() == 2 and positions.shape[1] == 2:
        return positions[..., None]
    if positions.dim() == 3 and positions.shape[1:] == (2, dim):
        return positions
    want = "(N, 2)" if dim == 1 else "(N, 2, 2)"
    raise ValueError(f"positions: expected shape {want}, got {tuple(positions.shape)}")


# ----------------------------------------------------------------------------- labels


def scale_detection_labels(
    positions: torch.Tensor,
    L: int,
    xi,
    *,
    task: int = 2,
    gap: float = 0.0,
    distance: str = "Linf",
) -> torch.Tensor:
    """Labels ``+1`` / ``-1`` (int64) of pairs of active pixels; ``0`` inside the gap.

    ``positions`` is ``(N, 2)`` (1D) or ``(N, 2, 2)`` (2D: ``[sample, pixel, (row, col)]``).
    """
    dim = 2 if torch.is_tensor(positions) and positions.dim() == 3 else 1
    L, xi, task, dim, gap, distance = _check_task_args(L, xi, task, dim, gap, distance)
    c = _coords(positions, dim).to(torch.int64)
    if ((c < 0) | (c >= L)).any():
        raise ValueError(f"positions: expected coordinates in [0, {L})")
    if task == 2:
        same = (torch.div(c[:, 0], xi, rounding_mode="floor")
                == torch.div(c[:, 1], xi, rounding_mode="floor")).all(dim=1)  # fmt: skip
        return torch.where(same, 1, -1).to(torch.int64)
    delta = (c[:, 0] - c[:, 1]).abs()
    delta = torch.minimum(delta, L - delta).to(torch.float64)
    dist = delta.pow(2).sum(1).sqrt() if distance == "L2" else delta.amax(1)
    labels = torch.zeros(c.shape[0], dtype=torch.int64, device=c.device)
    labels[dist < xi - gap] = 1
    labels[dist >= xi + gap] = -1
    return labels


def positions_to_images(
    positions: torch.Tensor, L: int, *, dim: int = 1, value: float | None = None, dtype=None
) -> torch.Tensor:
    """Signals ``(N, 1, L)`` (1D) or images ``(N, 1, L, L)`` (2D) with the two pixels set."""
    dim = check_int("dim", dim, 1, 2)
    L = check_int("L", L, 3)
    value = default_value(L, dim) if value is None else check_float("value", value, 0, strict=True)
    c = _coords(positions, dim).to(torch.int64)
    flat = c[..., 0] if dim == 1 else c[..., 0] * L + c[..., 1]
    out = torch.zeros(c.shape[0], L**dim, dtype=dtype or torch.float32, device=c.device)
    out.scatter_(1, flat, value)
    return out.reshape(c.shape[0], 1, *(L,) * dim)


# ----------------------------------------------------------------------------- data set


def _ordered_pairs(M: int, L: int, dim: int, seed: int, device=None):
    """All unordered pairs of distinct pixels, in the seed's random order, as ``(P, 2, dim)``."""
    a, b = torch.triu_indices(M, M, offset=1, device=device)
    keys = stream_uniforms(seed, torch.zeros(1, dtype=torch.int64), SELECT_STREAM, a.numel())[0]
    order = torch.argsort(keys, stable=True)
    flat = torch.stack([a[order], b[order]], dim=1)
    return _unflatten(flat, L, dim)


def _unflatten(flat: torch.Tensor, L: int, dim: int) -> torch.Tensor:
    if dim == 1:
        return flat[..., None]
    return torch.stack([torch.div(flat, L, rounding_mode="floor"), flat % L], dim=-1)


def _sampled_pairs(M: int, L: int, dim: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Candidate pairs ``start .. start+count-1``, each keyed by its index: ``(count, 2)``."""
    ids = torch.arange(start, start + count, dtype=torch.int64)
    u = stream_uniforms(seed, ids, SAMPLE_STREAM, 2).to(torch.float64)
    return torch.clamp((u * M).floor().to(torch.int64), max=M - 1)


class ScaleDetection(Dataset):
    """The scale-detection data set (module docstring): ``(image, label)`` pairs.

    ``positions`` is ``(N, 2)`` in 1D or ``(N, 2, 2)`` in 2D (``[sample, pixel, (row,
    col)]``), ``labels`` a float32 tensor of ``+1``/``-1`` (use ``(labels > 0).long()`` for
    class indices). ``n=None`` takes every valid pair (the smaller class's count of each
    class when ``balanced``); an ``n`` must be even when ``balanced``. Images are built on
    demand: ``dataset[i]``, :meth:`images`, :meth:`tensors`.
    """

    def __init__(
        self,
        L: int,
        xi,
        *,
        task: int = 2,
        dim: int = 1,
        n: int | None = None,
        gap: float = 0.0,
        distance: str = "Linf",
        balanced: bool = True,
        value: float | None = None,
        seed: int = 0,
    ) -> None:
        L, xi, task, dim, gap, distance = _check_task_args(L, xi, task, dim, gap, distance)
        self.L, self.xi, self.task, self.dim = L, xi, task, dim
        self.gap, self.distance, self.seed = gap, distance, check_seed(seed)
        if not isinstance(balanced, bool):
            raise TypeError(f"balanced: expected a bool, got {balanced!r}")
        self.balanced = balanced
        self.value = (
            default_value(L, dim) if value is None else check_float("value", value, 0, strict=True)
        )
        if n is not None:
            n = check_int("n", n, 1)
            if balanced and n % 2:
                raise ValueError(f"n: expected an even number with balanced=True, got {n}")
        M = L**dim
        n_pairs = M * (M - 1) // 2
        if n_pairs <= ENUMERATE_LIMIT:
            positions = self._enumerate(M, n)
        elif n is None:
            raise ValueError(
                f"n: {n_pairs} pairs are too many to enumerate (limit {ENUMERATE_LIMIT}); "
                "give the number of samples"
            )
        else:
            positions = self._sample(M, n)
        self.positions = positions[..., 0] if dim == 1 else positions
        self.labels = self._labels(self.positions).to(torch.float32)

    # -- selection

    def _labels(self, positions: torch.Tensor) -> torch.Tensor:
        return scale_detection_labels(
            positions, self.L, self.xi, task=self.task, gap=self.gap, distance=self.distance
        )

    def _take(self, positions: torch.Tensor, labels: torch.Tensor, n: int | None) -> torch.Tensor:
        """Pick from candidates already in random order; alternate classes when balanced."""
        if not self.balanced:
            kept = positions[labels != 0]
            if n is not None and kept.shape[0] < n:
                raise ValueError(f"n: only {kept.shape[0]} valid pairs exist, asked for {n}")
            return kept if n is None else kept[:n]
        plus, minus = positions[labels == 1], positions[labels == -1]
        per_class = min(plus.shape[0], minus.shape[0]) if n is None else n // 2
        if min(plus.shape[0], minus.shape[0]) < max(per_class, 1):
            raise ValueError(
                f"n: the task has {plus.shape[0]} '+1' and {minus.shape[0]} '-1' pairs "
                f"(L={self.L}, xi={self.xi}, gap={self.gap}); cannot draw {per_class} of each"
            )
        out = torch.empty(2 * per_class, *positions.shape[1:], dtype=positions.dtype)
        out[0::2], out[1::2] = plus[:per_class], minus[:per_class]
        return out

    def _enumerate(self, M: int, n: int | None) -> torch.Tensor:
        pairs = _ordered_pairs(M, self.L, self.dim, self.seed)
        return self._take(pairs, self._labels(_squeeze(pairs, self.dim)), n)

    def _sample(self, M: int, n: int) -> torch.Tensor:
        """Draw distinct pairs (candidate ``k`` keyed by ``k``) until the quotas are full."""
        seen: set[int] = set()
        plus: list[int] = []
        minus: list[int] = []
        other: list[int] = []
        quota = n // 2 if self.balanced else n
        for rnd in range(_SAMPLE_ROUNDS):
            ab = _sampled_pairs(M, self.L, self.dim, self.seed, rnd * _SAMPLE_CHUNK, _SAMPLE_CHUNK)
            ab = ab[ab[:, 0] != ab[:, 1]].sort(dim=1).values
            labels = self._labels(_squeeze(_unflatten(ab, self.L, self.dim), self.dim))
            for key, label in zip((ab[:, 0] * M + ab[:, 1]).tolist(), labels.tolist()):
                if label == 0 or key in seen:
                    continue
                seen.add(key)
                if not self.balanced:
                    other.append(key)
                elif label == 1 and len(plus) < quota:
                    plus.append(key)
                elif label == -1 and len(minus) < quota:
                    minus.append(key)
            if (not self.balanced and len(other) >= n) or (
                self.balanced and len(plus) == quota and len(minus) == quota
            ):
                break
        else:
            raise ValueError(f"n: could not draw {n} distinct valid pairs; ask for fewer")
        if self.balanced:
            keys = torch.empty(n, dtype=torch.int64)
            keys[0::2], keys[1::2] = torch.tensor(plus), torch.tensor(minus)
        else:
            keys = torch.tensor(other[:n], dtype=torch.int64)
        flat = torch.stack([torch.div(keys, M, rounding_mode="floor"), keys % M], dim=1)
        return _unflatten(flat, self.L, self.dim)

    # -- access

    def __len__(self) -> int:
        return self.positions.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not _is_integer(index):
            raise TypeError(f"index: expected an integer, got {index!r}")
        image = positions_to_images(
            self.positions[index : index + 1] if index >= 0 else self.positions[[index]],
            self.L,
            dim=self.dim,
            value=self.value,
        )[0]
        return image, self.labels[index]

    def images(self, index=None) -> torch.Tensor:
        """The signals/images of ``index`` (a slice, index tensor or list; all by default)."""
        positions = self.positions if index is None else self.positions[index]
        return positions_to_images(positions, self.L, dim=self.dim, value=self.value)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the whole data set."""
        return self.images(), self.labels

    def split(self, n_first: int) -> tuple[ScaleDetection, ScaleDetection]:
        """Disjoint parts: the first ``n_first`` samples and the rest (balanced if even)."""
        n_first = check_int("n_first", n_first, 0, len(self))
        return self._view(slice(0, n_first)), self._view(slice(n_first, None))

    def _view(self, index) -> ScaleDetection:
        view = object.__new__(ScaleDetection)
        view.__dict__.update(self.__dict__)
        view.positions, view.labels = self.positions[index], self.labels[index]
        return view

    def perturbation(self, *, seed: int = 0, noise="matched", rectify: bool = False):
        """The matching :class:`ScaleDetectionPerturbation` (same ``L``, ``xi``, task...)."""
        from diffeo_engine.data.scale_perturbations import ScaleDetectionPerturbation

        return ScaleDetectionPerturbation(
            self.L,
            self.xi,
            task=self.task,
            dim=self.dim,
            gap=self.gap,
            distance=self.distance,
            seed=seed,
            noise=noise,
            rectify=rectify,
        )

    def __repr__(self) -> str:
        return (
            f"ScaleDetection(L={self.L}, xi={self.xi}, task={self.task}, dim={self.dim}, "
            f"n={len(self)}, gap={self.gap}, distance={self.distance!r}, seed={self.seed})"
        )


def _squeeze(coords: torch.Tensor, dim: int) -> torch.Tensor:
    return coords[..., 0] if dim == 1 else coords


_MOVED = {
    "MOVE_STREAM", "NOISE_STREAM", "ONE_HOT_MOVE_STREAM", "ONE_HOT_NOISE_STREAM",
    "OneHotShift", "ScaleDetectionPerturbation", "one_hot_signals",
}  # fmt: skip


def __getattr__(name: str):
    """The perturbations moved to :mod:`.scale_perturbations`, importable from here too
    (lazily: that module imports this one)."""
    if name in _MOVED:
        from diffeo_engine.data import scale_perturbations

        return getattr(scale_perturbations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
