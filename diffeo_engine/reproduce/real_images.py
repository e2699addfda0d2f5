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

**4x, MNIST (exploratory, no verdict).** LeNet trained here on 8000 MNIST images for 5
epochs (SGD lr 0.05, momentum 0.9, batch 64, cross-entropy), measured on 2000 other images
at ``cut = 3``, ``T = sqrt(T_min T_max)``, matched noise, pixels normalised inside the
measurement. A proxy the paper never tested: printed as measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffeo_engine.models import get_model
from diffeo_engine.models.train import evaluate, load_weights, train
from diffeo_engine.physics import temperature_range, typical_temperature
from diffeo_engine.reproduce.claims import Claims, Normalize, last_over_first, log, measure

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_NETS",
    "CIFAR_STD",
    "MNIST_DEFAULT",
    "MNIST_QUICK",
    "MnistData",
    "MnistSettings",
    "MnistTraining",
    "experiment_cifar10",
    "experiment_mnist",
    "mnist_splits",
    "not_testable",
    "relu_sites",
]

CIFAR_NETS = ("vgg11", "alexnet", "lenet")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CUT, CIFAR_DISPLACEMENT = 3, 1.0
CIFAR_IMAGES = 1000  # test images measured per net


@dataclass(frozen=True)
class MnistTraining:
    """What every MNIST experiment shares: how many images train and are measured, SGD on
    the cross-entropy, and the cut of the max-entropy diffeomorphism."""

    n_train: int = 8000
    n_test: int = 2000
    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    cut: int = 3


@dataclass(frozen=True)
class MnistSettings(MnistTraining):
    """4x: LeNet on MNIST, max-entropy diffeomorphisms."""

    perturbations_per_image: int = 1
    layers: tuple[str, ...] = ("features.1", "features.4", "classifier.1", "classifier.3")


