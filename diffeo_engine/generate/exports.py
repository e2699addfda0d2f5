"""``export``: a generated data set in the layouts other pipelines read.

* ``cifar-c`` -- the CIFAR-10-C layout: per kind one ``KIND.npy`` (``tau.npy``,
  ``noisy.npy``) of NHWC uint8 images, every id in order, so the settings' blocks are
  stacked in setting order (row = id = ``(setting * length + source_index) * per_image +
  k``); ``labels.npy`` (int64, one per row) when the data set has labels; and
  ``export.json`` saying what each block is (its setting's ``T`` and ``cut``, its rows).
  Plain ``np.load`` reads it.
* ``webdataset`` -- tar shards ``data-NNNNN.tar`` (one per data set shard), one sample per
  id, key ``%0Nd`` of the id: ``KEY.tau.png`` / ``KEY.noisy.png`` (uint8, lossless PNG by
  Pillow; or ``.npy``, the ``(C, H, W)`` array as stored, with ``image="npy"``),
  ``KEY.cls`` (the label as decimal text, when there are labels) and ``KEY.json`` (id,
  source index, k, setting, T, cut, seed, noise, interp, label and class name). Members
  carry no time stamps or owners, so the same data set exports to the same bytes.

An export reads each shard once, checking its sha256 against the manifest as it goes (a
damaged data set is refused, naming the file: repair it first); it is written into a
hidden temporary folder beside ``dest`` and renamed to ``dest`` when whole, and it never
overwrites: ``dest`` must not exist.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from diffeo_engine.generate.files import CHUNK, ShardFileProblem, npy_header, open_listed
from diffeo_engine.generate.manifest import LABEL, check_out_path, labels_of, read_manifest
from diffeo_engine.generate.plan import Recipe
from diffeo_engine.progress import Progress

__all__ = ["EXPORT_INFO", "FORMATS", "IMAGE_FORMATS", "export"]

FORMATS = ("cifar-c", "webdataset")
IMAGE_FORMATS = ("png", "npy")
EXPORT_INFO = "export.json"


def _check_dest(dest) -> Path:
    """``dest``: a new path in an existing writable folder (an export never overwrites)."""
    dest = check_out_path(dest, "dest")
    if os.path.lexists(dest):
        raise FileExistsError(f"dest: {dest} exists; an export never overwrites, choose a new path")
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"dest: {parent} is not an existing folder to create {dest} in")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"dest: {parent} is not writable")
    return dest


def _import_pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "image: PNG export needs Pillow (pip install 'diffeo-engine[images]'), or pass "
            "image='npy' (--image npy)"
        ) from error
    return Image


def export(
    out: str | Path,
    dest: str | Path,
    *,
    format: str,
    image: str | None = None,
    progress: bool | None = None,
) -> dict:
    """Write the complete data set in ``out`` to ``dest`` in ``format`` (``"cifar-c"`` or
    ``"webdataset"``; ``image`` ``"png"`` (default for uint8) or ``"npy"`` for the latter);
    returns what ``dest/export.json`` records. See the module docstring for the layouts."""
    out = check_out_path(out)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    manifest = read_manifest(out)
    dest = _check_dest(dest)
    if not manifest["complete"]:
        raise ValueError(
            f"out: {out} is incomplete ({len(manifest['shards'])} of {manifest['n_shards']} "
            "shards); finish it with `diffeo-engine generate --out DIR --resume` first"
        )
    dtype = manifest["parameters"]["dtype"]
    if format == "cifar-c":
        if image is not None:
            raise ValueError("image: only for --format webdataset (cifar-c is .npy arrays)")
        if dtype != "uint8":
            raise ValueError(
                f"format: cifar-c holds uint8 images, {out} holds {dtype} (generate with "
                "--dtype uint8, or export --format webdataset --image npy)"
            )
    else:
        image = ("png" if dtype == "uint8" else "npy") if image is None else image
        if image not in IMAGE_FORMATS:
            raise ValueError(f"image: expected one of {list(IMAGE_FORMATS)}, got {image!r}")
        if image == "png":
            if dtype != "uint8":
                raise ValueError(
                    f"image: PNG holds uint8 images, {out} holds {dtype}; pass image='npy' "
                    "(--image npy)"
                )
            _import_pil()
    temp = Path(
        tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".export-tmp", dir=dest.absolute().parent)
    )
    try:
        writer = _cifar_c if format == "cifar-c" else _webdataset
        info = writer(out, manifest, temp, image, progress)
        _write_json(temp / EXPORT_INFO, info)
        _fsync(temp)
        if os.path.lexists(dest):  # appeared meanwhile
            raise FileExistsError(f"dest: {dest} appeared while exporting; nothing replaced")
        os.rename(temp, dest)
        _fsync(dest.absolute().parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return info


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _shards(out: Path, manifest: dict, bar: Progress):
    """Each listed shard in order with its files, hashed as they are read."""
    for shard in manifest["shards"]:
        arrays = {}
        for kind, entry in shard["files"].items():
            try:
                arrays[kind] = open_listed(out, entry, check_hash=True)
            except ShardFileProblem as problem:
                raise ValueError(
                    f"out: {out / problem.name}: {problem.problem}; nothing was exported. "
                    f"Check and repair it with `diffeo-engine verify {out} --full --repair`"
                ) from None
        yield shard, arrays
        bar.update(shard["id_stop"] - shard["id_start"])


def _describe(out: Path, manifest: dict) -> dict:
    params = manifest["parameters"]
    labels = labels_of(manifest)
    return {
        "from": str(out.resolve()),
        "source": manifest["source"]["spec"],
        "source_length": manifest["source"]["length"],
        "per_image": params["per_image"],
        "seed": params["seed"],
        "noise": params["noise"],
        "interp": params["interp"],
        "dtype": params["dtype"],
        "image_shape": manifest["image_shape"],
        "ids": manifest["ids"],
        "classes": None if labels is None else labels["classes"],
    }


def _blocks(manifest: dict) -> list[dict]:
    recipe = Recipe.of(manifest)
    size = recipe.length * recipe.per_image
    return [
        {"setting": s, "T": T, "cut": cut, "rows": [s * size, (s + 1) * size]}
        for s, (T, cut) in enumerate(recipe.settings)
    ]


def _cifar_c(out: Path, manifest: dict, temp: Path, image, progress) -> dict:
    total = manifest["total_images"]
    C, H, W = manifest["image_shape"]
    labelled = labels_of(manifest) is not None
    names = {kind: f"{kind}.npy" for kind in manifest["kinds"]}
    if labelled:
        names[LABEL] = "labels.npy"
    handles = {}
    bar = Progress(total, desc="export", enabled=progress)
    try:
        for kind, name in names.items():
            handles[kind] = open(temp / name, "xb")  # noqa: SIM115 -- closed below
            shape = (total,) if kind == LABEL else (total, H, W, C)
            handles[kind].write(npy_header(shape, np.int64 if kind == LABEL else np.uint8))
        for _, arrays in _shards(out, manifest, bar):
            for kind, handle in handles.items():
                array = arrays[kind]
                step = max(1, CHUNK // max(array[0].nbytes, 1))
                for start in range(0, len(array), step):
                    rows = np.asarray(array[start : start + step])
                    if kind != LABEL:
                        rows = np.ascontiguousarray(rows.transpose(0, 2, 3, 1))  # NHWC
                    handle.write(rows.tobytes())
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles.values():
            handle.close()
        bar.close()
    return {
        "format": "cifar-c",
        "files": {kind: name for kind, name in names.items() if kind != LABEL},
        "labels": names.get(LABEL),
        "layout": "each file (rows, H, W, C) uint8; labels.npy (rows,) int64; row = id",
        "rows": total,
        "blocks": _blocks(manifest),
        **_describe(out, manifest),
    }


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = stat.S_IFREG | 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _png(array: np.ndarray, Image) -> bytes:
    """A ``(C, H, W)`` uint8 image as PNG bytes (grey, RGB or RGBA by ``C``)."""
    pixels = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _webdataset(out: Path, manifest: dict, temp: Path, image: str, progress) -> dict:
    recipe = Recipe.of(manifest)
    labels = labels_of(manifest)
    classes = None if labels is None else labels["classes"]
    params = manifest["parameters"]
    total = manifest["total_images"]
    width = max(6, len(str(total - 1)))
    Image = _import_pil() if image == "png" else None
    names = []
    bar = Progress(total, desc="export", enabled=progress)
    try:
        for shard, arrays in _shards(out, manifest, bar):
            name = f"data-{shard['index']:05d}.tar"
            names.append(name)
            with open(temp / name, "xb") as handle:
                with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for row in range(shard["id_stop"] - shard["id_start"]):
                        id_ = shard["id_start"] + row
                        key = f"{id_:0{width}d}"
                        setting, source_index, k = recipe.locate(id_)
                        T, cut = recipe.settings[setting]
                        for kind in recipe.kinds:
                            array = np.asarray(arrays[kind][row])
                            data = _png(array, Image) if image == "png" else _npy(array)
                            _tar_member(tar, f"{key}.{kind}.{image}", data)
                        record = {
                            "id": id_, "source_index": source_index, "k": k,
                            "setting": setting, "T": T, "cut": cut, "seed": params["seed"],
                            "noise": params["noise"], "interp": params["interp"],
                        }  # fmt: skip
                        if LABEL in arrays:
                            label = int(arrays[LABEL][row])
                            _tar_member(tar, f"{key}.cls", str(label).encode())
                            record["label"] = label
                            if classes is not None:
                                record["class"] = classes[label]
                        _tar_member(tar, f"{key}.json", json.dumps(record).encode())
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        bar.close()
    last = manifest["n_shards"] - 1
    return {
        "format": "webdataset",
        "shards": names,
        "urls": f"data-{{00000..{last:05d}}}.tar",
        "samples": total,
        "key": f"the id, zero-padded to {width} digits",
        "members": [f"{kind}.{image}" for kind in recipe.kinds]
        + (["cls"] if labels is not None else [])
        + ["json"],
        "image": "PNG, uint8" if image == "png" else ".npy, (C, H, W) as stored",
        "blocks": _blocks(manifest),
        **_describe(out, manifest),
    }
