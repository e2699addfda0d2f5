"""``diffeo-engine sensitivity``: D_k, G_k, R_k of a network on a data set, to JSON/CSV/PNG.

The model is a registry name (``diffeo_engine.models.get_model``, including
``torchvision:NAME`` / ``timm:NAME``) or ``module.path:factory`` (also ``file.py:factory``);
weights come from ``torch.load(..., weights_only=True)`` or a ``.safetensors`` file; the data
from :func:`diffeo_engine.data.sources.open_source` (``.npy``/``.npz``, an image folder,
``torchvision:NAME:ROOT[:SPLIT]``). ``--out DIR`` receives ``sensitivity.json``,
``sensitivity.csv`` and ``sensitivity.png`` (the plot when matplotlib is installed).

Under ``torchrun`` each rank measures a contiguous share of the batches (global image ids
and positions, so the same perturbations and jackknife groups as one process), the float64
sums are added with one all-reduce, and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["add_command", "build_model", "load_weights", "run"]

_REGISTRY_PREFIXES = ("torchvision", "timm")


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_kwargs(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg: expected KEY=VALUE, got {item!r}")
        out[key] = _parse_value(value)
    return out


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"--model: expected NAME or module.path:factory, got {spec!r}")
    if target.endswith(".py"):
        from diffeo_engine.data.sources.safe import check_regular

        path = Path(target).expanduser()
        check_regular(path, "--model", follow=True)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's file: one line naming it
            raise ValueError(
                f"--model: {path} fails to import: {type(error).__name__}: {error}"
            ) from error
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ValueError(f"--model: cannot import module {target!r}: {error}") from error
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"--model: module {target!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise TypeError(f"--model: {spec!r} is not callable")
    return factory


def build_model(spec: str, kwargs: dict | None = None, seed: int | None = None) -> nn.Module:
    """A registry name, or ``module.path:factory`` / ``file.py:factory`` called with kwargs."""
    kwargs = dict(kwargs or {})
    prefix, sep, _ = spec.partition(":")
    if sep and prefix not in _REGISTRY_PREFIXES:
        factory = _import_factory(spec)
        if seed is None:
            model = factory(**kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = factory(**kwargs)
    else:
        try:
            from diffeo_engine.models import get_model
        except ImportError as error:
            raise ValueError(
                "--model: the model registry (diffeo_engine.models.get_model) is not available "
                f"({error}); give module.path:factory instead"
            ) from error
        model = get_model(spec, seed=seed, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model: {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    from diffeo_engine.data.sources.safe import check_regular

    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise ValueError(f"--weights: expected a file, got {str(path)!r}")
    check_regular(path, "--weights", follow=True)  # a FIFO or folder is refused unread
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as error:
            raise ValueError(
                "--weights: reading .safetensors needs the safetensors package"
            ) from error
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"--weights: {path} is not a readable .safetensors file: {first[:200]}"
            ) from None
    else:
        state = _torch_load(path)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"--weights: expected a state dict in {path}, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"--weights: {path} does not fit the model: {error}") from error


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``; a file that is not a saved state dict is one line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"--weights: {path} is not a state dict of tensors: it holds pickled Python "
            "objects, which are not loaded (save model.state_dict() instead)"
        ) from None
    except (RuntimeError, EOFError, ValueError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--weights: {path} is not a file written by torch.save (or .safetensors): "
            f"{first[:200]}"
        ) from None


def _open_data(spec: str, resize=None):
    """The data source: :func:`diffeo_engine.data.sources.open_source`."""
    from diffeo_engine.data.sources import open_source

    return open_source(spec, resize=resize)


def _factory_parameters(spec: str) -> list[str] | None:
    """Keyword names the model's factory accepts (None: unknown or ``**kwargs``)."""
    import inspect

    prefix, sep, _ = spec.partition(":")
    if not sep:
        from diffeo_engine.models.registry import model_parameters

        return model_parameters(spec)
    if prefix in _REGISTRY_PREFIXES:
        return None
    try:
        parameters = inspect.signature(_import_factory(spec)).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def infer_model_args(spec: str, kwargs: dict, shape: tuple[int, int, int]) -> dict:
    """``in_channels`` and ``input_size`` from the data's ``(C, H, W)`` where the factory
    takes them and the user did not give them (LeNet on MNIST needs no ``--model-arg``)."""
    accepted = _factory_parameters(spec) or []
    C, H, W = shape
    inferred = {}
    if "in_channels" in accepted and "in_channels" not in kwargs:
        inferred["in_channels"] = C
    if "input_size" in accepted and "input_size" not in kwargs:
        inferred["input_size"] = H if H == W else (H, W)
    return inferred


