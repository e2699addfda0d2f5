"""Reading a generated data set back: :class:`GeneratedDataset` (memory-mapped shards)."""

from __future__ import annotations

import operator
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.data.sources import ImageSource
from diffeo_engine.generate.files import ShardFileProblem, open_listed
from diffeo_engine.generate.manifest import LABEL, check_out_path, read_manifest
from diffeo_engine.generate.plan import Recipe
from diffeo_engine.generate.verification import Regenerator

__all__ = ["CHECKED_IDS", "GeneratedDataset", "load_generated"]

# ids per shard that check=True regenerates when it opens the shard: its first and last
CHECKED_IDS = 2


class GeneratedDataset(torch.utils.data.Dataset):
    """The images of a generated data set, memory-mapped shard by shard.

    Item ``j`` is a dict ``{"tau": (C, H, W), "noisy": (C, H, W) (unless noise was none),
    "label": int (when the data set has labels), "source_index": i, "k": k, "setting": s,
    "T": T, "cut": cut, "id": (s * length + i) * K + k}``. Only shards the manifest lists
    are served; an incomplete run is refused unless ``allow_incomplete``, in which case the
    items are the listed shards' ids in order.

    Each shard's files are checked when the shard is first opened, without being read
    first: each must be a regular file in the folder (no link, FIFO or device) of the listed
    size, with the listed shape and dtype. With ``check=True`` also its sha256 against the
    manifest (one read of each file) and, so that a manifest whose parameters were edited
    is caught too, its first and last ids are regenerated from the source (on the CPU;
    ``source``/``labels`` if it moved) and compared, after the source's fingerprint and
    labels are compared once with the manifest's. A shard that fails raises naming its file.
    Items are indexed by integers (Python, NumPy or 0-d integer tensors) only.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        allow_incomplete: bool = False,
        check: bool = False,
        source: str | Path | ImageSource | None = None,
        labels: str | Path | bool | None = None,
    ):
        if not isinstance(check, bool):
            raise TypeError(f"check: expected True or False, got {check!r}")
        if not isinstance(allow_incomplete, bool):
            raise TypeError(f"allow_incomplete: expected True or False, got {allow_incomplete!r}")
        self.out = check_out_path(out)
        self.check = check
        self.manifest = read_manifest(self.out)
        if not self.manifest["complete"] and not allow_incomplete:
            listed, total = len(self.manifest["shards"]), self.manifest["n_shards"]
            raise ValueError(
                f"out: {self.out} is incomplete ({listed} of {total} shards); finish it with "
                "`diffeo-engine generate --out DIR --resume`, or pass allow_incomplete=True"
            )
        self.recipe = Recipe.of(self.manifest)
        self.kinds = list(self.manifest["kinds"])
        self.labelled = LABEL in self.recipe.files
        self.per_image = self.recipe.per_image
        self._shards = self.manifest["shards"]
        counts = [s["id_stop"] - s["id_start"] for s in self._shards]
        self._starts = np.cumsum([0, *counts]).tolist()
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._regenerator = (
            Regenerator(self.out, self.manifest, source=source, labels=labels, device="cpu")
            if check
            else None
        )

    def __len__(self) -> int:
        return self._starts[-1]

    def _repair_hint(self) -> str:
        return f"; repair it with `diffeo-engine verify {self.out} --repair`"

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._maps:
            record = self._shards[shard]
            arrays = {}
            for kind, entry in record["files"].items():
                try:
                    arrays[kind] = open_listed(self.out, entry, check_hash=self.check)
                except ShardFileProblem as problem:
                    message = f"{self.out / problem.name}: {problem.problem}{self._repair_hint()}"
                    raise (FileNotFoundError if problem.missing else ValueError)(message) from None
            if self._regenerator is not None:
                self._check_regenerated(record, arrays)
            self._maps[shard] = arrays
        return self._maps[shard]

    def _check_regenerated(self, record: dict, arrays: dict[str, np.ndarray]) -> None:
        _, problem = self._regenerator.source()
        if problem is not None:
            raise ValueError(f"out: {self.out}: {problem}")
        ids = sorted({record["id_start"], record["id_stop"] - 1})[:CHECKED_IDS]
        problems, _ = self._regenerator.check_ids(record, arrays, ids)
        if problems:
            name = record["files"]["tau"]["name"]
            raise ValueError(
                f"{self.out / name}: {problems[0]}: the manifest does not describe this shard "
                f"(its parameters were changed?){self._repair_hint()}"
            )

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
        arrays = self._arrays(shard)
        item: dict = {kind: torch.from_numpy(np.array(arrays[kind][row])) for kind in self.kinds}
        if self.labelled:
            item["label"] = int(arrays[LABEL][row])
        id_ = self._shards[shard]["id_start"] + row
        setting, source_index, k = self.recipe.locate(id_)
        T, cut = self.recipe.settings[setting]
        item.update(source_index=source_index, k=k, setting=setting, T=T, cut=cut, id=id_)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # each DataLoader worker maps the shards itself
        return state


def load_generated(
    out: str | Path,
    *,
    allow_incomplete: bool = False,
    check: bool = False,
    source: str | Path | ImageSource | None = None,
    labels: str | Path | bool | None = None,
) -> GeneratedDataset:
    """A :class:`GeneratedDataset` over the shards in ``out`` (memory-mapped); ``check=True``
    verifies each shard's sha256 as it is first opened and regenerates its first and last
    ids from the source (``source``/``labels`` override the manifest's, if it moved)."""
    return GeneratedDataset(
        out, allow_incomplete=allow_incomplete, check=check, source=source, labels=labels
    )
