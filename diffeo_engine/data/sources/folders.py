"""Image folders: every PNG/JPEG below a directory, decoded with Pillow (the mode rule of
the package docstring), optionally resized so that folders of mixed sizes work. A folder
whose images all lie in sub-folders is labelled by them (the ``ImageFolder`` layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.data.sources.base import HASH_CHUNK_BYTES, ImageSource, _resize_batch
from diffeo_engine.data.sources.labels import LabelSet
from diffeo_engine.physics import _is_integer

__all__ = ["IMAGE_SUFFIXES", "FolderSource"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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

    def _auto_labels(self) -> LabelSet | None:
        """Class ``c`` is the ``c``-th name, sorted, of the sub-folders holding the images
        (as ``torchvision.datasets.ImageFolder`` numbers them); no labels when an image lies
        in the folder itself."""
        parts = [p.relative_to(self._root).parts for p in self._files]
        if any(len(part) < 2 for part in parts):
            return None
        classes = sorted({part[0] for part in parts})
        index = {name: c for c, name in enumerate(classes)}
        values = np.array([index[part[0]] for part in parts], dtype=np.int64)
        return LabelSet(values, "folder", None, classes)

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
        if not (_is_integer(start) and _is_integer(stop) and 0 <= start <= stop <= n):
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
        for path in self._files:  # every file's bytes, streamed
            with open(path, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
