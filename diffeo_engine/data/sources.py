"""Image sources: one reader interface over arrays, image folders, MNIST IDX and torchvision.

:func:`open_source` turns a user's ``--input``/``--data`` string into an :class:`ImageSource`,
which serves ``(B, C, H, W)`` batches by index range without loading the data set whole.
Shared by ``generate``, ``sensitivity`` and ``reproduce``, so every command reads data the
same way.

Spec rules (``open_source(spec)``):

* ``file.npy`` -- memory-mapped (``np.load(mmap_mode="r")``).
* ``file.npz`` -- the archive must hold exactly one array, else name it: ``file.npz:key``.
  A member stored uncompressed (``np.savez``) is memory-mapped in place; a compressed one
  (``np.savez_compressed``) is streamed from the archive (fast forwards, slow backwards).
* a directory -- every ``.png``/``.jpg``/``.jpeg`` below it (recursive, case-insensitive),
  sorted by relative path component-wise, decoded with Pillow to uint8. Grey images give
  ``C = 1``, colour ``C = 3``, images with alpha (or palette transparency) ``C = 4``. All must
  share one ``(C, H, W)``, else a ``ValueError`` names the first file that differs from the
  first one; with ``resize=(H, W)`` every image is resized (channels must still agree).
* an IDX file (MNIST's format, raw or ``.gz``) -- recognised by its magic number; raw files
  are memory-mapped, gzip'd ones are decompressed into memory.
* ``torchvision:NAME:ROOT[:SPLIT]`` -- ``torchvision.datasets.NAME(ROOT, download=False)``,
  with ``train=(SPLIT == "train")`` or ``split=SPLIT`` where the class takes one.

Array layout rule: ``(N, H, W)`` gets ``C = 1``; a 4-d array is ``(N, C, H, W)`` when its
axis 1 is 1, 3 or 4, else ``(N, H, W, C)`` when its last axis is 1, 3 or 4, else an error.
Data types: uint8 (kept as uint8), float16, float32, float64 (any byte order); anything
else is refused rather than guessed at.

``resize=(H, W)`` applies to every kind of source: bilinear with antialiasing
(``torch.nn.functional.interpolate``), uint8 rounded half up back to uint8.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffeo_engine.reference import to_dtype

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageSource",
    "load_mnist",
    "open_source",
    "parse_resize",
    "read_idx",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_NUMPY_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
_CHANNELS = (1, 3, 4)

# Fingerprints: hash everything when the data is this small, else this many sampled rows.
_FULL_HASH_BYTES = 8 << 20
_SAMPLED_ROWS = 64

# IDX type codes (http://yann.lecun.com/exdb/mnist/), big-endian data.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ------------------------------------------------------------------------------ helpers


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
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in resize)
    ):
        raise ValueError(f"resize: expected (H, W), two integers >= 2, got {resize!r}")
    if min(resize) < 2:
        raise ValueError(f"resize: expected H >= 2 and W >= 2, got {tuple(resize)}")
    return int(resize[0]), int(resize[1])


def _torch_dtype(dtype: np.dtype, where: str) -> torch.dtype:
    native = dtype.newbyteorder("=")
    if native not in _NUMPY_TO_TORCH:
        raise TypeError(
            f"input: expected image data of dtype uint8, float16, float32 or float64 in "
            f"{where}, got {dtype} (convert it first)"
        )
    return _NUMPY_TO_TORCH[native]


def _layout(shape: tuple[int, ...], where: str) -> tuple[str, tuple[int, int, int]]:
    """``("nhw" | "nchw" | "nhwc", (C, H, W))`` by the documented layout rule."""
    if len(shape) == 3:
        return "nhw", (1, shape[1], shape[2])
    if len(shape) == 4:
        if shape[1] in _CHANNELS:
            return "nchw", (shape[1], shape[2], shape[3])
        if shape[3] in _CHANNELS:
            return "nhwc", (shape[3], shape[1], shape[2])
    raise ValueError(
        f"input: expected an array of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with "
        f"C in {{1, 3, 4}} in {where}, got {tuple(shape)}"
    )


def _to_chw(array: np.ndarray, layout: str) -> np.ndarray:
    """A batch ``(B, ...)`` in the source's layout as a native-endian C-contiguous NCHW."""
    if layout == "nhw":
        array = array[:, None]
    elif layout == "nhwc":
        array = array.transpose(0, 3, 1, 2)
    # always a fresh, writable copy: never a view into a memory map or a bytes buffer
    return np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)


