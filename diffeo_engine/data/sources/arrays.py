"""Array sources: ``.npy`` (memory-mapped) and ``.npz`` (stored members memory-mapped in
place, compressed ones streamed through the archive)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.data.sources.base import ImageSource, _layout, _to_chw, _torch_dtype
from diffeo_engine.data.sources.labels import LabelSet, npz_keys, npz_member, read_labels

__all__ = ["ArraySource", "open_npy", "open_npz"]


class ArraySource(ImageSource):
    """An array already in memory or memory-mapped (``.npy``, stored ``.npz``, IDX, CIFAR-10).

    ``auto_labels``: the labels the format keeps with the images (a ``LabelSet``, or a
    function finding them on first use); ``archive``: the ``.npz`` file the array lives in,
    whose other arrays ``labels=KEY`` may name.
    """

    def __init__(
        self,
        array: np.ndarray,
        spec: str,
        kind: str,
        resize,
        identity: dict | None = None,
        *,
        auto_labels=None,
        archive: Path | None = None,
    ):
        super().__init__(spec, resize)
        self.kind = kind
        self._layout, self._shape = _layout(array.shape, spec)
        self._dtype = _torch_dtype(array.dtype, spec)
        self._array = array
        self._extra = identity or {}
        self._auto = auto_labels
        self._archive = archive

    def _auto_labels(self) -> LabelSet | None:
        return self._auto() if callable(self._auto) else self._auto

    def _labels_from(self, spec) -> LabelSet:
        return _archive_labels(self._archive, spec)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    @property
    def native_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        return _to_chw(np.asarray(self._array[start:stop]), self._layout)

    def _identity(self) -> dict:
        return self._extra


class _ZipStreamSource(ImageSource):
    """A compressed ``.npz`` member, read by streaming through the archive."""

    kind = "npz"

    def __init__(self, path: Path, key: str, spec: str, resize, crc: int, size: int):
        super().__init__(spec, resize)
        self._path, self._key = path, key
        self._handle = None
        with zipfile.ZipFile(path) as archive, archive.open(key + ".npy") as member:
            shape, fortran, dtype = _read_npy_header(member, spec)
            self._data_offset = member.tell()
        if fortran and len(shape) > 1:
            raise ValueError(
                f"input: {spec} is a compressed Fortran-ordered array; save it C-ordered "
                "(np.ascontiguousarray) or as .npy"
            )
        _holds_images(shape, spec)
        self._n = shape[0] if shape else 0
        self._raw_shape = shape
        self._np_dtype = dtype
        self._layout, self._shape = _layout(shape, spec)
        self._dtype = _torch_dtype(dtype, spec)
        self._row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        self._extra = {"zip_crc32": crc, "zip_size": size}

    def __len__(self) -> int:
        return self._n

    @property
    def native_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._handle is None:
            self._archive = zipfile.ZipFile(self._path)
            self._handle = self._archive.open(self._key + ".npy")
        self._handle.seek(self._data_offset + start * self._row_bytes)
        count = (stop - start) * self._row_bytes
        data = self._handle.read(count)
        if len(data) != count:
            raise ValueError(f"input: {self.spec} is truncated (wanted rows {start}..{stop - 1})")
        rows = np.frombuffer(data, dtype=self._np_dtype).reshape(
            (stop - start, *self._raw_shape[1:])
        )
        return _to_chw(rows, self._layout)

    def _identity(self) -> dict:
        return self._extra

    def _labels_from(self, spec) -> LabelSet:
        return _archive_labels(self._path, spec)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state.pop("_archive", None)
        return state


def _archive_labels(archive: Path | None, spec) -> LabelSet:
    """``labels=KEY`` of an ``.npz`` source: that array of the same archive, else a file."""
    if archive is not None and isinstance(spec, str) and spec in npz_keys(archive):
        return LabelSet(npz_member(archive, spec, "labels"), "npz", f"{archive}:{spec}")
    return read_labels(spec)


def _read_npy_header(handle, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        major, _ = np.lib.format.read_magic(handle)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except ValueError as error:
        raise ValueError(f"input: {where} is not a readable .npy array: {error}") from error
    if dtype.hasobject:
        raise TypeError(f"input: {where} holds Python objects; expected a numeric image array")
    return tuple(shape), bool(fortran), dtype


def _holds_images(shape: tuple[int, ...], where) -> None:
    """An array source must hold at least one image (an empty one would measure or write
    nothing, silently); other shapes are judged by the layout rule."""
    if shape and shape[0] == 0:
        raise ValueError(f"input: {where} holds no images (array of shape {tuple(shape)})")


def open_npy(path: Path, spec: str, resize) -> ImageSource:
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"input: {path} is not a readable .npy array: the file is empty")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise ValueError(f"input: {path} is not a readable .npy array: {error}") from error
    _holds_images(array.shape, path)
    return ArraySource(array, spec, "npy", resize, {"file_size": size})


def open_npz(path: Path, key: str | None, spec: str, resize) -> ImageSource:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"input: {path} is not a readable .npz archive: {error}") from error
    with archive:
        keys = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        if key is None:
            if len(keys) != 1:
                raise ValueError(
                    f"input: {path} holds {len(keys)} arrays {keys}; name one as '{path}:KEY'"
                )
            key = keys[0]
        elif key not in keys:
            raise ValueError(f"input: {path} has no array {key!r}; it holds {keys}")
        spec = f"{path}:{key}"
        info = archive.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return _ZipStreamSource(path, key, spec, resize, info.CRC, info.file_size)
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            member_start = info.header_offset + 30 + name_len + extra_len
            handle.seek(member_start)
            shape, fortran, dtype = _read_npy_header(handle, spec)
            data_offset = handle.tell()
    _holds_images(shape, spec)
    count = int(np.prod(shape)) if shape else 1
    if data_offset + count * dtype.itemsize > path.stat().st_size:
        raise ValueError(f"input: {spec} is truncated")
    array = np.memmap(
        path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran else "C"
    )
    identity = {"zip_crc32": info.CRC, "zip_size": info.file_size}
    return ArraySource(array, spec, "npz", resize, identity, archive=path)
