"""``manifest.json``: what a generated data set is (parameters, source, versions, and per
shard its id range, files, sizes and sha256), written atomically and read back checked.

Every reader (resume, ``verify``, ``load_generated``, repair) goes through
:func:`read_manifest`, which validates the whole document against the schema of
``FORMAT_VERSION`` (:func:`check_manifest`): a missing key or a tampered field is refused in
one line naming the field, and a shard file may only be the plain name ``KIND-NNNNN.npy``
of its own shard and kind, so a manifest can never point outside its folder.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path

import torch

from diffeo_engine import ops
from diffeo_engine.generate.files import _fsync_dir, _write_file

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "check_manifest",
    "read_manifest",
    "shard_name",
]

FORMAT = "diffeo-engine-generated"
# 2: the source fingerprint covers every row (1 sampled 64 rows above 8 MiB)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1 is read and verified, not resumed
MANIFEST = "manifest.json"
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
KINDS = ("tau", "noisy")
SEED_LIMIT = 1 << 63
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.npy"


def _kinds(noise) -> list[str]:
    return ["tau"] if noise == "none" else ["tau", "noisy"]


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


def read_manifest(out: str | Path) -> dict:
    """The manifest of a generated data set (``FileNotFoundError`` when there is none)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"out: no {MANIFEST} in {out}: not a generated data set")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"out: {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"out: {path} is not a diffeo-engine generate manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"out: {path} has format_version {manifest.get('format_version')!r}, "
            f"this library reads {list(READABLE_VERSIONS)}"
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

    def get(self, parent: dict, key: str, prefix: str):
        if key not in parent:
            name = f"{prefix}.{key}" if prefix else key
            raise ValueError(
                f"manifest: {self.where}: field {name} is missing; the data set's manifest "
                "is damaged or was edited"
            )
        return parent[key]

    def dict(self, parent: dict, key: str, prefix: str = "") -> dict:
        value = self.get(parent, key, prefix)
        if not isinstance(value, dict):
            self.fail(f"{prefix}.{key}" if prefix else key, "an object", value)
        return value

    def int(self, parent: dict, key: str, prefix: str = "", lo: int = 0, hi=None) -> int:
        value = self.get(parent, key, prefix)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        if not ok or (hi is not None and value >= hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
            self.fail(f"{prefix}.{key}" if prefix else key, f"an integer {bound}", value)
        return value

    def str(self, parent: dict, key: str, prefix: str = "", choices=None) -> str:
        value = self.get(parent, key, prefix)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = "a string" if choices is None else f"one of {list(choices)}"
            self.fail(f"{prefix}.{key}" if prefix else key, expected, value)
        return value

    def equal(self, parent: dict, key: str, prefix: str, want) -> None:
        value = self.get(parent, key, prefix)
        if value != want or type(value) is not type(want):
            self.fail(f"{prefix}.{key}" if prefix else key, repr(want), value)


def _is_number(value) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _int_list(value, n: int, lo: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value)
    )


