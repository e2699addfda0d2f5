"""Reading a generated data set back: :class:`GeneratedDataset` (memory-mapped shards)."""

from __future__ import annotations

import operator
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.generate.files import _sha256
from diffeo_engine.generate.manifest import read_manifest

__all__ = ["GeneratedDataset", "load_generated"]


class GeneratedDataset(torch.utils.data.Dataset):
    """The images of a generated data set, memory-mapped shard by shard.

    Item ``j`` is a dict ``{"tau": (C, H, W), "noisy": (C, H, W) (unless noise was none),
    "source_index": i, "k": k, "id": i * K + k}``. Only shards the manifest lists are
    served; an incomplete run is refused unless ``allow_incomplete``, in which case the
    items are the listed shards' ids in order.

    Each shard file is checked when first opened: its size, shape and dtype always, and
    with ``check=True`` its sha256 against the manifest (one read of the file), so a
    corrupted shard raises a ``ValueError`` naming the file instead of serving its bytes.
    Items are indexed by integers (Python, NumPy or 0-d integer tensors) only.
    """

    def __init__(self, out: str | Path, *, allow_incomplete: bool = False, check: bool = False):
        if not isinstance(check, bool):
            raise TypeError(f"check: expected True or False, got {check!r}")
        self.out = Path(out)
        self.check = check
        self.manifest = read_manifest(self.out)
        if not self.manifest["complete"] and not allow_incomplete:
            listed, total = len(self.manifest["shards"]), self.manifest["n_shards"]
            raise ValueError(
                f"out: {self.out} is incomplete ({listed} of {total} shards); finish it with "
                "`diffeo-engine generate --out DIR --resume`, or pass allow_incomplete=True"
            )
        self.kinds = list(self.manifest["kinds"])
        self.per_image = self.manifest["parameters"]["per_image"]
        self._shards = self.manifest["shards"]
        counts = [s["id_stop"] - s["id_start"] for s in self._shards]
        self._starts = np.cumsum([0, *counts]).tolist()
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _array(self, shard: int, kind: str) -> np.ndarray:
        key = (shard, kind)
        if key not in self._maps:
            self._maps[key] = self._open(self._shards[shard]["files"][kind])
        return self._maps[key]

    def _open(self, entry: dict) -> np.ndarray:
        path = self.out / entry["name"]  # a plain KIND-NNNNN.npy name (read_manifest)
        repair = f"; repair it with `diffeo-engine verify {self.out} --repair`"
        try:
            size = path.stat().st_size
            digest = _sha256(path) if self.check else entry["sha256"]
            array = np.load(path, mmap_mode="r") if size == entry["bytes"] else None
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in the manifest but missing{repair}") from None
        except OSError as error:
            raise OSError(error.errno, f"{path}: cannot read it: {error.strerror}") from error
        except ValueError as error:
            raise ValueError(f"{path}: not a readable .npy file ({error}){repair}") from error
        if size != entry["bytes"]:
            raise ValueError(f"{path}: {size} bytes, the manifest lists {entry['bytes']}{repair}")
        if digest != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest{repair}")
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise ValueError(
                f"{path}: holds {array.dtype} {list(array.shape)}, the manifest lists "
                f"{entry['dtype']} {entry['shape']}{repair}"
            )
        return array

    def id_of(self, index: int) -> int:
        shard = bisect_right(self._starts, index) - 1
        return self._shards[shard]["id_start"] + index - self._starts[shard]

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or (
            isinstance(index, torch.Tensor)
            and (index.dim() != 0 or index.is_floating_point() or index.dtype == torch.bool)
        ):
            raise TypeError(f"index: expected an integer, got {index!r}")
        try:
            index = operator.index(index)
        except TypeError:
            kind = "a slice" if isinstance(index, slice) else type(index).__name__
            raise TypeError(
                f"index: expected an integer, got {kind} ({index!r}); for several items use "
                "torch.utils.data.Subset or a DataLoader"
            ) from None
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index: expected -{n} <= index < {n}, got {index}")
        shard = bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        item: dict = {
            kind: torch.from_numpy(np.array(self._array(shard, kind)[row])) for kind in self.kinds
        }
        id_ = self._shards[shard]["id_start"] + row
        item.update(source_index=id_ // self.per_image, k=id_ % self.per_image, id=id_)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # each DataLoader worker maps the shards itself
        return state


def load_generated(
    out: str | Path, *, allow_incomplete: bool = False, check: bool = False
) -> GeneratedDataset:
    """A :class:`GeneratedDataset` over the shards in ``out`` (memory-mapped); ``check=True``
    verifies each shard's sha256 as it is first opened."""
    return GeneratedDataset(out, allow_incomplete=allow_incomplete, check=check)
