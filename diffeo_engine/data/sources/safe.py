"""Opening files safely: only regular files are read, and special files are refused unread.

One helper for every file the library reads by name. A FIFO would block the first read
forever, a link to ``/dev/zero`` would never end, and a symbolic link in a generated data
set could stand for a file outside its folder. So:

* :func:`check_regular` looks before it opens (``stat``, or ``lstat`` when links are not
  followed) and refuses, naming the path and what it is, anything but a regular file;
* :func:`open_regular` then opens with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot
  block) and, when links are not followed, ``O_NOFOLLOW``, and checks with ``fstat`` that
  it opened the very file it looked at.

User inputs (``--input``, ``--labels``) may be links to regular files (``follow=True``);
the members of a generated data set may not (``follow=False``).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np

__all__ = [
    "CHUNK",
    "check_input_path",
    "check_regular",
    "file_kind",
    "npy_memmap",
    "open_regular",
    "read_regular",
    "sha256_regular",
]

CHUNK = 4 << 20


def file_kind(mode: int) -> str:
    """``"a FIFO"``, ``"a symbolic link"``, ... for a ``st_mode``."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def check_regular(path: str | Path, where: str, *, follow: bool) -> os.stat_result:
    """``path``'s stat result when it is a regular file (through links when ``follow``);
    otherwise a ``FileNotFoundError``/``ValueError`` naming ``where`` and the path, without
    opening it."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file: {path}") from None
    except OSError as error:
        raise OSError(error.errno, f"{where}: cannot look at {path}: {error.strerror}") from error
    if not stat.S_ISREG(info.st_mode):
        target = "" if follow or not stat.S_ISLNK(info.st_mode) else f" to {os.readlink(path)}"
        raise ValueError(
            f"{where}: {path} is {file_kind(info.st_mode)}{target}, not a regular file; "
            "refused without reading it"
        )
    return info


def open_regular(path: str | Path, where: str, *, follow: bool = False) -> int:
    """A read-only fd on ``path``, a regular file (see :func:`check_regular`); the caller
    closes it. The file opened is checked to be the one looked at."""
    info = check_regular(path, where, follow=follow)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise OSError(error.errno, f"{where}: cannot open {path}: {error.strerror}") from error
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
        info.st_dev,
        info.st_ino,
    ):
        os.close(fd)
        raise ValueError(f"{where}: {path} changed while it was being opened; refused")
    return fd


def read_regular(path: str | Path, where: str, *, follow: bool = False, limit: int | None = None):
    """The bytes of a regular file (refusing more than ``limit`` bytes, if given)."""
    fd = open_regular(path, where, follow=follow)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if limit is not None and size > limit:
            raise ValueError(f"{where}: {path} holds {size} bytes, more than {limit} expected")
        return handle.read()


def sha256_regular(path: str | Path, where: str, *, follow: bool = False) -> tuple[str, int]:
    """``(sha256 hex, bytes)`` of a regular file, streamed."""
    digest = hashlib.sha256()
    size = 0
    fd = open_regular(path, where, follow=follow)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def npy_memmap(handle: io.BufferedReader, where: str) -> np.ndarray:
    """The ``.npy`` array of an open file, memory-mapped read-only (``np.load`` maps only
    by name, which would open the path again); Python objects are refused."""
    handle.seek(0)
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise ValueError(f"{where}: not a readable .npy file ({error})") from error
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects, not numbers")
    offset = handle.tell()
    count = int(np.prod(shape)) if shape else 1
    size = os.fstat(handle.fileno()).st_size
    if offset + count * dtype.itemsize != size:
        raise ValueError(
            f"{where}: {size} bytes, its header {list(shape)} {dtype} needs "
            f"{offset + count * dtype.itemsize}"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype)
    order = "F" if fortran else "C"
    return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def check_input_path(path: str | Path, where: str) -> Path:
    """A user's input path: it exists and is a folder or (through links) a regular file."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file or directory: {path}") from None
    except OSError as error:
        raise OSError(error.errno, f"{where}: cannot look at {path}: {error.strerror}") from error
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise ValueError(
            f"{where}: {path} is {file_kind(info.st_mode)}, not a regular file or a folder; "
            "refused without reading it"
        )
    return path