def check_manifest(manifest: dict, where: str) -> dict:
    """Validate a manifest (already known to be of this ``FORMAT_VERSION``) field by field.

    The schema: ``ids`` (text), ``parameters`` (``T`` >= 0, ``cut`` >= 1, ``per_image`` >= 1,
    ``seed`` in [0, 2**63), ``noise`` ``"matched"``/``"none"``/sigma >= 0, ``dtype``,
    ``shard_size`` >= 1, ``interp``, ``resize`` null or [H, W]), ``source`` (``spec``,
    ``kind``, ``length``, ``shape``, ``dtype``, ``resize``, ``fingerprint``), ``versions``,
    ``execution`` (``batch_size``, ``device``, ``backend``), ``kinds``, ``image_shape``,
    ``total_images`` (= length * per_image), ``n_shards`` (= ceil(total / shard_size)),
    ``complete`` (= every shard listed) and ``shards``: in increasing ``index``, each with
    its own id range, ``source_start``/``source_stop``, ``backend``, ``device``,
    ``batch_size`` and per kind ``files.KIND`` = ``{name: "KIND-NNNNN.npy" (its own),
    shape: [n, C, H, W], dtype, bytes, sha256}``. Returns ``manifest``.
    """
    f = _Fields(where)
    f.str(manifest, "ids")
    params = f.dict(manifest, "parameters")
    p = "parameters"
    T = f.get(params, "T", p)
    if not _is_number(T):
        f.fail("parameters.T", "a finite number >= 0", T)
    f.int(params, "cut", p, 1)
    K = f.int(params, "per_image", p, 1)
    f.int(params, "seed", p, 0, SEED_LIMIT)
    noise = f.get(params, "noise", p)
    if noise not in ("matched", "none") and not _is_number(noise):
        f.fail("parameters.noise", "'matched', 'none' or a finite sigma >= 0", noise)
    dtype = f.str(params, "dtype", p, tuple(DTYPES))
    S = f.int(params, "shard_size", p, 1)
    f.str(params, "interp", p, ("bilinear", "nearest"))
    resize = f.get(params, "resize", p)
    if resize is not None and not _int_list(resize, 2, 2):
        f.fail("parameters.resize", "null or [H, W], integers >= 2", resize)

    source = f.dict(manifest, "source")
    for key in ("spec", "kind", "dtype", "fingerprint"):
        f.str(source, key, "source")
    length = f.int(source, "length", "source", 1)
    f.get(source, "shape", "source")
    f.get(source, "resize", "source")
    versions = f.dict(manifest, "versions")
    for key in ("diffeo_engine", "torch"):
        f.str(versions, key, "versions")
    execution = f.dict(manifest, "execution")
    f.int(execution, "batch_size", "execution", 1)
    f.str(execution, "device", "execution")
    f.str(execution, "backend", "execution", ops.BACKENDS)

    kinds = ["tau"] if noise == "none" else ["tau", "noisy"]
    f.equal(manifest, "kinds", "", kinds)
    shape = f.get(manifest, "image_shape", "")
    if not _int_list(shape, 3, 1):
        f.fail("image_shape", "[C, H, W], integers >= 1", shape)
    total = length * K
    f.equal(manifest, "total_images", "", total)
    n_shards = -(-total // S)
    f.equal(manifest, "n_shards", "", n_shards)
    shards = f.get(manifest, "shards", "")
    if not isinstance(shards, list):
        f.fail("shards", "a list", shards)
    f.equal(manifest, "complete", "", len(shards) == n_shards)

    previous = -1
    for i, shard in enumerate(shards):
        at = f"shards[{i}]"
        if not isinstance(shard, dict):
            f.fail(at, "an object", shard)
        index = f.int(shard, "index", at, previous + 1, n_shards)
        previous = index
        lo, hi = index * S, min((index + 1) * S, total)
        f.equal(shard, "id_start", at, lo)
        f.equal(shard, "id_stop", at, hi)
        f.equal(shard, "source_start", at, lo // K)
        f.equal(shard, "source_stop", at, (hi - 1) // K + 1)
        f.str(shard, "backend", at, ("torch", "triton"))
        f.str(shard, "device", at)
        f.int(shard, "batch_size", at, 1)
        files = f.dict(shard, "files", at)
        if sorted(files) != sorted(kinds):
            f.fail(f"{at}.files", f"one entry per kind {kinds}", sorted(files))
        for kind in kinds:
            entry = f.dict(files, kind, f"{at}.files")
            where = f"{at}.files.{kind}"
            f.equal(entry, "name", where, shard_name(kind, index))
            f.equal(entry, "shape", where, [hi - lo, *shape])
            f.equal(entry, "dtype", where, dtype)
            f.int(entry, "bytes", where, 0)
            sha = f.get(entry, "sha256", where)
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                f.fail(f"{where}.sha256", "64 lowercase hex digits", sha)
    return manifest
