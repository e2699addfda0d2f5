"""The writer thread: hashes and writes this rank's finished shards in order, and after each
one (each round, under several processes) adds their records to the manifest."""

from __future__ import annotations

import threading
from pathlib import Path

from diffeo_engine.distributed import DistributedError
from diffeo_engine.generate.files import _fault, _fsync_dir, _npy_chunks, _write_file
from diffeo_engine.generate.manifest import _write_manifest, file_kinds, shard_name


class _Writer(threading.Thread):
    """Writes this rank's finished shards in order and updates the manifest after each one.

    Under several processes the update is per round (one shard per rank): the ranks'
    records are gathered, every rank adds them to its copy of the manifest and rank 0
    writes it. A rank with no shard left in a round still joins the gather.

    On an error it records it and keeps returning buffers (without writing), so that the
    producer never blocks; the producer checks :attr:`error` before every shard.
    """

    def __init__(self, out: Path, manifest: dict, work, free, fault, extra: dict, ctx, bar):
        super().__init__(name="diffeo-engine-writer", daemon=True)
        self.out, self.manifest, self.work, self.free = out, manifest, work, free
        self.fault, self.extra, self.ctx, self.bar = fault, extra, ctx, bar
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.work.get()
            if job is None:
                return
            index, lo, hi, buffers = job
            try:
                if self.error is None:
                    self._round(index, lo, hi, buffers)
            except BaseException as error:
                self.error = error
            finally:
                if buffers is not None:
                    self.free.put(buffers)

    def _round(self, index: int | None, lo: int, hi: int, buffers: dict | None) -> None:
        ctx = self.ctx
        entry = failure = None
        if index is not None:
            try:
                entry = self._write(index, lo, hi, buffers)
            except Exception as error:
                if not ctx.active:
                    raise
                failure = error
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = ctx.all_gather_object((entry, message))
        entries = [e for e, _ in reports if e is not None]
        if entries:  # listed even when another rank failed: a resume skips them
            self._merge(entries)
        if failure is not None:
            raise failure
        for rank, (_, message) in enumerate(reports):
            if message is not None:
                raise DistributedError(
                    f"rank {ctx.rank}: rank {rank} failed writing its shard: {message}"
                )
        if index is not None:
            _fault(self.fault, "between-shards", index)

    def _write(self, index: int, lo: int, hi: int, buffers: dict) -> dict:
        """Write the shard's files (hashing them); its manifest record."""
        kinds = file_kinds(self.manifest)  # the images, then the labels
        files = {}
        for kind in kinds:
            array = buffers[kind][: hi - lo].numpy()
            name = shard_name(kind, index)
            halfway = self.fault is not None and kind == kinds[-1]
            sha, size = _write_file(
                self.out / name,
                _npy_chunks(array, halfway),
                fault=self.fault,
                point="shard-write",
                shard=index,
            )
            files[kind] = {
                "name": name,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "bytes": size,
                "sha256": sha,
            }
        _fsync_dir(self.out)
        _fault(self.fault, "shard-renamed", index)
        return {
            "index": index,
            "id_start": lo,
            "id_stop": hi,
            **self.extra,
            "files": files,
        }

    def _merge(self, entries: list[dict]) -> None:
        shards = {s["index"]: s for s in self.manifest["shards"]}
        shards.update((e["index"], e) for e in entries)
        self.manifest["shards"] = [shards[i] for i in sorted(shards)]
        self.manifest["complete"] = len(shards) == self.manifest["n_shards"]
        if self.ctx.is_main:
            indices = [e["index"] for e in entries]
            fault = self.fault
            shard = fault[1] if fault is not None and fault[1] in indices else indices[0]
            _write_manifest(self.out, self.manifest, fault, shard)
        if self.bar is not None:
            self.bar.update(sum(e["id_stop"] - e["id_start"] for e in entries))
