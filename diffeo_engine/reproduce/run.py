"""``run_reproduction``: every experiment in order, one claims table, ``results.json``, the
figures; and the ``reproduce`` command line."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffeo_engine.reproduce import petrini2021, ruderman
from diffeo_engine.reproduce.analytical import EXPONENT_TOLERANCE, experiment_analytical
from diffeo_engine.reproduce.claims import Claims, claims_table, log, threads
from diffeo_engine.reproduce.figures import (
    have_matplotlib,
    plot_analytical,
    plot_mnist,
    plot_scale_detection,
)
from diffeo_engine.reproduce.real_images import (
    CIFAR_NETS,
    MNIST_DEFAULT,
    MNIST_QUICK,
    experiment_cifar10,
    experiment_mnist,
)
from diffeo_engine.reproduce.scale_detection import (
    R_DROP,
    SCALE_DEFAULT,
    SCALE_QUICK,
    TANH_LOG_FRACTION,
    TRAINING_EFFECT,
    experiment_scale_detection,
)
from diffeo_engine.sensitivity.result import finite_or_none
from diffeo_engine.versions import versions

__all__ = ["add_command", "parse_weights", "run_reproduction"]

NEEDS_MNIST = "not testable here: needs --mnist DIR (MNIST IDX files)"


def parse_weights(items) -> dict[str, str]:
    """``["vgg11=a.pt", ...]`` to ``{"vgg11": "a.pt"}`` (``--weights NAME=FILE``)."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights: expected NAME=FILE, got {item!r}")
        if name in out:
            raise ValueError(f"--weights: {name!r} given twice")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--weights: no such file: {path}")
        out[name] = path
    return out


