"""P1-P3: Ruderman, Rabinowitz, Morcos, Zoran (2018), *Pooling is neither necessary nor
sufficient for appropriate deformation stability in CNNs*, on MNIST.

Their stability measure: the cosine distance between the representation of an image and of
its deformation, normalised by the mean cosine distance between representations of random
pairs of images (``SensitivityMeter(metric="cosine")``: ``D_cos = E[1 - cos(f(tau x),
f(x))] / E_{x != z}[1 - cos(f(x), f(z))]``), at every ReLU. Deformations are ours (the
max-entropy diffeomorphism, ``cut = 3``, ``T = sqrt(T_min T_max)``), not their grid-based
ones. The nets are :class:`~diffeo_engine.models.PoolingCNN` with max pooling and with
strided convolutions instead (width 16, same weights), trained with SGD (cross-entropy, lr
0.05, momentum 0.9, batch 64) on ``n_train`` images; measured on ``n_test`` others.

* **P1** PASSes when at initialisation the pooling net is more stable in its deepest layer:
  ``D_cos(pool) / D_cos(stride) < P1_RATIO = 1`` at the third ReLU.
* **P2** PASSes when training narrows that gap: ``|ln(D_cos(pool) / D_cos(stride))|``
  trained is below its value at initialisation (``P2_SHRINK = 1``: any narrowing).
* **P3** PASSes when first-layer filters get smoother with training in both nets: the mean
  normalised total variation of the 3x3 filters (sum of absolute differences of adjacent
  weights, rows and columns, over the sum of absolute weights; lower is smoother) falls,
  trained / init ``< P3_RATIO = 1``. Our reading of their smoothness measure.

Thresholds fixed in this file before any run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffeo_engine.models import get_model
from diffeo_engine.reproduce.claims import Claims, log, ratio
from diffeo_engine.reproduce.real_images import MnistData, MnistTraining, not_testable, relu_sites

__all__ = ["P1_RATIO", "P2_SHRINK", "P3_RATIO", "THRESHOLDS", "experiment", "filter_roughness"]

P1_RATIO = 1.0  # P1: init D_cos(pool) / D_cos(stride) at the deepest ReLU below this
P2_SHRINK = 1.0  # P2: trained |ln ratio| < P2_SHRINK * init |ln ratio|
P3_RATIO = 1.0  # P3: trained / init roughness of the first-layer filters below this
THRESHOLDS = {"P1_RATIO": P1_RATIO, "P2_SHRINK": P2_SHRINK, "P3_RATIO": P3_RATIO}


@dataclass(frozen=True)
class Settings(MnistTraining):
    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 2
    width: int = 16


DEFAULT = Settings()
QUICK = Settings(n_train=2000, n_test=300, epochs=1)
QUICK_NOTE = "--quick: 2000 images, 1 epoch; training has barely started"


def filter_roughness(conv: nn.Conv2d) -> float:
    """Mean over the ``(out, in)`` filters of ``(sum |w[i+1,j]-w[i,j]| + sum |w[i,j+1]-w[i,j]|)
    / sum |w|``: the normalised total variation (lower is smoother)."""
    w = conv.weight.detach().to(torch.float64)
    tv = (w[..., 1:, :] - w[..., :-1, :]).abs().sum((-2, -1))
    tv = tv + (w[..., :, 1:] - w[..., :, :-1]).abs().sum((-2, -1))
    return float((tv / w.abs().sum((-2, -1)).clamp_min(1e-30)).mean())


CLAIMS = (
    ("P1", "Ruderman18: at init pooling more stable than strided (deep)"),
    ("P2", "Ruderman18: training narrows the pooling-strided gap"),
    ("P3", "Ruderman18: first-layer filters smoother after training"),
)


def experiment(
    mnist,
    claims: Claims,
    *,
    quick: bool,
    seed: int,
    device,
    echo=None,
    figure=None,
    cfg: Settings | None = None,
) -> dict:
    """P1-P3 on MNIST (NOT TESTABLE without ``mnist``); appends to ``claims``."""
    if mnist is None:
        return {
            "skipped": not_testable(
                claims, CLAIMS, experiment="ruderman2018", source="Ruderman et al. 2018 on MNIST"
            )
        }
    start = time.perf_counter()
    cfg = cfg or (QUICK if quick else DEFAULT)
    device = torch.device(device)
    data = MnistData.load(mnist, cfg)
    nets = {}
    for kind in ("pool", "stride"):
        t0 = time.perf_counter()
        model = get_model(
            "pooling_cnn",
            seed=seed,
            in_channels=1,
            num_classes=10,
            width=cfg.width,
            downsample=kind,
        ).to(device)
        sites = relu_sites(model)

        def run_meter(model=model, sites=sites):
            return data.measure(model, sites, cfg, seed=seed, device=device, metric="cosine")

        init, rough_init = run_meter(), filter_roughness(model.features[0])
        _, _, test_error = data.fit(model, cfg, seed=seed, device=device)
        trained, rough_trained = run_meter(), filter_roughness(model.features[0])
        nets[kind] = {
            "init": init,
            "trained": trained,
            "roughness_init": rough_init,
            "roughness_trained": rough_trained,
            "test_error": test_error,
            "seconds": time.perf_counter() - t0,
        }
        log(
            echo,
            f"  {kind}: D_cos deepest init {init[-1]['D']:.3g}, trained "
            f"{trained[-1]['D']:.3g}; test error {test_error:.3f}; {nets[kind]['seconds']:.1f} s",
        )
    gap = {
        w: ratio(nets["pool"][w][-1]["D"], nets["stride"][w][-1]["D"]) for w in ("init", "trained")
    }
    note = QUICK_NOTE if quick else None
    claims.add(
        "P1",
        "Ruderman18: at init pooling more stable than strided (deep)",
        statement="at initialisation a CNN with interleaved max pooling is more stable to "
        "deformation in its deep layers than the same CNN with strided convolutions "
        "(normalised cosine sensitivity at the deepest ReLU)",
        expected=f"init D_cos(pool)/D_cos(stride) < {P1_RATIO:g}",
        measured=f"init ratio {gap['init']:.3g} (pool {nets['pool']['init'][-1]['D']:.3g}, "
        f"stride {nets['stride']['init'][-1]['D']:.3g})",
        verdict=gap["init"] < P1_RATIO,
        experiment="ruderman2018",
        values={"ratio_init": gap["init"]},
        thresholds={"ratio_below": P1_RATIO},
    )
    li, lt = abs(math.log(gap["init"])), abs(math.log(gap["trained"]))
    claims.add(
        "P2",
        "Ruderman18: training narrows the pooling-strided gap",
        statement="after training the deep-layer deformation stability of the pooling and "
        "the strided net are closer than at initialisation",
        expected=f"|ln ratio| trained < {P2_SHRINK:g} x |ln ratio| init",
        measured=f"|ln ratio| init {li:.3g}, trained {lt:.3g} (ratio {gap['trained']:.3g})",
        verdict=lt < P2_SHRINK * li,
        experiment="ruderman2018",
        values={"ratio_init": gap["init"], "ratio_trained": gap["trained"]},
        thresholds={"shrink_below": P2_SHRINK},
        quick_note=note,
    )
    rough = {k: ratio(v["roughness_trained"], v["roughness_init"]) for k, v in nets.items()}
    claims.add(
        "P3",
        "Ruderman18: first-layer filters smoother after training",
        statement="training makes the first-layer filters smoother (normalised total "
        "variation of the 3x3 filters falls)",
        expected=f"roughness trained/init < {P3_RATIO:g} for both nets",
        measured=", ".join(
            f"{k} {nets[k]['roughness_init']:.3g} -> {nets[k]['roughness_trained']:.3g}"
            for k in nets
        ),
        verdict=all(r < P3_RATIO for r in rough.values()),
        experiment="ruderman2018",
        values={f"roughness_ratio_{k}": r for k, r in rough.items()},
        thresholds={"ratio_below": P3_RATIO},
        quick_note=note,
    )
    data = {
        "description": "Ruderman et al. 2018: pooling vs strided CNN on MNIST, normalised "
        "cosine sensitivity per ReLU, first-layer filter roughness",
        "settings": {**asdict(cfg), "T": data.T, "split": data.how},
        "nets": nets,
        "seconds": time.perf_counter() - start,
    }
    if figure is not None:
        plot(data, figure)
        data["figure"] = figure.name
    return data


def plot(data: dict, path) -> None:
    """The normalised cosine sensitivity by ReLU layer, both nets, init and trained."""
    from diffeo_engine.reproduce.figures import plot_layers

    nets = data["nets"]
    plot_layers(
        {f"{k}, {w}": nets[k][w] for k in nets for w in ("init", "trained")},
        path,
        key="D",
        title="P1-P2: Ruderman et al. 2018 on MNIST, pooling vs strided",
        ylabel="$D_{cos} = E[1-\\cos(f(\\tau x), f(x))]$\n/ $E[1-\\cos(f(x), f(z))]$",
    )
