"""Ports of the authors' released functions, for tests that compare numbers with them
(never imported by the library)."""

import torch


def relative_distance_port(f, os, ds, qs):
    """Port of Petrini et al.'s median ``relative_distance`` (leonardopetrini/diffeo-sota,
    one temperature): the (deformation, noise) stabilities of ``f`` to the deformed ``ds``
    and noisy ``qs`` copies of ``os``, each set forwarded as one batch."""
    with torch.no_grad():
        f0 = f(os).detach().reshape(len(os), -1)
        deno = torch.cdist(f0, f0).pow(2).median().item() + 1e-10
        fd = f(ds).detach().reshape(len(os), -1)
        fq = f(qs).detach().reshape(len(os), -1)
        outd = (fd - f0).pow(2).median(0).values.sum().item() / deno
        outq = (fq - f0).pow(2).median(0).values.sum().item() / deno
    return outd, outq
