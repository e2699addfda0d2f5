"""Class labels of a source: one integer per image, where they came from, and class names.

Where labels come from (``open_source(spec, labels=...)``):

* ``labels=None`` (the default): found with the images where the format has them: the
  MNIST IDX labels file beside the images file by its standard name
  (``t10k-images-idx3-ubyte[.gz]`` -> ``t10k-labels-idx1-ubyte[.gz]``), CIFAR-10 binary
  records, and a folder whose images all lie in sub-folders (the ``ImageFolder`` layout:
  class ``c`` is the ``c``-th sub-folder name in sorted order). Found lazily, on first use
  of ``source.labels``: a reader that never asks never reads them.
* ``labels=False``: none.
* ``labels="FILE"``: a ``.npy`` of integers, an IDX labels file (raw or ``.gz``) or
  ``FILE.npz:KEY``; for an ``.npz`` source, a bare ``KEY`` names an array of the same
  archive. Read when the source is opened.

Labels are integers ``>= 0`` (any integer dtype, stored as int64), one per image: a count
that differs from the number of images is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from diffeo_engine.data.sources.safe import check_input_path, read_regular

__all__ = ["LABEL_KINDS", "LabelSet", "check_label_values", "read_labels", "reopen_argument"]

# how labels were found: a file (idx, npy, npz member) or the images' own layout
LABEL_KINDS = ("idx", "npy", "npz", "folder", "cifar10")
FILE_KINDS = ("idx", "npy", "npz")
INT64_MAX = np.iinfo(np.int64).max


class LabelSet:
    """One int64 label per image (``values``, read-only), with its origin and class names."""

    def __init__(
        self, values: np.ndarray, kind: str, spec: str | None, classes: list[str] | None = None
    ) -> None:
        self.values = check_label_values(values, f"labels: {spec or kind}")
        self.values.setflags(write=False)
        self.kind, self.spec = kind, spec
        self.classes = None if classes is None else [str(c) for c in classes]
        if self.classes is not None and len(self.values) and self.values.max() >= len(self.classes):
            raise ValueError(
                f"labels: {spec or kind}: label {int(self.values.max())} but only "
                f"{len(self.classes)} classes"
            )
        digest = hashlib.sha256(self.values.astype("<i8").tobytes())
        digest.update(json.dumps(self.classes).encode())
        self.fingerprint = "sha256:" + digest.hexdigest()

    def __len__(self) -> int:
        return len(self.values)

    def describe(self) -> dict:
        """What a manifest records: ``kind``, ``spec`` (the file, or null), ``count``,
        ``classes`` (names, or null), ``fingerprint`` (sha256 of the values and names)."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "count": len(self.values),
            "classes": self.classes,
            "fingerprint": self.fingerprint,
        }


def reopen_argument(description: dict | None):
    """The ``labels=`` argument that opens a recorded source's labels again: ``False`` for
    none, the file for file labels, ``None`` (found with the images) otherwise."""
    if description is None:
        return False
    return description["spec"] if description["kind"] in FILE_KINDS else None


def check_label_values(values, where: str) -> np.ndarray:
    """A 1-d array of integers ``>= 0`` as native int64 (bool, floats, objects refused)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{where}: expected a 1-d array of labels, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{where}: expected integer labels, got dtype {array.dtype}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > INT64_MAX:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: expected labels in [0, 2**63), got {bad}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _npy_bytes(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{where}: not a readable .npy array ({error})") from error


def npz_member(path: Path, key: str, where: str) -> np.ndarray:
    """Array ``key`` of an ``.npz`` archive (a regular file), read whole."""
    data = read_regular(path, where, follow=True)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise ValueError(f"{where}: {path} is not a readable .npz archive: {error}") from error
    with archive:
        keys = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        if key not in keys:
            raise ValueError(f"{where}: {path} has no array {key!r}; it holds {keys}")
        return _npy_bytes(archive.read(key + ".npy"), f"{where}: {path}:{key}")


def npz_keys(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]


def read_labels(spec: str | Path, where: str = "labels") -> LabelSet:
    """Labels from a file: ``.npy``, ``FILE.npz:KEY`` or an IDX labels file (raw or gz)."""
    from diffeo_engine.data.sources.idx import idx_from_bytes

    text = str(spec)
    if not text:
        raise ValueError(f"{where}: expected a labels file, got ''")
    path, key = Path(text).expanduser(), None
    if not path.exists() and ".npz:" in text:
        head, _, key = text.rpartition(":")
        path = Path(head).expanduser()
    path = check_input_path(path, where)
    if path.is_dir():
        raise ValueError(f"{where}: {path} is a folder; expected a labels file")
    path = path.resolve()
    if path.suffix.lower() == ".npz":
        if key is None:
            keys = npz_keys(path)
            if len(keys) != 1:
                raise ValueError(f"{where}: {path} holds arrays {keys}; name one as '{path}:KEY'")
            key = keys[0]
        return LabelSet(npz_member(path, key, where), "npz", f"{path}:{key}")
    data = read_regular(path, where, follow=True)
    if path.suffix.lower() == ".npy":
        return LabelSet(_npy_bytes(data, f"{where}: {path}"), "npy", str(path))
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{where}: {path} is a damaged gzip file: {error}") from error
    array = idx_from_bytes(data, f"{where}: {path}")
    if array is None:
        raise ValueError(
            f"{where}: cannot tell what {path} is; expected a .npy array, FILE.npz:KEY or an "
            "IDX labels file (raw or .gz)"
        )
    return LabelSet(array, "idx", str(path))


def idx_labels_beside(images: Path) -> Path | None:
    """The MNIST labels file beside an IDX images file, by the standard names (``images`` ->
    ``labels``, ``idx3`` -> ``idx1``, raw or ``.gz``); None when there is none."""
    name = images.name
    if "images" not in name or "idx3" not in name:
        return None
    base = name.replace("images", "labels").replace("idx3", "idx1").removesuffix(".gz")
    for candidate in (base, base + ".gz"):
        path = images.with_name(candidate)
        if path.exists():
            return path
    return None