@threads(1)
def run_reproduction(
    out,
    *,
    mnist=None,
    cifar10=None,
    weights: dict[str, str] | None = None,
    quick: bool = False,
    device="cpu",
    seed: int = 0,
    echo: Callable[[str], None] | None = print,
) -> dict:
    """Run the experiments, write ``results.json`` and the figures to ``out``; return the
    results (``results["claims"]`` is the list of claims).

    Torch runs one thread per process (the scale-detection runs use one process per
    core): the nets are small, and on a loaded 2-core machine two threads per process ran
    them 5-14x slower than one (ResNet-18 of width 8, one epoch of 2000 MNIST images:
    9.6 s against 134.5 s, side by side).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {seed!r}")
    unknown = sorted(set(weights or {}) - set(CIFAR_NETS))
    if unknown:  # checked before any work, not after claims 1-3
        raise ValueError(f"--weights: expected names among {CIFAR_NETS}, got {unknown}")
    for flag, folder in (("--mnist", mnist), ("--cifar10", cifar10)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag}: no such directory: {folder}")
    device = torch.device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = have_matplotlib()
    if not plots:
        log(echo, "matplotlib is not installed: no figures (pip install 'diffeo-engine[plot]')")
    start = time.perf_counter()
    experiments: dict = {}
    claims = Claims()
    steps = 6

    log(echo, f"[1/{steps}] claim 1: analytical model (constant filters, one-hot inputs)")
    data = experiment_analytical(claims, seed=seed, device=device, echo=echo)
    if plots:
        plot_analytical(data, out / "claim1_analytical.png")
        data["figure"] = "claim1_analytical.png"
    experiments["analytical"] = data

    log(echo, f"[2/{steps}] claims 2-3: scale detection, ReLU vs tanh, init vs trained")
    cfg = SCALE_QUICK if quick else SCALE_DEFAULT
    data = experiment_scale_detection(
        cfg,
        claims,
        seed=seed,
        device=device,
        echo=echo,
        quick=quick,
        workers=min(2, os.cpu_count() or 1),
    )
    if plots:
        plot_scale_detection(
            data, out / "claim2_scale_detection.png", out / "claim3_relu_vs_tanh.png", r_drop=R_DROP
        )
        data["figures"] = ["claim2_scale_detection.png", "claim3_relu_vs_tanh.png"]
    experiments["scale_detection"] = data

    log(echo, f"[3/{steps}] claim 4: CIFAR-10 nets (needs --cifar10 DIR and --weights)")
    experiments["cifar10"] = experiment_cifar10(
        claims, cifar10, weights, seed=seed, device=device, echo=echo
    )

    log(echo, f"[4/{steps}] 4x: LeNet on MNIST, exploratory")
    if mnist is not None:
        mcfg = MNIST_QUICK if quick else MNIST_DEFAULT
        data = experiment_mnist(mcfg, mnist, claims, seed=seed, device=device, echo=echo)
        if plots:
            plot_mnist(data, out / "claim4x_mnist.png")
            data["figure"] = "claim4x_mnist.png"
        experiments["mnist"] = data
    else:
        experiments["mnist"] = {"skipped": "4x runs only with --mnist DIR (MNIST IDX files)"}

    log(echo, f"[5/{steps}] N1-N3: Petrini et al. 2021, relative stability R_f on MNIST")
    experiments["petrini2021"] = petrini2021.experiment(
        mnist,
        claims,
        quick=quick,
        seed=seed,
        device=device,
        echo=echo,
        figure=out / "petrini2021.png" if plots else None,
    )

    log(echo, f"[6/{steps}] P1-P3: Ruderman et al. 2018, pooling vs strided convolutions")
    experiments["ruderman2018"] = ruderman.experiment(
        mnist,
        claims,
        quick=quick,
        seed=seed,
        device=device,
        echo=echo,
        figure=out / "ruderman2018.png" if plots else None,
    )

    results = {
        "claims": list(claims),
        "experiments": experiments,
        "settings": {
            "quick": bool(quick),
            "device": str(device),
            "seed": seed,
            "mnist": None if mnist is None else os.fspath(mnist),
            "cifar10": None if cifar10 is None else os.fspath(cifar10),
            "weights": dict(weights or {}),
            "thresholds": {
                "EXPONENT_TOLERANCE": EXPONENT_TOLERANCE,
                "R_DROP": R_DROP,
                "TRAINING_EFFECT": TRAINING_EFFECT,
                "TANH_LOG_FRACTION": TANH_LOG_FRACTION,
                **petrini2021.THRESHOLDS,
                **ruderman.THRESHOLDS,
            },
            "ratios": "last hidden layer over first hidden layer (k = depth over k = 1)",
        },
        "versions": versions(detail=True),
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    with open(out / "results.json", "w", encoding="utf-8") as handle:
        json.dump(finite_or_none(results), handle, indent=1, allow_nan=False)
        handle.write("\n")
    return results


def _run_command(args: argparse.Namespace) -> int:
    weights = parse_weights(args.weights)
    results = run_reproduction(
        args.out,
        mnist=args.mnist,
        cifar10=args.cifar10,
        weights=weights,
        quick=args.quick,
        device=args.device,
        seed=args.seed,
    )
    claims = results["claims"]
    print()
    print(claims_table(claims))
    judged = [c for c in claims if c["verdict"] in ("PASS", "FAIL")]
    passed = sum(c["verdict"] == "PASS" for c in judged)
    other = len(claims) - len(judged)
    print(
        f"\n{passed}/{len(judged)} claims with a verdict reproduced ({other} measured or not "
        f"testable here) in {results['seconds']:.0f} s; results in "
        f"{Path(args.out) / 'results.json'}"
    )
    if args.quick:
        notes = [f"  {c['id']}: {c['quick_note']}" for c in claims if c.get("quick_note")]
        if notes:
            print("\nNot expected to hold at --quick scale (run without --quick to judge them):")
            print("\n".join(notes))
    return 0


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``reproduce`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the papers' claims (D_k, G_k, R_k by depth) and print verdicts",
        description="The published claims of Tomasini et al. 2022/23, Petrini et al. 2021 and "
        "Ruderman et al. 2018, measured on a CPU, each with its verdict and numbers.",
    )
    p.add_argument("--out", default="reproduce", help="folder for results.json and the PNGs")
    p.add_argument(
        "--mnist", default=None, metavar="DIR", help="MNIST IDX files: runs 4x, N1-N3 and P1-P3"
    )
    p.add_argument(
        "--cifar10",
        default=None,
        metavar="DIR",
        help="CIFAR-10 binary batches (with --weights): runs claim 4",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="NAME=FILE",
        help="weights of a CIFAR-10 net trained elsewhere (vgg11, alexnet, lenet); "
        "repeat for several",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller settings; prints which claims are not expected to hold",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_command)
    return p
