"""Claim 4, real images: the paper's CIFAR-10 nets, and an exploratory MNIST run.

**Claim 4 (the paper's).** Tomasini et al.'s layer-wise real-image results are CIFAR-10 nets
(VGG11, AlexNet, LeNet) trained about 250 epochs on augmented data, measured with the
max-entropy diffeomorphism at ``cut = 3`` and a typical displacement of 1 pixel
(``typical_temperature(1, 3, 32)``), matched plain noise, the full representation of every
ReLU. Training those nets does not fit a CPU budget, so the claim is testable only with
``--cifar10 DIR`` (the binary batches, :func:`~diffeo_engine.data.cifar10.load_cifar10`) and
``--weights NAME=FILE`` for at least one of ``vgg11``, ``alexnet``, ``lenet`` (weights
trained elsewhere, read by :func:`~diffeo_engine.models.train.load_weights`; inputs
normalised with the usual CIFAR-10 constants ``CIFAR_MEAN``, ``CIFAR_STD``). Without them
it reports NOT TESTABLE with the reason. PASS when every net given has, trained,
``D_last/D_1 < 1`` and ``G_last/G_1 > 1`` over its ReLU layers.

**4x, MNIST (exploratory, no verdict, ``--full``).** The LeNets trained for N2
(:mod:`.petrini2021`, the authors' recipe, three seeds) measured layer by layer at their
ReLUs on the probe set of :mod:`.mnist` (``cut = 3``, one-pixel displacement, matched
noise, full representation, mean estimator): a proxy the paper never tested, printed as
measured with the geometric means over the seeds.
"""

from __future__ import annotations

import time

from torch import nn

from diffeo_engine.models import get_model
from diffeo_engine.models.train import load_weights
from diffeo_engine.physics import typical_temperature
from diffeo_engine.reproduce.claims import (
    Claims,
    Normalize,
    SeedEstimate,
    last_over_first,
    log,
    measure,
)
from diffeo_engine.reproduce.mnist import relu_sites
from diffeo_engine.reproduce.petrini2021 import LENET_LAYERS

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_NETS",
    "CIFAR_STD",
    "experiment_cifar10",
    "experiment_mnist",
    "mnist_not_run",
]

CIFAR_NETS = ("vgg11", "alexnet", "lenet")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CUT, CIFAR_DISPLACEMENT = 3, 1.0
CIFAR_IMAGES = 1000  # test images measured per net


def _cifar_net(name: str, seed: int) -> nn.Module:
    return get_model(name, seed=seed, in_channels=3, num_classes=10)


def experiment_cifar10(
    claims: Claims, directory, weights: dict[str, str] | None, *, seed: int, device, echo=None
) -> dict:
    """Claim 4 with CIFAR-10 and weights trained elsewhere; NOT TESTABLE without them."""
    start = time.perf_counter()
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(CIFAR_NETS))
    if unknown:
        raise ValueError(f"--weights: expected names among {CIFAR_NETS}, got {unknown}")
    common = dict(
        statement="CIFAR-10 nets trained ~250 epochs (VGG11, AlexNet, LeNet), max-entropy "
        "diffeomorphisms (cut 3, 1-pixel displacement), full representation: after training "
        "D_k falls and G_k rises with depth",
        expected="for every net: trained D_last/D_1 < 1 and G_last/G_1 > 1 (ReLU layers)",
        experiment="cifar10",
        thresholds={"D_ratio_below": 1.0, "G_ratio_above": 1.0},
    )
    missing = []
    if directory is None:
        missing.append("no --cifar10 DIR (the CIFAR-10 binary batches)")
    if not weights:
        missing.append(
            f"no --weights NAME=FILE for {'/'.join(CIFAR_NETS)} trained on CIFAR-10 "
            "(~250 epochs each, beyond a CPU budget)"
        )
    if missing:
        reason = "not testable here: " + "; ".join(missing)
        claims.add(
            "4",
            "CIFAR-10 nets, trained: D falls, G rises",
            measured=reason,
            verdict="NOT TESTABLE",
            **common,
        )
        return {"skipped": reason}
    from diffeo_engine.data.cifar10 import load_cifar10

    images, _ = load_cifar10(directory, "test", limit=CIFAR_IMAGES)
    images = images.float() / 255.0
    T = typical_temperature(CIFAR_DISPLACEMENT, CIFAR_CUT, 32)
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    nets, ok, parts = {}, True, []
    for name in CIFAR_NETS:
        if name not in weights:
            continue
        model = _cifar_net(name, seed).to(device)
        sites = relu_sites(model)
        kw = dict(
            sites=sites,
            batch_size=100,
            device=device,
            T=T,
            cut=CIFAR_CUT,
            seed=seed,
            preprocess=norm,
        )
        init = measure(model, images, **kw)
        load_weights(model, weights[name], device=device)
        trained = measure(model, images, **kw)
        r = last_over_first(trained)
        ok = ok and r["D"] < 1 and r["G"] > 1
        parts.append(f"{name} D {r['D']:.3g} G {r['G']:.3g}")
        nets[name] = {
            "init": init,
            "trained": trained,
            "ratios_trained": r,
            "ratios_init": last_over_first(init),
            "weights": str(weights[name]),
        }
        log(echo, f"  {name}: D_L/D_1 {r['D']:.3g}, G_L/G_1 {r['G']:.3g}")
    claims.add(
        "4",
        "CIFAR-10 nets, trained: D falls, G rises",
        measured="; ".join(parts),
        verdict=ok,
        values={
            f"{n}_{k}_ratio_trained": d["ratios_trained"][k] for n, d in nets.items() for k in "DGR"
        },
        **common,
    )
    return {
        "description": "CIFAR-10 nets with weights trained elsewhere, ReLU layers",
        "settings": {
            "T": T,
            "cut": CIFAR_CUT,
            "displacement": CIFAR_DISPLACEMENT,
            "images": images.shape[0],
            "mean": CIFAR_MEAN,
            "std": CIFAR_STD,
        },
        "nets": nets,
        "seconds": time.perf_counter() - start,
    }