@dataclass
class MnistData:
    """The images of one MNIST experiment, ready: normalised training pairs, the measured
    images in ``[0, 1]`` (with their labels and stream offset), ``T``."""

    train: tuple[torch.Tensor, torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    offset: int
    how: str
    norm: Normalize
    T: float
    T_range: tuple[float, float]

    @classmethod
    def load(cls, directory, cfg: MnistTraining) -> MnistData:
        (train_x, train_y), (test_x, test_y, offset), how = mnist_splits(
            directory, cfg.n_train, cfg.n_test
        )
        norm = Normalize()
        T_min, T_max = temperature_range(28, cfg.cut)
        return cls(
            train=(norm(train_x.float() / 255.0), train_y),
            images=test_x.float() / 255.0,
            labels=test_y,
            offset=offset,
            how=how,
            norm=norm,
            T=math.sqrt(T_min * T_max),
            T_range=(T_min, T_max),
        )

    def fit(self, model: nn.Module, cfg: MnistTraining, *, seed: int, device):
        """Train ``model`` as ``cfg`` says; return the history and the test error."""
        history = train(
            model, self.train, loss="cross_entropy", epochs=cfg.epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, seed=seed,
            device=device,
        )  # fmt: skip
        test_loss, test_error = evaluate(
            model, (self.norm(self.images), self.labels), loss="cross_entropy", device=device
        )
        return history, test_loss, test_error

    def measure(
        self,
        model: nn.Module,
        sites: dict[str, int],
        cfg: MnistTraining,
        *,
        seed: int,
        device,
        **meter_kwargs,
    ) -> list[dict]:
        """:func:`measure` on the measured images, keyed by their stream offset, at ``T``."""
        return measure(
            model, self.images, sites=sites, batch_size=250, device=device,
            id_offset=self.offset, T=self.T, cut=cfg.cut, seed=seed, preprocess=self.norm,
            **meter_kwargs,
        )  # fmt: skip


def not_testable(claims: Claims, entries, *, experiment: str, source: str) -> str:
    """Append ``entries`` (``(id, title)``) as NOT TESTABLE without ``--mnist``."""
    reason = "not testable here: needs --mnist DIR (MNIST IDX files)"
    for cid, text in entries:
        claims.add(cid, text, statement=source, expected="see docs", measured=reason,
                   verdict="NOT TESTABLE", experiment=experiment)  # fmt: skip
    return reason


MNIST_DEFAULT = MnistSettings()
MNIST_QUICK = MnistSettings(n_train=4000, n_test=500, epochs=3)


def relu_sites(model: nn.Module) -> dict[str, int]:
    """``{"input": 0, <each ReLU module>: 1, 2, ...}`` in module order."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    return {"input": 0, **{name: i + 1 for i, name in enumerate(names)}}


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


def mnist_splits(directory, n_train: int, n_test: int):
    """``(train_x, train_y), (test_x, test_y, offset), how``: the training split when the
    folder has it, else the first ``n_train`` and last ``n_test`` test images."""
    from diffeo_engine.data.sources import load_mnist

    test_x, test_y = load_mnist(directory, "test")
    try:
        train_x, train_y = load_mnist(directory, "train")
    except FileNotFoundError:
        train_x = None
    if train_x is not None:
        how = "trained on the training split, measured on the test split"
        return (train_x[:n_train], train_y[:n_train]), (test_x[:n_test], test_y[:n_test], 0), how
    n = test_x.shape[0]
    if n < n_train + n_test:
        raise ValueError(f"--mnist: {n} test images, need {n_train + n_test} (no training split)")
    how = (
        f"no training split in the folder: trained on test images [0, {n_train}), "
        f"measured on [{n - n_test}, {n})"
    )
    te = (test_x[n - n_test :], test_y[n - n_test :], n - n_test)
    return (test_x[:n_train], test_y[:n_train]), te, how


def experiment_mnist(
    cfg: MnistSettings, directory, claims: Claims, *, seed: int, device, echo=None
) -> dict:
    """4x: LeNet on MNIST at init and after training, reported as measured."""
    start = time.perf_counter()
    device = torch.device(device)
    data = MnistData.load(directory, cfg)
    model = get_model("lenet", seed=seed, in_channels=1, num_classes=10, input_size=28)
    model = model.to(device)
    sites = {"input": 0, **{name: i + 1 for i, name in enumerate(cfg.layers)}}

    def run_meter():
        return data.measure(model, sites, cfg, seed=seed, device=device,
                            perturbations_per_image=cfg.perturbations_per_image)  # fmt: skip

    init = run_meter()
    history, test_loss, test_error = data.fit(model, cfg, seed=seed, device=device)
    trained = run_meter()
    r_tr, r_in = last_over_first(trained), last_over_first(init)
    claims.add(
        "4x",
        "exploratory: MNIST LeNet, trained (a proxy the paper never tested)",
        statement="LeNet trained 5 epochs on 8000 MNIST images, max-entropy diffeomorphisms: "
        "the layer-wise D_k, G_k after training, reported without a verdict",
        expected="no verdict (not a claim of the paper)",
        measured=f"D_L/D_1 {r_tr['D']:.3g}, G_L/G_1 {r_tr['G']:.3g}, "
        f"R_L/R_1 {r_tr['R']:.3g} (init D {r_in['D']:.3g}, G {r_in['G']:.3g})",
        verdict="MEASURED",
        experiment="mnist",
        values={
            **{f"{k}_ratio_trained": r_tr[k] for k in "DGR"},
            **{f"{k}_ratio_init": r_in[k] for k in "DGR"},
            "test_error": test_error,
        },
    )
    out = {
        "description": "LeNet on MNIST, max-entropy diffeomorphisms and matched noise",
        "settings": {**asdict(cfg), "T": data.T, "T_range": list(data.T_range), "split": data.how},
        "init": init,
        "trained": trained,
        "ratios_init": r_in,
        "ratios_trained": r_tr,
        "training": {
            "epochs": len(history.loss),
            "final_train_loss": history.final_loss,
            "final_train_error": history.error[-1] if history.error else math.nan,
            "test_loss": test_loss,
            "test_error": test_error,
        },
        "seconds": time.perf_counter() - start,
    }
    log(echo, f"  LeNet: test error {test_error:.3f}, {out['seconds']:.1f} s")
    return out
