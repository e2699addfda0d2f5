"""The streaming sensitivity meter against independent computations (issue 4).

The reference is the published estimator (Petrini et al. 2021): one full-batch forward per
input set, ``cdist`` over all pairs of clean representations (diagonal included), mean over
images, summed over features, in float64. Its denominator averages over ``N^2`` pairs, the
meter's over the ``N (N - 1)`` distinct ones, so ``meter = published * (N - 1) / N``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_sensitivity_models import tiny_1d, tiny_cnn
from torch import nn

from diffeo_engine import ops
from diffeo_engine.sensitivity import (
    NonFiniteActivationError,
    SensitivityMeter,
    SensitivityResult,
)

T, CUT, SEED = 0.01, 3, 7
REDUCTIONS = ("full", "channel_mean", "spatial_mean")


def images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=gen, dtype=torch.float64)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------- the brute force


def activations(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every call's output of the named modules and the network output, one forward."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(module, inputs, output, name=name):
            key, call = name, 1
            while key in out:
                key, call = f"{name}#{call}", call + 1
            out[key] = output.detach().clone()

        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        out["output"] = model(x)
    for handle in handles:
        handle.remove()
    return out


def reduce_by_hand(a: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "full":
        return a.flatten(1)
    if reduce == "channel_mean":
        return a.mean(1).reshape(a.shape[0], -1)
    if a.dim() == 2:
        return a
    return a.mean(dim=tuple(range(2, a.dim())))


def published(model, names, x, reduce, *, K=1, T=T, cut=CUT, seed=SEED, pairs=None):
    """``{layer: (D, G, den)}`` the published way: whole set at once, cdist over all pairs."""
    N = x.shape[0]
    ids = torch.arange(N)
    if pairs is None:
        pairs = [ops.perturb(x, T, cut, seed=seed, ids=ids * K + k) for k in range(K)]
    clean = activations(model, names, x)
    taus = [activations(model, names, tau) for tau, _ in pairs]
    noisy = [activations(model, names, eta) for _, eta in pairs]
    result = {}
    for layer, f in clean.items():
        f = reduce_by_hand(f, reduce)
        dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist").square().mean()
        d = torch.stack([(reduce_by_hand(t[layer], reduce) - f).square().sum(1) for t in taus])
        g = torch.stack([(reduce_by_hand(e[layer], reduce) - f).square().sum(1) for e in noisy])
        result[layer] = (float(d.mean() / dist), float(g.mean() / dist), float(dist))
    return result


def run_meter(model, x, batch, **kw) -> SensitivityResult:
    kw.setdefault("T", T)
    kw.setdefault("cut", CUT)
    kw.setdefault("seed", SEED)
    with SensitivityMeter(model, **kw) as meter:
        for start in range(0, x.shape[0], batch):
            meter.update(x[start : start + batch])
        return meter.compute()


# ---------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_meter_matches_published_estimator(reduce):
    model, x = tiny_cnn(), images(12)
    names = ["conv1", "relu", "conv2", "pool", "fc"]
    result = run_meter(model, x, 5, layers=names, reduce=reduce)
    reference = published(model, names, x, reduce)
    N = x.shape[0]
    got = {r.name: r for r in result.layers}
    assert (
        set(got) == set(reference) == {"conv1", "relu", "relu#1", "conv2", "pool", "fc", "output"}
    )
    for layer, (D, G, den) in reference.items():
        r = got[layer]
        assert rel(r.D, D * (N - 1) / N) < 1e-9, layer
        assert rel(r.G, G * (N - 1) / N) < 1e-9, layer
        assert rel(r.R, D / G) < 1e-9, layer
        assert rel(r.denominator, den * N / (N - 1)) < 1e-9, layer
        assert r.count == N and r.perturbations == N


def test_forward_order_depth_and_shapes():
    result = run_meter(tiny_cnn(), images(6), 6, layers=["leaves", "input"])
    assert [r.name for r in result] == [
        "input", "conv1", "relu", "conv2", "relu#1", "pool", "fc", "output"
    ]  # fmt: skip
    assert [r.depth for r in result] == list(range(8))
    assert result["conv1"].shape == [4, 8, 8] and result["fc"].shape == [3]
    assert result["input"].features == 3 * 8 * 8


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_streaming_batch_size_does_not_matter(reduce):
    model, x = tiny_cnn(), images(15)
    runs = [run_meter(model, x, b, layers="leaves", reduce=reduce) for b in (1, 7, 15)]
    for other in runs[1:]:
        for a, b in zip(runs[0].layers, other.layers):
            assert a.name == b.name
            for key in ("D", "G", "R", "denominator", "D_err", "G_err", "R_err"):
                assert rel(b[key], a[key]) < 1e-9, (a.name, key)


def test_identity_network_by_hand():
    x = images(9)
    result = run_meter(nn.Identity(), x, 4)
    (record,) = result.layers
    tau, _ = ops.perturb(x, T, CUT, seed=SEED, ids=torch.arange(9))
    numerator = sum(float(((tau[i] - x[i]) ** 2).sum()) for i in range(9)) / 9
    pairs = [(i, j) for i in range(9) for j in range(9) if i != j]
    denominator = sum(float(((x[i] - x[j]) ** 2).sum()) for i, j in pairs) / len(pairs)
    assert rel(record.denominator, denominator) < 1e-12
    assert rel(record.D, numerator / denominator) < 1e-12
    # matched noise: ||eta|| = ||tau x - x|| per image, so G = D and R = 1 at the input
    assert rel(record.G, record.D) < 1e-12 and abs(record.R - 1) < 1e-12


def test_perturbations_per_image():
    model, x, K = tiny_cnn(), images(8), 3
    names = ["conv2", "fc"]
    result = run_meter(model, x, 3, layers=names, perturbations_per_image=K)
    reference = published(model, names, x, "full", K=K)
    for layer, (D, G, _) in reference.items():
        r = result[layer]
        assert r.count == 8 and r.perturbations == 8 * K
        assert rel(r.D, D * 7 / 8) < 1e-9 and rel(r.G, G * 7 / 8) < 1e-9
    # perturbation k of image i is the one keyed by id i * K + k
    single = run_meter(model, x, 8, layers=names, perturbations_per_image=1)
    assert rel(result["fc"].D, single["fc"].D) > 1e-6


def test_sweep_equals_separate_runs():
    model, x = tiny_cnn(), images(10)
    settings = [(0.004, 3), (0.01, 3), (0.006, 5)]
    swept = run_meter(model, x, 4, layers="leaves", T=None, cut=None, settings=settings)
    for T_s, cut_s in settings:
        alone = run_meter(model, x, 4, layers="leaves", T=T_s, cut=cut_s)
        records = swept.select(T=T_s, cut=cut_s)
        assert [r.name for r in records] == [r.name for r in alone.layers]
        for a, b in zip(records, alone.layers):
            for key in ("D", "G", "R", "D_err", "denominator"):
                assert rel(a[key], b[key]) < 1e-12, (a.name, key)


def test_jackknife_errors_against_leave_one_group_out():
    model, x, groups = tiny_cnn(), images(14), 4
    names = ["conv2"]
    result = run_meter(model, x, 5, layers=names, error_groups=groups)
    N = x.shape[0]
    pairs = [ops.perturb(x, T, CUT, seed=SEED, ids=torch.arange(N))]
    estimates = {"D": [], "G": [], "R": []}
    for g in range(groups):
        keep = torch.tensor([i for i in range(N) if i % groups != g])
        sub = [(pairs[0][0][keep], pairs[0][1][keep])]
        D, G, _ = published(model, names, x[keep], "full", pairs=sub)["conv2"]
        n = len(keep)
        estimates["D"].append(D * (n - 1) / n)
        estimates["G"].append(G * (n - 1) / n)
        estimates["R"].append(D / G)
    for key, values in estimates.items():
        mean = sum(values) / groups
        se = math.sqrt((groups - 1) / groups * sum((v - mean) ** 2 for v in values))
        assert rel(result["conv2"][f"{key}_err"], se) < 1e-9, key


def test_one_dimensional_inputs_with_a_perturbation_object():
    class Shift:
        """tau x rolls by one step, eta is seeded by the ids: a Perturbation for 1D signals."""

        def __call__(self, x, ids):
            tau = torch.roll(x, 1, dims=-1)
            noise = torch.stack(
                [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(i)),
                             dtype=x.dtype) for i in ids]
            )  # fmt: skip
            return tau, x + 0.1 * noise

    model = tiny_1d()
    x = torch.rand(11, 2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    shift = Shift()
    result = run_meter(model, x, 4, layers=["0", "1"], perturbation=shift, T=None, cut=None)
    pairs = [shift(x, torch.arange(11))]
    for reduce in ("full",):
        reference = published(model, ["0", "1"], x, reduce, pairs=pairs)
        for layer, (D, G, _) in reference.items():
            assert rel(result[layer].D, D * 10 / 11) < 1e-9
            assert rel(result[layer].G, G * 10 / 11) < 1e-9
    with pytest.raises(ValueError, match="images"):
        run_meter(model, x, 4, layers=["0"])  # the built-in diffeo needs (B, C, H, W)


def test_layer_selection_by_type_and_pattern():
    model = tiny_cnn()
    by_type = run_meter(model, images(4), 4, layers=nn.Conv2d)
    assert by_type.names() == ["conv1", "conv2", "output"]
    by_name = run_meter(model, images(4), 4, layers=["type:ReLU", "fc"])
    assert by_name.names() == ["relu", "relu#1", "fc", "output"]
    by_glob = run_meter(model, images(4), 4, layers="conv*")
    assert by_glob.names() == ["conv1", "conv2", "output"]


def test_uint8_channels_last_and_autocast_run():
    model = tiny_cnn(dtype="float32")
    x = (images(6) * 255).round().to(torch.uint8)
    plain = run_meter(model, x, 3, layers="leaves")
    fast = run_meter(model, x, 3, layers="leaves", channels_last=True)
    for a, b in zip(plain.layers, fast.layers):
        assert rel(b.D, a.D) < 1e-4 and rel(b.G, a.G) < 1e-4
    low = run_meter(tiny_cnn(dtype="float32"), x, 3, autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(r.D) and r.D > 0 for r in low.layers)
    assert plain.settings["image_dtype"] == "uint8" and plain.settings["input_dtype"] == "float32"


def test_mode_is_kept_and_hooks_removed():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten()).double().train()
    with SensitivityMeter(model, T=T, cut=CUT) as meter:
        meter.update(images(4))
        assert model.training
        result = meter.compute()
    assert result.settings["model_mode"] == "train"
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="closed"):
        meter.update(images(2))


# ----------------------------------------------------------------------------- files


def test_json_and_csv_round_trip(tmp_path):
    result = run_meter(tiny_cnn(), images(6), 3, layers="leaves", error_groups=1)
    assert all(math.isnan(r.D_err) for r in result)  # one group: no error estimate
    result.to_json(tmp_path / "s.json")
    back = SensitivityResult.from_json(tmp_path / "s.json")
    assert back.settings == result.settings
    assert back.settings["seed"] == SEED and back.settings["versions"]["torch"]
    result.to_csv(tmp_path / "s.csv")
    from_csv = SensitivityResult.from_csv(tmp_path / "s.csv")
    assert from_csv.settings["seed"] == SEED
    for original in (back, from_csv):
        assert len(original.layers) == len(result.layers)
        for a, b in zip(original.layers, result.layers):
            for key, value in b.to_dict().items():
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(a[key]), key
                else:
                    assert a[key] == value, key


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_meter(tiny_cnn(), images(6), 6, settings=[(0.004, 3), (0.01, 3)], T=None, cut=None)
    result.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- bad input


def test_errors_are_clear():
    model = tiny_cnn()
    with pytest.raises(ValueError, match=r"no module names matching 'nope\*'"):
        SensitivityMeter(model, layers="nope*", T=T, cut=CUT)
    with pytest.raises(ValueError, match=r"rejected a batch of shape \(6, 1, 8, 8\)"):
        run_meter(model, images(2, channels=1), 2)
    meter = SensitivityMeter(model, T=T, cut=CUT)
    with pytest.raises(RuntimeError, match="no images yet"):
        meter.compute()
    meter.update(images(1))
    with pytest.raises(ValueError, match="at least two"):
        meter.compute()
    meter.close()
    with pytest.raises(ValueError, match="meta"):
        run_meter(tiny_cnn().to("meta"), images(2), 2)
    with pytest.raises(ValueError, match="reduce"):
        SensitivityMeter(model, T=T, cut=CUT, reduce="max")
    with pytest.raises(ValueError, match="T"):
        SensitivityMeter(model, T=-1.0, cut=CUT)
    with pytest.raises(ValueError, match="noise"):
        SensitivityMeter(model, T=T, cut=CUT, noise="loud")


def test_nan_names_the_layer_and_adds_nothing():
    class Poison(nn.Module):
        def forward(self, x):
            return x * torch.where(x[:, :1] > 0.99, float("nan"), 1.0)

    model = nn.Sequential(nn.Conv2d(3, 2, 1), Poison(), nn.Flatten()).double().eval()
    nn.init.constant_(model[0].weight, 0.0)
    nn.init.constant_(model[0].bias, 0.5)
    with SensitivityMeter(model, layers="leaves", T=T, cut=CUT) as meter:
        meter.update(images(3))
        before = meter.compute()
        with torch.no_grad():
            model[0].bias.fill_(1.0)
        with pytest.raises(NonFiniteActivationError, match=r"layer '1'.*NaN"):
            meter.update(images(3))
        with torch.no_grad():
            model[0].bias.fill_(0.5)
        assert meter.count == 3
        after = meter.compute()
    assert [r.denominator for r in after] == [r.denominator for r in before]


# ------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    import argparse

    from diffeo_engine.sensitivity.command import add_command

    parser = argparse.ArgumentParser(prog="diffeo-engine")
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.mark.parametrize("form", ["module", "file"])
def test_cli_end_to_end(tmp_path, form, capsys):
    import json
    from pathlib import Path

    import numpy as np

    x = images(10).to(torch.float32)
    np.save(tmp_path / "x.npy", x.numpy())
    weights = tmp_path / "w.pt"
    model = tiny_cnn(dtype="float32")
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # weights differ from the factory's
    torch.save(model.state_dict(), weights)
    here = Path(__file__).parent / "test_sensitivity_models.py"
    spec = "test_sensitivity_models:tiny_cnn" if form == "module" else f"{here}:tiny_cnn"
    out = tmp_path / "out"
    code = _cli(
        ["sensitivity", "--model", spec, "--model-arg", "dtype=float32", "--data",
         str(tmp_path / "x.npy"), "--weights", str(weights), "--layers", "conv*", "fc",
         "--T", "0.004", "0.01", "--cut", "3", "--seed", "5", "--batch-size", "4",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"sensitivity.json", "sensitivity.csv"}
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["settings"]["seed"] == 5 and len(data["layers"]) == 2 * 4
    direct = run_meter(
        model, x, 10, layers=["conv*", "fc"], settings=[(0.004, 3), (0.01, 3)],
        T=None, cut=None, seed=5,
    )  # fmt: skip
    for record, expected in zip(data["layers"], direct.layers):
        assert record["name"] == expected.name and record["T"] == expected.T
        assert rel(record["D"], expected.D) < 1e-5
    assert "conv1" in capsys.readouterr().out


def test_cli_reports_bad_model(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", images(3).numpy())
    with pytest.raises(ValueError, match="no attribute"):
        _cli(["sensitivity", "--model", "test_sensitivity_models:nope",
              "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path)])  # fmt: skip


def test_all_pairs_formula_is_the_mean_over_distinct_pairs():
    """The streaming denominator itself, on random vectors, against itertools."""
    from diffeo_engine.sensitivity.stats import pair_denominator

    f = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 3
    direct = [float((f[i] - f[j]).square().sum()) for i, j in itertools.permutations(range(7), 2)]
    got = pair_denominator(float(f.sum(0).square().sum()), float(f.square().sum()), 7)
    assert rel(got, sum(direct) / len(direct)) < 1e-12