def experiment_mnist(results: list[dict], claims: Claims) -> dict:
    """4x from the trained LeNets of N1-N3 (``results``: their runs), reported as measured."""
    runs = [r for r in results if r.get("layers_trained")]
    ratios = {
        w: {k: SeedEstimate.of(last_over_first(r[f"layers_{w}"])[k] for r in runs) for k in "DGR"}
        for w in ("init", "trained")
    }
    r_tr, r_in = ratios["trained"], ratios["init"]
    claims.add(
        "4x",
        "exploratory: MNIST LeNet, trained (a proxy the paper never tested)",
        statement="LeNet trained on MNIST in Petrini et al.'s recipe (the nets of N2), "
        "max-entropy diffeomorphisms: the layer-wise D_k, G_k after training, reported "
        "without a verdict",
        expected="no verdict (not a claim of the paper)",
        measured=f"D_L/D_1 {r_tr['D'].gm:.3g}, G_L/G_1 {r_tr['G'].gm:.3g}, R_L/R_1 "
        f"{r_tr['R'].gm:.3g} (init D {r_in['D'].gm:.3g}, G {r_in['G'].gm:.3g}; "
        f"{len(runs)} seeds)",
        verdict="MEASURED",
        experiment="mnist",
        values={
            **{f"{k}_ratio_trained": r_tr[k].gm for k in "DGR"},
            **{f"{k}_ratio_init": r_in[k].gm for k in "DGR"},
            "test_error": [r["training"]["test_error"] for r in runs],
        },
    )
    return {
        "description": "the LeNets of N2 on MNIST, layer by layer: max-entropy "
        "diffeomorphisms and matched noise, full representation, mean estimator",
        "layers": ["input", *LENET_LAYERS],
        "runs": [
            {
                "seed": r["seed"],
                "init": r["layers_init"],
                "trained": r["layers_trained"],
                "test_error": r["training"]["test_error"],
            }
            for r in runs
        ],
        "ratios_init": {k: e.to_dict() for k, e in r_in.items()},
        "ratios_trained": {k: e.to_dict() for k, e in r_tr.items()},
    }


def mnist_not_run(claims: Claims) -> dict:
    """4x without ``--full``."""
    reason = "not testable here: needs --full (the LeNets of N2, trained)"
    claims.add(
        "4x",
        "exploratory: MNIST LeNet, trained (a proxy the paper never tested)",
        statement="see --full",
        expected="no verdict (not a claim of the paper)",
        measured=reason,
        verdict="NOT TESTABLE",
        experiment="mnist",
    )
    return {"skipped": reason}
