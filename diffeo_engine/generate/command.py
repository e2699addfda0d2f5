"""The ``generate`` and ``verify`` subcommands (registered by :func:`add_commands`)."""

from __future__ import annotations

import argparse
import sys

import torch

from diffeo_engine import ops
from diffeo_engine.distributed import DistributedContext, DistributedError, distributed_session
from diffeo_engine.generate.manifest import DTYPES, MANIFEST
from diffeo_engine.generate.plan import DEFAULT_BATCH_SIZE
from diffeo_engine.generate.repair import repair
from diffeo_engine.generate.run import generate
from diffeo_engine.generate.verification import verify

__all__ = ["add_commands"]

DESCRIPTION = "Sharded, resumable writing of perturbed data sets."


# the CLI spelling of generate's arguments, for its one-line errors
FLAGS = {
    "input": "--input",
    "out": "--out",
    "T": "--T",
    "cut": "--cut",
    "per_image": "--per-image",
    "seed": "--seed",
    "noise": "--noise",
    "dtype": "--dtype",
    "shard_size": "--shard-size",
    "batch_size": "--batch-size",
    "interp": "--interp",
    "resize": "--resize",
    "device": "--device",
    "backend": "--backend",
    "resume": "--resume",
    "allow_nonfinite": "--allow-nonfinite",
}
REQUIRED = ("input", "T", "cut", "per_image", "seed")


def _cli_spelling(error: Exception) -> Exception:
    """The same error with its leading argument names (``per_image: ...``) as flags."""
    head, sep, rest = str(error).partition(": ")
    names = head.split(", ")
    if not sep or not all(name in FLAGS for name in names):
        return error
    return type(error)(", ".join(FLAGS[name] for name in names) + ": " + rest)


def _parse_noise(text: str) -> str | float:
    if text in ("matched", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--noise: expected 'matched', 'none' or a number sigma >= 0, got {text!r}"
        ) from None


def _run_generate(args: argparse.Namespace) -> int:
    if not args.resume:
        missing = [FLAGS[name] for name in REQUIRED if getattr(args, name) is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)}: required (or --resume to continue the run in --out)"
            )
    noise = None if args.noise is None else _parse_noise(args.noise)
    device = args.device
    if device is None:  # generate's own default, which the process group must know
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with distributed_session(device, timeout_s=getattr(args, "dist_timeout", None)) as ctx:
            return _generate_rank(args, ctx, noise)
    except DistributedError as error:
        print(f"diffeo-engine generate: error: {error}", file=sys.stderr)
        return 1


def _generate_rank(args: argparse.Namespace, ctx: DistributedContext, noise) -> int:
    try:
        manifest = generate(
            args.input,
            args.out,
            T=args.T,
            cut=args.cut,
            per_image=args.per_image,
            seed=args.seed,
            noise=noise,
            dtype=args.dtype,
            shard_size=args.shard_size,
            interp=args.interp,
            resize=args.resize,
            batch_size=args.batch_size,
            device=args.device,
            backend=args.backend,
            resume=args.resume,
            progress=not args.quiet,
            distributed=ctx,
            allow_nonfinite=args.allow_nonfinite,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise _cli_spelling(error) from error
    except OSError as error:
        print(f"diffeo-engine generate: error: {error}", file=sys.stderr)
        return 1
    if not ctx.is_main:
        return 0
    print(
        f"{manifest['total_images']} images in {manifest['n_shards']} shards "
        f"({', '.join(manifest['kinds'])}) in {args.out}; see {MANIFEST}"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    if args.repair:
        try:
            found = repair(
                args.dir, source=args.input, device=args.device, backend=args.backend,
                progress=not args.quiet,
            )  # fmt: skip
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise _cli_spelling(error) from error
        print(f"repaired: {'; '.join(found)}" if found else "repair: no damaged shard found")
    report = verify(
        args.dir, args.sample, source=args.input, device=args.device, backend=args.backend
    )
    print(report.summary())
    return 0 if report.ok else 1


def add_commands(subparsers) -> None:
    """Register ``generate`` and ``verify`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "generate",
        help="write perturbed copies of a data set to resumable shards",
        description=DESCRIPTION,
    )
    need = p.add_argument_group("required (unless --resume takes them from the run in --out)")
    need.add_argument(
        "--input",
        default=None,
        help="SRC: .npy, .npz[:KEY], image folder, IDX file, torchvision:NAME:ROOT",
    )
    need.add_argument("--T", type=float, default=None, help="temperature")
    need.add_argument("--cut", type=int, default=None, help="high-frequency cut-off")
    need.add_argument("--per-image", type=int, default=None, help="K perturbations per image")
    need.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory (required)")
    p.add_argument("--noise", default=None, help="matched (default) | none | SIGMA")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default uint8")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="images per shard (default: 16 MiB per file, at least 8 shards)",
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULT_BATCH_SIZE}")
    p.add_argument("--interp", default=None, choices=("bilinear", "nearest"))
    p.add_argument("--resize", default=None, help="HxW: resize every source image")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="let NaN/inf source pixels through (refused by default; needs a float --dtype)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: fail when a rank has not joined a collective after this long "
        "(default: $DIFFEO_ENGINE_DIST_TIMEOUT, else 300); must exceed one shard's time",
    )
    p.set_defaults(run=_run_generate)

    v = subparsers.add_parser(
        "verify", help="re-hash a generated data set and regenerate a sample of its ids"
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--sample", type=int, default=16, help="ids to regenerate (0: hash only)")
    v.add_argument("--input", default=None, help="the source, if it moved")
    v.add_argument("--device", default=None, help="default: the run's, if available")
    v.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default: the run's")
    v.add_argument(
        "--repair",
        action="store_true",
        help="first rewrite every damaged or missing shard (and finish an incomplete run)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar while repairing")
    v.set_defaults(run=_run_verify)
