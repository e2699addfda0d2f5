"""CIFAR-10 from a user's folder, in its binary format (``cifar-10-binary.tar.gz``, extracted).

Each file ``data_batch_{1..5}.bin`` (training) or ``test_batch.bin`` (test) is a run of
10,000 records of 3073 bytes: one label byte (0-9), then 1024 red, 1024 green and 1024
blue bytes of a 32x32 image in row-major order (Krizhevsky 2009, the format's own page).
Only these raw bytes are read: the Python-pickle batches are never unpickled (a pickle can
run code). The folder may be the extracted ``cifar-10-batches-bin`` itself or hold it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffeo_engine.physics import _is_integer

__all__ = ["CIFAR10_CLASSES", "RECORD_BYTES", "load_cifar10"]

RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


def _folder(directory: Path) -> Path:
    for candidate in (directory, directory / "cifar-10-batches-bin"):
        if any((candidate / name).is_file() for names in _FILES.values() for name in names):
            return candidate
    raise FileNotFoundError(
        f"directory: no CIFAR-10 binary files (data_batch_1.bin ... test_batch.bin) in "
        f"{directory} or {directory / 'cifar-10-batches-bin'}"
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records of "
            f"{RECORD_BYTES} bytes"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{path}: record {bad} has label {int(labels[bad])}, expected 0-9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(
    directory: str | Path, split: str = "test", *, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of ``split`` (``"train"``:
    the batches found among ``data_batch_1..5.bin``, in order; ``"test"``:
    ``test_batch.bin``). ``limit`` keeps the first images only (files past it are not read).
    """
    if split not in _FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if limit is not None and (not _is_integer(limit) or limit < 1):
        raise ValueError(f"limit: expected an integer >= 1 or None, got {limit!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory: no such directory: {directory}")
    folder = _folder(directory)
    paths = [folder / name for name in _FILES[split] if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"directory: no CIFAR-10 {split} files {_FILES[split]} in {folder}")
    images, labels, count = [], [], 0
    for path in paths:
        x, y = _read(path)
        images.append(x)
        labels.append(y)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    x = torch.from_numpy(np.concatenate(images)[:limit].copy())
    y = torch.from_numpy(np.concatenate(labels)[:limit].astype(np.int64))
    return x, y
