"""IDX files (MNIST's format, raw or ``.gz``): :func:`read_idx`, :func:`load_mnist`, and the
IDX image source (raw files memory-mapped, gzip'd ones decompressed into memory)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.data.sources.arrays import ArraySource
from diffeo_engine.data.sources.base import ImageSource
from diffeo_engine.data.sources.labels import LabelSet, idx_labels_beside, read_labels
from diffeo_engine.data.sources.safe import check_regular

__all__ = ["idx_from_bytes", "is_idx", "load_mnist", "open_idx", "read_idx"]

# IDX type codes (http://yann.lecun.com/exdb/mnist/), big-endian data.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _idx_header(data: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"input: {where} is not an IDX file (bad magic number)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"input: {where} is not an IDX file (bad header)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return _IDX_TYPES[data[2]], tuple(shape), 4 + 4 * ndim


def is_idx(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_TYPES


def idx_from_bytes(data: bytes, where: str) -> np.ndarray | None:
    """The array of a whole (decompressed) IDX file's bytes; None when the magic number is
    not IDX's, a ``ValueError`` when the sizes disagree."""
    if not is_idx(data):
        return None
    dtype, shape, offset = _idx_header(data, where)
    count = int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{where} holds {len(data) - offset} data bytes, its header "
            f"{shape} {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def read_idx(path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """An IDX file (MNIST's format; raw or ``.gz``) as an array in its stored dtype.

    ``mmap=True`` memory-maps a raw file instead of reading it (ignored for ``.gz``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no such IDX file: {path}")
    check_regular(path, "path", follow=True)
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    if gzipped:
        try:
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        except (OSError, EOFError) as error:
            raise ValueError(f"path: {path} is a damaged gzip file: {error}") from error
        dtype, shape, offset = _idx_header(data, str(path))
        count = int(np.prod(shape))
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(
                f"path: {path} holds {len(data) - offset} data bytes, its header "
                f"{shape} {dtype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    with open(path, "rb") as handle:
        head = handle.read(4 + 4 * 255)
    dtype, shape, offset = _idx_header(head, str(path))
    count = int(np.prod(shape))
    size = path.stat().st_size
    if size - offset != count * dtype.itemsize:
        raise ValueError(
            f"path: {path} holds {size - offset} data bytes, its header "
            f"{shape} {dtype} needs {count * dtype.itemsize}"
        )
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return np.fromfile(path, dtype=dtype, offset=offset).reshape(shape)


def open_idx(path: Path, spec: str, resize) -> ImageSource:
    array = read_idx(path, mmap=True)
    if array.ndim not in (3, 4):
        raise ValueError(
            f"input: {path} is an IDX file of shape {array.shape}; expected images "
            "(N, H, W) -- is this a labels file?"
        )

    def beside() -> LabelSet | None:
        found = idx_labels_beside(path)
        return None if found is None else read_labels(found)

    identity = {"file_size": path.stat().st_size}
    return ArraySource(array, spec, "idx", resize, identity, auto_labels=beside)


def load_mnist(directory: str | Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from its IDX files: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    Looks in ``directory`` for ``t10k-*`` (``split="test"``) or ``train-*`` files named
    ``{prefix}-images-idx3-ubyte`` / ``{prefix}-labels-idx1-ubyte`` (or with ``.`` before
    ``idx``), each raw or ``.gz``.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split: expected 'test' or 'train', got {split!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: no such directory: {directory}")
    prefix = "t10k" if split == "test" else "train"

    def find(what: str, idx: str) -> Path:
        names = [
            f"{prefix}{sep}{what}{dot}{idx}-ubyte{gz}"
            for sep in ("-",)
            for dot in ("-", ".")
            for gz in ("", ".gz")
        ]
        for name in names:
            if (directory / name).is_file():
                return directory / name
        raise FileNotFoundError(f"directory: no MNIST {split} {what} in {directory}; tried {names}")

    images = read_idx(find("images", "idx3"))
    labels = read_idx(find("labels", "idx1"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"directory: MNIST files in {directory} disagree: images {images.shape}, "
            f"labels {labels.shape}"
        )
    return (
        torch.from_numpy(np.array(images, dtype=np.uint8))[:, None],
        torch.from_numpy(np.array(labels, dtype=np.int64)),
    )
