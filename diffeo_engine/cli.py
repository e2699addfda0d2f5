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
import tempfile

from diffeo_engine import flags

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
# Every path argument of a command, checked in this order before any work: (attribute, the
# flag as typed, kind). Kinds: "input" (a data source: an existing folder or regular file,
# or a torchvision:/cifar10: spec), "file"/"files" (existing regular files), "model" (the
# file of file.py:factory), and the outputs "picture", "folder" and "any" (OUT_KIND).
# Commands not listed (generate, verify, export, reproduce) check their own; --out of every
# command is checked here.
PATH_FLAGS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "demo": (("out", "--out", "picture"),),
    "show": (("source", "IMAGE", "input"), ("out", "--out", "picture")),
    "sensitivity": (
        ("model", "--model", "model"), ("data", "--data", "input"),
        ("weights", "--weights", "file"), ("out", "--out", "folder"),
    ),
    "bench": (("merge", "--merge", "files"), ("out", "--out", "any")),
}  # fmt: skip
# Flags a command spells its own way (flags.FLAGS holds the common spelling); commands in
# SPELLED show errors that begin with an argument name as the flag the user typed.
COMMAND_FLAGS = {
    "show": {"input": "IMAGE", "image": "IMAGE"},
    "sensitivity": {"input": "--data", "name": "--model", "settings": "--T, --cut"},
}
SPELLED = ("demo", "show", "sensitivity", "bench")
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


def _check_demo(args: argparse.Namespace) -> float:
    """Every demo flag before any work; the temperature to use."""
    import warnings

    import torch

    from diffeo_engine import ops
    from diffeo_engine.physics import (
        check_cut,
        check_field,
        check_int,
        check_memory,
        check_scalar_T,
        check_seed,
        perturbation_bytes,
        temperature_range,
    )

    B = check_int("--batch-size", args.batch_size, 1)
    size = check_int("--size", args.size, 2)
    check_cut(args.cut, minimum=2)
    check_seed(args.seed)
    T_min, T_max = temperature_range(size, args.cut)
    T = check_scalar_T(args.T) if args.T is not None else math.sqrt(T_min * T_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself warns of folds
        check_field(T, args.cut, size, size)
    path = ops.resolved_backend(args.device, torch.float32, args.backend)
    nbytes = 4 * 4 * B * 3 * size * size  # the built-in batch and its temporaries
    nbytes += perturbation_bytes((B, 3, size, size), torch.float32, outputs=2, path=path, chunk=128)
    if args.out is not None:
        from diffeo_engine.pictures import figure_bytes

        nbytes += figure_bytes(3, size, size)
    check_memory(
        "--size" if size * size >= B else "--batch-size", nbytes, args.device,
        what=f"the demo of {B} image(s) of 3x{size}x{size}",
    )  # fmt: skip
    return T


def _run_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    import diffeo_engine
    from diffeo_engine import ops
    from diffeo_engine.physics import temperature_range, typical_displacement

    T = _check_demo(args)
    images = demo_images(args.batch_size, args.size).to(args.device)
    T_min, T_max = temperature_range(args.size, args.cut)
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
    if args.out is not None:
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
    from diffeo_engine.data.sources import parse_resize
    from diffeo_engine.physics import (
        check_cut,
        check_int,
        check_memory,
        check_seed,
        temperature_range,
    )
    from diffeo_engine.pictures import figure_bytes, load_image, save_perturbation_figure

    check_int("--index", args.index, 0)
    check_cut(args.cut, minimum=2)
    check_seed(args.seed)
    size = parse_resize(args.resize)
    if size is not None:  # the resized image is made before anything else
        H, W = size
        nbytes = 4 * 4 * H * W + figure_bytes(4, H, W)
        check_memory("--resize", nbytes, args.device, what=f"drawing a {H}x{W} image")
    image = load_image(args.source, index=args.index, resize=args.resize).to(args.device)
    temperature_range(math.sqrt(image.shape[-2] * image.shape[-1]), args.cut)  # --cut vs image
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


def _check_writable(folder: str, flag: str, target: str) -> None:
    """Create and remove a probe file in ``folder``: the one test that holds for root, for
    read-only mounts and for pseudo file systems such as ``/proc``."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".diffeo-engine-", suffix=".probe", dir=folder)
    except OSError as error:
        raise UsageError(
            f"{flag}: cannot write in {folder} ({error.strerror or error}), so {target} "
            "cannot be written"
        ) from None
    os.close(handle)
    os.unlink(probe)


def _existing_kind(path: str) -> str | None:
    """What ``path`` is when it exists and is neither a folder nor a regular file."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    from diffeo_engine.data.sources.safe import file_kind

    return file_kind(mode)


def check_out(command: str, out: str | None, flag: str = "--out", kind: str | None = None) -> None:
    """Refuse an output path that cannot be written, before any work starts. A folder may
    be new (it is created with its parents); a file's folder must exist; either way a probe
    file is written and removed where the output will go."""
    if out is None:
        return
    if out == "":
        raise UsageError(f"{flag}: expected a path, got '' (write '.' for this folder)")
    kind = kind or OUT_KIND.get(command, "any")
    if kind == "any":  # a folder when it is one or ends in a separator, else a file
        kind = "folder" if os.path.isdir(out) or out.endswith(("/", os.sep)) else "file"
    special = _existing_kind(out)
    if special is not None:
        raise UsageError(f"{flag}: {out} is {special}, not a regular file or a folder; refused")
    if kind == "folder":
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"{flag}: {out} exists and is not a folder (expected a folder)")
        base = _nearest_existing(out)
        if not os.path.isdir(base):
            raise UsageError(f"{flag}: {base} is a file, so {out} cannot be created")
        _check_writable(base, flag, out)
        return
    if os.path.isdir(out):
        expected = "a picture file such as d.png" if kind == "picture" else "a file"
        raise UsageError(f"{flag}: {out} is a folder (expected {expected})")
    if kind == "picture" and not out.lower().endswith(PICTURE_SUFFIXES):
        raise UsageError(
            f"{flag}: expected a picture file ending in {', '.join(PICTURE_SUFFIXES)}, got {out}"
        )
    folder = os.path.dirname(out) or "."
    if not os.path.exists(folder):
        base = _nearest_existing(folder)
        if not os.path.isdir(base):
            raise UsageError(f"{flag}: {base} is a file, so {out} cannot be created")
        raise UsageError(f"{flag}: the folder {folder} does not exist (create it first)")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: {folder} is a file, so {out} cannot be created")
    _check_writable(folder, flag, out)