def _resize_batch(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    values = F.interpolate(
        images.to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return to_dtype(values, images.dtype)


def _pil_to_chw(image, where: str) -> np.ndarray:
    """A Pillow image as a uint8 ``(C, H, W)`` array by the documented mode rule."""
    mode = image.mode
    if mode in ("1", "L"):
        target = "L"
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        target = "RGBA"
    elif mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        target = "RGB"
    else:
        raise ValueError(
            f"input: {where} has image mode {mode!r}; expected 8-bit grey, colour or "
            "colour+alpha images (convert 16-bit or float images first)"
        )
    array = np.asarray(image.convert(target) if image.mode != target else image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array) if array.flags.writeable else array.copy()


def _pil_channels(mode: str, info: dict) -> int | None:
    if mode in ("1", "L"):
        return 1
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in info):
        return 4
    if mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return 3
    return None


def _import_pil():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow is in the test extras
        raise ValueError(
            "input: reading an image folder needs Pillow: pip install 'diffeo-engine[images]'"
        ) from error
    return Image


def _sample_indices(n: int, row_bytes: int) -> np.ndarray:
    if n * row_bytes <= _FULL_HASH_BYTES or n <= _SAMPLED_ROWS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, _SAMPLED_ROWS).round().astype(np.int64))


# ----------------------------------------------------------------------------- sources


class ImageSource(ABC):
    """A data set of images served by index range as ``(B, C, H, W)`` tensors.

    ``shape`` and ``dtype`` describe what :meth:`batch` returns (after any ``resize``);
    uint8 data stays uint8. :meth:`fingerprint` identifies the content cheaply (see there).
    """

    kind: str = "source"

    def __init__(self, spec: str, resize: tuple[int, int] | None) -> None:
        self.spec = spec
        self.resize = resize
        self._fingerprint: str | None = None

    # what subclasses provide: the native (un-resized) shape, dtype and rows
    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def native_shape(self) -> tuple[int, int, int]: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a native-endian uint8/float ``(B, C, H, W)`` array."""

    def _identity(self) -> dict:
        """Cheap content identifiers beyond the sampled rows (file sizes, CRCs)."""
        return {}

    # the public interface
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images :meth:`batch` returns."""
        C, H, W = self.native_shape
        return (C, *self.resize) if self.resize is not None else (C, H, W)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start .. stop - 1`` as a contiguous ``(B, C, H, W)`` CPU tensor."""
        n = len(self)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise IndexError(f"batch: expected 0 <= start <= stop <= {n}, got ({start}, {stop})")
        images = torch.from_numpy(self._read(start, stop))
        if self.resize is not None:
            images = _resize_batch(images, self.resize)
        return images

    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over the length, native shape, dtype, ``resize``, cheap file
        identifiers (sizes, zip CRCs) and the bytes of every row when the data is at most
        8 MiB, else of 64 evenly spaced rows (first and last included). Image folders hash
        the sorted list of (relative path, size) and the bytes of the files in place of rows.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {
                "length": len(self),
                "shape": list(self.native_shape),
                "dtype": str(self.dtype).removeprefix("torch."),
                "resize": list(self.resize) if self.resize else None,
                **self._identity(),
            }
            digest.update(json.dumps(header, sort_keys=True).encode())
            self._hash_content(digest)
            self._fingerprint = "sha256:" + digest.hexdigest()
        return self._fingerprint

    def _hash_content(self, digest) -> None:
        C, H, W = self.native_shape
        row_bytes = C * H * W * torch.empty((), dtype=self.dtype).element_size()
        for i in _sample_indices(len(self), row_bytes):
            digest.update(self._read(int(i), int(i) + 1).tobytes())

    def describe(self) -> dict:
        """What a manifest records about the source."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "length": len(self),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "resize": list(self.resize) if self.resize else None,
            "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)}, shape={self.shape})"


class ArraySource(ImageSource):
    """An array already in memory or memory-mapped (``.npy``, stored ``.npz``, raw IDX)."""

    def __init__(
        self, array: np.ndarray, spec: str, kind: str, resize, identity: dict | None = None
    ):
        super().__init__(spec, resize)
        self.kind = kind
        self._layout, self._shape = _layout(array.shape, spec)
        self._dtype = _torch_dtype(array.dtype, spec)
        self._array = array
        self._extra = identity or {}

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

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state.pop("_archive", None)
        return state


