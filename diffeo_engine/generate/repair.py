"""Repair a damaged data set: re-hash every listed shard, forget and remove the damaged or
missing ones, then resume the run, which writes exactly those shards again (byte-identical
to the first run's for the same backend and device type: contents depend only on
``(seed, id)``). The CLI's ``diffeo-engine verify DIR --repair``."""

from __future__ import annotations

from pathlib import Path

import torch

from diffeo_engine.data.sources import ImageSource
from diffeo_engine.generate.files import _lock, _unlock
from diffeo_engine.generate.manifest import _write_manifest, read_manifest, shard_name
from diffeo_engine.generate.run import generate
from diffeo_engine.generate.verification import shard_problems

__all__ = ["repair"]


def repair(
    out: str | Path,
    *,
    source: str | Path | ImageSource | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    progress: bool | None = None,
) -> list[str]:
    """Rewrite every listed shard whose files are missing, unreadable, or differ from the
    manifest's sha256/shape/dtype, and finish an incomplete run; the problems found.

    ``source`` overrides the manifest's source path (its fingerprint must match, as on any
    resume); ``batch_size``, ``device`` and ``backend`` default to the run's own.
    """
    out = Path(out)
    read_manifest(out)  # a clear error before the lock is taken in a folder that is no run
    lock = _lock(out)
    try:
        manifest = read_manifest(out)  # under the lock
        found: list[str] = []
        bad = []
        for shard in manifest["shards"]:
            problems = shard_problems(out, manifest, shard)
            if problems:
                found += problems
                bad.append(shard["index"])
        if bad:
            manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in bad]
            manifest["complete"] = False
            _write_manifest(out, manifest)  # first forget them, then remove their files
            for index in bad:
                for kind in manifest["kinds"]:
                    (out / shard_name(kind, index)).unlink(missing_ok=True)
    finally:
        _unlock(out, lock)
    generate(
        source, out, resume=True, batch_size=batch_size, device=device, backend=backend,
        progress=progress,
    )  # fmt: skip
    return found
