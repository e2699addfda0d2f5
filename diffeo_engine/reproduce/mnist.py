"""The MNIST set-up shared by N1-N3, 4x and P1-P3: data, training recipe, measurements.

**Data.** The MNIST test set (10,000 images), the copy shipped in the package
(:func:`~diffeo_engine.data.packaged.packaged_mnist`) unless ``--mnist DIR`` names another;
three disjoint slices of it: the first ``n_probe = 500`` images are the probe set every
sensitivity is measured on (the authors' probe set: ``load_mnist(p=500)`` takes the first
500 test images), the next ``n_train`` train, the next ``n_select`` choose the best
checkpoint. (The last 5000 test digits, from NIST's test writers, are harder than the
first 5000: a first version that trained on the start of the set and measured on its last
500 images measured on other digits than it trained on.) Pixels in ``[0, 1]`` with no
normalisation, as the authors' MNIST pipeline (``ToTensor`` only), in training and
measurement alike.

**Training** (:func:`fit`), the authors' recipe (leonardopetrini/diffeo-sota ``main.py``):
cross-entropy, batch 128, SGD with learning rate 0.1, momentum 0.9, weight decay 5e-4 and a
cosine schedule (theirs: ``CosineAnnealingLR(T_max=200)`` stepped per epoch over 250
epochs and more; ours decays to 0 over our epoch budget); the fully-connected net with
Adam, learning rate 0.1, no schedule (their ``--optim adam --scheduler none``). The
checkpoint kept is the one with the lowest error on the selection slice (their
``best['net']``, chosen on the test set). A net whose probe-set error is above
``LEARNED_MAX_ERROR`` did not learn: the claims built on it are NOT TESTABLE.

**Measurement**: max-entropy diffeomorphisms at ``cut = 3`` and the temperature of a typical
displacement of one pixel, ``typical_temperature(1, 3, 28)`` (the authors' ``diffeo_imgs``
at ``nT = 1``; their figures sweep ``T`` and ``cut`` in ``{3, 5, 15}``), matched Gaussian
noise, every image keyed by its index in the test set.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from diffeo_engine.models.train import evaluate, train
from diffeo_engine.physics import temperature_range, typical_temperature
from diffeo_engine.reproduce.claims import measure

__all__ = [
    "LEARNED_MAX_ERROR",
    "MnistData",
    "MnistTraining",
    "SeparateParts",
    "fit",
    "load_mnist_source",
    "relu_sites",
    "use_batch_statistics",
]

# A net with a probe-set error above this did not learn MNIST (chance is 0.9; the nets
# here reach a few percent): fixed before any run of this recipe.
LEARNED_MAX_ERROR = 0.2


@dataclass(frozen=True)
class MnistTraining:
    """Slices of the MNIST test set, the training recipe, the perturbation."""

    n_train: int = 4096
    n_select: int = 1000
    n_probe: int = 500
    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    fcn_optimizer: str = "adam"
    fcn_lr: float = 0.1
    cut: int = 3
    displacement: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def T(self) -> float:
        return typical_temperature(self.displacement, self.cut, 28)

    def split_text(self) -> str:
        p, a = self.n_probe, self.n_probe + self.n_train
        b = a + self.n_select
        return (
            f"MNIST test set: measured on images [0, {p}), trained on [{p}, {a}), "
            f"checkpoint chosen on [{a}, {b}); pixels in [0, 1]"
        )


@lru_cache(maxsize=2)
def load_mnist_source(source: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set: the packaged copy (``source=None``) or the IDX files in the
    folder ``source``; ``(uint8 images (N, 1, 28, 28), int64 labels)``."""
    if source is None:
        from diffeo_engine.data.packaged import packaged_mnist

        return packaged_mnist()
    from diffeo_engine.data.sources import load_mnist

    return load_mnist(source, "test")


