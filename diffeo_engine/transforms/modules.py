"""``nn.Module`` transforms in the torchvision-v2 style, and the perturbation protocol.

A *perturbation* is any callable ``(images, ids) -> (tau x, x + eta)`` whose output depends
only on ``(seed, ids)``; the sensitivity meter and the generator accept any of them.
:class:`DiffeoPair` is the max-entropy one. :class:`Diffeo` is the augmentation: it moves
every part of a sample (image, video, mask, boxes, keypoints) with one field per sample.
Both draw ``T`` and ``cut`` per sample from the laws of :mod:`.laws`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from diffeo_engine import ops, targets
from diffeo_engine.physics import (
    IMAGE_DTYPES,
    check_choice,
    check_ids,
    check_interp,
    check_seed,
)
from diffeo_engine.reference import check_noise
from diffeo_engine.transforms.laws import (
    Beta,
    DiffeoParams,
    Fixed,
    check_probability,
    cut_law,
    describe,
    draw_applied,
    draw_cuts,
    draw_temperatures,
    temperature_law,
)
from diffeo_engine.transforms.samples import Part, parse_sample, to_batch

__all__ = ["Diffeo", "DiffeoPair", "Perturbation"]


@runtime_checkable
class Perturbation(Protocol):
    """Anything that turns a batch and its ids into ``(tau x, x + eta)``."""

    def __call__(
        self, images: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _check_out_dtype(out_dtype):
    if out_dtype is not None and out_dtype not in IMAGE_DTYPES:
        raise TypeError(f"out_dtype: expected None or one of {IMAGE_DTYPES}, got {out_dtype!r}")
    return out_dtype


def _law_value(law):
    """What ``module.T`` / ``module.cut`` shows: the value, the range, or None (Beta)."""
    if isinstance(law, Beta):
        return None
    return law.value if hasattr(law, "value") else (law.low, law.high)


class _RandomDiffeo(nn.Module):
    """What :class:`Diffeo` and :class:`DiffeoPair` share: the laws of ``T`` and ``cut``,
    the probability ``p``, the seed and the ids of a call, and its record."""

    def __init__(
        self, T, cut, *, sT, rT, scut, rcut, cutmin, cutmax, p, seed, interp, backend
    ) -> None:
        super().__init__()
        self.T_law = temperature_law(T, sT, rT)
        minimum = 2 if isinstance(self.T_law, Beta) else 1
        self.cut_law = cut_law(cut, scut, rcut, cutmin, cutmax, minimum=minimum)
        self.p = check_probability(p)
        self.seed = None if seed is None else check_seed(seed)
        self.interp = check_interp(interp)
        self.backend = check_choice("backend", backend, ops.BACKENDS)
        self.last_params: DiffeoParams | None = None
        self._drawn_T = self._drawn_cut = None  # the tensors of the last fresh draw

    @property
    def T(self):
        """The fixed temperature or the range ``(low, high)``; None for the Beta law."""
        return _law_value(self.T_law)

    @property
    def cut(self):
        """The fixed ``cut`` or the range ``(low, high)``; None for the Beta law."""
        return _law_value(self.cut_law)

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, (1,)).item())

    def _default_ids(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=device)

    def sample_params(
        self, size, ids=None, *, n: int | None = None, device: torch.device | str | None = None
    ) -> DiffeoParams:
        """The parameters of a call on ``n`` samples of ``size = (H, W)`` (or on the samples
        ``ids``: one int for one sample, or a sequence): what the next call would use.
        ``T`` is 0 for the samples the coin of ``p`` leaves unchanged."""
        H, W = size
        if ids is not None:
            ids = _as_ids(ids, device)
            if n is not None and ids.shape[0] != n:
                raise ValueError(f"ids: expected one id per sample ({n}), got {ids.shape[0]}")
        elif n is None:
            raise ValueError("n: expected the number of samples when ids are not given")
        else:
            ids = self._default_ids(n, torch.device(device or "cpu"))
        seed = self._seed()
        applied = draw_applied(self.p, seed, ids)
        cuts = draw_cuts(self.cut_law, seed, ids)
        T = draw_temperatures(self.T_law, seed, ids, cuts, math.sqrt(H * W))
        if self.p < 1:
            T = torch.where(applied, T, torch.zeros_like(T))
        _set(self, _drawn_T=T, _drawn_cut=cuts)  # drawn here, not replayed: see _T_arg
        return DiffeoParams(T, cuts, ids, applied, seed)

    def _params(self, size, n, device, ids, params) -> DiffeoParams:
        """Recorded ``params`` (replay) or fresh ones; kept as ``last_params``."""
        if params is None:
            params = self.sample_params(size, ids, n=n, device=device)
        else:
            if not isinstance(params, DiffeoParams):
                raise TypeError(
                    f"params: expected the DiffeoParams of an earlier call, got "
                    f"{type(params).__name__}"
                )
            if ids is not None:
                raise ValueError("ids: the recorded params carry the ids; give one, not both")
            if len(params) != n:
                raise ValueError(f"params: expected a record of {n} samples, got {len(params)}")
            params = params.to(device)
        _set(self, last_params=params)
        return params

    def _cut_arg(self, params: DiffeoParams):
        """One integer when every sample has the same ``cut`` (the kernels' shared path)."""
        if isinstance(self.cut_law, Fixed) and params.cut is self._drawn_cut:
            return self.cut_law.value  # nothing to read: the law's own value
        low, high = (int(v) for v in torch.aminmax(params.cut)) if len(params) else (1, 1)
        return low if low == high else params.cut

    def _T_arg(self, params: DiffeoParams):
        """One float when the law is fixed and every sample is transformed (``ops``' fast
        path for a scalar ``T``), else the per-sample tensor."""
        if isinstance(self.T_law, Fixed) and self.p >= 1 and params.T is self._drawn_T:
            return self.T_law.value
        return params.T

    def _laws_repr(self) -> str:
        return (
            f"{describe('T', self.T_law, ('sT', 'rT'))}, "
            f"{describe('cut', self.cut_law, ('scut', 'rcut'))}, p={self.p}, seed={self.seed}"
        )


class Diffeo(_RandomDiffeo):
    """A random max-entropy diffeomorphism per sample, moving all its parts with one field.

    ``T`` and ``cut`` are fixed values, ranges ``(low, high)`` (uniform; ``cut`` integers)
    or, with ``T=None`` / ``cut=None``, the Beta laws of the published transform (``sT, rT``;
    ``scut, rcut, cutmin, cutmax``; :mod:`diffeo_engine.transforms.laws`). Each sample is
    transformed with probability ``p``. A call takes one image (``(H, W)``, ``(C, H, W)``
    or a batch ``(B, C, H, W)``; a tensor, a numpy array or a PIL image), a dict of parts,
    or an image and parts by name (``mask=``, ``boxes=``, ``keypoints=``, ``video=``), and
    returns the same structure (:mod:`diffeo_engine.transforms.samples`). Images and videos
    are warped with ``interp``, masks at the nearest pixel, boxes and keypoints moved with
    the field (:mod:`diffeo_engine.targets`; boxes in ``box_format``).

    With ``seed=None`` each call draws a fresh seed from torch's generator (augmentation).
    With a fixed ``seed`` a sample depends only on ``(seed, id)``; when ``ids`` are not
    given, a per-module counter of the samples seen so far supplies them (call ``k`` on one
    sample gets id ``k``). In a ``DataLoader`` with workers the counter is per worker and
    interleaved by worker id (``count * num_workers + worker_id``); workers re-created every
    epoch start their counters again. For fields tied to the data-set index pass ``ids``
    (the index). ``reset()`` sets the counter back to 0. Every call records its parameters
    in ``last_params`` (``return_params=True`` returns them too); passing them back as
    ``params=`` replays the same fields on other parts.
    """

    def __init__(
        self,
        T=None,
        cut=None,
        *,
        sT: float | None = None,
        rT: float | None = None,
        scut: float | None = None,
        rcut: float | None = None,
        cutmin: int | None = None,
        cutmax: int | None = None,
        p: float = 1.0,
        seed: int | None = None,
        interp: str = "bilinear",
        out_dtype: torch.dtype | None = None,
        backend: str = "auto",
        box_format: str = "xyxy",
    ) -> None:
        super().__init__(
            T, cut, sT=sT, rT=rT, scut=scut, rcut=rcut, cutmin=cutmin, cutmax=cutmax, p=p,
            seed=seed, interp=interp, backend=backend,
        )  # fmt: skip
        self.out_dtype = _check_out_dtype(out_dtype)
        self.box_format = targets.check_box_format(box_format)
        self.calls = 0  # samples served without explicit ids (the id counter)

    def reset(self) -> None:
        """Restart the id counter: the next sample gets id 0 again."""
        self.calls = 0

    def _default_ids(self, n: int, device: torch.device) -> torch.Tensor:
        if self.seed is None:
            return super()._default_ids(n, device)  # a fresh seed per call already differs
        info = torch.utils.data.get_worker_info()
        start = self.calls
        _set(self, calls=start + n)
        if info is None:
            return torch.arange(start, start + n, dtype=torch.int64, device=device)
        ids = (start + torch.arange(n, dtype=torch.int64)) * info.num_workers + info.id
        return ids.to(device)

    def forward(
        self,
        *sample,
        ids=None,
        params: DiffeoParams | None = None,
        return_params: bool = False,
        size: tuple[int, int] | None = None,
        **parts,
    ):
        """Transform one sample or a batch; see the class docstring for the forms."""
        recorded = len(params) if isinstance(params, DiffeoParams) else None
        parsed = parse_sample(sample, parts, ids=ids, size=size, recorded=recorded)
        params = self._params(parsed.size, parsed.batch_size, parsed.device, ids, params)
        field: list[torch.Tensor] = []  # computed once, for the first part that needs it
        outputs = [self.move(part, params, parsed.size, field) for part in parsed.parts]
        result = parsed.rebuild(outputs)
        return (result, params) if return_params else result

    def _field(self, params: DiffeoParams, size, cache: list) -> torch.Tensor:
        if not cache:
            p = params
            field = targets.sample_displacement(
                len(p), p.cut, p.T, size, seed=p.seed, ids=p.ids, device=p.ids.device
            )
            cache.append(field)
        return cache[0]

    def _deform(self, images: torch.Tensor, params: DiffeoParams, out_dtype) -> torch.Tensor:
        return ops.deform(
            images, self._T_arg(params), self._cut_arg(params), seed=params.seed, ids=params.ids,
            interp=self.interp, out_dtype=out_dtype, backend=self.backend,
        )  # fmt: skip

    def move(self, part: Part, params: DiffeoParams, size, field: list, *, box_format=None):
        """One part in batch form moved with the samples' fields (``field``: a cache list,
        empty or holding the displacement of these params; ``box_format``: the boxes' own,
        else the module's)."""
        kind, batch = part.kind, part.batch
        if kind == "other":
            return part.value
        if kind == "image":
            out_dtype = self.out_dtype if part.out_dtype is None else part.out_dtype
            return self._deform(batch, params, out_dtype)
        if kind == "video":
            B, frames, C, H, W = batch.shape
            out = self._deform(batch.reshape(B, frames * C, H, W), params, self.out_dtype)
            return out.reshape(B, frames, C, H, W)
        if kind == "mask":
            moved = targets.warp_mask(batch.to(params.ids.device), self._field(params, size, field))
            applied = params.applied.to(batch.device)
            return _unchanged_where_not_applied(moved.to(batch.device), batch, applied)
        displacement = self._field(params, size, field)
        if isinstance(batch, list):  # per-sample boxes or keypoints
            return [
                self._move_points(
                    kind, item[None], displacement[i : i + 1], params.applied[i], box_format
                )[0]
                for i, item in enumerate(batch)
            ]
        return self._move_points(kind, batch, displacement, params.applied, box_format)

    def _move_points(self, kind, points, displacement, applied, box_format):
        if kind == "boxes":
            box_format = self.box_format if box_format is None else box_format
            moved = targets.move_boxes(points, displacement, box_format=box_format)
        else:
            moved = targets.move_keypoints(points, displacement)
        original = points if points.is_floating_point() else points.to(moved.dtype)
        return _unchanged_where_not_applied(moved, original, applied.to(points.device))

    def extra_repr(self) -> str:
        return f"{self._laws_repr()}, interp={self.interp!r}, box_format={self.box_format!r}"


def _set(module: nn.Module, **values) -> None:
    """Plain Python attributes written past ``nn.Module.__setattr__`` (which costs
    microseconds a call, inspecting parameters, buffers and submodules): the per-call
    state of a transform, never a tensor the module owns."""
    module.__dict__.update(values)


def _as_ids(ids, device) -> torch.Tensor:
    """One id (an integer or a 0-d tensor) or a sequence of them, checked, as int64."""
    if torch.is_tensor(ids):
        ids = ids.reshape(1) if ids.dim() == 0 else ids
        return check_ids(ids, ids.shape[0], device)
    if isinstance(ids, numbers.Integral):
        ids = [ids]
    elif not isinstance(ids, (str, bytes)) and isinstance(ids, Iterable):
        ids = list(ids)  # an iterator is read once
    else:
        raise TypeError(
            f"ids: expected an integer id or a sequence of them, got {type(ids).__name__} {ids!r}"
        )
    return check_ids(ids, len(ids), device)


def _unchanged_where_not_applied(moved, original, applied: torch.Tensor):
    """The parts of the samples the coin of ``p`` left alone come back exactly as given."""
    if bool(applied.all()):
        return moved
    keep = applied.reshape(-1, *([1] * (moved.dim() - 1))) if applied.dim() else applied
    return torch.where(keep, moved, original)


class DiffeoPair(_RandomDiffeo):
    """The max-entropy perturbation pair ``(tau x, x + eta)`` as a :class:`Perturbation`.

    ``T`` and ``cut`` take the same laws as :class:`Diffeo` (and ``p``: a sample left alone
    gets ``T = 0``, so ``tau x = x`` and, with matched noise, ``eta = 0``). Images are one
    ``(H, W)`` or ``(C, H, W)`` image, a batch ``(B, C, H, W)``, a numpy array or a PIL
    image, returned as they came (uint8 tensors give float32). ``ids`` default to
    ``0..B-1``; ``params=`` replays recorded parameters.
    """

    def __init__(
        self,
        T=None,
        cut=None,
        *,
        sT: float | None = None,
        rT: float | None = None,
        scut: float | None = None,
        rcut: float | None = None,
        cutmin: int | None = None,
        cutmax: int | None = None,
        p: float = 1.0,
        seed: int = 0,
        noise="matched",
        interp: str = "bilinear",
        backend: str = "auto",
    ) -> None:
        super().__init__(
            T, cut, sT=sT, rT=rT, scut=scut, rcut=rcut, cutmin=cutmin, cutmax=cutmax, p=p,
            seed=check_seed(seed), interp=interp, backend=backend,
        )  # fmt: skip
        check_noise(noise)
        self.noise = noise

    def forward(
        self,
        images,
        ids=None,
        *,
        params: DiffeoParams | None = None,
        return_params: bool = False,
    ):
        batched = getattr(images, "ndim", 0) == 4
        part = to_batch("images", "image", images, batched)
        batch = part.batch
        params = self._params(batch.shape[-2:], batch.shape[0], batch.device, ids, params)
        out_dtype = part.out_dtype
        if out_dtype is None and batch.dtype == torch.uint8:
            out_dtype = torch.float32
        tau, noisy = ops.perturb(
            batch, self._T_arg(params), self._cut_arg(params), seed=params.seed, ids=params.ids,
            noise=self.noise, interp=self.interp, out_dtype=out_dtype, backend=self.backend,
        )  # fmt: skip
        result = (part.back(tau), part.back(noisy))
        return (result, params) if return_params else result

    def extra_repr(self) -> str:
        return f"{self._laws_repr()}, noise={self.noise!r}, interp={self.interp!r}"
