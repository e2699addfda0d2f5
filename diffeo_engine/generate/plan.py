"""What a run will do, checked before anything is written: every parameter validated, the
source and its labels opened and fingerprinted, every setting tried on one image through the
very ``ops`` calls of the run (so whatever ``ops`` refuses -- an absurd ``T``, a ``cut`` too
large for the images, a backend that is not there, outputs beyond the dtype -- is refused
before the manifest exists), an existing run in ``out`` compared (or taken, on resume), the
manifest to write composed. Also the one place the outputs are computed (:func:`_perturb`:
exactly the ``ops`` calls a user would make, one per setting), shared by the run,
``verify`` and ``load_generated(check=True)``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffeo_engine import ops, rng
from diffeo_engine.data.sources import ImageSource, open_source, parse_resize
from diffeo_engine.data.sources.labels import reopen_argument
from diffeo_engine.data.sources.safe import check_regular
from diffeo_engine.generate.files import _is_ours
from diffeo_engine.generate.manifest import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    ID_LIMIT,
    IDS,
    MANIFEST,
    MAX_SHARDS,
    _kinds,
    file_kinds,
    labels_of,
    locate,
    read_manifest,
    settings_of,
)
from diffeo_engine.physics import (
    OutputOverflowError,
    check_cut,
    check_finite,
    check_images,
    check_int,
    check_interp,
    check_scalar_T,
    check_seed,
    check_T,
    check_uint8_scale,
)
from diffeo_engine.reference import check_noise
from diffeo_engine.versions import versions

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SHARD_BYTES",
    "MAX_DEFAULT_SHARD",
    "Recipe",
    "default_shard_size",
    "labels_for",
    "make_settings",
]

DEFAULT_BATCH_SIZE = 256
# Default shard: 16 MiB per file (about a second of CPU work for small images), and at least
# MIN_DEFAULT_SHARDS shards, so that an interrupted run loses little (MNIST makes several).
DEFAULT_SHARD_BYTES = 16 << 20
MIN_DEFAULT_SHARDS = 8
MAX_DEFAULT_SHARD = 65536
# Rows sampled to tell a float source in [0, 1] or [-1, 1] (which uint8 output would ruin).
RANGE_SAMPLE = 64
# the library versions a resume must match (their images could differ)
PINNED_VERSIONS = ("diffeo_engine", "torch")


@dataclass(frozen=True)
class Recipe:
    """How the images of a data set are made, from its manifest: ``settings`` in id order,
    the source ``length``, ``per_image`` and the ``ops`` arguments."""

    settings: tuple[tuple[float, int], ...]
    length: int
    per_image: int
    seed: int
    noise: str | float
    dtype: str
    interp: str
    kinds: tuple[str, ...]
    files: tuple[str, ...]

    @classmethod
    def of(cls, manifest: dict) -> Recipe:
        params = manifest["parameters"]
        return cls(
            settings=tuple(settings_of(manifest)),
            length=manifest["source"]["length"],
            per_image=params["per_image"],
            seed=params["seed"],
            noise=params["noise"],
            dtype=params["dtype"],
            interp=params["interp"],
            kinds=tuple(manifest["kinds"]),
            files=tuple(file_kinds(manifest)),
        )

    def locate(self, ids):
        """``(setting, source_index, k)`` of int64 ids."""
        return locate(ids, self.length, self.per_image)


def _resolved_backend(backend: str, device: torch.device, source_dtype: str) -> str:
    """What ``ops`` runs for the run's images (``source_dtype``: the manifest's)."""
    return ops.resolved_backend(device, getattr(torch, source_dtype), backend)


def _normalise_noise(noise, dtype: str) -> str | float:
    if noise == "none":
        return "none"
    sigma = check_noise(noise)
    if sigma is None:
        return "matched"
    limit = torch.finfo(torch.float16 if dtype == "float16" else torch.float32).max
    if sigma > limit:
        where = "float32 (the computation)" if dtype != "float16" else "float16 (--dtype)"
        raise ValueError(
            f"noise: expected a sigma that {where} can hold (<= {limit:.4g}), got {sigma:g}"
        )
    return sigma


def _values(name: str, value) -> list:
    """One value or a non-empty sequence of them, as a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value]
    if not value:
        raise ValueError(f"{name}: expected a value or a non-empty list of them, got {value!r}")
    return list(value)


