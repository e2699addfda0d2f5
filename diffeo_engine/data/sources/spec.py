"""The spec parser: :func:`open_source` turns a ``--input``/``--data`` string into an
:class:`ImageSource` (the rules are in the package docstring); :func:`parse_resize` reads
``resize`` as ``(H, W)`` or ``"HxW"``."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

from diffeo_engine.data.sources.arrays import open_npy, open_npz
from diffeo_engine.data.sources.base import ImageSource
from diffeo_engine.data.sources.cifar import CIFAR_PREFIX, open_cifar10, open_cifar10_batch
from diffeo_engine.data.sources.folders import FolderSource
from diffeo_engine.data.sources.idx import is_idx, open_idx
from diffeo_engine.data.sources.safe import check_input_path
from diffeo_engine.data.sources.torchvision_source import TorchvisionSource
from diffeo_engine.physics import _is_integer

__all__ = ["open_source", "parse_resize"]


def parse_resize(resize) -> tuple[int, int] | None:
    """``None``, an ``(H, W)`` pair of ints >= 2, or a string ``"HxW"`` (as on the CLI)."""
    if resize is None:
        return None
    if isinstance(resize, str):
        parts = resize.lower().split("x")
        try:
            resize = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"resize: expected 'HxW' such as '32x32', got {resize!r}") from None
    if (
        not isinstance(resize, Sequence)
        or len(resize) != 2
        or not all(_is_integer(v) for v in resize)
    ):
        raise ValueError(f"resize: expected (H, W), two integers >= 2, got {resize!r}")
    if min(resize) < 2:
        raise ValueError(f"resize: expected H >= 2 and W >= 2, got {tuple(resize)}")
    return int(resize[0]), int(resize[1])


def open_source(
    spec: str | Path,
    *,
    resize: tuple[int, int] | str | None = None,
    labels: str | Path | bool | None = None,
) -> ImageSource:
    """Open ``spec`` (see the module docstring for the accepted forms) as an ImageSource.

    ``labels``: ``None`` finds the format's own labels on first use of ``source.labels``,
    ``False`` means none, a file (or an ``.npz`` source's KEY) is read now
    (:mod:`~diffeo_engine.data.sources.labels`).
    """
    source = _open(spec, parse_resize(resize))
    source.attach_labels(labels)
    return source


def _open(spec: str | Path, resize: tuple[int, int] | None) -> ImageSource:
    if isinstance(spec, Path):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec
    else:
        raise TypeError(f"input: expected a path or a source string, got {type(spec).__name__}")
    if not text:
        raise ValueError("input: expected a path or a source string, got ''")
    if text.startswith("torchvision:"):
        parts = text.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"input: expected 'torchvision:NAME:ROOT[:SPLIT]', got {text!r}")
        name, root, split = parts[1], parts[2], None
        head, sep, tail = root.rpartition(":")
        if sep and tail in ("train", "test", "val", "valid", "validation") and head:
            root, split = head, tail
        return TorchvisionSource(name, root, split, text, resize)
    if text.startswith(CIFAR_PREFIX):
        return open_cifar10(text, resize)
    key = None
    path = Path(text).expanduser()
    if not path.exists() and ".npz:" in text:
        head, _, key = text.rpartition(":")
        path = Path(head).expanduser()
    path = check_input_path(path, "input").resolve()  # a folder or a regular file
    if path.is_dir():
        return FolderSource(path, str(path), resize)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return open_npy(path, str(path), resize)
    if suffix == ".npz":
        return open_npz(path, key, str(path), resize)
    if suffix == ".bin":
        return open_cifar10_batch(path, resize)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as handle:
            try:
                head = handle.read(4)
            except (OSError, EOFError) as error:
                raise ValueError(f"input: {path} is a damaged gzip file: {error}") from error
    if is_idx(head):
        return open_idx(path, str(path), resize)
    raise ValueError(
        f"input: cannot tell what {path} is; expected a .npy/.npz array, an image folder, "
        "an IDX file (raw or .gz), a CIFAR-10 .bin batch, 'cifar10:DIR[:SPLIT]' or "
        "'torchvision:NAME:ROOT'"
    )
