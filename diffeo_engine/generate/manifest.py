"""``manifest.json``: what a generated data set is (parameters, settings, source and its
labels, versions, and per shard its id range, files, sizes and sha256), written atomically
and read back checked.

Every reader (resume, ``verify``, ``load_generated``, repair, export) goes through
:func:`read_manifest`, which reads the file only if it is a regular file (no link) and
validates the whole document with :func:`check_manifest`, the one validator: every field's
type and range, its consistency with the others (sizes, shapes, counts, the settings
against the image size) and that nothing else is there. A missing, extra or tampered field
is refused in one line naming it, and a shard file may only be the plain name
``KIND-NNNNN.npy`` of its own shard and kind, so a manifest never points outside its folder.
What a manifest cannot say about itself (that its shards hold what it claims, that its
parameters made them) is checked against the shards and the source by ``verify`` and
``load_generated(check=True)``.

Ids (format 3): ``id = (setting * length + source_index) * per_image + k``, so one setting's
ids are contiguous and, with one setting, ``id = source_index * per_image + k`` as in formats
1 and 2 (which hold one ``(T, cut)`` and no labels, and are read and verified, not resumed).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path

import numpy as np
import torch

from diffeo_engine import ops, physics, rng
from diffeo_engine.data.sources.labels import FILE_KINDS, LABEL_KINDS
from diffeo_engine.data.sources.safe import read_regular
from diffeo_engine.generate.files import _fsync_dir, _write_file, npy_size

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "LABEL",
    "MANIFEST",
    "check_manifest",
    "file_kinds",
    "labels_of",
    "locate",
    "read_manifest",
    "settings_of",
    "shard_name",
]

FORMAT = "diffeo-engine-generated"
# 2: the source fingerprint covers every row (1 sampled 64 rows above 8 MiB)
# 3: several (T, cut) settings per data set, labels stored per shard, no source_start/stop
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1 and 2 are read and verified, not resumed or repaired
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 1 << 30  # bytes: a manifest of MAX_SHARDS shards is about 100 MB
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
KINDS = ("tau", "noisy")
LABEL = "label"  # the labels' file kind: label-NNNNN.npy, int64 (n,)
LABEL_DTYPE = "int64"
SEED_LIMIT = 1 << 63
ID_LIMIT = 1 << 63  # ids are int64
MAX_SHARDS = 100_000  # each is listed in the manifest
SOURCE_KINDS = ("npy", "npz", "idx", "folder", "torchvision", "cifar10")
SOURCE_DTYPES = ("uint8", "float16", "float32", "float64")
RESOLVED_BACKENDS = ("torch", "triton", "cpu")  # what a shard records as having computed it
IDS = {
    1: "id = source_index * per_image + k, k in [0, per_image)",
    2: "id = source_index * per_image + k, k in [0, per_image)",
    3: "id = (setting * source_length + source_index) * per_image + k, k in [0, per_image)",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.npy"


def _kinds(noise) -> list[str]:
    return ["tau"] if noise == "none" else ["tau", "noisy"]


def labels_of(manifest: dict) -> dict | None:
    """The source's labels as recorded (None: the data set has none)."""
    return manifest["source"].get("labels")


def file_kinds(manifest: dict) -> list[str]:
    """The files of every shard: the image kinds, then ``label`` when there are labels."""
    return [*manifest["kinds"], *([LABEL] if labels_of(manifest) is not None else [])]


def settings_of(manifest: dict) -> list[tuple[float, int]]:
    """The ``(T, cut)`` settings in id order (formats 1 and 2: their one setting)."""
    params = manifest["parameters"]
    if "settings" in params:
        return [(s["T"], s["cut"]) for s in params["settings"]]
    return [(params["T"], params["cut"])]


def locate(ids, length: int, per_image: int):
    """``(setting, source_index, k)`` of int64 ids (arrays or tensors)."""
    block = length * per_image
    return ids // block, (ids % block) // per_image, ids % per_image


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def _write_manifest(out: Path, manifest: dict, fault=None, shard: int = -1) -> None:
    data = memoryview(_manifest_bytes(manifest))
    half = len(data) // 2
    chunks = [data] if fault is None else [data[:half], None, data[half:]]
    _write_file(
        out / MANIFEST,
        chunks,
        fault=fault,
        point="manifest-write",
        shard=shard,
    )
    _fsync_dir(out)


def check_out_path(out, name: str = "out") -> Path:
    """A data set folder argument: a non-empty path (``''`` would mean the current folder)."""
    if isinstance(out, Path):
        return out
    if not isinstance(out, str):
        raise TypeError(f"{name}: expected a folder path, got {type(out).__name__}")
    if not out:
        raise ValueError(f"{name}: expected a folder path, got '' (write '.' for this folder)")
    return Path(out)


