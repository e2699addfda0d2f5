"""What a run will do, checked before anything is written: every parameter validated, the
source opened and fingerprinted, an existing run in ``out`` compared (or taken, on resume),
the manifest to write composed. Also the one place the outputs are computed (``_perturb``:
exactly the ``ops`` calls a user would make), shared by the run and ``verify``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffeo_engine import ops, rng
from diffeo_engine.data.sources import ImageSource, open_source, parse_resize
from diffeo_engine.generate.files import _is_ours
from diffeo_engine.generate.manifest import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    _kinds,
    read_manifest,
)
from diffeo_engine.physics import (
    check_cut,
    check_finite,
    check_images,
    check_int,
    check_interp,
    check_seed,
    check_T,
)
from diffeo_engine.reference import check_noise
from diffeo_engine.versions import versions

DEFAULT_BATCH_SIZE = 256
# Default shard: 16 MiB per file (about a second of CPU work for small images), and at least
# MIN_DEFAULT_SHARDS shards, so that an interrupted run loses little (MNIST makes several).
DEFAULT_SHARD_BYTES = 16 << 20
MIN_DEFAULT_SHARDS = 8
MAX_DEFAULT_SHARD = 65536
# A plan is refused beyond this many shards (the manifest lists each one) ...
MAX_SHARDS = 100_000
# ... or when ids i * per_image + k would reach 2**63 (ids are int64).
ID_LIMIT = 1 << 63
# Rows sampled to tell a float source in [0, 1] or [-1, 1] (which uint8 output would ruin).
RANGE_SAMPLE = 64
# the library versions a resume must match (their images could differ)
PINNED_VERSIONS = ("diffeo_engine", "torch")


def _resolved_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


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


def _check_uint8_range(source: ImageSource) -> None:
    """Refuse uint8 output of float images that are not on the 0..255 scale (sampled rows):
    rounding images in [0, 1] to integers would leave only 0 and 1, and negative pixels
    would be clamped to 0."""
    n = len(source)
    rows = sorted({round(i * (n - 1) / max(RANGE_SAMPLE - 1, 1)) for i in range(RANGE_SAMPLE)})
    values = torch.cat([source.batch(i, i + 1).flatten() for i in rows[:n]]).double()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0 or 0 < high <= 1:
        raise ValueError(
            f"dtype: the source {source.spec} holds floats in [{low:.3g}, {high:.3g}] (sampled "
            f"rows); uint8 output keeps the 0..255 scale and would "
            f"{'clamp negative pixels to 0' if low < 0 else 'round every pixel to 0 or 1'}. "
            "Scale the source to 0..255, or pass dtype='float32' (--dtype float32)"
        )


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


def _perturb(
    images, ids, params: dict, device, backend: str, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """The outputs for ``images`` with ``ids``: exactly the ops calls a user would make."""
    common = dict(
        seed=params["seed"],
        ids=ids,
        interp=params["interp"],
        out_dtype=DTYPES[params["dtype"]],
        backend=backend,
        allow_nonfinite=allow_nonfinite,
    )
    if params["noise"] == "none":
        return {"tau": ops.deform(images, params["T"], params["cut"], **common)}
    tau, noisy = ops.perturb(images, params["T"], params["cut"], noise=params["noise"], **common)
    return {"tau": tau, "noisy": noisy}


def _check_source_finite(images: torch.Tensor, ids: torch.Tensor, per_image: int) -> None:
    """Refuse NaN/inf source pixels (``physics.check_finite``), naming the source image."""
    if not images.is_floating_point():
        return
    try:
        check_finite(images, "input")
    except ValueError:
        for row in range(len(images)):  # the first offending source image, by its index
            check_finite(images[row : row + 1], f"input: source image {int(ids[row]) // per_image}")
        raise


def _batch_for_ids(source: ImageSource, ids: torch.Tensor, per_image: int) -> torch.Tensor:
    """The source image of every id (each repeated as often as it appears)."""
    index = torch.div(ids, per_image, rounding_mode="floor")
    lo, hi = int(index.min()), int(index.max()) + 1
    if hi - lo <= 2 * len(ids):
        return source.batch(lo, hi)[index - lo]
    return torch.cat([source.batch(int(i), int(i) + 1) for i in index])


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
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            path = out / entry["name"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ValueError(
                    f"out: {path} is listed in {MANIFEST} but is missing or has the wrong "
                    f"size; repair it with `diffeo-engine verify {out} --repair`"
                )


def _prepare(
    source, out, resume, T, cut, per_image, seed, noise, dtype, shard_size, interp, resize,
    batch_size, device, backend, allow_nonfinite=False,
):  # fmt: skip
    """Validate every parameter against ``out`` (read only): ``(source, old manifest or
    None, manifest to write, batch_size, device, backend)``."""
    old = None
    if (out / MANIFEST).exists():
        old = read_manifest(out)
    elif resume:
        raise ValueError(f"resume: {out} holds no run to resume (no {MANIFEST})")
    run_before = old.get("execution", {}) if old is not None else {}
    if batch_size is None:
        batch_size = run_before.get("batch_size", DEFAULT_BATCH_SIZE)
    batch_size = check_int("batch_size", batch_size)
    if device is None:
        cuda = torch.cuda.is_available()
        device = run_before.get("device", "cuda" if cuda else "cpu")
        device = device if cuda or not str(device).startswith("cuda") else "cpu"
    device = _check_device(device)
    backend = run_before.get("backend", "auto") if backend is None else backend
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
    if resume:
        given = dict(
            T=T,
            cut=cut,
            per_image=per_image,
            seed=seed,
            noise=noise,
            dtype=dtype,
            shard_size=shard_size,
            interp=interp,
            resize=resize,
        )
        for key, value in given.items():
            if value is None:
                given[key] = old["parameters"][key]
        T, cut, per_image, seed = given["T"], given["cut"], given["per_image"], given["seed"]
        noise, dtype, shard_size = given["noise"], given["dtype"], given["shard_size"]
        interp, resize = given["interp"], given["resize"]
        if source is None:
            source = old["source"]["spec"]
    required = {"input": source, "T": T, "cut": cut, "per_image": per_image, "seed": seed}
    missing = [name for name, value in required.items() if value is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: required (or resume=True / --resume to take the run's)"
        )

    # validate every parameter before touching the disk
    check_T(T, 1, torch.device("cpu"))
    T = float(T)
    cut = check_cut(cut, maximum=rng.MAX_CUT)
    per_image = check_int("per_image", per_image)
    seed = check_seed(seed)
    dtype = "uint8" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    noise = _normalise_noise("matched" if noise is None else noise, dtype)
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
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
    else:
        source = open_source(source, resize=resize)
    if len(source) == 0:
        raise ValueError(f"input: {source.spec} holds no images")
    C, H, W = source.shape
    check_images(source.batch(0, 1), "input")
    total = len(source) * per_image
    if total > ID_LIMIT:
        raise ValueError(
            f"per_image: {len(source)} images x per_image {per_image} = {total} ids, but ids "
            f"(i * per_image + k, int64) must stay below 2**63; use a smaller per_image"
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
        "T": T,
        "cut": cut,
        "per_image": per_image,
        "seed": seed,
        "noise": noise,
        "dtype": dtype,
        "shard_size": shard_size,
        "interp": interp,
        "resize": list(resize) if resize else None,
    }
    described = source.describe()

    if old is not None:
        if old["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"out: {out} was written with manifest format {old['format_version']} (a "
                "sampled source fingerprint, which cannot vouch for the source); it can be "
                "read and verified, not resumed. Use another --out"
            )
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
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a directory")
        if out.is_dir():
            foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
            if foreign:
                raise ValueError(
                    f"out: {out} is not empty and holds no {MANIFEST} (found "
                    f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                    "choose a new or empty directory"
                )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ids": "id = source_index * per_image + k, k in [0, per_image)",
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
