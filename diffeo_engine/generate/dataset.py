"""Reading a generated data set back: :class:`GeneratedDataset` (memory-mapped shards)."""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.generate.manifest import read_manifest

__all__ = ["GeneratedDataset", "load_generated"]


class GeneratedDataset(torch.utils.data.Dataset):
    """The images of a generated data set, memory-mapped shard by shard.

    Item ``j`` is a dict ``{"tau": (C, H, W), "noisy": (C, H, W) (unless noise was none),
    "source_index": i, "k": k, "id": i * K + k}``. Only shards the manifest lists are
    served; an incomplete run is refused unless ``allow_incomplete``, in which case the
    items are the listed shards' ids in order.
    """

    def __init__(self, out: str | Path, *, allow_incomplete: bool = False):
        self.out = Path(out)
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
            entry = self._shards[shard]["files"][kind]
            self._maps[key] = np.load(self.out / entry["name"], mmap_mode="r")
        return self._maps[key]

    def id_of(self, index: int) -> int:
        shard = bisect_right(self._starts, index) - 1
        return self._shards[shard]["id_start"] + index - self._starts[shard]

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, torch.Tensor):
            index = int(index)
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


def load_generated(out: str | Path, *, allow_incomplete: bool = False) -> GeneratedDataset:
    """A :class:`GeneratedDataset` over the shards in ``out`` (memory-mapped)."""
    return GeneratedDataset(out, allow_incomplete=allow_incomplete)
