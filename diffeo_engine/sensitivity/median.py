"""The median estimator of Petrini, Favero, Geiger, Wyart (NeurIPS 2021).

Their ``relative_distance(..., avgtype="median")`` (leonardopetrini/diffeo-sota,
``results/utils.py``; the same in ``stability_measures.py``) measures a representation ``f``
of ``N`` images as

* denominator: the median of ``||f(x_i) - f(x_j)||^2`` over **all** ``N x N`` ordered pairs,
  the ``N`` zeros of ``i = j`` included (``torch.cdist(f0, f0).pow(2).median()``, the lower
  median of an even count);
* numerator of ``D`` (``G``): per feature, the median over images of
  ``(f(tau x) - f(x))^2`` (``(f(x + eta) - f(x))^2``), summed over features;
* ``R = D / G``.

Medians do not stream: the meter keeps every image's (reduced) representation of the layer
(memory ``N`` times its size), so measure the output or small layers with it. No jackknife
error is given (``*_err`` are NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = ["MedianStore", "median_estimates", "median_pair_distance"]


def median_pair_distance(clean: torch.Tensor) -> float:
    """Median of ``||f_i - f_j||^2`` over all ``N x N`` pairs (diagonal included), float64."""
    f = clean.to(torch.float64)
    sq = f.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * f @ f.T).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return float(d2.flatten().median())


def median_estimates(clean: torch.Tensor, tau: torch.Tensor, noisy: torch.Tensor) -> dict:
    """``D, G, R, denominator, D_numerator, G_numerator`` (and NaN ``*_err``) of one layer.

    ``clean`` is ``(N, F)``; ``tau`` and ``noisy`` are ``(K, N, F)``, the ``K`` perturbed
    copies of each image (the per-feature medians run over all ``K N`` differences).
    """
    den = median_pair_distance(clean)
    c = clean.to(torch.float64)[None]
    d_num = float((tau.to(torch.float64) - c).square().flatten(0, 1).median(0).values.sum())
    g_num = float((noisy.to(torch.float64) - c).square().flatten(0, 1).median(0).values.sum())
    out = {
        "D": d_num / den if den > 0 else math.nan,
        "G": g_num / den if den > 0 else math.nan,
        "R": d_num / g_num if g_num > 0 else math.nan,
        "denominator": den,
        "D_numerator": d_num,
        "G_numerator": g_num,
    }
    out.update({f"{key}_err": math.nan for key in list(out)})
    return out


class MedianStore:
    """Every image's features of one layer, batch by batch, for :func:`median_estimates`."""

    def __init__(self) -> None:
        self.clean: list[torch.Tensor] = []
        self.copies: dict[tuple[int, int], list[torch.Tensor]] = {}

    @staticmethod
    def batch(clean: torch.Tensor, perturbed) -> dict:
        """One batch's features on the CPU: ``clean`` and, per ``(setting, kind)``, the
        ``(K, B, F)`` stack of its ``K`` copies in order."""
        out: dict = {"clean": clean.detach().cpu()}
        for setting, kind, values in perturbed:
            out.setdefault((setting, kind), []).append(values.detach().cpu())
        return {key: v if key == "clean" else torch.stack(v) for key, v in out.items()}

    def add(self, batch: dict) -> None:
        self.clean.append(batch["clean"])
        for key, values in batch.items():
            if key != "clean":
                self.copies.setdefault(key, []).append(values)

    def estimates(self, setting: int) -> dict:
        clean = torch.cat(self.clean)
        tau = torch.cat(self.copies[(setting, 0)], dim=1)
        noisy = torch.cat(self.copies[(setting, 1)], dim=1)
        return median_estimates(clean, tau, noisy)