def make_settings(T, cut, settings=None) -> list[tuple[float, int]]:
    """The ``(T, cut)`` settings of a run, checked: every ``cut`` with every ``T``
    (``cut`` outer, ``T`` inner, in the order given), or ``settings=[(T, cut), ...]``."""
    if settings is not None:
        if T is not None or cut is not None:
            raise ValueError("settings: give either T and cut, or settings=[(T, cut), ...]")
        pairs = []
        for item in _values("settings", settings):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"settings: expected (T, cut) pairs, got {item!r}")
            pairs.append(tuple(item))
    else:
        pairs = [(t, c) for c in _values("cut", cut) for t in _values("T", T)]
    out: list[tuple[float, int]] = []
    for t, c in pairs:
        if torch.is_tensor(t):
            raise TypeError("T: expected a float per setting, got a tensor")
        check_T(t, 1, torch.device("cpu"))  # finite, >= 0, held by float32
        pair = (check_scalar_T(t), check_cut(c, maximum=rng.MAX_CUT))
        if pair in out:
            raise ValueError(f"T, cut: the setting (T={pair[0]:g}, cut={pair[1]}) is given twice")
        out.append(pair)
    return out


def _check_uint8_range(source: ImageSource) -> None:
    """Refuse uint8 output of float images that are not on the 0..255 scale (sampled rows;
    :func:`physics.check_uint8_scale`, negative pixels refused too: a whole data set)."""
    n = len(source)
    rows = sorted({round(i * (n - 1) / max(RANGE_SAMPLE - 1, 1)) for i in range(RANGE_SAMPLE)})
    values = torch.cat([source.batch(i, i + 1).flatten() for i in rows[:n]]).double()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return
    check_uint8_scale(
        "dtype", float(values.min()), float(values.max()),
        where=f"the source {source.spec} holds floats (sampled rows) in",
        fix="scale the source to 0..255, or pass dtype='float32' (--dtype float32)",
        refuse_negative=True,
    )  # fmt: skip


