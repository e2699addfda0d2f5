"""The ``diffeo-engine`` command: one console script, one subcommand per job.

Common flags are spelled the same everywhere: ``--T``, ``--cut``, ``--seed``,
``--batch-size``, ``--device``, ``--out``. Subcommand modules are imported only when their
command runs (``--help`` stays fast). Every failure is one line on stderr: exit status 2
for bad usage or input, 1 for a failed run, 130 for an interrupt (Ctrl-C); ``--debug``
(anywhere on the line, or ``DIFFEO_ENGINE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

__all__ = ["build_parser", "main"]

# command -> (module, registering function, one-line help for the command list)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "reproduce": (
        "diffeo_engine.reproduce", "add_command",
        "run the papers' layer-wise experiments and say which claims reproduce",
    ),
    "demo": ("diffeo_engine.cli", "_add_demo", "perturb a built-in batch; --out draws it"),
    "show": ("diffeo_engine.cli", "_add_show", "draw the perturbations of your own image"),
    "sensitivity": (
        "diffeo_engine.sensitivity.command", "add_command",
        "measure D_k, G_k, R_k layer by layer and write JSON/CSV/PNG",
    ),
    "generate": (
        "diffeo_engine.generate", "add_commands", "write a perturbed data set as shards"
    ),
    "verify": ("diffeo_engine.generate", "add_commands", "check a generated data set"),
    "export": (
        "diffeo_engine.generate", "add_commands", "export a data set as CIFAR-C or WebDataset"
    ),
    "bench": (
        "diffeo_engine.benchmark", "add_command", "benchmark against grid_sample pipelines"
    ),
}  # fmt: skip

# What each command's --out names: a folder, a file, or either (checked before any work).
OUT_KIND = {
    "reproduce": "folder", "sensitivity": "folder", "generate": "folder", "export": "folder",
    "demo": "picture", "show": "picture", "bench": "any",
}  # fmt: skip
PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
DEBUG_ENV = "DIFFEO_ENGINE_DEBUG"
# bad input or usage (exit status 2); anything else is a failed run (1)
USAGE_ERRORS = (
    ValueError, TypeError, LookupError, ImportError, FileNotFoundError, FileExistsError,
    PermissionError, IsADirectoryError, NotADirectoryError,
)  # fmt: skip


class UsageError(ValueError):
    """Bad command-line usage found after parsing (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------- demo


def demo_images(n: int, size: int = 32):
    """An embedded default batch: ``n`` smooth RGB test patterns (rings and stripes)."""
    import torch

    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    k = torch.arange(n, dtype=torch.float32)[:, None, None]
    r = torch.sqrt(x**2 + y**2)
    red = 0.5 + 0.5 * torch.cos((4 + k) * math.pi * r)
    green = 0.5 + 0.5 * torch.sin((2 + k % 5) * math.pi * x)
    blue = 0.5 + 0.5 * torch.sin((2 + k % 3) * math.pi * (x + y))
    return torch.stack([red, green, blue], dim=1)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    import diffeo_engine
    from diffeo_engine import ops
    from diffeo_engine.physics import check_int, temperature_range, typical_displacement

    check_int("--batch-size", args.batch_size, 1)
    check_int("--size", args.size, 2)
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
    if args.out:
        from diffeo_engine.pictures import save_perturbation_figure

        save_perturbation_figure(
            args.out, images[0], cut=args.cut, seed=args.seed, backend=args.backend,
            title="diffeo-engine demo: the first built-in image",
        )  # fmt: skip
        print(f"wrote {args.out}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help=COMMANDS["demo"][2], description=COMMANDS["demo"][2])
    p.add_argument("--T", type=float, default=None, help="temperature (default: mid-range)")
    p.add_argument("--cut", type=int, default=3, help="high-frequency cut-off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument(
        "--out", default=None, metavar="PICTURE",
        help="draw the first image at T_min, sqrt(T_min T_max), T_max with its matched noise "
        "and field, and the phase picture across T and cut (.png/.pdf/.svg)",
    )  # fmt: skip
    p.set_defaults(run=_run_demo)


# ------------------------------------------------------------------------------- show


def _run_show(args: argparse.Namespace) -> int:
    from diffeo_engine.pictures import load_image, save_perturbation_figure

    image = load_image(args.source, index=args.index, resize=args.resize).to(args.device)
    save_perturbation_figure(
        args.out, image, cut=args.cut, seed=args.seed, image_id=args.index,
        backend=args.backend, title=f"{os.path.basename(args.source.rstrip('/'))} [{args.index}]",
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _add_show(subparsers) -> None:
    p = subparsers.add_parser("show", help=COMMANDS["show"][2], description=COMMANDS["show"][2])
    p.add_argument(
        "source", metavar="IMAGE|FOLDER|.npy",
        help="a PNG/JPEG file, or any data source of generate/sensitivity (folder, .npy, IDX)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="PICTURE", help=".png/.pdf/.svg to write")
    p.add_argument("--index", type=int, default=0, help="which image of a folder or array")
    p.add_argument("--cut", type=int, default=3, help="high-frequency cut-off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize", default=None, metavar="HxW", help="resize the image first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.set_defaults(run=_run_show)


# ----------------------------------------------------------------------------- parser


def _wanted(argv: list[str]) -> str | None:
    """The command named on the line (the first word that is one), or None."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. With ``argv`` only the named command's module is imported (the others get
    a placeholder with their help line); without it every command is built in full."""
    parser = _Parser(
        prog="diffeo-engine",
        description="Max-entropy diffeomorphisms, matched noise, and layer-wise sensitivities.",
        epilog="Every command also runs as python -m diffeo_engine COMMAND. "
        "Errors are one line; --debug shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    wanted = _wanted(argv) if argv is not None else None
    registered: set[str] = set()
    for name, (module_name, function, help_line) in COMMANDS.items():
        if name in registered:
            continue
        if argv is None or name == wanted or (module_name, function) == _spec(wanted):
            module = sys.modules[__name__] if module_name == __name__ else None
            module = module or importlib.import_module(module_name)
            before = set(subparsers.choices)
            getattr(module, function)(subparsers)
            registered |= set(subparsers.choices) - before
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
            registered.add(name)
    return parser


def _spec(name: str | None):
    return COMMANDS[name][:2] if name in COMMANDS else None


def _version() -> str:
    import diffeo_engine  # cheap: its names load on first use

    return diffeo_engine.__version__


# ------------------------------------------------------------------------------- main


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_out(command: str, out: str | None) -> None:
    """Refuse an output path that cannot be written before any work starts."""
    if not out:
        return
    kind = OUT_KIND.get(command, "any")
    if kind == "folder" and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: {out} exists and is not a folder (expected a folder)")
    if kind == "picture":
        if os.path.isdir(out):
            raise UsageError(f"--out: {out} is a folder (expected a picture file such as d.png)")
        if not out.lower().endswith(PICTURE_SUFFIXES):
            raise UsageError(
                f"--out: expected a picture file ending in {', '.join(PICTURE_SUFFIXES)}, got {out}"
            )
    base = _nearest_existing(out if kind == "folder" else os.path.dirname(out) or ".")
    if not os.path.isdir(base):
        raise UsageError(f"--out: {base} is a file, so {out} cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {base} is not writable")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError):
        text = f"missing key {text}"
    if not text or not isinstance(error, (ValueError, TypeError, OSError, ImportError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _check_common(args: argparse.Namespace) -> None:
    """Checks shared by every command, before its module runs."""
    check_out(args.command, getattr(args, "out", None))
    if getattr(args, "device", None) is not None:
        from diffeo_engine.physics import check_device

        check_device(args.device, "--device")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status (0, 1 failure, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [word for word in argv if word != "--debug"]
    command = _wanted(argv) or "diffeo-engine"
    prefix = f"diffeo-engine {command}" if command != "diffeo-engine" else command
    try:
        parser = build_parser(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version, or a usage error already printed
            return done.code if isinstance(done.code, int) else 0
        if args.command is None:
            parser.print_help()
            return 0
        _check_common(args)
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as error:
        if debug:
            raise
        usage = isinstance(error, USAGE_ERRORS)
        hint = "" if usage else " (--debug shows the traceback)"
        print(f"{prefix}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2 if usage else 1
