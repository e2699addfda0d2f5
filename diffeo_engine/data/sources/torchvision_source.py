"""``torchvision:NAME:ROOT[:SPLIT]``: a ``torchvision.datasets`` class as an image source."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from diffeo_engine.data.sources.base import (
    CHANNELS,
    ImageSource,
    _resize_batch,
    _torch_dtype,
)
from diffeo_engine.data.sources.folders import _pil_to_chw
from diffeo_engine.physics import _is_integer

__all__ = ["TorchvisionSource"]


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
        if array.ndim != 3 or array.shape[0] not in CHANNELS:
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
        if not (_is_integer(start) and _is_integer(stop) and 0 <= start <= stop <= n):
            raise IndexError(f"batch: expected 0 <= start <= stop <= {n}, got ({start}, {stop})")
        if start == stop:
            return torch.empty((0, *self.shape), dtype=self.dtype)
        return torch.from_numpy(self._read(start, stop))

    def _identity(self) -> dict:
        return {"torchvision": self._name, "split": self._split}

    def _hash_content(self, digest) -> None:
        for i in range(len(self)):  # items decode one by one: every item, in order
            digest.update(self._item(i).tobytes())
