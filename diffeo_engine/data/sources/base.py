"""The :class:`ImageSource` interface and what every reader shares: the array layout rule,
dtype mapping, resizing, and the whole-content fingerprint a generated data set records.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffeo_engine.data.sources.labels import LabelSet, read_labels
from diffeo_engine.physics import _is_integer
from diffeo_engine.reference import to_dtype

__all__ = ["HASH_CHUNK_BYTES", "ImageSource"]

_NUMPY_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
CHANNELS = (1, 3, 4)

# Fingerprints read every row, this many bytes of rows at a time.
HASH_CHUNK_BYTES = 16 << 20


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
        if shape[1] in CHANNELS:
            return "nchw", (shape[1], shape[2], shape[3])
        if shape[3] in CHANNELS:
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


class ImageSource(ABC):
    """A data set of images served by index range as ``(B, C, H, W)`` tensors.

    ``shape`` and ``dtype`` describe what :meth:`batch` returns (after any ``resize``);
    uint8 data stays uint8. :meth:`fingerprint` identifies the content cheaply (see there).
    :attr:`labels` holds the images' class labels, when the source has them (a
    :class:`~diffeo_engine.data.sources.labels.LabelSet`, or None).
    """

    kind: str = "source"

    def __init__(self, spec: str, resize: tuple[int, int] | None) -> None:
        self.spec = spec
        self.resize = resize
        self._fingerprint: str | None = None
        self._labels: LabelSet | None = None
        self._labels_found = False

    # labels: found with the images (lazily), none, or from a file
    def _auto_labels(self) -> LabelSet | None:
        """The labels the format keeps with the images, or None (subclasses say)."""
        return None

    def _labels_from(self, spec: str | Path) -> LabelSet:
        """Labels named by the user (``labels=FILE``); an ``.npz`` source adds its keys."""
        return read_labels(spec)

    def attach_labels(self, labels: str | Path | bool | None) -> None:
        """``None``: the format's own labels (found on first use of :attr:`labels`);
        ``False``: none; a path: read now, and refused unless one per image."""
        if labels is None:
            self._labels, self._labels_found = None, False
            return
        if labels is False:
            self._labels, self._labels_found = None, True
            return
        if labels is True or not isinstance(labels, (str, Path)):
            raise TypeError(
                f"labels: expected None (found with the images), False or a file, got {labels!r}"
            )
        self._labels = self._checked_count(self._labels_from(labels))
        self._labels_found = True

    def _checked_count(self, labels: LabelSet | None) -> LabelSet | None:
        if labels is not None and len(labels) != len(self):
            where = labels.spec or f"the {labels.kind} labels"
            raise ValueError(
                f"labels: {where} holds {len(labels)} labels, but {self.spec} holds "
                f"{len(self)} images; give the matching labels (--labels FILE) or none "
                "(--no-labels)"
            )
        return labels

    @property
    def labels(self) -> LabelSet | None:
        """The class labels, one per image, or None."""
        if not self._labels_found:
            self._labels = self._checked_count(self._auto_labels())
            self._labels_found = True
        return self._labels

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
        """Cheap content identifiers beside the content (file sizes, CRCs)."""
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
        if not (_is_integer(start) and _is_integer(stop) and 0 <= start <= stop <= n):
            raise IndexError(f"batch: expected 0 <= start <= stop <= {n}, got ({start}, {stop})")
        images = torch.from_numpy(self._read(start, stop))
        if self.resize is not None:
            images = _resize_batch(images, self.resize)
        return images

    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over the length, native shape, dtype, ``resize``, cheap file
        identifiers (sizes, zip CRCs) and every byte of the content: all rows (streamed,
        ``HASH_CHUNK_BYTES`` at a time), or for image folders the sorted list of (relative
        path, size) and every file's bytes. A resume over a source changed anywhere is
        therefore refused. Computed once per source object (a pass over the data: about
        the cost of reading it once).
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
        step = max(1, HASH_CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, len(self), step):
            digest.update(self._read(start, min(start + step, len(self))).tobytes())

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
            "labels": None if self.labels is None else self.labels.describe(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)}, shape={self.shape})"
