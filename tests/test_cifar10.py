"""The CIFAR-10 binary reader on small files written here in the format's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffeo_engine.data.cifar10 import RECORD_BYTES, load_cifar10


def _write(path, labels, pixels) -> None:
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], pixels], axis=1)
    records.astype(np.uint8).tofile(path)


def _random(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, n), rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def test_reads_labels_and_channel_planes(tmp_path):
    labels, pixels = _random(5, seed=int(np.random.randint(1 << 30)))
    _write(tmp_path / "test_batch.bin", labels, pixels)
    x, y = load_cifar10(tmp_path, "test")
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    for i in range(5):  # byte 1 + c*1024 + r*32 + col is channel c, row r, column col
        for c, r, col in ((0, 0, 0), (1, 5, 7), (2, 31, 31), (0, 17, 3)):
            assert int(x[i, c, r, col]) == int(pixels[i, c * 1024 + r * 32 + col])


def test_training_batches_in_order_inside_the_extracted_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    parts = [_random(3, seed) for seed in (1, 2)]
    for i, (labels, pixels) in enumerate(parts, start=1):
        _write(folder / f"data_batch_{i}.bin", labels, pixels)
    x, y = load_cifar10(tmp_path, "train")
    assert y.tolist() == parts[0][0].tolist() + parts[1][0].tolist()
    assert x.shape[0] == 6
    x2, y2 = load_cifar10(tmp_path, "train", limit=4)
    assert torch.equal(x2, x[:4]) and torch.equal(y2, y[:4])


def test_bad_files_and_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 binary files"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * (RECORD_BYTES + 5))
    with pytest.raises(ValueError, match="not a whole number of CIFAR-10 records"):
        load_cifar10(tmp_path)
    labels, pixels = _random(2, 3)
    labels[1] = 12
    _write(tmp_path / "test_batch.bin", labels, pixels)
    with pytest.raises(ValueError, match="record 1 has label 12"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 train files"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="limit"):
        load_cifar10(tmp_path, limit=0)