def default_shard_size(image_bytes: int, total: int) -> int:
    """Ids per shard by bytes: ``DEFAULT_SHARD_BYTES`` per file (at most
    ``MAX_DEFAULT_SHARD`` ids), fewer where that would leave under ``MIN_DEFAULT_SHARDS``."""
    by_bytes = max(1, min(MAX_DEFAULT_SHARD, DEFAULT_SHARD_BYTES // image_bytes))
    return max(1, min(by_bytes, math.ceil(total / MIN_DEFAULT_SHARDS)))


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but is not available")
    return device


def _check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in ops.BACKENDS:
        raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
    return backend


def _perturb(
    images: torch.Tensor,
    ids: torch.Tensor,
    recipe: Recipe,
    backend: str,
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor]:
    """The outputs for ``images`` with ``ids``: exactly the ``ops`` call a user would make,
    each image with its setting's ``T`` and ``cut`` (one per image when the ids span
    several settings: an image's output does not depend on the others of its batch)."""
    setting = torch.div(ids, recipe.length * recipe.per_image, rounding_mode="floor").cpu()
    Ts = sorted({T for T, _ in recipe.settings})
    cuts = sorted({cut for _, cut in recipe.settings})
    T = Ts[0] if len(Ts) == 1 else _per_image(recipe, setting, 0, torch.float32, images.device)
    cut = cuts[0] if len(cuts) == 1 else _per_image(recipe, setting, 1, torch.int64, "cpu")
    common = dict(
        seed=recipe.seed,
        ids=ids,
        interp=recipe.interp,
        out_dtype=DTYPES[recipe.dtype],
        backend=backend,
        allow_nonfinite=allow_nonfinite,
    )
    if recipe.noise == "none":
        return {"tau": ops.deform(images, T, cut, **common)}
    tau, noisy = ops.perturb(images, T, cut, noise=recipe.noise, **common)
    return {"tau": tau, "noisy": noisy}


def _per_image(recipe: Recipe, setting: torch.Tensor, field: int, dtype, device) -> torch.Tensor:
    """Each image's ``T`` (``field`` 0) or ``cut`` (1) from its setting."""
    values = torch.tensor([s[field] for s in recipe.settings], dtype=dtype)
    return values[setting].to(device)


def _check_source_finite(images: torch.Tensor, ids: torch.Tensor, recipe: Recipe) -> None:
    """Refuse NaN/inf source pixels (``physics.check_finite``), naming the source image."""
    if not images.is_floating_point():
        return
    try:
        check_finite(images, "input")
    except ValueError:
        rows = recipe.locate(ids)[1]
        for row in range(len(images)):  # the first offending source image, by its index
            check_finite(images[row : row + 1], f"input: source image {int(rows[row])}")
        raise


def _batch_for_ids(source: ImageSource, ids: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The source image of every id (each repeated as often as it appears), read in runs
    of consecutive source rows."""
    index = recipe.locate(ids)[1]
    runs = []
    start = 0
    values = index.tolist()
    for j in range(1, len(values) + 1):  # split where the rows stop being near-consecutive
        if j == len(values) or not 0 <= values[j] - values[j - 1] <= 1:
            runs.append((start, j))
            start = j
    parts = []
    for a, b in runs:
        lo, hi = values[a], values[b - 1] + 1
        parts.append(source.batch(lo, hi)[index[a:b] - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def labels_for(ids, recipe: Recipe, values: np.ndarray) -> np.ndarray:
    """The labels of ``ids`` (int64): their source images' labels."""
    return values[np.asarray(recipe.locate(np.asarray(ids, dtype=np.int64))[1])]


def _refuse_differences(out: Path, old: dict, new: dict, what: str) -> None:
    diffs = [
        f"{key}: the run has {old.get(key)!r}, this call {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    if diffs:
        raise ValueError(
            f"out: {out} holds a run with different {what}; nothing was written. "
            + "; ".join(diffs)
            + ". Use another --out, or the run's own values to resume it."
        )


def _check_listed_shards(out: Path, manifest: dict) -> None:
    """Every listed file is there as a regular file of the listed size (not hashed)."""
    repair = f"repair it with `diffeo-engine verify {out} --repair`"
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            path = out / entry["name"]
            try:
                info = check_regular(path, "out", follow=False)
            except FileNotFoundError:
                raise ValueError(
                    f"out: {path} is listed in {MANIFEST} but missing; {repair}"
                ) from None
            except ValueError as error:
                raise ValueError(f"{error}; {repair}") from None
            if info.st_size != entry["bytes"]:
                raise ValueError(
                    f"out: {path} is listed in {MANIFEST} but has the wrong size; {repair}"
                )


def _dry_run(source: ImageSource, recipe: Recipe, device, backend, allow_nonfinite) -> None:
    """Every setting on the first source image, through the run's own ``ops`` calls: what
    ``ops`` refuses is refused here, before anything is written."""
    ids = torch.tensor(
        [s * recipe.length * recipe.per_image for s in range(len(recipe.settings))],
        dtype=torch.int64,
    )
    images = source.batch(0, 1).expand(len(ids), *source.shape).contiguous()
    if not allow_nonfinite:
        _check_source_finite(images[:1], ids[:1], recipe)
    try:  # ops refuses outputs that overflow the dtype, from the kernels' own count
        _perturb(images.to(device), ids.to(device), recipe, backend, allow_nonfinite)
    except OutputOverflowError as error:  # image s is setting s
        T, cut = recipe.settings[error.image]
        raise ValueError(
            f"dtype: the outputs of source image 0 at T={T:g}, cut={cut} overflow "
            f"{recipe.dtype} (inf); nothing was written. Use a smaller --noise sigma, "
            "smaller pixel values, or --dtype float32"
        ) from None


def _prepare(
    source, out: Path, *, resume: bool, T, cut, settings, per_image, seed, noise, dtype,
    shard_size, interp, resize, batch_size, device, backend, allow_nonfinite, labels,
):  # fmt: skip
    """Validate every parameter against ``out`` (read only) and try every setting on one
    image: ``(source, old manifest or None, manifest to write, batch_size, device,
    backend)``."""
    old = None
    if (out / MANIFEST).exists() or (out / MANIFEST).is_symlink():
        old = read_manifest(out)
        if old["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"out: {out} was written with manifest format {old['format_version']}; it can "
                f"be read and verified, not resumed or repaired (this library writes format "
                f"{FORMAT_VERSION}). Use another --out"
            )
    elif resume:
        raise ValueError(f"resume: {out} holds no run to resume (no {MANIFEST})")
    run_before = old["execution"] if old is not None else {}
    if batch_size is None:
        batch_size = run_before.get("batch_size", DEFAULT_BATCH_SIZE)
    batch_size = check_int("batch_size", batch_size)
    if device is None:
        cuda = torch.cuda.is_available()
        device = run_before.get("device", "cuda" if cuda else "cpu")
        device = device if cuda or not str(device).startswith("cuda") else "cpu"
    device = _check_device(device)
    backend = _check_backend(run_before.get("backend", "auto") if backend is None else backend)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    if resume:
        given = dict(
            per_image=per_image, seed=seed, noise=noise, dtype=dtype, shard_size=shard_size,
            interp=interp, resize=resize,
        )  # fmt: skip
        for key, value in given.items():
            if value is None:
                given[key] = old["parameters"][key]
        per_image, seed, noise = given["per_image"], given["seed"], given["noise"]
        dtype, shard_size = given["dtype"], given["shard_size"]
        interp, resize = given["interp"], given["resize"]
        if T is None and cut is None and settings is None:
            settings = settings_of(old)
        elif settings is None:  # the run's values for what is not given
            run_settings = settings_of(old)
            T = list(dict.fromkeys(t for t, _ in run_settings)) if T is None else T
            cut = list(dict.fromkeys(c for _, c in run_settings)) if cut is None else cut
        if source is None:
            source = old["source"]["spec"]
        if labels is None and not isinstance(source, ImageSource):
            labels = reopen_argument(labels_of(old))
    required = {"input": source, "T": T, "cut": cut, "per_image": per_image, "seed": seed}
    if settings is not None:
        required.pop("T"), required.pop("cut")
    missing = [name for name, value in required.items() if value is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: required (or resume=True / --resume to take the run's)"
        )

    # validate every parameter before touching the disk
    chosen = make_settings(T, cut, settings)
    per_image = check_int("per_image", per_image)
    seed = check_seed(seed)
    dtype = "uint8" if dtype is None else dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    noise = _normalise_noise("matched" if noise is None else noise, dtype)
    if allow_nonfinite and dtype == "uint8":
        raise ValueError(
            "allow_nonfinite: uint8 output cannot hold NaN or inf (it would write 0 or 255 "
            "in their place); pass dtype='float16' or 'float32' (--dtype) with it"
        )
    interp = check_interp("bilinear" if interp is None else interp)
    resize = parse_resize(resize)
    if isinstance(source, ImageSource):
        if resize is not None and resize != source.resize:
            raise ValueError("resize: give it to open_source() when passing an ImageSource")
        resize = source.resize
        if labels is not None:
            source.attach_labels(labels)
    else:
        source = open_source(source, resize=resize, labels=labels)
    if len(source) == 0:
        raise ValueError(f"input: {source.spec} holds no images")
    C, H, W = source.shape
    check_images(source.batch(0, 1), "input")
    source.labels  # noqa: B018 -- found and counted now: a mismatch is refused here
    total = len(chosen) * len(source) * per_image
    if total >= ID_LIMIT:
        raise ValueError(
            f"per_image: {len(chosen)} settings x {len(source)} images x per_image "
            f"{per_image} = {total} ids, but ids (int64) must stay below 2**63; use a "
            "smaller per_image"
        )
    if dtype == "uint8" and source.dtype.is_floating_point:
        _check_uint8_range(source)
    image_bytes = C * H * W * DTYPES[dtype].itemsize
    if shard_size is None:
        shard_size = default_shard_size(image_bytes, total)
    shard_size = check_int("shard_size", shard_size)
    n_shards = math.ceil(total / shard_size)
    if n_shards > MAX_SHARDS:
        raise ValueError(
            f"shard_size: {total} ids in shards of {shard_size} make {n_shards} shards, more "
            f"than {MAX_SHARDS} (each is listed in the manifest); pass a larger shard_size "
            "(--shard-size) or a smaller per_image"
        )

    params = {
        "settings": [{"T": t, "cut": c} for t, c in chosen],
        "per_image": per_image,
        "seed": seed,
        "noise": noise,
        "dtype": dtype,
        "shard_size": shard_size,
        "interp": interp,
        "resize": list(resize) if resize else None,
    }
    recipe = Recipe(
        settings=tuple(chosen), length=len(source), per_image=per_image, seed=seed,
        noise=noise, dtype=dtype, interp=interp, kinds=tuple(_kinds(noise)), files=(),
    )  # fmt: skip
    _dry_run(source, recipe, device, backend, allow_nonfinite)
    described = source.describe()

    if old is not None:
        old_source = {k: v for k, v in old["source"].items() if k != "spec"}
        new_source = {k: v for k, v in described.items() if k != "spec"}
        if old_source.get("fingerprint") != new_source.get("fingerprint"):
            raise ValueError(
                f"out: {out} holds another run, made from a different source "
                f"({old['source']['spec']}, {old_source.get('fingerprint')}); this input is "
                f"{described['spec']} ({described['fingerprint']}); nothing was written. "
                "Use another --out."
            )
        _refuse_differences(out, old_source, new_source, "source")
        _refuse_differences(out, old["parameters"], params, "parameters")
        found = versions()
        _refuse_differences(
            out,
            {k: old["versions"].get(k) for k in PINNED_VERSIONS},
            {k: found[k] for k in PINNED_VERSIONS},
            "library versions (their images could differ)",
        )
        _check_listed_shards(out, old)
        manifest = old
    else:
        if out.is_symlink() and not out.is_dir():
            raise ValueError(f"out: {out} is a symbolic link to something that is no folder")
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a directory")
        if out.is_dir():
            foreign = sorted(p.name for p in os.scandir(out) if not _is_ours(p.name))
            if foreign:
                raise ValueError(
                    f"out: {out} is not empty and holds no {MANIFEST} (found "
                    f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                    "choose a new or empty directory"
                )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ids": IDS[FORMAT_VERSION],
            "parameters": params,
            "source": described,
            "versions": versions(),
            "execution": {"batch_size": batch_size, "device": str(device), "backend": backend},
            "kinds": _kinds(noise),
            "image_shape": [C, H, W],
            "total_images": total,
            "n_shards": n_shards,
            "complete": False,
            "shards": [],
        }

    return source, old, manifest, batch_size, device, backend
