"""Streaming float64 statistics of one measured layer, and their jackknife errors.

Per layer the meter keeps, in float64 and split over ``G`` interleaved groups of images
(the image at position ``n`` of the stream, counted from 0, goes to group ``n mod G``;
processes sharing a data set pass global positions, so the groups are those of one pass):

* ``S1 = sum (f(x) - s)`` and ``S2 = sum ||f(x) - s||^2`` over clean images, with ``N``;
* per ``(T, cut)`` setting, ``sum ||f(tau x) - f(x)||^2``, ``sum ||f(x + eta) - f(x)||^2``
  and ``M``, the number of perturbed samples (``N`` times the perturbations per image).

The shift ``s`` is the first image's representation. The denominator
``2 (N S2 - ||S1||^2) / (N (N - 1))`` of design.md section 2 does not change under a shift,
and with one it does not lose digits to cancellation when the representation has a large
mean. Nothing per image is kept: memory is ``G`` times the layer's (reduced) size.

Standard errors come from the delete-one-group jackknife over the ``G`` groups: every
quantity (``D``, ``G``, ``R``, the denominator) is recomputed with one group left out, and
``SE^2 = (g - 1) / g * sum_j (theta_j - mean theta)^2`` over the ``g`` non-empty groups.
For the ratios this is the resampling counterpart of the delta method: it carries the
covariance of numerator and denominator. Because groups follow image order, not batches,
the errors do not depend on the batch size, nor on the number of processes: sums kept
about different shifts are moved to a common one (``S1 + N d``, ``S2 + 2 d.S1 + N ||d||^2``
with ``d`` the difference of shifts) and added group by group.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Estimates", "SiteStats", "pair_denominator"]


def pair_denominator(S1_sq, S2, N):
    """``E_{x != z} ||f(x) - f(z)||^2 = 2 (N S2 - ||S1||^2) / (N (N - 1))`` from the sums."""
    return 2.0 * (N * S2 - S1_sq) / (N * (N - 1.0))


def _squared_distance(values: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``||values - clean||^2`` per row as float64: in the working dtype, or in float64 when
    that overflowed (activations near 1e19 square past float32's 3.4e38)."""
    out = (values - clean).square().sum(1)
    if out.dtype != torch.float64 and not bool(torch.isfinite(out).all()):
        out = (values.to(torch.float64) - clean.to(torch.float64)).square().sum(1)
    return out.to(torch.float64)


class Estimates(dict):
    """``D, G, R, denominator, D_numerator, G_numerator`` and their ``*_err``: floats."""


class SiteStats:
    """Accumulators of one hooked site for ``n_settings`` perturbation settings."""

    def __init__(self, n_features: int, n_settings: int, groups: int, device) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.n_features, self.n_settings, self.groups = n_features, n_settings, groups
        self.shift: torch.Tensor | None = None
        self.S1 = torch.zeros(groups, n_features, **kw)
        self.S2 = torch.zeros(groups, **kw)
        self.N = torch.zeros(groups, **kw)
        self.num = torch.zeros(n_settings, 2, groups, **kw)  # [:, 0] diffeo, [:, 1] noise
        self.M = torch.zeros(n_settings, groups, **kw)

    def contributions(
        self,
        clean: torch.Tensor,
        perturbed: list[tuple[int, int, torch.Tensor]],
        onehot: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One batch's additions, not yet added (so that a NaN can be refused first).

        ``clean`` is ``(B, F)`` in float32 or float64; ``perturbed`` lists
        ``(setting, kind, (B, F))`` with ``kind`` 0 for ``tau x`` and 1 for ``x + eta``;
        ``onehot`` is the ``(G, B)`` float64 group membership of the images. Group sums are
        matrix products with it. A perturbed image's squared distance is computed in the
        activations' dtype (float32 at least), again in float64 for a batch where that
        overflowed (finite activations beyond about 1e19), and accumulated over images in
        float64; the clean sums are float64 throughout.
        """
        float64 = torch.float64
        clean64 = clean.to(float64)
        if self.shift is None:
            self.shift = clean64[0].clone()
        centred = clean64 - self.shift
        columns = [centred.square().sum(1), torch.ones_like(centred[:, 0])]
        columns += [_squared_distance(values, clean) for _, _, values in perturbed]
        sums = onehot @ torch.stack(columns, dim=1)  # (G, 2 + len(perturbed))
        num = torch.zeros_like(self.num)
        M = torch.zeros_like(self.M)
        for j, (setting, kind, _) in enumerate(perturbed):
            num[setting, kind] += sums[:, 2 + j]
            if kind == 0:
                M[setting] += sums[:, 1]
        return {"S1": onehot @ centred, "S2": sums[:, 0], "N": sums[:, 1], "num": num, "M": M}

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        self.S1 += parts["S1"]
        self.S2 += parts["S2"]
        self.N += parts["N"]
        self.num += parts["num"]
        self.M += parts["M"]

    @property
    def count(self) -> int:
        return round(float(self.N.sum()))

    def estimates(self, setting: int) -> Estimates:
        """Point estimates over all images and their jackknife standard errors."""
        S1_all, S2_all, N_all = self.S1.sum(0), self.S2.sum(), self.N.sum()
        num_all, M_all = self.num[setting].sum(1), self.M[setting].sum()

        def quantities(S1_sq, S2, N, num, M) -> dict[str, torch.Tensor]:
            den = pair_denominator(S1_sq, S2, N)
            d_num, g_num = num[0] / M, num[1] / M
            return {
                "D": d_num / den,
                "G": g_num / den,
                "R": num[0] / num[1],
                "denominator": den,
                "D_numerator": d_num,
                "G_numerator": g_num,
            }

        point = quantities(S1_all.square().sum(), S2_all, N_all, num_all, M_all)
        out = Estimates({k: float(v) for k, v in point.items()})
        used = (self.N > 0).nonzero().flatten()
        g = int(used.numel())
        if g < 2 or float(N_all) - float(self.N[used].max()) < 2:
            for key in point:
                out[f"{key}_err"] = math.nan
            return out
        S1_out = S1_all - self.S1[used]  # (g, F): the sums with one group left out
        loo = quantities(
            S1_out.square().sum(1),
            S2_all - self.S2[used],
            N_all - self.N[used],
            num_all[:, None] - self.num[setting][:, used],
            M_all - self.M[setting][used],
        )
        for key, values in loo.items():
            spread = (values - values.mean()).square().sum()
            out[f"{key}_err"] = float(torch.sqrt((g - 1) / g * spread))
        return out
