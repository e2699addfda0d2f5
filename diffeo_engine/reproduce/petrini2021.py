"""N1-N3: Petrini, Favero, Geiger, Wyart (NeurIPS 2021), *Relative stability toward
diffeomorphisms indicates performance in deep nets*, on MNIST, in the authors' conventions
(leonardopetrini/diffeo-sota, ``results/stability_measures.py``, ``results/utils.py``).

The relative stability ``R_f = D_f / G_f`` of the network **output** (the logits), measured
with the authors' median estimator (``SensitivityMeter(estimator="median")``, a port of
their ``relative_distance``) on the 500-image probe set of :mod:`.mnist` (pixels in
``[0, 1]``), at ``cut = 3`` and the temperature of a one-pixel displacement, matched noise.
At initialisation BatchNorm normalises with **batch statistics**
(:func:`~diffeo_engine.reproduce.mnist.use_batch_statistics`) and the probe set, its
deformations and its noisy copies are each forwarded as one batch; trained nets use their
running statistics. Their MNIST nets: the fully-connected ``DenseNetL4`` (``fcn_ntk``: three
hidden layers of 64, NTK scaling, trained with Adam), LeNet, and ResNet-18 here at width
16 (theirs 64; 16 is what the CPU budget allows); EfficientNetB0 is left out (budget), and
VGG, which they train on CIFAR-10 only, is not used. Three initialisation seeds
(``SEEDS``); every number is a geometric mean over them, as the authors average.

* **N1** (default run): at initialisation ``N1_LOW = 0.3 <= R_f <= N1_HIGH = 3`` for every
  net, each bound by two standard errors across seeds.
* **N2** (``--full``): after training (:func:`~diffeo_engine.reproduce.mnist.fit`, the
  authors' recipe, best checkpoint), seed by seed, each CNN's ``R_f`` at most ``1 /
  N2_FACTOR = 1/3`` of the FCN's, by two standard errors. Trained over init ``R_f`` is
  printed beside it: the paper's own statement is that it falls by decades for CNNs. A net
  that did not learn makes N2 NOT TESTABLE.
* **N3** (``--full``): Spearman's rank correlation of test error and trained ``R_f`` across
  the nets, without a verdict (the paper's correlation is across many more nets).

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
from diffeo_engine.reproduce.claims import Claims, Job, SeedEstimate, combine, judge, log
from diffeo_engine.reproduce.mnist import (
    LEARNED_MAX_ERROR,
    MnistData,
    MnistTraining,
    fit,
    layer_records,
    output_stability,
    temperature_note,
    use_batch_statistics,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT",
    "N1_HIGH",
    "N1_LOW",
    "N2_FACTOR",
    "QUICK",
    "THRESHOLDS",
    "Settings",
    "conclude",
    "describe",
    "experiment",
    "jobs",
    "plot",
]

N1_LOW, N1_HIGH = 0.3, 3.0  # N1: R_f at initialisation within [N1_LOW, N1_HIGH]
N2_FACTOR = 3.0  # N2: trained R_f(CNN) <= R_f(FCN) / N2_FACTOR
THRESHOLDS = {
    "N1_LOW": N1_LOW,
    "N1_HIGH": N1_HIGH,
    "N2_FACTOR": N2_FACTOR,
    "LEARNED_MAX_ERROR": LEARNED_MAX_ERROR,
}

# label -> (registry name, keyword arguments, cost of one training epoch of 4096 images in
# scale-detection epochs, about 1.5 s: only for the estimate of the time left)
ARCHITECTURES = {
    "FCN": ("fcn_ntk", {"width": 64, "depth": 3, "input_size": 28}, 0.1),
    "LeNet": ("lenet", {"input_size": 28}, 0.35),
    "ResNet": ("resnet18", {"width": 16}, 7.0),
}
LENET_LAYERS = ("features.1", "features.4", "classifier.1", "classifier.3")  # 4x's ReLUs


@dataclass(frozen=True)
class Settings(MnistTraining):
    pass


DEFAULT = Settings()
QUICK = Settings(n_train=1024, n_select=256, n_probe=200, epochs=2, seeds=(0, 1))
QUICK_NOTE = "--quick: 1024 images, 2 epochs, 2 seeds; the trained nets are far from converged"
NEEDS_FULL = "not testable here: needs --full (trains every net in the authors' recipe)"

CLAIMS = {
    "N1": "NeurIPS21: R_f of order one at init, every architecture",
    "N2": "NeurIPS21: trained CNNs' R_f >= 3x below the FCN's",
    "N3": "NeurIPS21: rank correlation of test error and R_f",
}


def _one_net(
    cfg: Settings, label: str, seed: int, source, device, trained: bool, perturbation_seed: int
) -> dict:
    """One architecture and seed: R_f at init (batch statistics), then trained."""
    t0 = time.perf_counter()
    device = torch.device(device)
    data = MnistData.load(source, cfg)
    name, kwargs, _ = ARCHITECTURES[label]
    model = get_model(name, seed=seed, in_channels=1, num_classes=10, **kwargs).to(device)
    kw = dict(seed=perturbation_seed, device=device)
    out: dict = {
        "net": label,
        "seed": seed,
        "init": output_stability(use_batch_statistics(model), data, cfg, **kw),
    }
    if label == "LeNet" and trained:  # 4x: the same LeNet, layer by layer
        sites = {"input": 0, **{n: i + 1 for i, n in enumerate(LENET_LAYERS)}}
        out["layers_init"] = layer_records(model, sites, data, cfg, **kw)
    if trained:
        out["training"] = fit(model, data, cfg, seed=seed, device=device, fcn=label == "FCN")
        out["trained"] = output_stability(model, data, cfg, **kw)
        if label == "LeNet":
            out["layers_trained"] = layer_records(model, sites, data, cfg, **kw)
    out["seconds"] = time.perf_counter() - t0
    return out


def jobs(cfg: Settings, *, seed: int, source, device, trained: bool) -> list:
    """One job per architecture and initialisation seed (``seed + s`` for ``s`` in
    ``cfg.seeds``); the perturbations are the same for every net (seed ``seed``)."""
    return [
        Job(
            _one_net,
            (cfg, label, seed + s, source, str(device), trained, seed),
            cost=(cost * cfg.epochs * cfg.n_train / 4096 if trained else 0.0) + 0.2,
            label=f"N{'1-N3' if trained else '1'}, {label}, seed {seed + s}",
        )
        for label, (_, _, cost) in ARCHITECTURES.items()
        for s in cfg.seeds
    ]


def describe(run: dict) -> str:
    text = f"R_f init {run['init']['R']:.3g}"
    if "trained" in run:
        text += (
            f", trained {run['trained']['R']:.3g}, test error {run['training']['test_error']:.3f}"
        )
    return text + f", {run['seconds']:.0f} s"


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


def _band(e: SeedEstimate) -> str:
    if not math.isfinite(e.factor):
        return f"{e.gm:.3g}"
    return f"{e.gm:.3g} [{e.gm / e.factor:.2g}, {e.gm * e.factor:.2g}]"


def conclude(
    cfg: Settings, results: list[dict], claims: Claims, *, quick: bool, trained: bool, seed: int
) -> dict:
    """N1 (and N2, N3 with trained nets) from the runs; the experiment's data."""
    nets = {label: [r for r in results if r["net"] == label] for label in ARCHITECTURES}
    r_init = {k: SeedEstimate.of(r["init"]["R"] for r in runs) for k, runs in nets.items()}
    n = len(cfg.seeds)
    parts1 = {}
    for k, e in r_init.items():
        low, high = judge(e, N1_LOW, "above"), judge(e, N1_HIGH, "below")
        parts1[k] = combine([low, high])
    claims.add(
        "N1",
        CLAIMS["N1"],
        statement="at initialisation the output's relative stability R_f = D_f/G_f is of "
        "order one for every architecture (median estimator, BatchNorm with batch "
        "statistics, probe set of 500 MNIST images in [0, 1], cut 3, 1-pixel displacement)",
        expected=f"{N1_LOW:g} <= R_f(init) <= {N1_HIGH:g} for each net, geometric mean over "
        f"{n} seeds, by 2 standard errors",
        measured=", ".join(f"{k} {_band(e)}" for k, e in r_init.items()),
        verdict=combine(parts1.values()),
        experiment="petrini2021",
        values={
            **{f"R_init_{k}": e.gm for k, e in r_init.items()},
            **{f"R_init_{k}_log_se": e.se for k, e in r_init.items()},
            "conditions": parts1,
        },
        thresholds={"low": N1_LOW, "high": N1_HIGH, "standard_errors": 2.0},
    )
    out = {
        "description": "Petrini et al. 2021: R_f of the output on MNIST, median estimator, "
        "batch statistics at initialisation",
        "settings": {
            **asdict(cfg),
            **temperature_note(cfg),
            "split": cfg.split_text(),
            "architectures": ARCHITECTURES,
            "perturbation_seed": seed,
        },
        "runs": results,
        "R_init": {k: e.to_dict() for k, e in r_init.items()},
    }
    if not trained:
        for cid in ("N2", "N3"):
            claims.add(
                cid,
                CLAIMS[cid],
                statement="see --full",
                expected="see --full",
                measured=NEEDS_FULL,
                verdict="NOT TESTABLE",
                experiment="petrini2021",
            )
        return out
    r_tr = {k: SeedEstimate.of(r["trained"]["R"] for r in runs) for k, runs in nets.items()}
    drop = {
        k: SeedEstimate.of(r["trained"]["R"] / r["init"]["R"] for r in runs)
        for k, runs in nets.items()
    }
    errors = {
        k: float(np.mean([r["training"]["test_error"] for r in runs])) for k, runs in nets.items()
    }
    unlearned = sorted({r["net"] for r in results if not r["training"]["learned"]})
    cnns = [k for k in nets if k != "FCN"]
    vs_fcn = {
        k: SeedEstimate.of(
            a["trained"]["R"] / b["trained"]["R"] for a, b in zip(nets[k], nets["FCN"])
        )
        for k in cnns
    }
    parts2 = {k: judge(vs_fcn[k], 1.0 / N2_FACTOR, "below") for k in cnns}
    measured = (
        f"FCN {_band(r_tr['FCN'])}; "
        + ", ".join(f"{k} {_band(r_tr[k])} (/FCN {vs_fcn[k].gm:.2g})" for k in cnns)
        + "; trained/init "
        + ", ".join(f"{k} {drop[k].gm:.2g}" for k in nets)
    )
    verdict = combine(parts2.values())
    if unlearned:
        verdict = "NOT TESTABLE"
        measured = (
            f"not testable: {', '.join(unlearned)} did not learn (probe-set error above "
            f"{LEARNED_MAX_ERROR:g}); " + measured
        )
    note = QUICK_NOTE if quick else None
    claims.add(
        "N2",
        CLAIMS["N2"],
        statement="after training, convolutional nets are far more stable to "
        "diffeomorphisms relative to noise than a fully-connected net; for CNNs R_f falls "
        "by decades during training (median estimator, trained nets' running statistics)",
        expected=f"seed by seed, trained R_f(CNN) / R_f(FCN) <= 1/{N2_FACTOR:g} for "
        f"{', '.join(cnns)}, by 2 standard errors; trained/init R_f printed, no verdict",
        measured=measured,
        verdict=verdict,
        experiment="petrini2021",
        values={
            **{f"R_trained_{k}": e.gm for k, e in r_tr.items()},
            **{f"R_trained_over_init_{k}": e.gm for k, e in drop.items()},
            **{f"R_over_FCN_{k}": e.gm for k, e in vs_fcn.items()},
            **{f"R_over_FCN_{k}_log_se": e.se for k, e in vs_fcn.items()},
            **{f"test_error_{k}": v for k, v in errors.items()},
            "not_learned": unlearned,
            "conditions": parts2,
        },
        thresholds={
            "factor": N2_FACTOR,
            "learned_max_error": LEARNED_MAX_ERROR,
            "standard_errors": 2.0,
        },
        quick_note=note,
    )
    rho = _rank_correlation(list(errors.values()), [r_tr[k].gm for k in nets])
    claims.add(
        "N3",
        CLAIMS["N3"],
        statement="test error tracks R_f across architectures (reported, no verdict)",
        expected=f"no verdict: Spearman rho across the {len(nets)} nets, as measured",
        measured=f"rho {rho:+.2f} (test errors "
        + ", ".join(f"{k} {v:.3f}" for k, v in errors.items())
        + ")",
        verdict="MEASURED",
        experiment="petrini2021",
        values={"spearman": rho, **{f"test_error_{k}": v for k, v in errors.items()}},
    )
    out.update(
        R_trained={k: e.to_dict() for k, e in r_tr.items()},
        R_trained_over_init={k: e.to_dict() for k, e in drop.items()},
        test_error=errors,
        spearman=rho,
    )
    return out


