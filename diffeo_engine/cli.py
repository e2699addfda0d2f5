"""The ``diffeo-engine`` command: one console script, one subcommand per job.

Common flags are spelled the same everywhere: ``--T``, ``--cut``, ``--seed``,
``--batch-size``, ``--device``, ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import diffeo_engine
from diffeo_engine import benchmark, generate, ops, reproduce
from diffeo_engine.physics import temperature_range, typical_displacement
from diffeo_engine.sensitivity import command as sensitivity_command

__all__ = ["build_parser", "main"]


def demo_images(n: int, size: int = 32) -> torch.Tensor:
    """An embedded default batch: ``n`` smooth RGB test patterns (rings and stripes)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    k = torch.arange(n, dtype=torch.float32)[:, None, None]
    r = torch.sqrt(x**2 + y**2)
    red = 0.5 + 0.5 * torch.cos((4 + k) * math.pi * r)
    green = 0.5 + 0.5 * torch.sin((2 + k % 5) * math.pi * x)
    blue = 0.5 + 0.5 * torch.sin((2 + k % 3) * math.pi * (x + y))
    return torch.stack([red, green, blue], dim=1)


def _run_demo(args: argparse.Namespace) -> int:
    images = demo_images(args.batch_size, args.size).to(args.device)
    T_min, T_max = temperature_range(args.size, args.cut)
    T = args.T if args.T is not None else math.sqrt(T_min * T_max)
    start = time.perf_counter()
    tau_x, noisy = ops.perturb(images, T, args.cut, seed=args.seed, backend=args.backend)
    elapsed = time.perf_counter() - start
    change = (tau_x - images).flatten(1).norm(dim=1)
    noise = (noisy - images).flatten(1).norm(dim=1)
    print(f"diffeo-engine {diffeo_engine.__version__}, torch {torch.__version__}")
    print(
        f"perturbed {args.batch_size} images of 3x{args.size}x{args.size} on {images.device} "
        f"in {elapsed * 1e3:.1f} ms"
    )
    print(f"T = {T:.3g} (range for cut={args.cut}: [{T_min:.3g}, {T_max:.3g}]), seed = {args.seed}")
    print(f"typical displacement: {typical_displacement(T, args.cut, args.size):.2f} px")
    print(f"mean ||tau x - x|| = {change.mean():.4f}, mean ||eta|| = {noise.mean():.4f}")
    print(f"max | ||eta|| - ||tau x - x|| | = {(noise - change).abs().max():.2e}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="perturb a built-in batch of images and print what was done"
    )
    p.add_argument("--T", type=float, default=None, help="temperature (default: mid-range)")
    p.add_argument("--cut", type=int, default=3, help="high-frequency cut-off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS)
    p.set_defaults(run=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffeo-engine",
        description="Max-entropy diffeomorphisms, matched noise, and layer-wise sensitivities.",
    )
    parser.add_argument("--version", action="version", version=diffeo_engine.__version__)
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    reproduce.add_command(subparsers)
    _add_demo(subparsers)
    sensitivity_command.add_command(subparsers)
    generate.add_commands(subparsers)
    benchmark.add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"diffeo-engine {args.command}: error: {error}", file=sys.stderr)
        return 2
