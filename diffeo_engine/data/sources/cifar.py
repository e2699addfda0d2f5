"""CIFAR-10 binary batches as a labelled image source, read by :mod:`diffeo_engine.data.cifar10`.

Two spellings: one batch file (``test_batch.bin``, ``data_batch_3.bin``: any ``.bin`` of
whole 3073-byte records) or ``cifar10:DIR[:train|test]`` (the split's batches found as
:func:`~diffeo_engine.data.cifar10.load_cifar10` finds them; default ``test``). The records'
label bytes are the labels, the ten CIFAR-10 names the classes. The batches are read into
memory (30 MB each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffeo_engine.data import cifar10
from diffeo_engine.data.sources.arrays import ArraySource
from diffeo_engine.data.sources.labels import LabelSet
from diffeo_engine.data.sources.safe import check_input_path, check_regular

__all__ = ["CIFAR_PREFIX", "open_cifar10", "open_cifar10_batch"]

CIFAR_PREFIX = "cifar10:"
SPLITS = ("train", "test")


def _source(images: np.ndarray, labels: np.ndarray, spec: str, resize, files) -> ArraySource:
    identity = {"files": [[path.name, path.stat().st_size] for path in files]}
    label_set = LabelSet(labels, "cifar10", None, list(cifar10.CIFAR10_CLASSES))
    return ArraySource(images, spec, "cifar10", resize, identity, auto_labels=label_set)


def open_cifar10_batch(path: Path, resize) -> ArraySource:
    """One CIFAR-10 binary batch file (a regular file of whole records)."""
    check_regular(path, "input", follow=True)
    try:
        images, labels = cifar10._read(path)
    except ValueError as error:
        raise ValueError(f"input: {error}") from error
    return _source(images, labels, str(path), resize, [path])


def open_cifar10(text: str, resize) -> ArraySource:
    """``cifar10:DIR[:train|test]``: the split's batches in ``DIR`` (or its
    ``cifar-10-batches-bin``), concatenated in order."""
    root, split = text[len(CIFAR_PREFIX) :], "test"
    head, sep, tail = root.rpartition(":")
    if sep and tail in SPLITS and head:
        root, split = head, tail
    if not root:
        raise ValueError(f"input: expected 'cifar10:DIR[:train|test]', got {text!r}")
    directory = check_input_path(root, "input")
    if not directory.is_dir():
        raise ValueError(f"input: {text!r} names {directory}, which is not a folder")
    directory = directory.resolve()
    try:
        folder = cifar10._folder(directory)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"input: {error}".replace("directory: ", "")) from None
    files = [folder / name for name in cifar10._FILES[split] if (folder / name).is_file()]
    for path in files:
        check_regular(path, "input", follow=True)
    try:
        images, labels = cifar10.load_cifar10(directory, split)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"input: {error}".replace("directory: ", "")) from error
    spec = f"{CIFAR_PREFIX}{directory}:{split}"
    return _source(images.numpy(), labels.numpy(), spec, resize, files)
