"""The perturbation settings of the sensitivity meter and the perturbed copies of a batch.

A setting is one ``(T, cut)`` of the max-entropy perturbation (through :func:`ops.perturb`,
settings sharing ``cut`` are one launch with a per-image ``T``) or a user's callable
``(images, ids) -> (tau x, x + eta)``. Image ``i`` is perturbed ``K`` times with the
perturbation ids ``i * K + k`` (design.md section 2).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from diffeo_engine import ops
from diffeo_engine.physics import _is_integer, check_cut, check_images, check_T

__all__ = ["Setting", "make_settings", "perturb_batch"]


@dataclass(frozen=True)
class Setting:
    label: str
    T: float | None
    cut: int | None
    perturbation: Callable | None  # None: the built-in max-entropy pair through ops


def make_settings(
    T, cut, settings, perturbation, *, seed: int, noise, interp: str, backend: str
) -> list[Setting]:
    """The perturbation settings of a meter, checked: from ``T, cut``, ``settings=[(T,
    cut), ...]`` or ``perturbation=`` (a callable or a list of them)."""
    if perturbation is not None:
        if settings is not None:
            raise ValueError("settings: give either settings=[(T, cut), ...] or perturbation")
        many = isinstance(perturbation, (list, tuple))
        chosen = list(perturbation) if many else [perturbation]
        if not chosen:
            raise ValueError("perturbation: expected a callable or a non-empty list of them")
        out = []
        for p in chosen:
            if not callable(p):
                raise TypeError(
                    "perturbation: expected a callable (images, ids) -> (tau x, x + eta), "
                    f"got {type(p).__name__}"
                )
            pT, pcut = getattr(p, "T", T), getattr(p, "cut", cut)
            real = isinstance(pT, numbers.Real) and not isinstance(pT, bool)
            pT = float(pT) if real else None
            pcut = int(pcut) if _is_integer(pcut) else None
            label = type(p).__name__ if pT is None else f"T={pT:.4g}, cut={pcut}"
            out.append(Setting(label, pT, pcut, p))
        labels = [s.label for s in out]
        if len(set(labels)) < len(labels):
            out = [
                Setting(f"{s.label} #{i}", s.T, s.cut, s.perturbation) for i, s in enumerate(out)
            ]
        return out
    if settings is None:
        if T is None or cut is None:
            raise ValueError(
                "T, cut: expected a temperature and a cut-off (or settings=[(T, cut), ...], "
                "or perturbation=...)"
            )
        settings = [(T, cut)]
    elif T is not None or cut is not None:
        raise ValueError("settings: give either T and cut, or settings=[(T, cut), ...]")
    elif isinstance(settings, (str, bytes)) or not isinstance(settings, Iterable):
        raise TypeError(f"settings: expected a list of (T, cut) pairs, got {settings!r}")
    settings = list(settings)
    if not settings:
        raise ValueError(
            "settings: expected at least one (T, cut) pair, got none (an empty sweep would "
            "measure nothing)"
        )
    out, seen = [], set()
    for item in settings:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"settings: expected (T, cut) pairs, got {item!r}")
        sT, scut = item
        if torch.is_tensor(sT):
            raise TypeError("T: expected a float per setting (a sweep takes settings=[...])")
        check_T(sT, 1, torch.device("cpu"))
        scut = check_cut(scut)
        key = (float(sT), scut)
        if key in seen:
            raise ValueError(f"settings: (T={sT}, cut={scut}) given twice")
        seen.add(key)
        out.append(Setting(f"T={float(sT):.4g}, cut={scut}", float(sT), scut, None))
    # noise / interp / backend are checked once here, through ops, on a tiny image
    probe = torch.zeros(1, 1, 2, 2)
    for s in out:
        ops.perturb(
            probe, s.T, s.cut, seed=seed, noise=noise, interp=interp,
            backend=backend,
        )  # fmt: skip
    return out


def perturb_batch(
    settings: list[Setting],
    images: torch.Tensor,
    ids: torch.Tensor,
    K: int,
    *,
    seed: int,
    noise,
    interp: str,
    backend: str,
) -> list[tuple[int, int, torch.Tensor]]:
    """Every perturbed copy: ``(setting, kind, batch)`` for ``k`` in order, kind 0 then 1."""
    B = images.shape[0]
    pids = [ids * K + k for k in range(K)]
    out: list[tuple[int, int, torch.Tensor]] = []
    builtin: dict[int, list[int]] = {}
    for index, s in enumerate(settings):
        if s.perturbation is None:
            builtin.setdefault(s.cut, []).append(index)
            continue
        for k in range(K):
            pair = s.perturbation(images, pids[k])
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(
                    "perturbation: expected it to return (tau x, x + eta), "
                    f"got {type(pair).__name__}"
                )
            for kind, part in enumerate(pair):
                if not torch.is_tensor(part) or part.shape != images.shape:
                    got = tuple(part.shape) if torch.is_tensor(part) else type(part).__name__
                    raise ValueError(
                        f"perturbation: expected outputs of shape {tuple(images.shape)} "
                        f"(the images'), got {got}"
                    )
                out.append((index, kind, part))
    if builtin:
        check_images(images)
        out_dtype = torch.float32 if images.dtype == torch.uint8 else None
    for cut, members in builtin.items():
        # one launch per cut: images repeated per (setting, k), per-image T
        reps = len(members) * K
        batch = images.repeat(reps, *([1] * (images.dim() - 1)))
        T = torch.tensor(
            [settings[i].T for i in members], dtype=torch.float32, device=images.device
        ).repeat_interleave(K * B)
        all_ids = torch.cat(pids).repeat(len(members))
        tau, noisy = ops.perturb(
            batch, T, cut, seed=seed, ids=all_ids, noise=noise,
            interp=interp, out_dtype=out_dtype, backend=backend,
        )  # fmt: skip
        for m, index in enumerate(members):
            for k in range(K):
                chunk = slice((m * K + k) * B, (m * K + k + 1) * B)
                out.append((index, 0, tau[chunk]))
                out.append((index, 1, noisy[chunk]))
    return out
