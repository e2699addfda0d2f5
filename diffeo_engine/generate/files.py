"""Crash-safe files: write under a temporary name, fsync, rename; the ``.lock``; hashing;
the ``.npy`` header; and the test-only fault injection
(``DIFFEO_ENGINE_GENERATE_FAULT=POINT:SHARD``).

Every file of a data set is read through :mod:`diffeo_engine.data.sources.safe` (regular
files only, no links followed), and written without following links either: a temporary
file is created afresh (``O_EXCL | O_NOFOLLOW``, after removing any leftover of that name),
and the lock is opened with ``O_NOFOLLOW``.

Fault points: ``shard-write`` (half of the last kind's temporary file written),
``shard-renamed`` (shard files in place, manifest not yet updated), ``manifest-write``
(half of the manifest's temporary file written) and ``between-shards`` (manifest lists the
shard, the next not begun). Never set the variable otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import signal
import stat
from pathlib import Path

import numpy as np

from diffeo_engine.data.sources.safe import file_kind, npy_memmap, open_regular, sha256_regular

__all__ = [
    "CHUNK",
    "FAULT_ENV",
    "FAULT_POINTS",
    "LOCK",
    "ShardFileProblem",
    "npy_header",
    "npy_size",
    "open_listed",
]

LOCK = ".lock"
FAULT_ENV = "DIFFEO_ENGINE_GENERATE_FAULT"
FAULT_POINTS = ("shard-write", "shard-renamed", "manifest-write", "between-shards")
CHUNK = 4 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        temp.unlink(missing_ok=True)  # a leftover (or a link planted there): never written through
        fd = os.open(temp, flags, 0o644)
    except OSError as error:
        raise type(error)(error.errno, f"writing {path}: {error.strerror or error}") from error
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


def npy_header(shape, dtype) -> bytes:
    """The ``.npy`` (version 1.0, C order) header of an array of ``shape`` and ``dtype``:
    what the shards begin with, and with the data's size, their exact length."""
    header = io.BytesIO()
    described = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(n) for n in shape),
    }
    np.lib.format.write_array_header_1_0(header, described)
    return header.getvalue()


def npy_size(shape, dtype) -> int:
    """The exact length of a ``.npy`` file written by this module."""
    return _npy_size(tuple(int(n) for n in shape), np.dtype(dtype).str)


@functools.lru_cache(maxsize=256)
def _npy_size(shape: tuple[int, ...], dtype: str) -> int:
    count = int(np.prod(shape, dtype=object)) if shape else 1
    return len(npy_header(shape, dtype)) + count * np.dtype(dtype).itemsize


def _npy_chunks(array: np.ndarray, halfway: bool):
    yield memoryview(npy_header(array.shape, array.dtype))
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
    """sha256 of a data set's regular file (a link or special file is refused unread)."""
    return sha256_regular(path, "out", follow=False)[0]


def _lock(out: Path) -> int:
    """Take ``out/.lock`` (``flock``, non-blocking); the fd. The file is removed again by
    :func:`_unlock`, so a lock taken on a file another process has just removed is dropped
    and taken again on the new file (its inode is compared after locking)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock
        return os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(100):
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW
            fd = os.open(out / LOCK, flags, 0o644)
        except OSError as error:
            if os.path.islink(out / LOCK):
                raise ValueError(
                    f"out: {out / LOCK} is a symbolic link; remove it (generate never follows "
                    "links in a data set)"
                ) from None
            raise OSError(
                error.errno, f"out: cannot open {out / LOCK}: {error.strerror}"
            ) from error
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise ValueError(
                f"out: {out / LOCK} is {file_kind(mode)}, not a regular file; remove it"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"out: another generate process is writing to {out}") from None
        try:
            same = os.lstat(out / LOCK).st_ino == os.fstat(fd).st_ino
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
            if os.lstat(out / LOCK).st_ino == os.fstat(fd).st_ino:
                os.unlink(out / LOCK)
    finally:
        os.close(fd)


class ShardFileProblem(Exception):
    """A listed file of a data set that cannot be served: ``name``, ``problem`` (one line,
    without the path) and whether it is simply ``missing``."""

    def __init__(self, name: str, problem: str, missing: bool = False) -> None:
        super().__init__(f"{name}: {problem}")
        self.name, self.problem, self.missing = name, problem, missing


def open_listed(out: Path, entry: dict, *, check_hash: bool) -> np.ndarray:
    """A file the manifest lists, memory-mapped after checking, without reading it first,
    that it is a regular file inside ``out`` (no link) of the listed size; then (with
    ``check_hash``) its sha256 and always its ``.npy`` header against the listed shape and
    dtype. Raises :class:`ShardFileProblem`."""
    name = entry["name"]  # a plain KIND-NNNNN.npy name (read_manifest)
    path = out / name
    try:
        fd = open_regular(path, "out", follow=False)
    except FileNotFoundError:
        raise ShardFileProblem(name, "listed in the manifest but missing", True) from None
    except ValueError as error:
        what = str(error).split(f"{path} ", 1)[-1].removeprefix("is ")
        raise ShardFileProblem(name, what) from None
    except OSError as error:
        raise ShardFileProblem(name, f"cannot read it: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        if size != entry["bytes"]:
            raise ShardFileProblem(name, f"{size} bytes, the manifest lists {entry['bytes']}")
        try:
            if check_hash:
                digest = hashlib.sha256()
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
                if digest.hexdigest() != entry["sha256"]:
                    raise ShardFileProblem(name, "sha256 differs from the manifest")
            array = npy_memmap(handle, name)
        except OSError as error:
            raise ShardFileProblem(name, f"cannot read it: {error.strerror or error}") from None
        except ValueError as error:
            raise ShardFileProblem(name, str(error).removeprefix(f"{name}: ")) from None
    if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
        raise ShardFileProblem(
            name,
            f"holds {array.dtype} {list(array.shape)}, the manifest lists {entry['dtype']} "
            f"{entry['shape']}",
        )
    if not array.flags.c_contiguous and array.ndim > 1:
        raise ShardFileProblem(name, "is stored in Fortran order; generate writes C order")
    return array
