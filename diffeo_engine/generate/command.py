"""The ``generate``, ``verify`` and ``export`` subcommands (registered by :func:`add_commands`).

Every path flag (``--input``, ``--labels``, ``--out``, ``DIR``) is checked before any work:
an empty path, a missing one, a FIFO or device, an ``--out`` that is a file or (for
``export``) already exists are refused in one line naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from diffeo_engine import ops
from diffeo_engine.data.sources.safe import check_input_path
from diffeo_engine.distributed import DistributedContext, DistributedError, distributed_session
from diffeo_engine.flags import FLAGS, spelled_error
from diffeo_engine.generate.exports import FORMATS, IMAGE_FORMATS, export
from diffeo_engine.generate.manifest import DTYPES, MANIFEST
from diffeo_engine.generate.plan import DEFAULT_BATCH_SIZE
from diffeo_engine.generate.repair import repair
from diffeo_engine.generate.run import generate
from diffeo_engine.generate.verification import verify

__all__ = ["add_commands"]

DESCRIPTION = "Sharded, resumable writing of perturbed data sets."


# verify and export name the data set DIR and export's destination --out
DIR_FLAGS = {
    "out": "DIR", "dest": "--out", "format": "--format", "image": "--image", "sample": "--sample",
}  # fmt: skip
REQUIRED = ("input", "T", "cut", "per_image", "seed")


def _parse_noise(text: str) -> str | float:
    if text in ("matched", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--noise: expected 'matched', 'none' or a number sigma >= 0, got {text!r}"
        ) from None


# ---------------------------------------------------------------------- path flags


def _nonempty(value: str, flag: str) -> str:
    if value == "":
        raise ValueError(f"{flag}: expected a path, got '' (write '.' for this folder)")
    return value


def check_input_flag(spec: str, flag: str = "--input") -> None:
    """An input spec names an existing folder or regular file (``torchvision:`` specs are
    checked by torchvision)."""
    _nonempty(spec, flag)
    if spec.startswith("torchvision:"):
        return
    if spec.startswith("cifar10:"):
        root = spec[len("cifar10:") :]
        head, sep, tail = root.rpartition(":")
        root = head if sep and tail in ("train", "test") and head else root
        path = check_input_path(_nonempty(root, flag), flag)
        if not path.is_dir():
            raise NotADirectoryError(f"{flag}: {path} is not a folder (cifar10:DIR)")
        return
    path = Path(spec).expanduser()
    if not path.exists() and ".npz:" in spec:
        path = Path(spec.rpartition(":")[0]).expanduser()
    check_input_path(path, flag)


def check_labels_flag(labels: str, input_spec: str | None) -> None:
    """``--labels``: an existing regular file (``FILE.npz:KEY`` too), or the KEY of an
    ``.npz`` input."""
    _nonempty(labels, "--labels")
    path = Path(labels).expanduser()
    if not path.exists() and not path.is_symlink() and ".npz:" in labels:
        path = Path(labels.rpartition(":")[0]).expanduser()
    npz_input = input_spec is not None and ".npz" in input_spec.lower()
    if not path.exists() and not path.is_symlink() and npz_input:
        return  # a KEY of the input archive, looked up when it is opened
    path = check_input_path(path, "--labels")
    if path.is_dir():
        raise IsADirectoryError(f"--labels: {path} is a folder; expected a labels file")


def check_dir_flag(value: str, flag: str = "DIR") -> None:
    """A data set folder: exists and is a folder (its manifest is read by the command)."""
    path = Path(_nonempty(value, flag))
    if not path.exists():
        raise FileNotFoundError(f"{flag}: no such folder: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{flag}: {path} is not a folder (expected a generated data set)")


def check_out_folder(value: str) -> None:
    """generate's ``--out``: a folder, or a new path whose nearest existing parent is a
    writable folder."""
    _nonempty(value, "--out")
    path = Path(value)
    if path.is_symlink() and not path.is_dir():
        raise NotADirectoryError(f"--out: {path} is a link to something that is not a folder")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out: {path} exists and is not a folder (expected a folder)")


def _check_generate_paths(args: argparse.Namespace) -> None:
    check_out_folder(args.out)
    if args.input is not None:
        check_input_flag(args.input)
    if args.labels is not None:
        if args.no_labels:
            raise ValueError("--labels: give either --labels FILE or --no-labels")
        check_labels_flag(args.labels, args.input)


# ------------------------------------------------------------------------- generate


def _labels_argument(args: argparse.Namespace):
    return False if args.no_labels else args.labels


def _run_generate(args: argparse.Namespace) -> int:
    _check_generate_paths(args)
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
            labels=_labels_argument(args),
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
        raise spelled_error(error) from error
    except OSError as error:
        print(f"diffeo-engine generate: error: {error}", file=sys.stderr)
        return 1
    if not ctx.is_main:
        return 0
    settings = len(manifest["parameters"]["settings"])
    extra = f", {settings} settings" if settings > 1 else ""
    extra += ", labelled" if manifest["source"]["labels"] is not None else ""
    print(
        f"{manifest['total_images']} images in {manifest['n_shards']} shards "
        f"({', '.join(manifest['kinds'])}{extra}) in {args.out}; see {MANIFEST}"
    )
    return 0


# --------------------------------------------------------------------------- verify


def _run_verify(args: argparse.Namespace) -> int:
    check_dir_flag(args.dir)
    if args.input is not None:
        check_input_flag(args.input)
    if args.labels is not None:
        check_labels_flag(args.labels, args.input)
    common = dict(source=args.input, labels=args.labels, device=args.device, backend=args.backend)
    try:
        if args.full:
            report = verify(args.dir, full=True, progress=not args.quiet, **common)
            if args.repair:
                print(report.summary())
                if report.ok:
                    return 0
                found = repair(
                    args.dir, shards=report.bad_shards, progress=not args.quiet, **common
                )
                print(f"repaired: {'; '.join(found)}" if found else "repair: nothing to rewrite")
                report = verify(
                    args.dir, full=True, shards=report.bad_shards, progress=False, **common
                )
        else:
            if args.repair:
                found = repair(args.dir, progress=not args.quiet, **common)
                print(
                    f"repaired: {'; '.join(found)}" if found else "repair: no damaged shard found"
                )
            report = verify(args.dir, args.sample, **common)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise spelled_error(error, DIR_FLAGS) from error
    print(report.summary())
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- export


def _run_export(args: argparse.Namespace) -> int:
    check_dir_flag(args.dir)
    _nonempty(args.out, "--out")
    if os.path.lexists(args.out):
        raise FileExistsError(f"--out: {args.out} exists; an export never overwrites")
    try:
        info = export(
            args.dir, args.out, format=args.format, image=args.image, progress=not args.quiet
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as error:
        raise spelled_error(error, DIR_FLAGS) from error
    count = info.get("rows", info.get("samples"))
    print(f"exported {count} images of {args.dir} as {args.format} to {args.out}")
    return 0


# ------------------------------------------------------------------------- parsers


def add_commands(subparsers) -> None:
    """Register ``generate``, ``verify`` and ``export`` on an argparse ``subparsers``."""
    p = subparsers.add_parser(
        "generate",
        help="write perturbed copies of a data set to resumable shards",
        description=DESCRIPTION,
    )
    need = p.add_argument_group("required (unless --resume takes them from the run in --out)")
    need.add_argument(
        "--input",
        default=None,
        help="SRC: .npy, .npz[:KEY], image folder, IDX file, CIFAR-10 .bin or cifar10:DIR[:SPLIT], "
        "torchvision:NAME:ROOT",
    )
    need.add_argument(
        "--T", type=float, nargs="+", default=None, help="temperature(s): one setting per T"
    )
    need.add_argument(
        "--cut", type=int, nargs="+", default=None, help="cut-off(s): every T with every cut"
    )
    need.add_argument("--per-image", type=int, default=None, help="K perturbations per image")
    need.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory (required)")
    p.add_argument(
        "--labels",
        default=None,
        metavar="FILE|KEY",
        help="labels: .npy, IDX or FILE.npz:KEY, or an .npz input's KEY (default: the "
        "source's own -- MNIST's labels file beside it, CIFAR-10 records, class sub-folders)",
    )
    p.add_argument("--no-labels", action="store_true", help="store no labels")
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
        "verify", help="re-hash a generated data set and regenerate its ids (a sample, or all)"
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--sample", type=int, default=16, help="ids to regenerate (0: hash only)")
    v.add_argument(
        "--full",
        action="store_true",
        help="regenerate every image and compare byte for byte, naming each that differs",
    )
    v.add_argument("--input", default=None, help="the source, if it moved")
    v.add_argument("--labels", default=None, metavar="FILE", help="the labels file, if it moved")
    v.add_argument("--device", default=None, help="default: the run's, if available")
    v.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default: the run's")
    v.add_argument(
        "--repair",
        action="store_true",
        help="rewrite every damaged or missing shard (with --full: every shard that differs "
        "from its regeneration) and finish an incomplete run",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(run=_run_verify)

    e = subparsers.add_parser(
        "export", help="write a generated data set as CIFAR-10-C arrays or WebDataset tars"
    )
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, help="a new folder (never overwritten)")
    e.add_argument(
        "--image",
        default=None,
        choices=IMAGE_FORMATS,
        help="webdataset images: png (default for uint8) or npy",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=_run_export)
