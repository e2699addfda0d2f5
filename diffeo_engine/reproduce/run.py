"""``run_reproduction``: every experiment, one claims table, ``results.json``, the figures;
and the ``reproduce`` command line.

Three stages: claim 1 (no training, in this process); every training of every experiment,
spread over worker processes of one torch thread each, with one progress line per finished
run and an estimate of the time left; then each experiment's claims from its runs. The
default run gives a verdict on the claims it can run in the authors' regime in about five
minutes on two cores (1, 2, N1, P1); ``--full`` adds those that train longer (3, 4x, N2,
N3, P2, P3) and prints every claim; claim 4 needs ``--cifar10 DIR --weights NAME=FILE``. A claim a
run leaves out prints what it needs, never a verdict from a shortened regime.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffeo_engine.reproduce import petrini2021, ruderman
from diffeo_engine.reproduce import scale_detection as sd
from diffeo_engine.reproduce.analytical import EXPONENT_TOLERANCE, experiment_analytical
from diffeo_engine.reproduce.claims import STANDARD_ERRORS, Claims, claims_table, log, run_jobs
from diffeo_engine.reproduce.figures import (
    have_matplotlib,
    plot_analytical,
    plot_mnist,
    plot_scale_detection,
)
from diffeo_engine.reproduce.mnist import LEARNED_MAX_ERROR, MnistData
from diffeo_engine.reproduce.real_images import (
    CIFAR_NETS,
    experiment_cifar10,
    experiment_mnist,
    mnist_not_run,
)
from diffeo_engine.sensitivity.result import finite_or_none
from diffeo_engine.versions import versions

__all__ = ["CLAIM_ORDER", "add_command", "check_paths", "parse_weights", "run_reproduction"]

CLAIM_ORDER = ("1a", "1b", "2", "3", "4", "4x", "N1", "N2", "N3", "P1", "P2", "P3")


def parse_weights(items) -> dict[str, str]:
    """``["vgg11=a.pt", ...]`` to ``{"vgg11": "a.pt"}`` (``--weights NAME=FILE``)."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights: expected NAME=FILE, got {item!r}")
        if name in out:
            raise ValueError(f"--weights: {name!r} given twice")
        if name not in CIFAR_NETS:
            raise ValueError(f"--weights: expected names among {CIFAR_NETS}, got {name!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--weights: no such file: {path}")
        out[name] = path
    return out


def _settings(quick: bool, full: bool):
    """The settings of each experiment for this run."""
    scale = sd.SCALE_QUICK if quick else sd.SCALE_DEFAULT
    petrini = petrini2021.QUICK if quick else petrini2021.DEFAULT
    rud = ruderman.QUICK if quick else ruderman.DEFAULT
    return scale, petrini, rud


def check_paths(*, mnist=None, cifar10=None, weights=None, out=None, quick=False) -> None:
    """Every path flag, before any work; errors name the flag (``--mnist``, ``--cifar10``,
    ``--weights``, ``--out``)."""
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} exists and is not a folder")
        base = out
        while not base.exists():
            base = base.parent
        if not base.is_dir():
            raise ValueError(f"--out: {base} is a file, so {out} cannot be created")
    for name in weights or {}:
        if name not in CIFAR_NETS:
            raise ValueError(f"--weights: expected names among {CIFAR_NETS}, got {name!r}")
        if not Path(weights[name]).is_file():
            raise FileNotFoundError(f"--weights: no such file: {weights[name]}")
    if mnist is not None:
        if not Path(mnist).is_dir():
            raise FileNotFoundError(f"--mnist: no such folder: {mnist}")
        _, petrini, rud = _settings(quick, False)
        try:
            for cfg in (petrini, rud):
                MnistData.load(os.fspath(mnist), cfg)
        except (FileNotFoundError, ValueError) as error:
            text = str(error).split(": ", 1)[-1]
            raise FileNotFoundError(
                f"--mnist: {mnist} does not hold a usable MNIST test set "
                f"(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]): {text}"
            ) from None
    if cifar10 is not None:
        if not Path(cifar10).is_dir():
            raise FileNotFoundError(f"--cifar10: no such folder: {cifar10}")
        from diffeo_engine.data.cifar10 import load_cifar10

        try:
            load_cifar10(cifar10, "test", limit=1)
        except (FileNotFoundError, ValueError) as error:
            text = str(error).split(": ", 1)[-1]
            raise FileNotFoundError(f"--cifar10: {text}") from None


PROCESSES_PER_CORE = 3


