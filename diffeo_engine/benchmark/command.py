"""``diffeo-engine bench``: timed runs (or merges of them), and ``--static``, the offline
cost report of the kernels."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from diffeo_engine.benchmark.providers import (
    DTYPES,
    ISSUE_CUTS,
    ISSUE_DTYPES,
    ISSUE_SHAPES,
    PROVIDERS,
    SMOKE_CUTS,
    SMOKE_DTYPES,
    SMOKE_SHAPES,
)
from diffeo_engine.benchmark.report import format_table, result_filename, write_plot
from diffeo_engine.benchmark.run import SCHEMA, merge_results, run_benchmarks

__all__ = ["add_command"]


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW, e.g. 4096x3x32x32, got {text!r}")
    return shape  # type: ignore[return-value]


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


# what every record of a result document must hold for a merge (and its table)
_RECORD_KEYS = ("provider", "kind", "shape", "batch", "dtype", "cut", "pairs_per_s")


def _read_result(path: str) -> dict:
    """One result document of ``bench --out``, refused in one line naming ``--merge`` and
    the file when it is not one (a FIFO, not JSON, another schema, a damaged record)."""
    from diffeo_engine.data.sources.safe import read_regular

    raw = read_regular(path, "--merge", follow=True)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--merge: {path} is not JSON ({error})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"--merge: {path} is not a bench result (expected schema {SCHEMA!r}, got "
            f"{found!r}; --static reports are not merged)"
        )
    bandwidth = doc.get("copy_bandwidth_GBps")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
        raise ValueError(f"--merge: {path} has no copy_bandwidth_GBps number")
    if not isinstance(doc.get("device"), dict) or not isinstance(doc.get("results"), list):
        raise ValueError(f"--merge: {path} lacks a device object or a results list")
    for i, record in enumerate(doc["results"]):
        missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"--merge: {path}: result {i} lacks {', '.join(missing)}")
        rate = record["pairs_per_s"]
        if (
            not isinstance(record["shape"], list)
            or isinstance(rate, bool)
            or not (isinstance(rate, (int, float)))
        ):
            raise ValueError(f"--merge: {path}: result {i} has a malformed shape or pairs_per_s")
    return doc


def _check_flags(args: argparse.Namespace) -> None:
    """The flags a run would otherwise find out about case by case: one line each."""
    from diffeo_engine.physics import check_cut, check_memory, check_seed

    check_seed(args.seed)
    for cut in args.cut or []:
        check_cut(cut)
    for flag, given, known in (
        ("--providers", _split(args.providers), PROVIDERS),
        ("--dtypes", _split(args.dtypes), DTYPES),
    ):
        unknown = [name for name in given or [] if name not in known]
        if unknown:
            raise ValueError(f"{flag}: unknown {unknown}, expected some of {list(known)}")
    if args.static:
        from diffeo_engine.benchmark.static import TARGETS

        bad = [t for t in args.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"--targets: expected some of {sorted(TARGETS)}, got {bad}")
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for B, C, H, W in args.shapes or ():
        # the input buffers (a few per case) and both outputs, float32
        check_memory("--shapes", 4 * 4 * B * C * H * W, device, what=f"a {B}x{C}x{H}x{W} case")


def _run_static(args: argparse.Namespace) -> int:
    from diffeo_engine.benchmark import static

    cases = static.STATIC_CASES
    if args.shapes or args.dtypes:  # a matrix of its own: matched noise and deform each
        cases = tuple(
            static.StaticCase(tuple(shape), DTYPES[dtype][0], DTYPES[dtype][1], cut, noise)
            for shape in args.shapes or ISSUE_SHAPES
            for dtype in _split(args.dtypes) or ISSUE_DTYPES
            for cut in args.cut or ISSUE_CUTS
            for noise in ("matched", None)
        )
    elif args.cut:
        cases = tuple(c for c in cases if c.cut in args.cut)
    say = (lambda m: print(f"  {m}", file=sys.stderr, flush=True)) if args.verbose else None
    doc = static.static_report(cases, capabilities=tuple(args.targets), progress=say)
    doc["command"] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    print(static.format_static_table(doc))
    if args.out:
        path = static.write_static(doc, args.out)
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.static:
        return _run_static(args)
    if args.merge:
        doc = merge_results([_read_result(path) for path in args.merge])
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = device.type == "cuda"
        small = args.smoke or not cuda
        if not cuda and not args.smoke and args.shapes is None:
            print("no CUDA device: tiny shapes (the issue's matrix is for a GPU)", file=sys.stderr)
        providers = _split(args.providers) or list(PROVIDERS)
        dtypes = _split(args.dtypes) or list(SMOKE_DTYPES if small else ISSUE_DTYPES)
        doc = run_benchmarks(
            args.shapes or (SMOKE_SHAPES if small else ISSUE_SHAPES),
            dtypes,
            args.cut or (SMOKE_CUTS if small else ISSUE_CUTS),
            providers,
            device=device,
            smoke=args.smoke,
            seed=args.seed,
            timer=args.timer,
            interleave=args.interleave if args.interleave is not None else not cuda,
            progress=(lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            if args.verbose
            else None,
        )
        doc["command"] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    print(format_table(doc))
    if args.out is not None:  # the CLI checked it first: a folder (created) or a file
        out = Path(args.out)
        if out.is_dir() or args.out.endswith(("/", os.sep)):
            out.mkdir(parents=True, exist_ok=True)
            out = out / result_filename(doc)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(format_table(doc, markdown=True) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
        if not args.no_plot:
            png = write_plot(doc, out.with_suffix(".png"))
            print(f"wrote {png}" if png else "no plot: matplotlib is not installed")
    return 0


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers (``diffeo-engine bench``)."""
    p = subparsers.add_parser(
        "bench",
        help="time perturbation engines side by side against the device's copy bandwidth",
        description=(
            "Time the fused kernels (Triton; the CPU kernel), torch-reference, grid_sample "
            "(eager and compiled), the published per-image loop, and kornia's and torchvision's "
            "elastic transforms (another law) on random data; report pairs/s, effective "
            "GB/s under the minimum-bytes model and the fraction of the copy bandwidth "
            "measured in the same run. Default: the issue's matrix on CUDA, tiny shapes on CPU. "
            "--static: no GPU needed; compile the kernels for sm_90/sm_80 and report their "
            "static costs and a labelled model estimate instead."
        ),
    )
    p.add_argument("--out", help="JSON file (or folder: <gpu>-<date>.json); .md/.png beside it")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--providers", nargs="+", default=None, help=f"some of {', '.join(PROVIDERS)}")
    p.add_argument(
        "--shapes", nargs="+", type=_parse_shape, default=None, help="BxCxHxW, e.g. 4096x3x32x32"
    )
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 bfloat16 uint8")
    p.add_argument("--cut", nargs="+", type=int, default=None, help="cut-offs (default 3 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timer", choices=("events", "do_bench"), default="events")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSON files instead")
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the providers of each case round by round in turn and pair their ratios "
        "(default: on for CPU, whose speed drifts on a shared machine; off for CUDA)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument(
        "--static",
        action="store_true",
        help="no timing: compile every kernel variant offline (sm_90, sm_80) and report "
        "registers, spills, SASS mix, instructions per channel-pixel and a model estimate",
    )
    p.add_argument(
        "--targets", nargs="+", type=int, default=[90, 80], help="--static: compute capabilities"
    )
    # --static with --shapes/--dtypes/--cut: that matrix instead of issue 11's cases
    p.add_argument("--verbose", "-v", action="store_true", help="print progress to stderr")
    p.set_defaults(run=_run_bench)
    return p
