"""N1-N3: Petrini, Favero, Geiger, Wyart (NeurIPS 2021), *Relative stability toward
diffeomorphisms indicates performance in deep nets*, on MNIST.

The relative stability ``R_f = D_f / G_f`` of the network **output** (the logits), measured
with the authors' median estimator (``SensitivityMeter(estimator="median")``, a port of
their ``relative_distance(..., avgtype="median")``), max-entropy diffeomorphisms at
``cut = 3``, ``T = sqrt(T_min T_max)`` of ``temperature_range(28, 3)``, matched noise; the
streamed mean estimator is reported beside it. Four architectures, each trained here with
SGD (cross-entropy, lr 0.05, momentum 0.9, batch 64) on ``n_train`` images for ``epochs``:
a fully-connected net (2 hidden layers of 500), LeNet, a small ResNet-18 (width 8) and a
small VGG-11 (width 8); measured on ``n_test`` other images.

* **N1** PASSes when at initialisation every architecture has
  ``N1_LOW = 0.3 <= R_f <= N1_HIGH = 3``.
* **N2** PASSes when after training each CNN's ``R_f`` is at most ``1 / N2_FACTOR = 1/3`` of
  the FCN's.
* **N3** reports Spearman's rank correlation of test error and trained ``R_f`` across the
  four architectures, without a verdict (the paper's correlation is across many more nets).

The thresholds are ours, fixed in this file before any run: the paper shows ``R_f`` of
order one at initialisation and falling by decades with training for CNNs, not for FCNs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffeo_engine.models import get_model
from diffeo_engine.reproduce.claims import Claims, log
from diffeo_engine.reproduce.real_images import MnistData, MnistTraining, not_testable

__all__ = ["ARCHITECTURES", "N1_HIGH", "N1_LOW", "N2_FACTOR", "THRESHOLDS", "experiment"]

N1_LOW, N1_HIGH = 0.3, 3.0  # N1: R_f at initialisation within [N1_LOW, N1_HIGH]
N2_FACTOR = 3.0  # N2: trained R_f(CNN) <= R_f(FCN) / N2_FACTOR
THRESHOLDS = {"N1_LOW": N1_LOW, "N1_HIGH": N1_HIGH, "N2_FACTOR": N2_FACTOR}

ARCHITECTURES = {
    "FCN": ("fcn", {"width": 500, "depth": 2, "input_size": 28}),
    "LeNet": ("lenet", {"input_size": 28}),
    "ResNet": ("resnet18", {"width": 8}),
    "VGG": ("vgg11", {"width": 8}),
}


@dataclass(frozen=True)
class Settings(MnistTraining):
    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 2


DEFAULT = Settings()
QUICK = Settings(n_train=2000, n_test=300, epochs=1)
QUICK_NOTE = "--quick: 2000 images, 1 epoch; the trained nets are far from converged"


def _rank_correlation(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


CLAIMS = (
    ("N1", "NeurIPS21: R_f of order one at init, every architecture"),
    ("N2", "NeurIPS21: trained CNNs' R_f >= 3x below the FCN's"),
    ("N3", "NeurIPS21: rank correlation of test error and R_f"),
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
    """N1-N3 on MNIST (NOT TESTABLE without ``mnist``); appends to ``claims``."""
    if mnist is None:
        return {
            "skipped": not_testable(
                claims, CLAIMS, experiment="petrini2021", source="Petrini et al. 2021 on MNIST"
            )
        }
    start = time.perf_counter()
    cfg = cfg or (QUICK if quick else DEFAULT)
    device = torch.device(device)
    data = MnistData.load(mnist, cfg)
    nets: dict[str, dict] = {}
    for label, (name, kwargs) in ARCHITECTURES.items():
        t0 = time.perf_counter()
        model = get_model(name, seed=seed, in_channels=1, num_classes=10, **kwargs).to(device)

        def output_R(estimator: str, model=model) -> dict:
            (record,) = data.measure(
                model, {"output": 1}, cfg, seed=seed, device=device, estimator=estimator
            )
            return {key: record[key] for key in ("D", "G", "R")}

        init = {"median": output_R("median"), "mean": output_R("mean")}
        _, _, test_error = data.fit(model, cfg, seed=seed, device=device)
        trained = {"median": output_R("median"), "mean": output_R("mean")}
        nets[label] = {
            "model": name,
            "kwargs": kwargs,
            "init": init,
            "trained": trained,
            "test_error": test_error,
            "seconds": time.perf_counter() - t0,
        }
        log(
            echo,
            f"  {label}: R_f init {init['median']['R']:.3g}, trained "
            f"{trained['median']['R']:.3g} (median), test error {test_error:.3f}, "
            f"{nets[label]['seconds']:.1f} s",
        )
    note = QUICK_NOTE if quick else None
    r_init = {k: v["init"]["median"]["R"] for k, v in nets.items()}
    ok1 = all(N1_LOW <= r <= N1_HIGH for r in r_init.values())
    claims.add(
        "N1",
        "NeurIPS21: R_f of order one at init, every architecture",
        statement="at initialisation the output's relative stability R_f = D_f/G_f is of "
        "order one for every architecture (FCN, LeNet, ResNet, VGG), median estimator",
        expected=f"{N1_LOW:g} <= R_f(init) <= {N1_HIGH:g} for each",
        measured=", ".join(f"{k} {r:.3g}" for k, r in r_init.items()),
        verdict=ok1,
        experiment="petrini2021",
        values={f"R_init_{k}": r for k, r in r_init.items()},
        thresholds={"low": N1_LOW, "high": N1_HIGH},
    )
    r_tr = {k: v["trained"]["median"]["R"] for k, v in nets.items()}
    fcn = r_tr["FCN"]
    cnns = [k for k in nets if k != "FCN"]
    ok2 = math.isfinite(fcn) and all(r_tr[k] <= fcn / N2_FACTOR for k in cnns)
    claims.add(
        "N2",
        "NeurIPS21: trained CNNs' R_f >= 3x below the FCN's",
        statement="after training, convolutional nets are far more stable to "
        "diffeomorphisms relative to noise than a fully-connected net (median estimator)",
        expected=f"trained R_f(CNN) <= R_f(FCN) / {N2_FACTOR:g} for LeNet, ResNet, VGG",
        measured=f"FCN {fcn:.3g}; "
        + ", ".join(f"{k} {r_tr[k]:.3g}" for k in cnns)
        + " (mean est.: "
        + ", ".join(f"{k} {v['trained']['mean']['R']:.3g}" for k, v in nets.items())
        + ")",
        verdict=ok2,
        experiment="petrini2021",
        values={f"R_trained_{k}": r for k, r in r_tr.items()},
        thresholds={"factor": N2_FACTOR},
        quick_note=note,
    )
    errors = [nets[k]["test_error"] for k in nets]
    rho = _rank_correlation(errors, [r_tr[k] for k in nets])
    claims.add(
        "N3",
        "NeurIPS21: rank correlation of test error and R_f",
        statement="test error tracks R_f across architectures (reported, no verdict)",
        expected="no verdict: Spearman rho across the 4 nets, as measured",
        measured=f"rho {rho:+.2f} (errors "
        + ", ".join(f"{k} {nets[k]['test_error']:.3f}" for k in nets)
        + ")",
        verdict="MEASURED",
        experiment="petrini2021",
        values={"spearman": rho, **{f"test_error_{k}": nets[k]["test_error"] for k in nets}},
    )
    data = {
        "description": "Petrini et al. 2021: R_f of the output on MNIST, median estimator",
        "settings": {**asdict(cfg), "T": data.T, "split": data.how, "architectures": ARCHITECTURES},
        "nets": nets,
        "spearman": rho,
        "seconds": time.perf_counter() - start,
    }
    if figure is not None:
        plot(data, figure)
        data["figure"] = figure.name
    return data


def plot(data: dict, path) -> None:
    """R_f of each net at init and trained, with N1's band and N2's line."""
    from diffeo_engine.reproduce.figures import plot_bars

    nets = data["nets"]
    r_init = {k: v["init"]["median"]["R"] for k, v in nets.items()}
    r_tr = {k: v["trained"]["median"]["R"] for k, v in nets.items()}
    plot_bars(
        {"init": r_init, "trained": r_tr},
        path,
        title="N1-N2: Petrini et al. 2021 on MNIST (median estimator)",
        ylabel="$R_f = D_f / G_f$ of the output (each normalised by the\n"
        "median squared distance between two images' outputs)",
        lines={
            f"N1 band [{N1_LOW:g}, {N1_HIGH:g}] (init)": ([N1_LOW, N1_HIGH], ":"),
            f"N2: trained FCN / {N2_FACTOR:g} (CNNs below)": ([r_tr["FCN"] / N2_FACTOR], "-."),
        },
    )
