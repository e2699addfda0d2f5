"""Crash-safe files: write under a temporary name, fsync, rename; the ``.lock``; hashing;
and the test-only fault injection (``DIFFEO_ENGINE_GENERATE_FAULT=POINT:SHARD``).

Fault points: ``shard-write`` (half of the last kind's temporary file written),
``shard-renamed`` (shard files in place, manifest not yet updated), ``manifest-write``
(half of the manifest's temporary file written) and ``between-shards`` (manifest lists the
shard, the next not begun). Never set the variable otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
from pathlib import Path

import numpy as np

__all__ = ["CHUNK", "FAULT_ENV", "FAULT_POINTS", "LOCK"]

LOCK = ".lock"
FAULT_ENV = "DIFFEO_ENGINE_GENERATE_FAULT"
FAULT_POINTS = ("shard-write", "shard-renamed", "manifest-write", "between-shards")
CHUNK = 4 << 20


def _temp_name(name: str) -> str:
    return f".{name}.tmp"


def _is_ours(name: str) -> bool:
    """Files generate leaves in a directory apart from shards and the manifest."""
    return name == LOCK or (name.startswith(".") and name.endswith(".tmp"))


def _fault_spec() -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    point, _, shard = spec.partition(":")
    if point not in FAULT_POINTS or not shard.isdigit():
        raise ValueError(
            f"{FAULT_ENV}: expected POINT:SHARD, POINT in {FAULT_POINTS}, got {spec!r}"
        )
    return point, int(shard)


def _fault(fault: tuple[str, int] | None, point: str, shard: int) -> None:
    if fault is not None and fault == (point, shard):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    """``os.write`` until every byte is out (the one place bytes reach the disk)."""
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def _write_file(
    path: Path, chunks, *, fault: tuple[str, int] | None = None, point=None, shard=-1
) -> tuple[str, int]:
    """Write ``chunks`` to ``path``'s temporary name, fsync, rename; ``(sha256, bytes)``.

    On any error the temporary file is removed and the error re-raised naming ``path``.
    """
    temp = path.with_name(_temp_name(path.name))
    digest = hashlib.sha256()
    size = 0
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            for chunk in chunks:
                if chunk is None:  # the halfway mark, for fault injection
                    _fault(fault, point, shard)
                    continue
                _write_all(fd, chunk, path)
                digest.update(chunk)
                size += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise type(error)(error.errno, f"writing {path}: {error.strerror or error}") from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _npy_chunks(array: np.ndarray, halfway: bool):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    yield memoryview(header.getvalue())
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    half = len(data) // 2 if halfway else -1
    for start in range(0, len(data), CHUNK):
        stop = min(start + CHUNK, len(data))
        if start <= half < stop:
            yield data[start:half]
            yield None
            start = half
        yield data[start:stop]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _lock(out: Path) -> int:
    """Take ``out/.lock`` (``flock``, non-blocking); the fd. The file is removed again by
    :func:`_unlock`, so a lock taken on a file another process has just removed is dropped
    and taken again on the new file (its inode is compared after locking)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock
        return os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(100):
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"out: another generate process is writing to {out}") from None
        try:
            same = os.stat(out / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed by its holder meanwhile: lock the current file
    raise ValueError(f"out: cannot take {out / LOCK}: it keeps being replaced")


def _unlock(out: Path, fd: int) -> None:
    """Remove ``out/.lock`` (while still holding it) and release it."""
    try:
        with contextlib.suppress(OSError):
            if os.stat(out / LOCK).st_ino == os.fstat(fd).st_ino:
                os.unlink(out / LOCK)
    finally:
        os.close(fd)