class FolderSource(ImageSource):
    """PNG/JPEG files below a directory, decoded with Pillow."""

    kind = "folder"

    def __init__(self, root: Path, spec: str, resize):
        super().__init__(spec, resize)
        Image = _import_pil()
        self._root = root
        files = sorted(
            (
                p
                for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            ),
            key=lambda p: p.relative_to(root).parts,
        )
        if not files:
            hint = ""
            if any(p.is_file() and "ubyte" in p.name for p in root.iterdir()):
                hint = " (for MNIST IDX files, pass the images file itself)"
            raise ValueError(f"input: no .png/.jpg/.jpeg images found under {root}{hint}")
        first_shape = None
        for path in files:
            try:
                with Image.open(path) as image:
                    channels = _pil_channels(image.mode, image.info)
                    shape = (channels, image.size[1], image.size[0])
            except (OSError, SyntaxError) as error:
                raise ValueError(f"input: cannot read image {path}: {error}") from error
            if channels is None:
                raise ValueError(
                    f"input: {path} has image mode {image.mode!r}; expected 8-bit grey, colour "
                    "or colour+alpha images (convert 16-bit or float images first)"
                )
            if first_shape is None:
                first_shape = shape
            elif shape[0] != first_shape[0]:
                raise ValueError(
                    f"input: images of mixed channel counts under {root}: {path} has "
                    f"C={shape[0]}, the first image ({files[0]}) has C={first_shape[0]}; "
                    "convert them to one mode"
                )
            elif shape != first_shape and resize is None:
                raise ValueError(
                    f"input: images of mixed shapes under {root}: {path} is "
                    f"{shape[1]}x{shape[2]}, the first image ({files[0]}) is "
                    f"{first_shape[1]}x{first_shape[2]} (H x W); pass resize=(H, W) "
                    "(--resize HxW) to resize them all"
                )
        self._files = files
        self._shape = first_shape

    def __len__(self) -> int:
        return len(self._files)

    @property
    def native_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def _load(self, path: Path) -> np.ndarray:
        Image = _import_pil()
        try:
            with Image.open(path) as image:
                array = _pil_to_chw(image, str(path))
        except (OSError, SyntaxError) as error:
            raise ValueError(f"input: cannot decode image {path}: {error}") from error
        return array

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if self.resize is None:
            return super().batch(start, stop)
        n = len(self)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise IndexError(f"batch: expected 0 <= start <= stop <= {n}, got ({start}, {stop})")
        C = self._shape[0]
        out = torch.empty((stop - start, C, *self.resize), dtype=torch.uint8)
        for row, path in enumerate(self._files[start:stop]):
            image = torch.from_numpy(self._load(path))[None]
            out[row] = _resize_batch(image, self.resize)[0]
        return out

    def _read(self, start: int, stop: int) -> np.ndarray:
        C, H, W = self._shape
        out = np.empty((stop - start, C, H, W), dtype=np.uint8)
        for row, path in enumerate(self._files[start:stop]):
            out[row] = self._load(path)
        return out

    def _hash_content(self, digest) -> None:
        listing = [(p.relative_to(self._root).as_posix(), p.stat().st_size) for p in self._files]
        digest.update(json.dumps(listing).encode())
        total = sum(size for _, size in listing)
        mean = max(1, total // len(listing))
        for i in _sample_indices(len(self._files), mean):
            digest.update(self._files[int(i)].read_bytes())


class TorchvisionSource(ImageSource):
    """A ``torchvision.datasets`` class, item ``[0]`` taken as the image."""

    kind = "torchvision"

    def __init__(self, name: str, root: str, split: str | None, spec: str, resize):
        super().__init__(spec, resize)
        try:
            import torchvision.datasets as datasets
        except ImportError as error:
            raise ValueError(
                f"input: {spec!r} needs torchvision, which is not installed"
            ) from error
        cls = getattr(datasets, name, None)
        if not inspect.isclass(cls):
            raise ValueError(f"input: torchvision.datasets has no data set named {name!r}")
        kwargs = {}
        params = inspect.signature(cls).parameters
        if split is not None:
            if "train" in params:
                kwargs["train"] = split == "train"
            elif "split" in params:
                kwargs["split"] = split
            else:
                raise ValueError(f"input: torchvision.datasets.{name} takes no split")
        if "download" in params:
            kwargs["download"] = False
        try:
            self._dataset = cls(root, **kwargs)
        except (RuntimeError, OSError) as error:
            raise FileNotFoundError(
                f"input: cannot open torchvision.datasets.{name} at {root}: {error}"
            ) from error
        self._name, self._split = name, split
        if len(self._dataset) == 0:
            raise ValueError(f"input: {spec!r} is empty")
        first = self._item(0)
        self._shape = tuple(first.shape)
        self._dtype = _torch_dtype(first.dtype, spec)

    def _item(self, index: int) -> np.ndarray:
        item = self._dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        where = f"{self.spec} item {index}"
        if torch.is_tensor(image):
            array = image.numpy()
        elif isinstance(image, np.ndarray):
            array = image
        else:
            array = _pil_to_chw(image, where)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[0] not in _CHANNELS:
            raise ValueError(f"input: {where} is not a (C, H, W) image: {array.shape}")
        return array

    def __len__(self) -> int:
        return len(self._dataset)

    @property
    def native_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        rows = []
        for index in range(start, stop):
            array = self._item(index)
            if tuple(array.shape) != self._shape and (
                self.resize is None or array.shape[0] != self._shape[0]
            ):
                raise ValueError(
                    f"input: {self.spec} item {index} has shape {tuple(array.shape)}, item 0 "
                    f"has {self._shape}; pass resize=(H, W) (--resize HxW)"
                )
            rows.append(array)
        if self.resize is not None:  # resize each item here; batch() then sees one shape
            rows = [
                _resize_batch(torch.from_numpy(np.ascontiguousarray(r))[None], self.resize)[
                    0
                ].numpy()
                for r in rows
            ]
        return np.ascontiguousarray(np.stack(rows), dtype=rows[0].dtype.newbyteorder("="))

    def batch(self, start: int, stop: int) -> torch.Tensor:
        n = len(self)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise IndexError(f"batch: expected 0 <= start <= stop <= {n}, got ({start}, {stop})")
        if start == stop:
            return torch.empty((0, *self.shape), dtype=self.dtype)
        return torch.from_numpy(self._read(start, stop))

    def _identity(self) -> dict:
        return {"torchvision": self._name, "split": self._split}

    def _hash_content(self, digest) -> None:
        n = len(self)  # items decode one by one: always sample, never hash them all
        for i in np.unique(np.linspace(0, n - 1, min(n, _SAMPLED_ROWS)).round().astype(int)):
            digest.update(self._item(int(i)).tobytes())


# ------------------------------------------------------------------------------- files


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


def _open_npy(path: Path, spec: str, resize) -> ImageSource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"input: {path} is not a readable .npy array: {error}") from error
    return ArraySource(array, spec, "npy", resize, {"file_size": path.stat().st_size})


