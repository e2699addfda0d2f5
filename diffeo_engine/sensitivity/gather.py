"""The sums of a sensitivity meter gathered from every rank of a distributed run.

:func:`reduced_copy` is a collective (every rank calls it) behind
``SensitivityMeter.compute(distributed=ctx)`` (design.md section 3).
"""

from __future__ import annotations

import copy
import math

import torch

from diffeo_engine.distributed import DistributedContext
from diffeo_engine.sensitivity.stats import SiteStats

__all__ = ["reduced_copy"]


def reduced_copy(meter, ctx: DistributedContext):
    """A copy of ``meter`` holding the sums of every rank of ``ctx``, to compute.

    A collective (every rank calls it): the layer lists are compared through one small
    object gather, the reference shift (design.md section 2's sums are kept about the
    first image's representation) is broadcast from the first rank that saw images,
    each rank re-centres its sums on it, and all the float64 accumulators travel in one
    flat buffer through one all-reduce. ``meter`` is left as it was; the copy shares
    its hooks and only computes.
    """
    mine = {
        "order": list(meter._order),
        "meta": dict(meter._meta),
        "features": {site: meter._stats[site].n_features for site in meter._order},
        "images": meter._n_seen,
        "mode": meter._mode,
        "image_info": dict(meter._image_info),
    }
    everyone = ctx.all_gather_object(mine)
    seen = [rank for rank, info in enumerate(everyone) if info["order"]]
    if not seen:
        raise RuntimeError("compute: no images yet on any rank; call update(images) first")
    ref = everyone[seen[0]]
    for rank in seen[1:]:
        info = everyone[rank]
        if info["order"] != ref["order"] or info["features"] != ref["features"]:
            raise ValueError(
                f"compute: rank {rank} measured layers {info['features']} but rank "
                f"{seen[0]} measured {ref['features']}; every rank must run the same model"
            )
    order, features = ref["order"], ref["features"]
    G, S = meter.error_groups, len(meter._settings)
    device = None
    if meter._order:
        device = meter._stats[meter._order[0]].S1.device
    shift_here = (
        torch.cat([meter._stats[site].shift for site in order])
        if meter._order
        else torch.zeros(sum(features.values()), dtype=torch.float64, device=device)
    )
    shift = ctx.broadcast(shift_here, src=seen[0])
    pieces, offset = [], 0
    for site in order:
        F = features[site]
        common = shift[offset : offset + F]
        offset += F
        stats = meter._stats.get(site)
        if stats is None:
            stats = SiteStats(F, S, G, common.device)
            stats.shift = common
        d = stats.shift - common  # move the sums from this rank's shift to the common one
        S1 = stats.S1 + stats.N[:, None] * d
        S2 = stats.S2 + 2.0 * (stats.S1 @ d) + stats.N * d.square().sum()
        pieces += [S1.flatten(), S2, stats.N, stats.num.flatten(), stats.M.flatten()]
    total = ctx.all_reduce_sum(torch.cat(pieces))
    out = copy.copy(meter)
    out._stats, out._pending, out._batch_info = {}, {}, None
    out._progress, out._closed = None, True
    offset = shift_offset = 0
    for site in order:
        F = features[site]
        stats = SiteStats(F, S, G, total.device)
        stats.shift = shift[shift_offset : shift_offset + F].to(total.device)
        shift_offset += F
        for name, shape in (
            ("S1", (G, F)), ("S2", (G,)), ("N", (G,)), ("num", (S, 2, G)), ("M", (S, G))
        ):  # fmt: skip
            size = math.prod(shape)
            setattr(stats, name, total[offset : offset + size].reshape(shape))
            offset += size
        out._stats[site] = stats
    out._order, out._meta = list(order), dict(ref["meta"])
    out._n_seen = sum(info["images"] for info in everyone)
    out._mode, out._image_info = ref["mode"], ref["image_info"]
    return out
