"""The meter's other estimators against ports of the authors' functions, and its edges.

* ``estimator="median"`` against a port of Petrini et al.'s ``relative_distance(...,
  avgtype="median")`` (leonardopetrini/diffeo-sota);
* ``metric="cosine"`` against a float64 loop of Ruderman et al.'s normalised cosine
  distance (image vs deformation over random pairs of images);
* activations near 1e19 (squared distances past float32) measure like their rescaled copy;
* a ``preprocess`` that returns None is one clear TypeError.
"""

from __future__ import annotations

import math

import pytest
import torch
from authors import relative_distance_port
from torch import nn

from diffeo_engine.sensitivity import NonFiniteActivationError, SensitivityMeter


class FixedPair(nn.Module):
    """``(images, ids) -> (tau x, x + eta)``: a shift by one column, and Gaussian noise of
    the same norm, drawn from the ids (so the test can recompute them)."""

    def forward(self, images, ids=None):
        tau = torch.roll(images, 1, dims=-1)
        gens = [torch.Generator().manual_seed(1000 + int(i)) for i in ids]
        z = torch.stack([torch.randn(images.shape[1:], generator=g, dtype=images.dtype)
                         for g in gens])  # fmt: skip
        norm = (tau - images).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
        return tau, images + z * norm.view(-1, *[1] * (images.dim() - 1))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)
    ).double()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)  # fmt: skip


def test_median_estimator_matches_port_of_authors_function():
    seed = int(torch.randint(0, 2**20, ()).item())
    net, x = _net(seed), _images(23, seed + 1)  # odd and even counts both exercised below
    pair = FixedPair()
    for n in (23, 22):
        with SensitivityMeter(net, layers=[], perturbation=pair, estimator="median") as meter:
            meter.update(x[:n][:10])
            meter.update(x[10:n])
            record = meter.compute()["output"]
        tau, noisy = pair(x[:n], torch.arange(n))
        D, G = relative_distance_port(net, x[:n], tau, noisy)
        assert math.isclose(record["D"], D, rel_tol=1e-6)
        assert math.isclose(record["G"], G, rel_tol=1e-6)
        assert math.isclose(record["R"], D / G, rel_tol=1e-6)
        assert math.isnan(record["D_err"])


def test_median_with_two_perturbations_per_image():
    net, x = _net(3), _images(12, 4)
    pair = FixedPair()
    with SensitivityMeter(net, layers=[], perturbation=pair, estimator="median",
                          perturbations_per_image=2) as meter:  # fmt: skip
        meter.update(x)
        record = meter.compute()["output"]
    with torch.no_grad():
        f0 = net(x)
        diffs = []
        for k in range(2):
            tau, _ = pair(x, torch.arange(12) * 2 + k)
            diffs.append((net(tau) - f0).square())
        num = torch.cat(diffs).median(0).values.sum()
        den = torch.cdist(f0, f0).pow(2).flatten().median()
    assert math.isclose(record["D"], float(num / den), rel_tol=1e-9)


def test_cosine_metric_matches_ruderman_loop():
    seed = int(torch.randint(0, 2**20, ()).item())
    net, x = _net(seed), _images(9, seed + 2)
    pair = FixedPair()
    with SensitivityMeter(net, layers=["1"], perturbation=pair, metric="cosine") as meter:
        meter.update(x)
        result = meter.compute()
    tau, noisy = pair(x, torch.arange(9))
    with torch.no_grad():
        reps = {name: [] for name in ("x", "tau", "noisy")}
        for name, batch in (("x", x), ("tau", tau), ("noisy", noisy)):
            reps[name] = [net[:2](batch[i : i + 1]).flatten().tolist() for i in range(9)]

    def cos_dist(a, b):
        dot = sum(p * q for p, q in zip(a, b))
        return 1.0 - dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    pairs = [cos_dist(reps["x"][i], reps["x"][j]) for i in range(9) for j in range(9) if i != j]
    den = sum(pairs) / len(pairs)
    D = sum(cos_dist(reps["x"][i], reps["tau"][i]) for i in range(9)) / 9 / den
    G = sum(cos_dist(reps["x"][i], reps["noisy"][i]) for i in range(9)) / 9 / den
    record = result["1"]
    assert math.isclose(record["D"], D, rel_tol=1e-9)
    assert math.isclose(record["G"], G, rel_tol=1e-9)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_huge_finite_activations_measure_like_their_rescaled_copy():
    # 1e19-sized float32 activations: their squared distances overflow float32 (3.4e38)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    results = {}
    for factor in (1.0, 1e19):
        net = nn.Sequential(Scale(factor), nn.Flatten())
        with SensitivityMeter(net, layers=["1"], T=0.01, cut=3, seed=2) as meter:
            meter.update(x)
            results[factor] = meter.compute()["1"]
    for key in ("D", "G", "R"):
        assert math.isfinite(results[1e19][key])
        assert math.isclose(results[1e19][key], results[1.0][key], rel_tol=1e-4), key


def test_real_non_finite_activation_is_still_refused():
    net = nn.Sequential(Scale(math.inf), nn.Flatten())
    meter = SensitivityMeter(net, layers=["1"], T=0.01, cut=3)
    with meter, pytest.raises(NonFiniteActivationError, match="layer '1'"):
        meter.update(torch.rand(4, 1, 8, 8) + 0.5)


def test_preprocess_returning_none_is_one_clear_error():
    net = nn.Sequential(nn.Flatten())
    meter = SensitivityMeter(net, T=0.01, cut=3, preprocess=lambda b: None)
    wanted = r"^preprocess: expected it to return a tensor.*got NoneType$"
    with meter, pytest.raises(TypeError, match=wanted):
        meter.update(torch.rand(4, 1, 8, 8))
    with pytest.raises(TypeError, match="preprocess: expected a callable"):
        SensitivityMeter(net, T=0.01, cut=3, preprocess=3)


def test_bad_estimator_and_metric_are_refused():
    net = nn.Sequential(nn.Flatten())
    with pytest.raises(ValueError, match="estimator"):
        SensitivityMeter(net, T=0.01, cut=3, estimator="mode")
    with pytest.raises(ValueError, match="metric"):
        SensitivityMeter(net, T=0.01, cut=3, metric="l1")