def _default_workers(device: torch.device) -> int:
    """``PROCESSES_PER_CORE`` single-threaded processes per core on the CPU (one on other
    devices): the runs are few and unequal (five ReLU nets on two cores would leave one
    core idle for a third of the time), so the cores are shared by the operating system,
    and the work ends when the last core's share is done."""
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, PROCESSES_PER_CORE * cores)


def run_reproduction(
    out,
    *,
    mnist=None,
    cifar10=None,
    weights: dict[str, str] | None = None,
    quick: bool = False,
    full: bool = False,
    device="cpu",
    seed: int = 0,
    workers: int | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict:
    """Run the experiments, write ``results.json`` and the figures to ``out``; return the
    results (``results["claims"]`` is the list of claims).

    ``mnist``: a folder with the MNIST test set (default: the copy in the package).
    ``full``: also the claims that train longer (3, 4x, N2, N3, P2, P3). ``workers``: processes
    for the trainings (default: ``PROCESSES_PER_CORE`` per core on the CPU, each with one
    torch thread: the nets are small, and on a loaded 2-core machine two threads per
    process ran them 5-14x slower than one).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {seed!r}")
    check_paths(mnist=mnist, cifar10=cifar10, weights=weights, out=out, quick=quick)
    device = torch.device(device)
    workers = _default_workers(device) if workers is None else max(1, int(workers))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = None if mnist is None else os.fspath(mnist)
    plots = have_matplotlib()
    if not plots:
        log(echo, "matplotlib is not installed: no figures (pip install 'diffeo-engine[plot]')")
    start = time.perf_counter()
    experiments: dict = {}
    claims = Claims()
    scale_cfg, petrini_cfg, rud_cfg = _settings(quick, full)

    log(echo, "[1/3] claim 1: analytical model (constant filters, one-hot inputs)")
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = experiment_analytical(claims, seed=seed, device=device, echo=echo)
    finally:
        torch.set_num_threads(with_threads)
    if plots:
        plot_analytical(data, out / "claim1_analytical.png")
        data["figure"] = "claim1_analytical.png"
    experiments["analytical"] = data

    activations = ("relu", "tanh") if full else ("relu",)
    jobs = {
        "scale": sd.jobs(scale_cfg, seed=seed, device=device, activations=activations),
        "petrini": petrini2021.jobs(
            petrini_cfg, seed=seed, source=source, device=device, trained=full
        ),
        "ruderman": ruderman.jobs(rud_cfg, seed=seed, source=source, device=device, trained=full),
    }
    describe = {
        "scale": sd.describe,
        "petrini": petrini2021.describe,
        "ruderman": ruderman.describe,
    }
    flat = [(kind, job) for kind, js in jobs.items() for job in js]
    where = "MNIST test set " + ("packaged with diffeo-engine" if source is None else source)
    log(
        echo,
        f"[2/3] {len(flat)} nets to train and measure on {workers} process(es) "
        f"({'full' if full else 'default'} run; {where}; {petrini_cfg.split_text()})",
    )
    t_jobs = time.perf_counter()
    kinds = {id(job): kind for kind, job in flat}
    results = run_jobs(
        [job for _, job in flat],
        workers=workers,
        echo=echo,
        describe=lambda job, r: describe[kinds[id(job)]](r),
    )
    by_kind: dict[str, list] = {kind: [] for kind in jobs}
    for (kind, _), result in zip(flat, results):
        by_kind[kind].append(result)
    seconds_jobs = time.perf_counter() - t_jobs

    log(echo, "[3/3] verdicts")
    runs = {a: [r for r in by_kind["scale"] if r["activation"] == a] for a in ("relu", "tanh")}
    data = sd.conclude(scale_cfg, runs, claims, seed=seed, quick=quick)
    if plots:
        plot_scale_detection(
            data,
            out / "claim2_scale_detection.png",
            out / "claim3_relu_vs_tanh.png",
            r_drop=sd.R_DROP,
        )
        data["figures"] = ["claim2_scale_detection.png"] + (
            ["claim3_relu_vs_tanh.png"] if runs["tanh"] else []
        )
    experiments["scale_detection"] = data
    experiments["cifar10"] = experiment_cifar10(
        claims, cifar10, weights, seed=seed, device=device, echo=echo
    )
    data = petrini2021.conclude(
        petrini_cfg, by_kind["petrini"], claims, quick=quick, trained=full, seed=seed
    )
    if plots:
        petrini2021.plot(data, out / "petrini2021.png")
        data["figure"] = "petrini2021.png"
    experiments["petrini2021"] = data
    if full:
        data = experiment_mnist(by_kind["petrini"], claims)
        if plots:
            plot_mnist(data, out / "claim4x_mnist.png")
            data["figure"] = "claim4x_mnist.png"
        experiments["mnist"] = data
    else:
        experiments["mnist"] = mnist_not_run(claims)
    data = ruderman.conclude(rud_cfg, by_kind["ruderman"], claims, quick=quick, trained=full)
    if plots:
        ruderman.plot(data, out / "ruderman2018.png")
        data["figure"] = "ruderman2018.png"
    experiments["ruderman2018"] = data
    claims.sort(key=lambda c: CLAIM_ORDER.index(c["id"]))

    results = {
        "claims": list(claims),
        "experiments": experiments,
        "settings": {
            "quick": bool(quick),
            "full": bool(full),
            "device": str(device),
            "workers": workers,
            "seed": seed,
            "mnist": "packaged" if source is None else source,
            "mnist_split": petrini_cfg.split_text(),
            "cifar10": None if cifar10 is None else os.fspath(cifar10),
            "weights": dict(weights or {}),
            "thresholds": {
                "EXPONENT_TOLERANCE": EXPONENT_TOLERANCE,
                "R_DROP": sd.R_DROP,
                "TRAINING_EFFECT": sd.TRAINING_EFFECT,
                "TANH_LOG_FRACTION": sd.TANH_LOG_FRACTION,
                "STANDARD_ERRORS": STANDARD_ERRORS,
                "LEARNED_MAX_ERROR": LEARNED_MAX_ERROR,
                **petrini2021.THRESHOLDS,
                **ruderman.THRESHOLDS,
            },
            "ratios": "last hidden layer over first hidden layer (k = depth over k = 1)",
        },
        "versions": versions(detail=True),
        "seed": seed,
        "seconds_training_stage": seconds_jobs,
        "seconds": time.perf_counter() - start,
    }
    with open(out / "results.json", "w", encoding="utf-8") as handle:
        json.dump(finite_or_none(results), handle, indent=1, allow_nan=False)
        handle.write("\n")
    return results


def summary(results: dict) -> str:
    """The line under the table: verdicts counted, time, where the results are."""
    claims = results["claims"]
    count = {
        v: sum(c["verdict"] == v for c in claims)
        for v in ("PASS", "FAIL", "INCONCLUSIVE", "MEASURED", "NOT TESTABLE")
    }
    judged = count["PASS"] + count["FAIL"] + count["INCONCLUSIVE"]
    return (
        f"{count['PASS']}/{judged} claims with a verdict reproduced ({count['FAIL']} FAIL, "
        f"{count['INCONCLUSIVE']} INCONCLUSIVE: within 2 standard errors of the threshold); "
        f"{count['MEASURED']} measured, {count['NOT TESTABLE']} not testable in this run; "
        f"{results['seconds']:.0f} s"
    )


def _run_command(args: argparse.Namespace) -> int:
    weights = parse_weights(args.weights)
    check_paths(
        mnist=args.mnist, cifar10=args.cifar10, weights=weights, out=args.out, quick=args.quick
    )
    results = run_reproduction(
        args.out,
        mnist=args.mnist,
        cifar10=args.cifar10,
        weights=weights,
        quick=args.quick,
        full=args.full,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
    )
    claims = results["claims"]
    print()
    print(claims_table(claims))
    print(f"\n{summary(results)}; results in {Path(args.out) / 'results.json'}")
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
        "Ruderman et al. 2018, measured on a CPU, each with its verdict and numbers. The "
        "default run (about 5 minutes on 2 cores) judges claims 1, 2, N1 and P1; --full "
        "(about 30 minutes) adds 3, 4x, N2, N3, P2 and P3.",
    )
    p.add_argument("--out", default="reproduce", help="folder for results.json and the PNGs")
    p.add_argument(
        "--full",
        action="store_true",
        help="also the claims that train longer (3, 4x, N2, N3, P2, P3): about 30 minutes on "
        "2 cores",
    )
    p.add_argument(
        "--mnist",
        default=None,
        metavar="DIR",
        help="a folder with the MNIST test set's IDX files (default: the copy in the package)",
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
        help="smaller settings (seconds); prints which claims are not expected to hold",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the trainings on the CPU (default: 3 per core, one torch thread each)",
    )
    p.set_defaults(run=_run_command)
    return p