def _open_npz(path: Path, key: str | None, spec: str, resize) -> ImageSource:
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
    count = int(np.prod(shape)) if shape else 1
    if data_offset + count * dtype.itemsize > path.stat().st_size:
        raise ValueError(f"input: {spec} is truncated")
    array = np.memmap(
        path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran else "C"
    )
    identity = {"zip_crc32": info.CRC, "zip_size": info.file_size}
    return ArraySource(array, spec, "npz", resize, identity)


def _idx_header(data: bytes, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"input: {where} is not an IDX file (bad magic number)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"input: {where} is not an IDX file (bad header)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return _IDX_TYPES[data[2]], tuple(shape), 4 + 4 * ndim


def _is_idx(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_TYPES


def read_idx(path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """An IDX file (MNIST's format; raw or ``.gz``) as an array in its stored dtype.

    ``mmap=True`` memory-maps a raw file instead of reading it (ignored for ``.gz``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such IDX file: {path}")
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


def _open_idx(path: Path, spec: str, resize) -> ImageSource:
    array = read_idx(path, mmap=True)
    if array.ndim not in (3, 4):
        raise ValueError(
            f"input: {path} is an IDX file of shape {array.shape}; expected images "
            "(N, H, W) -- is this a labels file?"
        )
    return ArraySource(array, spec, "idx", resize, {"file_size": path.stat().st_size})


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


def open_source(spec: str | Path, *, resize: tuple[int, int] | str | None = None) -> ImageSource:
    """Open ``spec`` (see the module docstring for the accepted forms) as an ImageSource."""
    resize = parse_resize(resize)
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
    key = None
    path = Path(text).expanduser()
    if not path.exists() and ".npz:" in text:
        head, _, key = text.rpartition(":")
        path = Path(head).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input: no such file or directory: {path}")
    path = path.resolve()
    if path.is_dir():
        return FolderSource(path, str(path), resize)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path, str(path), resize)
    if suffix == ".npz":
        return _open_npz(path, key, str(path), resize)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as handle:
            try:
                head = handle.read(4)
            except (OSError, EOFError) as error:
                raise ValueError(f"input: {path} is a damaged gzip file: {error}") from error
    if _is_idx(head):
        return _open_idx(path, str(path), resize)
    raise ValueError(
        f"input: cannot tell what {path} is; expected a .npy/.npz array, an image folder, "
        "an IDX file (raw or .gz) or 'torchvision:NAME:ROOT'"
    )