def _check_input(value: str, flag: str, kind: str) -> None:
    """An input path argument (see ``PATH_FLAGS``)."""
    from diffeo_engine.data.sources.safe import check_regular

    if kind == "model":  # NAME, module.path:factory, or file.py:factory (the file is read)
        target = value.rpartition(":")[0]
        if target.endswith(".py"):
            check_regular(os.path.expanduser(target), flag, follow=True)
        return
    if value == "":
        raise UsageError(f"{flag}: expected a path, got '' (write '.' for this folder)")
    if kind == "input":
        from diffeo_engine.generate.command import check_input_flag

        check_input_flag(value, flag)
    else:
        check_regular(os.path.expanduser(value), flag, follow=True)


def check_paths(args: argparse.Namespace) -> None:
    """Every path argument of the command (``PATH_FLAGS``; ``--out`` of the others): an
    empty path, a missing input, a FIFO or device, an output that cannot be written are
    refused in one line naming the flag, before any work."""
    table = PATH_FLAGS.get(args.command)
    if table is None:
        check_out(args.command, getattr(args, "out", None))
        return
    for attribute, flag, kind in table:
        value = getattr(args, attribute, None)
        if value is None:
            continue
        if kind in ("picture", "folder", "any"):
            check_out(args.command, value, flag, kind)
        else:
            for item in value if kind == "files" else [value]:
                _check_input(item, flag, "file" if kind == "files" else kind)


def spelled(text: str, command: str) -> str:
    """``text`` with its leading argument names written as ``command``'s flags."""
    return flags.spelled(text, COMMAND_FLAGS.get(command))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError):
        text = f"missing key {text}"
    if not text or not isinstance(error, (ValueError, TypeError, OSError, ImportError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _check_common(args: argparse.Namespace) -> None:
    """Checks shared by every command, before its module runs: the device, then every path
    argument (:func:`check_paths`)."""
    if getattr(args, "device", None) is not None:
        from diffeo_engine.physics import check_device

        check_device(args.device, "--device")
    check_paths(args)


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
        text = _one_line(error)
        if command in SPELLED:
            text = spelled(text, command)
        print(f"{prefix}: error: {text}{hint}", file=sys.stderr)
        return 2 if usage else 1