def _noise_arg(text: str):
    if text == "matched":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--noise: expected 'matched' or a sigma >= 0, got {text!r}") from None


class Normalize:
    """``(x * scale - mean) / std`` per channel: the CLI's preprocessing."""

    def __init__(self, scale: float, mean: list[float] | None, std: list[float] | None) -> None:
        self.scale, self.mean, self.std = scale, mean, std

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = batch * self.scale if self.scale != 1.0 else batch
        shape = (1, -1) + (1,) * (batch.dim() - 2)
        if self.mean is not None:
            out = out - torch.tensor(self.mean, dtype=out.dtype, device=out.device).view(shape)
        if self.std is not None:
            out = out / torch.tensor(self.std, dtype=out.dtype, device=out.device).view(shape)
        return out

    def __repr__(self) -> str:
        return f"Normalize(scale={self.scale}, mean={self.mean}, std={self.std})"


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    table["float64"] = torch.float64
    if name not in table:
        raise ValueError(f"expected one of {sorted(table)}, got {name!r}")
    return table[name]


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``sensitivity`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "sensitivity",
        help="measure D_k, G_k, R_k layer by layer and write JSON/CSV/PNG",
        description=__doc__.split("\n\n")[0],
    )
    from diffeo_engine.models import list_models

    p.add_argument(
        "--model", required=True, metavar="NAME",
        help=f"a built-in model ({', '.join(list_models())}), torchvision:NAME, timm:NAME, "
        "or module.path:factory / file.py:factory; in_channels and input_size are taken "
        "from the data when the model has them",
    )  # fmt: skip
    p.add_argument(
        "--model-arg", action="append", metavar="KEY=VALUE", help="keyword for the factory"
    )
    p.add_argument(
        "--weights", help="state dict: torch.save file or .safetensors (default: none, an "
        "untrained network is measured)",
    )  # fmt: skip
    p.add_argument("--data", required=True, help=".npy/.npz, image folder, torchvision:NAME:ROOT")
    p.add_argument(
        "--layers", nargs="+", default=None, metavar="PATTERN",
        help="glob patterns over module names, 'type:Conv2d', 'leaves' (default), 'input'",
    )  # fmt: skip
    p.add_argument(
        "--T", type=float, nargs="+", default=None,
        help="temperature(s); default: the geometric middle of temperature_range",
    )  # fmt: skip
    p.add_argument("--cut", type=int, nargs="+", default=[3], help="cut-off(s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="sensitivity", help="folder for the JSON/CSV/PNG")
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument(
        "--resize", default=None, metavar="HxW",
        help="resize every image (folders of mixed sizes need it)",
    )  # fmt: skip
    p.add_argument("--reduce", default="full", choices=("full", "channel_mean", "spatial_mean"))
    p.add_argument(
        "--metric", default="euclidean", choices=("euclidean", "cosine"),
        help="squared distances (Petrini et al.) or normalised cosine (Ruderman et al. 2018)",
    )  # fmt: skip
    p.add_argument(
        "--estimator", default="mean", choices=("mean", "median"),
        help="streamed means with jackknife errors, or the median of Petrini et al. 2021",
    )  # fmt: skip
    p.add_argument("--per-image", type=int, default=1, help="perturbations per image (K)")
    p.add_argument("--noise", default="matched", help="'matched' or a fixed sigma")
    p.add_argument("--interp", default="bilinear", choices=("bilinear", "nearest"))
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--error-groups", type=int, default=10, help="jackknife groups")
    p.add_argument(
        "--scale", default="auto",
        help="multiply images by this before the model ('auto': 1/255 for uint8 data)",
    )  # fmt: skip
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="model dtype")
    p.add_argument("--autocast", default=None, choices=("float16", "bfloat16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--train-mode", action="store_true", help="keep the model in train mode")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="under torchrun: fail when a rank has not joined a collective after this long "
        "(default: $DIFFEO_ENGINE_DIST_TIMEOUT, else 300)",
    )  # fmt: skip
    p.set_defaults(run=run)
    return p


def _settings(args, shape: tuple[int, ...]) -> list[tuple[float, int]]:
    cuts = args.cut
    if args.T is not None:
        return [(T, cut) for cut in cuts for T in args.T]
    from diffeo_engine.physics import temperature_range

    side = math.sqrt(shape[-1] * shape[-2]) if len(shape) >= 2 else shape[-1]
    out = []
    for cut in cuts:
        T_min, T_max = temperature_range(side, cut)
        out.append((math.sqrt(T_min * T_max), cut))
    return out


def _scale_arg(text: str) -> float | None:
    """``--scale``: 'auto' (None) or a finite number > 0."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--scale: expected 'auto' or a finite number > 0, got {text!r}")
    return value


def _unique(flag: str, values: list) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{flag}: {value:g} given twice")
        seen.add(value)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag that can be judged without the data or the model, before any work: one
    line naming the flag as typed (``--T``, ``--scale``, ...)."""
    from diffeo_engine.data.sources import parse_resize
    from diffeo_engine.physics import (
        check_cut,
        check_float,
        check_int,
        check_noise,
        check_seed,
        check_T,
    )

    check_int("--batch-size", args.batch_size, 1)
    check_int("--error-groups", args.error_groups, 1)
    check_int("--per-image", args.per_image, 1)
    if args.limit is not None:
        check_int("--limit", args.limit, 2)
    check_seed(args.seed)
    check_noise(_noise_arg(args.noise))
    for T in args.T or []:
        check_T(T, 1, torch.device("cpu"))
    _unique("--T", args.T or [])
    for cut in args.cut:
        check_cut(cut, minimum=1 if args.T is not None else 2)
    _unique("--cut", args.cut)
    _scale_arg(args.scale)
    for value in args.mean or []:
        if not math.isfinite(value):
            raise ValueError(f"--mean: expected finite numbers, got {value}")
    for value in args.std or []:
        check_float("--std", value, 0.0, strict=True)
    parse_resize(args.resize)
    timeout = getattr(args, "dist_timeout", None)
    check_float("--dist-timeout", timeout, 0.0, strict=True, allow_none=True)


def _check_data_flags(
    args: argparse.Namespace, shape: tuple[int, ...], n: int, itemsize: int
) -> None:
    """The flags judged against the data: its size, its channels, the settings' fields, the
    memory one batch takes (before the model is built: it may size itself by the data)."""
    import warnings

    from diffeo_engine.physics import check_field, check_memory
    from diffeo_engine.sensitivity.meter import update_bytes

    if n < 2:
        raise ValueError(f"--data: expected at least two images, got {n}")
    C = shape[0]
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and len(values) not in (1, C):
            raise ValueError(
                f"{flag}: expected one value or one per channel ({C} for the data's shape "
                f"{tuple(shape)}), got {len(values)}"
            )
    settings = _settings(args, shape)
    if len(shape) == 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the measurement itself warns of folds
            for T, cut in settings:
                check_field(T, cut, shape[1], shape[2])
    batch = (min(args.batch_size, n), *shape)
    model_itemsize = (_dtype(args.dtype) or torch.float32).itemsize
    copies = 1 + 2 * len(settings) * args.per_image
    pixels = shape[1] * shape[2] if len(shape) == 3 else 0
    check_memory(
        "--resize" if args.resize is not None and pixels > batch[0] else "--batch-size",
        update_bytes(batch, copies, itemsize, model_itemsize), args.device,
        what=f"one batch of {batch[0]} image(s) of {'x'.join(map(str, shape))} in "
        f"{copies} copies",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the ``sensitivity`` subcommand (under torchrun: this rank's share); exit status."""
    from diffeo_engine.distributed import DistributedError, distributed_session

    check_flags(args)
    _check_out_folder(Path(args.out))
    timeout = getattr(args, "dist_timeout", None)
    try:
        with distributed_session(args.device, timeout_s=timeout) as ctx:
            return _run(args, ctx)
    except DistributedError as error:
        print(f"diffeo-engine sensitivity: error: {error}", file=sys.stderr)
        return 1


def _check_out_folder(out: Path) -> None:
    """Before any work: ``--out`` must be a folder we can create or write into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    for name in ("sensitivity.json", "sensitivity.csv", "sensitivity.png"):
        if (out / name).is_dir():
            raise ValueError(f"--out: {out / name} is a folder; it would be overwritten by a file")


def _say(ctx, text: str) -> None:
    if ctx.is_main:
        print(f"sensitivity: {text}", file=sys.stderr)


def _model(args: argparse.Namespace, model_args: dict, inferred: dict, shape) -> nn.Module:
    """The model with its weights; its errors name the flag they come from (a keyword the
    factory refuses: ``--model-arg``, or ``--data`` where it was taken from the data)."""
    try:
        model = build_model(args.model, model_args, seed=args.seed)
    except (TypeError, ValueError) as error:
        head = str(error).partition(": ")[0]
        if head in inferred and head not in _parse_kwargs(args.model_arg):
            raise type(error)(f"--data: {error} ({head} from the data's shape {shape})") from None
        if head in model_args:
            raise type(error)(f"--model-arg: {error}") from None
        raise
    if args.weights is not None:
        load_weights(model, args.weights)
    return model


def _notes(args: argparse.Namespace, ctx, n: int, inferred: dict, shape) -> None:
    """What the user should know, said once every flag has been checked."""
    if n < args.error_groups:
        _say(
            ctx,
            f"warning: {n} images for {args.error_groups} jackknife groups: the error bars "
            f"need at least {args.error_groups} images (use more images or --error-groups)",
        )
    if inferred:
        shown = ", ".join(f"{k}={v}" for k, v in inferred.items())
        _say(ctx, f"{args.model}: {shown} (from the data's shape {shape})")
    if args.weights is None:
        _say(
            ctx,
            f"no --weights: measuring an untrained {args.model} (its initial weights, "
            f"seed {args.seed})",
        )


def _run(args: argparse.Namespace, ctx) -> int:
    from diffeo_engine.sensitivity.meter import SensitivityMeter

    noise = _noise_arg(args.noise)
    device = torch.device(args.device)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # one GPU per rank
    source = _open_data(args.data, getattr(args, "resize", None))
    shape = tuple(source.shape)
    n = len(source) if args.limit is None else min(args.limit, len(source))
    _check_data_flags(args, shape, n, source.dtype.itemsize)
    model_args = _parse_kwargs(args.model_arg)
    inferred = infer_model_args(args.model, model_args, shape)
    model_args = {**inferred, **model_args}
    model = _model(args, model_args, inferred, shape)
    model = model.to(device=device, dtype=_dtype(args.dtype))
    model.train(args.train_mode)
    first = source.batch(0, 1)
    scale = _scale_arg(args.scale)
    if scale is None:
        scale = 1.0 / 255.0 if first.dtype == torch.uint8 else 1.0
    preprocess = None
    if scale != 1.0 or args.mean is not None or args.std is not None:
        preprocess = Normalize(scale, args.mean, args.std)
    settings = _settings(args, tuple(source.shape))
    # whole batches per rank: each image meets the same batch, hence the same arithmetic,
    # as in a single process
    batches = ctx.shard(math.ceil(n / args.batch_size))
    share = min(batches.stop * args.batch_size, n) - batches.start * args.batch_size
    meter = SensitivityMeter(
        model,
        layers=args.layers,
        settings=settings,
        noise=noise,
        reduce=args.reduce,
        metric=args.metric,
        estimator=args.estimator,
        seed=args.seed,
        perturbations_per_image=args.per_image,
        interp=args.interp,
        backend=args.backend,
        autocast_dtype=_dtype(args.autocast),
        channels_last=args.channels_last,
        progress=False if args.no_progress or not ctx.is_main else share,
        error_groups=args.error_groups,
        preprocess=preprocess,
    )
    with meter:  # the hooks come off whatever happens
        _notes(args, ctx, n, inferred, shape)  # every flag is checked: now the notes
        for index in batches:
            start = index * args.batch_size
            stop = min(start + args.batch_size, n)
            meter.update(source.batch(start, stop).to(device), start=start)
    result = meter.compute(distributed=ctx)
    if not ctx.is_main:
        return 0
    result.settings.update(
        {
            "command": "sensitivity",
            "model_spec": args.model,
            "model_args": model_args,
            "weights": args.weights,
            "data": args.data,
            "limit": args.limit,
            "batch_size": args.batch_size,
            "processes": ctx.world_size,
        }
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "sensitivity.json")
    result.to_csv(out / "sensitivity.csv")
    written = ["sensitivity.json", "sensitivity.csv"]
    if not args.no_plot:
        try:
            result.plot(out / "sensitivity.png")
            written.append("sensitivity.png")
        except ImportError as error:
            print(f"sensitivity: no plot ({error})", file=sys.stderr)
    print(result.table())
    ranks = f" on {ctx.world_size} processes" if ctx.active else ""
    print(f"{n} images{ranks}, {len(settings)} setting(s); wrote {', '.join(written)} to {out}")
    return 0
