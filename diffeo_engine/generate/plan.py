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
from diffeo_engine.physics import check_cut, check_images, check_interp, check_seed, check_T
from diffeo_engine.reference import check_noise
from diffeo_engine.versions import versions

DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_BYTES = 64 << 20
MAX_DEFAULT_SHARD = 65536
# the library versions a resume must match (their images could differ)
PINNED_VERSIONS = ("diffeo_engine", "torch")


def _resolved_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return value


def _normalise_noise(noise) -> str | float:
    if noise == "none":
        return "none"
    sigma = check_noise(noise)
    return "matched" if sigma is None else sigma


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


def _perturb(images, ids, params: dict, device, backend: str) -> dict[str, torch.Tensor]:
    """The outputs for ``images`` with ``ids``: exactly the ops calls a user would make."""
    common = dict(
        seed=params["seed"],
        ids=ids,
        interp=params["interp"],
        out_dtype=DTYPES[params["dtype"]],
        backend=backend,
    )
    if params["noise"] == "none":
        return {"tau": ops.deform(images, params["T"], params["cut"], **common)}
    tau, noisy = ops.perturb(images, params["T"], params["cut"], noise=params["noise"], **common)
    return {"tau": tau, "noisy": noisy}


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
                    "size; the output is damaged (run `diffeo-engine verify`)"
                )


def _prepare(
    source, out, resume, T, cut, per_image, seed, noise, dtype, shard_size, interp, resize,
    batch_size, device, backend,
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
    batch_size = _check_positive_int("batch_size", batch_size)
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
    for name, value in (("T", T), ("cut", cut), ("per_image", per_image), ("seed", seed)):
        if value is None:
            raise ValueError(f"{name}: required (or resume=True / --resume to take the run's)")
    if source is None:
        raise ValueError("input: required (or resume=True / --resume to take the run's)")

    # validate every parameter before touching the disk
    check_T(T, 1, torch.device("cpu"))
    T = float(T)
    cut = check_cut(cut, maximum=rng.MAX_CUT)
    per_image = _check_positive_int("per_image", per_image)
    seed = check_seed(seed)
    noise = _normalise_noise("matched" if noise is None else noise)
    dtype = "uint8" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
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
    image_bytes = C * H * W * DTYPES[dtype].itemsize
    if shard_size is None:
        shard_size = max(1, min(MAX_DEFAULT_SHARD, DEFAULT_SHARD_BYTES // image_bytes))
    shard_size = _check_positive_int("shard_size", shard_size)

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
    total = len(source) * per_image
    n_shards = math.ceil(total / shard_size)

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