@dataclass
class MnistData:
    """The three slices of one run, as float tensors in ``[0, 1]``."""

    train: tuple[torch.Tensor, torch.Tensor]
    select: tuple[torch.Tensor, torch.Tensor]
    probe: tuple[torch.Tensor, torch.Tensor]
    probe_offset: int

    @classmethod
    def load(cls, source: str | None, cfg: MnistTraining) -> MnistData:
        images, labels = load_mnist_source(source)
        n = images.shape[0]
        end_train = cfg.n_probe + cfg.n_train
        end_select = end_train + cfg.n_select
        if end_select > n:
            where = "the packaged test set" if source is None else f"--mnist {source}"
            raise ValueError(
                f"{where}: {n} images, need {end_select} for disjoint probe, training and "
                "selection slices"
            )
        x = images.float() / 255.0

        def part(a: int, b: int):
            return x[a:b], labels[a:b]

        return cls(
            train=part(cfg.n_probe, end_train),
            select=part(end_train, end_select),
            probe=part(0, cfg.n_probe),
            probe_offset=0,
        )


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm layers normalise with the
    statistics of the batch they see: Petrini et al.'s measurement at initialisation,
    where no running statistics exist (``track_running_stats = False``, running mean and
    variance removed, then ``eval()``; ``results/stability_measures.py``)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model.eval()


class SeparateParts(nn.Module):
    """Forward each of the meter's ``parts`` (``x``, ``tau x``, ``x + eta``) as a batch of
    its own, so that batch statistics are those of one set, as when the authors forward the
    probe set, its deformations and its noisy copies one after the other."""

    def __init__(self, model: nn.Module, parts: int = 3) -> None:
        super().__init__()
        self.model, self.parts = model, parts

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(part) for part in batch.chunk(self.parts)])


def output_stability(
    model: nn.Module, data: MnistData, cfg: MnistTraining, *, seed: int, device
) -> dict[str, float]:
    """``{D, G, R}`` of the output (logits), median estimator, the probe set forwarded as
    one batch per part (see :class:`SeparateParts`)."""
    images = data.probe[0]
    (record,) = measure(
        SeparateParts(model).eval(),
        images,
        sites={"output": 1},
        batch_size=images.shape[0],
        device=device,
        id_offset=data.probe_offset,
        T=cfg.T,
        cut=cfg.cut,
        seed=seed,
        estimator="median",
    )
    return {key: record[key] for key in ("D", "G", "R")}


def layer_records(
    model: nn.Module,
    sites: dict[str, int],
    data: MnistData,
    cfg: MnistTraining,
    *,
    seed: int,
    device,
    **meter_kwargs,
) -> list[dict]:
    """Per-layer records on the probe set (eval mode, mean estimator unless told)."""
    return measure(
        model.eval(),
        data.probe[0],
        sites=sites,
        batch_size=250,
        device=device,
        id_offset=data.probe_offset,
        T=cfg.T,
        cut=cfg.cut,
        seed=seed,
        **meter_kwargs,
    )


def relu_sites(model: nn.Module) -> dict[str, int]:
    """``{"input": 0, <each ReLU module>: 1, 2, ...}`` in module order."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    return {"input": 0, **{name: i + 1 for i, name in enumerate(names)}}


def fit(
    model: nn.Module, data: MnistData, cfg: MnistTraining, *, seed: int, device, fcn: bool = False
) -> dict:
    """Train ``model`` in place in the recipe above (``fcn``: Adam); keep the best
    checkpoint; return the training summary with the probe-set error."""
    if fcn:
        kw = dict(optimizer=cfg.fcn_optimizer, lr=cfg.fcn_lr, schedule="constant")
    else:
        kw = dict(
            optimizer="sgd",
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
        )
    history = train(
        model,
        data.train,
        loss="cross_entropy",
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        device=device,
        test_data=data.select,
        keep_best=True,
        **kw,
    )
    probe_loss, probe_error = evaluate(model, data.probe, loss="cross_entropy", device=device)
    best = history.best_epoch
    return {
        "epochs": len(history.loss),
        "best_epoch": best,
        "train_error_at_best": history.error[best - 1] if best else math.nan,
        "final_train_error": history.error[-1],
        "selection_error": history.test_error[best - 1] if best else math.nan,
        "test_error": probe_error,
        "test_loss": probe_loss,
        "learned": probe_error <= LEARNED_MAX_ERROR,
        "recipe": {k: v for k, v in history.settings.items() if k != "seed"},
    }


def temperature_note(cfg: MnistTraining) -> dict:
    T_min, T_max = temperature_range(28, cfg.cut)
    return {
        "T": cfg.T,
        "cut": cfg.cut,
        "displacement_pixels": cfg.displacement,
        "T_range": [T_min, T_max],
    }