def plot(data: dict, path) -> None:
    """R_f of each net at init and trained (geometric means), with N1's band and N2's line."""
    from diffeo_engine.reproduce.figures import plot_bars

    groups = {"init": {k: v["gm"] for k, v in data["R_init"].items()}}
    lines = {f"N1 band [{N1_LOW:g}, {N1_HIGH:g}] (init)": ([N1_LOW, N1_HIGH], ":")}
    if "R_trained" in data:
        groups["trained"] = {k: v["gm"] for k, v in data["R_trained"].items()}
        fcn = data["R_trained"]["FCN"]["gm"]
        lines[f"N2: trained FCN / {N2_FACTOR:g} (CNNs below)"] = ([fcn / N2_FACTOR], "-.")
    plot_bars(
        groups,
        path,
        title="N1-N2: Petrini et al. 2021 on MNIST (median estimator, geometric mean of seeds)",
        ylabel="$R_f = D_f / G_f$ of the output (each normalised by the\n"
        "median squared distance between two images' outputs)",
        lines=lines,
    )


def experiment(
    source,
    claims: Claims,
    *,
    quick: bool,
    seed: int,
    device,
    echo=None,
    figure=None,
    cfg: Settings | None = None,
    trained: bool = True,
    workers: int = 1,
) -> dict:
    """N1-N3 on their own (the command runs :func:`jobs` with the other experiments')."""
    from diffeo_engine.reproduce.claims import run_jobs

    start = time.perf_counter()
    cfg = cfg or (QUICK if quick else DEFAULT)
    todo = jobs(cfg, seed=seed, source=source, device=device, trained=trained)
    results = run_jobs(todo, workers=workers, echo=echo, describe=lambda _, r: describe(r))
    data = conclude(cfg, results, claims, quick=quick, trained=trained, seed=seed)
    if figure is not None:
        plot(data, figure)
        data["figure"] = figure.name
    data["seconds"] = time.perf_counter() - start
    log(echo, f"  N1-N3: {data['seconds']:.0f} s")
    return data