def read_manifest(out: str | Path) -> dict:
    """The manifest of a generated data set (``FileNotFoundError`` when there is none),
    validated (:func:`check_manifest`)."""
    out = check_out_path(out)
    path = out / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"out: no {MANIFEST} in {out}: not a generated data set")
    data = read_regular(path, "out", follow=False, limit=MANIFEST_LIMIT)
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"out: {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"out: {path} is not a diffeo-engine generate manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"out: {path} has format_version {version!r}, this library reads "
            f"{list(READABLE_VERSIONS)}"
        )
    return check_manifest(manifest, str(path))


# ------------------------------------------------------------------------------- schema


class _Fields:
    """Reads fields of one manifest, refusing the first bad one in one line naming it."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, name: str, expected: str, value) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(
            f"manifest: {self.where}: field {name}: expected {expected}, got {shown}; "
            "the data set's manifest is damaged or was edited"
        )

    @staticmethod
    def name(prefix: str, key) -> str:
        return f"{prefix}.{key}" if prefix else str(key)

    def keys(self, parent: dict, prefix: str, required, optional=()) -> None:
        """``parent`` holds every required key and nothing beyond the optional ones."""
        for key in required:
            if key not in parent:
                raise ValueError(
                    f"manifest: {self.where}: field {self.name(prefix, key)} is missing; the "
                    "data set's manifest is damaged or was edited"
                )
        extra = sorted(set(parent) - set(required) - set(optional))
        if extra:
            raise ValueError(
                f"manifest: {self.where}: field {self.name(prefix, extra[0])} is not part of "
                "this manifest format; the data set's manifest is damaged or was edited"
            )

    def dict(self, parent: dict, key: str, prefix: str = "") -> dict:
        value = parent[key]
        if not isinstance(value, dict):
            self.fail(self.name(prefix, key), "an object", value)
        return value

    def int(self, parent: dict, key: str, prefix: str = "", lo: int = 0, hi=None) -> int:
        value = parent[key]
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        if not ok or (hi is not None and value >= hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
            self.fail(self.name(prefix, key), f"an integer {bound}", value)
        return value

    def str(self, parent: dict, key: str, prefix: str = "", choices=None) -> str:
        value = parent[key]
        if (
            not isinstance(value, str)
            or not value
            or (choices is not None and value not in choices)
        ):
            expected = "a non-empty string" if choices is None else f"one of {list(choices)}"
            self.fail(self.name(prefix, key), expected, value)
        return value

    def equal(self, parent: dict, key: str, prefix: str, want) -> None:
        value = parent[key]
        if value != want or type(value) is not type(want):
            self.fail(self.name(prefix, key), repr(want), value)

    def fingerprint(self, parent: dict, key: str, prefix: str) -> None:
        value = parent[key]
        if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
            self.fail(self.name(prefix, key), "'sha256:' and 64 lowercase hex digits", value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _int_list(value, n: int, lo: int) -> bool:
    return (
        isinstance(value, list) and len(value) == n and all(_is_int(v) and v >= lo for v in value)
    )


def _is_device_type(value) -> bool:
    try:
        return isinstance(value, str) and torch.device(value).type == value
    except (RuntimeError, TypeError):
        return False


def _noise_limit(dtype: str) -> float:
    return float(torch.finfo(torch.float16 if dtype == "float16" else torch.float32).max)


PARAMETERS = {
    1: ("T", "cut", "per_image", "seed", "noise", "dtype", "shard_size", "interp", "resize"),
    3: ("settings", "per_image", "seed", "noise", "dtype", "shard_size", "interp", "resize"),
}
SOURCE = ("spec", "kind", "length", "shape", "dtype", "resize", "fingerprint")
TOP = (
    "format", "format_version", "ids", "parameters", "source", "versions", "execution",
    "kinds", "image_shape", "total_images", "n_shards", "complete", "shards",
)  # fmt: skip
SHARD = {
    1: ("index", "id_start", "id_stop", "source_start", "source_stop", "backend", "device",
        "batch_size", "files"),
    3: ("index", "id_start", "id_stop", "backend", "device", "batch_size", "files"),
}  # fmt: skip
FILE = ("name", "shape", "dtype", "bytes", "sha256")
LABELS = ("kind", "spec", "count", "classes", "fingerprint")


def _check_setting(f: _Fields, T, cut, at: str, shape: list[int]) -> None:
    """One ``(T, cut)``: what ``ops`` would accept for images of ``shape``."""
    if not _is_number(T) or torch.finfo(torch.float32).max < T:
        f.fail(f"{at}.T", "a finite number >= 0 that float32 holds", T)
    if not _is_int(cut) or cut < 1 or cut > rng.MAX_CUT:
        f.fail(f"{at}.cut", f"an integer in [1, {rng.MAX_CUT}]", cut)
    H, W = shape[1], shape[2]
    hard = max(physics.max_cut(H, W), physics.CUT_COST_BOUND)
    if cut > hard:
        f.fail(f"{at}.cut", f"an integer <= {hard} for {H}x{W} images", cut)
    if cut >= 2:
        shift = physics.typical_displacement(float(T), cut, math.sqrt(H * W))
        if shift > physics.MAX_TYPICAL_DISPLACEMENT:
            f.fail(f"{at}.T", f"a typical displacement <= 2**22 pixels for cut {cut}", T)


def check_manifest(manifest: dict, where: str) -> dict:
    """Validate a manifest (already known to be of a readable ``format_version``).

    The schema (format 3): ``ids`` (the documented text), ``parameters`` (``settings``: a
    non-empty list of distinct ``{T, cut}`` that ``ops`` accepts for the image size,
    ``per_image`` >= 1, ``seed`` in [0, 2**63), ``noise`` ``"matched"``/``"none"``/a sigma
    the dtype holds, ``dtype``, ``shard_size`` >= 1, ``interp``, ``resize`` null or [H, W]),
    ``source`` (``spec``, ``kind``, ``length``, ``shape`` (= ``image_shape``), ``dtype``,
    ``resize`` (= the parameters'), ``fingerprint``, ``labels``: null or ``{kind, spec,
    count (= length), classes, fingerprint}``), ``versions``, ``execution`` (``batch_size``,
    ``device``, ``backend``), ``kinds``, ``image_shape``, ``total_images`` (= settings *
    length * per_image), ``n_shards`` (= ceil(total / shard_size)), ``complete`` (= every
    shard listed) and ``shards``: in increasing ``index``, each with its own id range,
    ``backend``, ``device`` (a device type), ``batch_size`` and per file kind ``files.KIND``
    = ``{name: "KIND-NNNNN.npy" (its own), shape, dtype, bytes (the exact .npy size),
    sha256}``. Formats 1 and 2 have ``parameters.T``/``cut`` instead of ``settings``, no
    ``source.labels``, and ``source_start``/``source_stop`` per shard. Returns ``manifest``.
    """
    f = _Fields(where)
    version = manifest["format_version"]
    layout = 3 if version >= 3 else 1
    f.keys(manifest, "", TOP)
    f.equal(manifest, "ids", "", IDS[version])

    params = f.dict(manifest, "parameters")
    p = "parameters"
    f.keys(params, p, PARAMETERS[layout])
    K = f.int(params, "per_image", p, 1)
    f.int(params, "seed", p, 0, SEED_LIMIT)
    dtype = f.str(params, "dtype", p, tuple(DTYPES))
    noise = params["noise"]
    if noise not in ("matched", "none") and (not _is_number(noise) or noise > _noise_limit(dtype)):
        f.fail(f"{p}.noise", f"'matched', 'none' or a sigma {dtype} holds", noise)
    S = f.int(params, "shard_size", p, 1)
    f.str(params, "interp", p, ("bilinear", "nearest"))
    resize = params["resize"]
    if resize is not None and not _int_list(resize, 2, 2):
        f.fail(f"{p}.resize", "null or [H, W], integers >= 2", resize)

    image_shape = manifest["image_shape"]
    if (
        not _int_list(image_shape, 3, 1)
        or image_shape[0] not in (1, 3, 4)
        or min(image_shape[1:]) < 2
    ):
        f.fail("image_shape", "[C, H, W], C in {1, 3, 4}, H and W >= 2", image_shape)
    if resize is not None and image_shape[1:] != resize:
        f.fail("image_shape", f"[C, {resize[0]}, {resize[1]}] (parameters.resize)", image_shape)

    if layout == 3:
        settings = params["settings"]
        if not isinstance(settings, list) or not settings:
            f.fail(f"{p}.settings", "a non-empty list of {T, cut}", settings)
        seen = set()
        for i, setting in enumerate(settings):
            at = f"{p}.settings[{i}]"
            if not isinstance(setting, dict):
                f.fail(at, "an object {T, cut}", setting)
            f.keys(setting, at, ("T", "cut"))
            _check_setting(f, setting["T"], setting["cut"], at, image_shape)
            key = (float(setting["T"]), setting["cut"])
            if key in seen:
                f.fail(at, "a setting not listed before", setting)
            seen.add(key)
        n_settings = len(settings)
    else:
        _check_setting(f, params["T"], params["cut"], p, image_shape)
        n_settings = 1

    source = f.dict(manifest, "source")
    f.keys(source, "source", (*SOURCE, "labels") if layout == 3 else SOURCE)
    f.str(source, "spec", "source")
    f.str(source, "kind", "source", SOURCE_KINDS)
    length = f.int(source, "length", "source", 1)
    f.str(source, "dtype", "source", SOURCE_DTYPES)
    f.fingerprint(source, "fingerprint", "source")
    if source["shape"] != image_shape or not isinstance(source["shape"], list):
        f.fail("source.shape", f"{image_shape} (image_shape)", source["shape"])
    if source["resize"] != resize or type(source["resize"]) is not type(resize):
        f.fail("source.resize", f"{resize!r} (parameters.resize)", source["resize"])
    if layout == 3:
        _check_labels(f, source["labels"], length)

    versions = f.dict(manifest, "versions")
    f.keys(versions, "versions", ("diffeo_engine", "torch"), tuple(versions))
    for key in versions:
        f.str(versions, key, "versions")
    execution = f.dict(manifest, "execution")
    f.keys(execution, "execution", ("batch_size", "device", "backend"))
    f.int(execution, "batch_size", "execution", 1)
    device = execution["device"]
    try:
        ok = isinstance(device, str) and bool(device) and torch.device(device) is not None
    except (RuntimeError, TypeError):
        ok = False
    if not ok:
        f.fail("execution.device", "a torch device such as 'cpu' or 'cuda:0'", device)
    f.str(execution, "backend", "execution", ops.BACKENDS)

    kinds = _kinds(noise)
    f.equal(manifest, "kinds", "", kinds)
    total = n_settings * length * K
    if total >= ID_LIMIT:
        f.fail("total_images", "fewer than 2**63 ids", total)
    f.equal(manifest, "total_images", "", total)
    n_shards = -(-total // S)
    if n_shards > MAX_SHARDS:
        f.fail("n_shards", f"at most {MAX_SHARDS} shards", n_shards)
    f.equal(manifest, "n_shards", "", n_shards)
    shards = manifest["shards"]
    if not isinstance(shards, list):
        f.fail("shards", "a list", shards)
    f.equal(manifest, "complete", "", len(shards) == n_shards)

    files_expected = {kind: (dtype, list(image_shape)) for kind in kinds}
    if layout == 3 and source["labels"] is not None:
        files_expected[LABEL] = (LABEL_DTYPE, [])
    previous = -1
    for i, shard in enumerate(shards):
        at = f"shards[{i}]"
        if not isinstance(shard, dict):
            f.fail(at, "an object", shard)
        f.keys(shard, at, SHARD[layout])
        index = f.int(shard, "index", at, previous + 1, n_shards)
        previous = index
        lo, hi = index * S, min((index + 1) * S, total)
        f.equal(shard, "id_start", at, lo)
        f.equal(shard, "id_stop", at, hi)
        if layout == 1:
            f.equal(shard, "source_start", at, lo // K)
            f.equal(shard, "source_stop", at, (hi - 1) // K + 1)
        f.str(shard, "backend", at, RESOLVED_BACKENDS)
        if not _is_device_type(shard["device"]):
            f.fail(f"{at}.device", "a device type such as 'cpu' or 'cuda'", shard["device"])
        f.int(shard, "batch_size", at, 1)
        files = f.dict(shard, "files", at)
        if sorted(files) != sorted(files_expected):
            f.fail(f"{at}.files", f"one entry per kind {list(files_expected)}", sorted(files))
        for kind, (kind_dtype, tail) in files_expected.items():
            entry = f.dict(files, kind, f"{at}.files")
            there = f"{at}.files.{kind}"
            f.keys(entry, there, FILE)
            f.equal(entry, "name", there, shard_name(kind, index))
            shape = [hi - lo, *tail]
            f.equal(entry, "shape", there, shape)
            f.equal(entry, "dtype", there, kind_dtype)
            f.equal(entry, "bytes", there, npy_size(shape, np.dtype(kind_dtype)))
            sha = entry["sha256"]
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                f.fail(f"{there}.sha256", "64 lowercase hex digits", sha)
    return manifest


def _check_labels(f: _Fields, labels, length: int) -> None:
    if labels is None:
        return
    at = "source.labels"
    if not isinstance(labels, dict):
        f.fail(at, "null or an object", labels)
    f.keys(labels, at, LABELS)
    kind = f.str(labels, "kind", at, LABEL_KINDS)
    if kind in FILE_KINDS:
        f.str(labels, "spec", at)
    elif labels["spec"] is not None:
        f.fail(f"{at}.spec", f"null (the {kind} labels come with the images)", labels["spec"])
    f.equal(labels, "count", at, length)
    classes = labels["classes"]
    if kind in FILE_KINDS:
        if classes is not None:
            f.fail(f"{at}.classes", "null (a labels file names no classes)", classes)
    elif (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        f.fail(f"{at}.classes", "a list of distinct non-empty class names", classes)
    f.fingerprint(labels, "fingerprint", at)
