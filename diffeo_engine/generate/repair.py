"""Repair a damaged data set: find the damaged or missing shards (by their hashes, and with
``full=True`` by regenerating every image), forget and remove their files (links and special
files are removed, never followed or read), then resume the run, which writes exactly those
shards again (byte-identical to the first run's for the same backend and device type:
contents depend only on ``(seed, id)``). The CLI's ``diffeo-engine verify DIR --repair``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from diffeo_engine.data.sources import ImageSource
from diffeo_engine.generate.files import _lock, _unlock
from diffeo_engine.generate.manifest import (
    FORMAT_VERSION,
    _write_manifest,
    check_out_path,
    file_kinds,
    read_manifest,
    shard_name,
)
from diffeo_engine.generate.run import generate
from diffeo_engine.generate.verification import shard_problems, verify

__all__ = ["repair"]


def repair(
    out: str | Path,
    *,
    full: bool = False,
    shards: list[int] | None = None,
    source: str | Path | ImageSource | None = None,
    labels: str | Path | bool | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    progress: bool | None = None,
) -> list[str]:
    """Rewrite every listed shard whose files are missing, not regular files, unreadable,
    or differ from the manifest's size/sha256/shape/dtype (with ``full=True``: or whose
    images differ from their regeneration, as ``verify(full=True)`` finds), plus the shard
    indices in ``shards``; finish an incomplete run; the problems found.

    ``source``/``labels`` override the manifest's (the fingerprint must match, as on any
    resume); ``batch_size``, ``device`` and ``backend`` default to the run's own. Data sets
    of manifest formats 1 and 2 are refused (read and verified, not repaired).
    """
    out = check_out_path(out)
    manifest = read_manifest(out)  # a clear error before the lock is taken in a non-run
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"out: {out} was written with manifest format {manifest['format_version']}; it can "
            "be read and verified, not resumed or repaired. Generate it again into another "
            "--out (the same parameters make the same images)"
        )
    found: list[str] = []
    wanted = set(shards or ())
    if full:
        report = verify(
            out, full=True, source=source, labels=labels, device=device, backend=backend,
            progress=progress,
        )  # fmt: skip
        for problem in report.problems:
            if not problem.startswith("incomplete:"):
                found.append(problem)
        wanted |= set(report.bad_shards)
    lock = _lock(out)
    try:
        manifest = read_manifest(out)  # under the lock
        bad = []
        for shard in manifest["shards"]:
            problems = shard_problems(out, manifest, shard)
            if problems or shard["index"] in wanted:
                found += [p for p in problems if p not in found]
                bad.append(shard["index"])
        if bad:
            manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in bad]
            manifest["complete"] = False
            _write_manifest(out, manifest)  # first forget them, then remove their files
            for shard in bad:
                for kind in file_kinds(manifest):
                    _remove(out / shard_name(kind, shard))
    finally:
        _unlock(out, lock)
    generate(
        source, out, labels=labels, resume=True, batch_size=batch_size, device=device,
        backend=backend, progress=progress,
    )  # fmt: skip
    return found


def _remove(path: Path) -> None:
    """Remove a shard file, or whatever stands in its place, without following it; a
    folder is refused (repair removes files only)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"out: {path} is a folder where a shard file belongs; remove it first")
    os.unlink(path)
