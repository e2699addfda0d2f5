"""Sharded, resumable writing of perturbed data sets (``diffeo-engine generate`` / ``verify``).

Perturbation ``k`` of source image ``i`` has id ``i * K + k`` (``K = per_image``); its
content depends only on ``(seed, id)`` (design.md section 3), so any image can be
regenerated alone. Ids are cut into fixed-size shards, one ``.npy`` file per output kind
(``tau-00000.npy``, ``noisy-00000.npy``; shape ``(n, C, H, W)``), memory-mappable.

Crash safety: a shard file is written under a hidden temporary name, fsynced and renamed;
then ``manifest.json`` (parameters, seed, versions, source fingerprint, and per shard its id
range, shape, dtype and sha256) is rewritten the same way (temporary file, fsync, rename,
fsync of the directory). A shard exists for a reader only once the manifest lists it, so a
run killed at any point resumes from the last listed shard, re-running the same command
(or ``--resume``) and producing byte-identical files. The manifest holds no timestamps.
A ``.lock`` file (``flock``) keeps two processes from writing one directory at once.

Under ``torchrun`` (``generate(..., distributed=ctx)``) rank 0 alone validates, holds the
``.lock`` for the whole job, cleans leftovers and writes the manifest; the shards still
missing are dealt round-robin to the ranks, each writing its own shard files (distinct
names, so no lock is needed between them). After each round (one shard per rank) the
ranks' records are gathered and rank 0 rewrites the manifest, so a killed job loses at
most one round. Output and manifest are byte-identical to one process's (the manifest
does not record the number of processes), and any number of processes may resume. On
several machines ``--out`` must be a directory every rank sees (a shared filesystem).

Throughput: the main thread computes (on the GPU, into pinned host buffers) while a writer
thread hashes and writes; the two share a pool of two shard buffers, so memory is bounded
by two shards whatever the size of the data set.

Test-only fault injection: ``DIFFEO_ENGINE_GENERATE_FAULT=POINT:SHARD`` makes the process
SIGKILL itself at ``POINT`` for shard ``SHARD``; points are ``shard-write`` (half of the
last kind's temporary file written), ``shard-renamed`` (shard files in place, manifest not
yet updated), ``manifest-write`` (half of the manifest's temporary file written) and
``between-shards`` (manifest lists the shard, the next not begun). Never set it otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import queue
import signal
import sys
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import diffeo_engine
from diffeo_engine import ops, rng
from diffeo_engine.data.sources import ImageSource, open_source, parse_resize
from diffeo_engine.distributed import DistributedContext, DistributedError, distributed_session
from diffeo_engine.physics import check_cut, check_images, check_interp, check_seed, check_T
from diffeo_engine.reference import check_noise

__all__ = [
    "FAULT_ENV",
    "FORMAT",
    "MANIFEST",
    "GeneratedDataset",
    "VerifyReport",
    "add_commands",
    "generate",
    "load_generated",
    "read_manifest",
    "shard_name",
    "verify",
]

FORMAT = "diffeo-engine-generated"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
FAULT_ENV = "DIFFEO_ENGINE_GENERATE_FAULT"
FAULT_POINTS = ("shard-write", "shard-renamed", "manifest-write", "between-shards")
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
DEFAULT_BATCH_SIZE = 256
DEFAULT_SHARD_BYTES = 64 << 20
MAX_DEFAULT_SHARD = 65536
CHUNK = 4 << 20
# Cross-backend tolerance of verify (same backend and device type: exact equality):
# |stored - regenerated| <= TOLERANCE[dtype] * max(1, max |regenerated|), and 1 for uint8.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


# ------------------------------------------------------------------------------ helpers


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.npy"


def _temp_name(name: str) -> str:
    return f".{name}.tmp"


def _is_ours(name: str) -> bool:
    """Files generate leaves in a directory apart from shards and the manifest."""
    return name == LOCK or (name.startswith(".") and name.endswith(".tmp"))


def _versions() -> dict:
    return {
        "diffeo_engine": diffeo_engine.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _resolved_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


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


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def _write_manifest(out: Path, manifest: dict, fault=None, shard: int = -1) -> None:
    data = memoryview(_manifest_bytes(manifest))
    half = len(data) // 2
    chunks = [data] if fault is None else [data[:half], None, data[half:]]
    _write_file(
        out / MANIFEST,
        chunks,
        fault=fault,
        point="manifest-write",
        shard=shard,
    )
    _fsync_dir(out)


def read_manifest(out: str | Path) -> dict:
    """The manifest of a generated data set (``FileNotFoundError`` when there is none)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"out: no {MANIFEST} in {out}: not a generated data set")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"out: {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"out: {path} is not a diffeo-engine generate manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"out: {path} has format_version {manifest.get('format_version')}, "
            f"this library reads {FORMAT_VERSION}"
        )
    return manifest


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return value


def _normalise_noise(noise) -> str | float:
    if noise == "none":
        return "none"
    sigma = check_noise(noise)
    return "matched" if sigma is None else sigma


def _parse_noise(text: str) -> str | float:
    if text in ("matched", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"noise: expected 'matched', 'none' or a sigma, got {text!r}") from None


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but is not available")
    return device


def _kinds(noise) -> list[str]:
    return ["tau"] if noise == "none" else ["tau", "noisy"]


def _perturb(images, ids, params: dict, device, backend: str) -> dict[str, torch.Tensor]:
    """The outputs for ``images`` with ``ids``: exactly the ops calls a user would make."""
    common = dict(
        seed=params["seed"],
        ids=ids,
        interp=params["interp"],
        out_dtype=DTYPES[params["dtype"]],
        backend=backend,
    )
    if params["noise"] == "none":
        return {"tau": ops.deform(images, params["T"], params["cut"], **common)}
    tau, noisy = ops.perturb(images, params["T"], params["cut"], noise=params["noise"], **common)
    return {"tau": tau, "noisy": noisy}


def _batch_for_ids(source: ImageSource, ids: torch.Tensor, per_image: int) -> torch.Tensor:
    """The source image of every id (each repeated as often as it appears)."""
    index = torch.div(ids, per_image, rounding_mode="floor")
    lo, hi = int(index.min()), int(index.max()) + 1
    if hi - lo <= 2 * len(ids):
        return source.batch(lo, hi)[index - lo]
    return torch.cat([source.batch(int(i), int(i) + 1) for i in index])


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A one-line progress bar on stderr: images done, images/s and ETA."""

    def __init__(self, total: int, done: int, enabled: bool | None, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = tty if enabled is None else enabled
        self.interval = 0.1 if tty else 10.0
        self.end = "\r" if tty else "\n"
        self.total, self.done, self.start_done = total, done, done
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = self.total - self.done
        if rate > 0:
            seconds = round(left / rate)
            eta = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        else:
            eta = "-:--:--"
        pct = 100.0 * self.done / max(self.total, 1)
        self.stream.write(
            f"generate: {self.done}/{self.total} images ({pct:5.1f}%) "
            f"{rate:9.1f} images/s  ETA {eta}{self.end}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.end == "\r":
                self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------ writer


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
        params = self.manifest["parameters"]
        K = params["per_image"]
        kinds = self.manifest["kinds"]
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
                "dtype": params["dtype"],
                "bytes": size,
                "sha256": sha,
            }
        _fsync_dir(self.out)
        _fault(self.fault, "shard-renamed", index)
        return {
            "index": index,
            "id_start": lo,
            "id_stop": hi,
            "source_start": lo // K,
            "source_stop": (hi - 1) // K + 1,
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


# ---------------------------------------------------------------------------- generate


def _refuse_differences(out: Path, old: dict, new: dict, what: str) -> None:
    diffs = [
        f"{key}: the run has {old.get(key)!r}, this call {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    if diffs:
        raise ValueError(
            f"out: {out} holds a run with different {what}; nothing was written. "
            + "; ".join(diffs)
            + ". Use another --out, or the run's own values to resume it."
        )


def _check_listed_shards(out: Path, manifest: dict) -> None:
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            path = out / entry["name"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ValueError(
                    f"out: {path} is listed in {MANIFEST} but is missing or has the wrong "
                    "size; the output is damaged (run `diffeo-engine verify`)"
                )


def generate(
    source: str | Path | ImageSource | None,
    out: str | Path,
    *,
    T: float | None = None,
    cut: int | None = None,
    per_image: int | None = None,
    seed: int | None = None,
    noise: str | float | None = None,
    dtype: str | None = None,
    shard_size: int | None = None,
    interp: str | None = None,
    resize: tuple[int, int] | str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    resume: bool = False,
    progress: bool | None = None,
    distributed: DistributedContext | None = None,
) -> dict:
    """Write ``per_image`` perturbations of every image of ``source`` to shards in ``out``.

    ``noise``: ``"matched"`` (default), ``"none"`` (only ``tau`` is written) or a sigma;
    ``dtype``: ``"uint8"`` (default), ``"float16"`` or ``"float32"``; ``shard_size``: ids
    per shard (default: about 64 MiB per file). A directory holding the same run (same
    parameters and source fingerprint) is continued from its last complete shard; with
    ``resume=True`` the directory must hold a run and parameters left ``None`` (the source
    included) are taken from its manifest. Different parameters, another run or foreign
    files in ``out`` are refused before anything is written.

    ``batch_size`` (default 256), ``device`` (default CUDA when available, else CPU) and
    ``backend`` (default ``"auto"``) are how, not what: they may differ on resuming, and
    default to the run's own (its manifest's ``execution``). Each shard records the backend,
    device type and batch size that computed it. Returns the final manifest.

    ``distributed`` (a :class:`~diffeo_engine.distributed.DistributedContext` of several
    processes, every one calling ``generate`` with the same arguments): rank 0 checks the
    parameters, takes the lock and writes the manifest; the shards still to write are dealt
    round-robin to the ranks, which write their own shard files, and after each round of
    shards rank 0 adds the round's records to the manifest. The files are byte-identical to
    a single process's, and a run killed at any point resumes with any number of processes.
    """
    out = Path(out)
    fault = _fault_spec()
    ctx = distributed if distributed is not None else DistributedContext()
    given_source = source
    lock = failure = None
    try:
        if ctx.is_main:
            try:
                source, old, manifest, batch_size, device, backend = _prepare(
                    source, out, resume, T, cut, per_image, seed, noise, dtype, shard_size,
                    interp, resize, batch_size, device, backend,
                )  # fmt: skip
                lock, manifest = _claim(out, old, manifest)
            except BaseException as error:
                with contextlib.suppress(DistributedError):
                    ctx.broadcast_object(("error", type(error).__name__, str(error)))
                raise
            ctx.broadcast_object(("ok", manifest, batch_size, str(device), backend))
        else:
            status = ctx.broadcast_object(None)
            if status[0] == "error":
                raise _error_of(status[1])(status[2])
            _, manifest, batch_size, device, backend = status
            try:
                source = _rank_source(given_source, manifest)
                device = _check_device(device)
            except (ValueError, TypeError, FileNotFoundError) as error:
                failure = error
        # every rank starts, or none: a rank that cannot read the source stops them all
        failures = ctx.all_gather_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if ctx.active and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)  # one GPU per rank
        for rank, message in enumerate(failures):
            if message is not None:
                raise DistributedError(f"rank {ctx.rank}: rank {rank} could not start: {message}")
        done = {s["index"] for s in manifest["shards"]}
        todo = [s for s in range(manifest["n_shards"]) if s not in done]
        if todo:
            mine = todo[ctx.rank :: ctx.world_size]
            rounds = math.ceil(len(todo) / ctx.world_size)
            _run(source, out, manifest, mine, rounds, batch_size, device, backend, fault,
                 progress, ctx)  # fmt: skip
    finally:
        if lock is not None:
            os.close(lock)
    return manifest


def _error_of(name: str) -> type[Exception]:
    """The exception type to re-raise on the other ranks for rank 0's refusal."""
    known = (ValueError, TypeError, FileNotFoundError)
    return next((kind for kind in known if kind.__name__ == name), DistributedError)


def _rank_source(source, manifest: dict) -> ImageSource:
    """The source of a rank other than 0: its own argument (or the run's spec), checked
    against the fingerprint rank 0 recorded."""
    resize = manifest["parameters"]["resize"]
    if not isinstance(source, ImageSource):
        spec = manifest["source"]["spec"] if source is None else source
        source = open_source(spec, resize=tuple(resize) if resize else None)
    if source.fingerprint() != manifest["source"]["fingerprint"]:
        raise ValueError(
            f"input: {source.spec} has fingerprint {source.fingerprint()} here, rank 0 read "
            f"{manifest['source']['fingerprint']}; every rank needs the same data"
        )
    return source


def _prepare(
    source, out, resume, T, cut, per_image, seed, noise, dtype, shard_size, interp, resize,
    batch_size, device, backend,
):  # fmt: skip
    """Validate every parameter against ``out`` (read only): ``(source, old manifest or
    None, manifest to write, batch_size, device, backend)``."""
    old = None
    old = None
    if (out / MANIFEST).exists():
        old = read_manifest(out)
    elif resume:
        raise ValueError(f"resume: {out} holds no run to resume (no {MANIFEST})")
    run_before = old.get("execution", {}) if old is not None else {}
    if batch_size is None:
        batch_size = run_before.get("batch_size", DEFAULT_BATCH_SIZE)
    batch_size = _check_positive_int("batch_size", batch_size)
    if device is None:
        cuda = torch.cuda.is_available()
        device = run_before.get("device", "cuda" if cuda else "cpu")
        device = device if cuda or not str(device).startswith("cuda") else "cpu"
    device = _check_device(device)
    backend = run_before.get("backend", "auto") if backend is None else backend
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
    if resume:
        given = dict(
            T=T,
            cut=cut,
            per_image=per_image,
            seed=seed,
            noise=noise,
            dtype=dtype,
            shard_size=shard_size,
            interp=interp,
            resize=resize,
        )
        for key, value in given.items():
            if value is None:
                given[key] = old["parameters"][key]
        T, cut, per_image, seed = given["T"], given["cut"], given["per_image"], given["seed"]
        noise, dtype, shard_size = given["noise"], given["dtype"], given["shard_size"]
        interp, resize = given["interp"], given["resize"]
        if source is None:
            source = old["source"]["spec"]
    for name, value in (("T", T), ("cut", cut), ("per_image", per_image), ("seed", seed)):
        if value is None:
            raise ValueError(f"{name}: required (or resume=True / --resume to take the run's)")
    if source is None:
        raise ValueError("input: required (or resume=True / --resume to take the run's)")

    # validate every parameter before touching the disk
    check_T(T, 1, torch.device("cpu"))
    T = float(T)
    cut = check_cut(cut, maximum=rng.MAX_CUT)
    per_image = _check_positive_int("per_image", per_image)
    seed = check_seed(seed)
    noise = _normalise_noise("matched" if noise is None else noise)
    dtype = "uint8" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    interp = check_interp("bilinear" if interp is None else interp)
    resize = parse_resize(resize)
    if isinstance(source, ImageSource):
        if resize is not None and resize != source.resize:
            raise ValueError("resize: give it to open_source() when passing an ImageSource")
        resize = source.resize
    else:
        source = open_source(source, resize=resize)
    if len(source) == 0:
        raise ValueError(f"input: {source.spec} holds no images")
    C, H, W = source.shape
    check_images(source.batch(0, 1), "input")
    image_bytes = C * H * W * DTYPES[dtype].itemsize
    if shard_size is None:
        shard_size = max(1, min(MAX_DEFAULT_SHARD, DEFAULT_SHARD_BYTES // image_bytes))
    shard_size = _check_positive_int("shard_size", shard_size)

    params = {
        "T": T,
        "cut": cut,
        "per_image": per_image,
        "seed": seed,
        "noise": noise,
        "dtype": dtype,
        "shard_size": shard_size,
        "interp": interp,
        "resize": list(resize) if resize else None,
    }
    described = source.describe()
    total = len(source) * per_image
    n_shards = math.ceil(total / shard_size)

    if old is not None:
        old_source = {k: v for k, v in old["source"].items() if k != "spec"}
        new_source = {k: v for k, v in described.items() if k != "spec"}
        if old_source.get("fingerprint") != new_source.get("fingerprint"):
            raise ValueError(
                f"out: {out} holds another run, made from a different source "
                f"({old['source']['spec']}, {old_source.get('fingerprint')}); this input is "
                f"{described['spec']} ({described['fingerprint']}); nothing was written. "
                "Use another --out."
            )
        _refuse_differences(out, old_source, new_source, "source")
        _refuse_differences(out, old["parameters"], params, "parameters")
        versions = _versions()
        _refuse_differences(
            out,
            {k: old["versions"].get(k) for k in ("diffeo_engine", "torch")},
            {k: versions[k] for k in ("diffeo_engine", "torch")},
            "library versions (their images could differ)",
        )
        _check_listed_shards(out, old)
        manifest = old
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a directory")
        if out.is_dir():
            foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
            if foreign:
                raise ValueError(
                    f"out: {out} is not empty and holds no {MANIFEST} (found "
                    f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                    "choose a new or empty directory"
                )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ids": "id = source_index * per_image + k, k in [0, per_image)",
            "parameters": params,
            "source": described,
            "versions": _versions(),
            "execution": {"batch_size": batch_size, "device": str(device), "backend": backend},
            "kinds": _kinds(noise),
            "image_shape": [C, H, W],
            "total_images": total,
            "n_shards": n_shards,
            "complete": False,
            "shards": [],
        }

    return source, old, manifest, batch_size, device, backend


def _claim(out: Path, old: dict | None, manifest: dict) -> tuple[int, dict]:
    """Take the lock on ``out``, write (or re-read) the manifest, remove leftovers of a
    killed run; ``(lock fd, manifest)``. Only rank 0 does this."""
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        # what was checked above may have changed before the lock was ours
        if old is not None:
            manifest = read_manifest(out)
            _check_listed_shards(out, manifest)
        elif (out / MANIFEST).exists():
            raise ValueError(f"out: another process started a run in {out} meanwhile")
        else:
            _write_manifest(out, manifest)
        for path in out.iterdir():  # leftovers of a killed run
            if path.name != LOCK and _is_ours(path.name):
                path.unlink(missing_ok=True)
    except BaseException:
        os.close(lock)
        raise
    return lock, manifest


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory lock
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"out: another generate process is writing to {out}") from None
    return fd


def _run(
    source, out, manifest, mine, rounds, batch_size, device, backend, fault, progress, ctx
) -> None:
    """Compute this rank's shards ``mine``, one per round for ``rounds`` rounds."""
    params = manifest["parameters"]
    K, S = params["per_image"], params["shard_size"]
    total = manifest["total_images"]
    out_dtype = DTYPES[params["dtype"]]
    shape = tuple(manifest["image_shape"])
    pinned = device.type == "cuda"
    free: queue.Queue = queue.Queue()
    for _ in range(2 if mine else 0):  # two shard buffers: one filling, one writing
        free.put(
            {
                kind: torch.empty((min(S, total), *shape), dtype=out_dtype, pin_memory=pinned)
                for kind in manifest["kinds"]
            }
        )
    work: queue.Queue = queue.Queue(maxsize=1)
    extra = {
        "backend": _resolved_backend(backend, device),
        "device": device.type,
        "batch_size": batch_size,
    }
    done_images = sum(s["id_stop"] - s["id_start"] for s in manifest["shards"])
    bar = _Progress(total, done_images, progress if ctx.is_main else False)
    # one process: the bar follows batches; several: rank 0's follows the merged rounds
    writer = _Writer(out, manifest, work, free, fault, extra, ctx, bar if ctx.active else None)
    writer.start()
    try:
        for round_ in range(rounds):
            if round_ >= len(mine):
                if writer.error is not None:
                    break
                work.put((None, 0, 0, None))  # nothing left here: still join the round
                continue
            index = mine[round_]
            buffers = free.get()
            if writer.error is not None:
                break
            lo, hi = index * S, min((index + 1) * S, total)
            for start in range(lo, hi, batch_size):
                stop = min(start + batch_size, hi)
                ids = torch.arange(start, stop, dtype=torch.int64)
                images = _batch_for_ids(source, ids, K).to(device)
                outputs = _perturb(images, ids.to(device), params, device, backend)
                for kind, values in outputs.items():
                    buffers[kind][start - lo : stop - lo].copy_(values, non_blocking=pinned)
                if not ctx.active:
                    bar.update(stop - start)
            if pinned:
                torch.cuda.current_stream(device).synchronize()
            work.put((index, lo, hi, buffers))
    finally:
        work.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error


# ------------------------------------------------------------------------- reading back


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


# -------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` is true when there is nothing in ``problems``."""

    out: str
    complete: bool
    shards_checked: int
    n_shards: int
    ids_checked: list[int] = field(default_factory=list)
    exact: bool = True
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        mode = "exactly" if self.exact else "within the cross-backend tolerance"
        lines = [
            f"{self.out}: {self.shards_checked} of {self.n_shards} shards hashed, "
            f"{len(self.ids_checked)} ids regenerated (compared {mode}, max |diff| "
            f"{self.max_abs_diff:.3g})"
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED ({len(self.problems)} problems)")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(
    out: str | Path,
    sample: int = 16,
    *,
    source: str | Path | ImageSource | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Re-hash every shard against the manifest and regenerate ``sample`` ids from the source.

    The ids sampled are the first and last listed plus others drawn with ``seed``, and are
    regenerated alone, in one batch. A shard computed by the same backend on the same device
    type must match exactly (an id that does not is recomputed once more inside the batch
    that produced it, whose size the shard records, in case a kernel's rounding depends on
    the batch's size; it must then match exactly); otherwise
    within ``TOLERANCE[dtype] * max(1, max |x|)`` for float outputs and 1 for uint8.
    ``source`` overrides the manifest's source path (its fingerprint must still match).
    ``device`` and ``backend`` default to the run's own where available (else the CPU).
    An incomplete run is reported as a problem.
    """
    out = Path(out)
    manifest = read_manifest(out)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ValueError(f"sample: expected an integer >= 0, got {sample!r}")
    run_before = manifest.get("execution", {})
    if device is None:
        device = run_before.get("device", "cpu")
        cuda = torch.cuda.is_available()
        device = device if cuda or not str(device).startswith("cuda") else "cpu"
    device = _check_device(device)
    backend = run_before.get("backend", "auto") if backend is None else backend
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
    params = manifest["parameters"]
    S, total = params["shard_size"], manifest["total_images"]
    shards = manifest["shards"]
    report = VerifyReport(
        out=str(out),
        complete=bool(manifest["complete"]),
        shards_checked=0,
        n_shards=manifest["n_shards"],
    )
    problems = report.problems
    if [s["index"] for s in shards] != sorted({s["index"] for s in shards}):
        problems.append("the manifest lists a shard twice or out of order")
    listed = len(shards) == manifest["n_shards"] and all(
        s["index"] == i for i, s in enumerate(shards)
    )
    if manifest["complete"] and not listed:
        problems.append("the manifest says complete but does not list every shard")
    if not manifest["complete"]:
        problems.append(f"incomplete: {len(shards)} of {manifest['n_shards']} shards written")
    good = []
    for shard in shards:
        lo, hi = shard["index"] * S, min((shard["index"] + 1) * S, total)
        fine = (shard["id_start"], shard["id_stop"]) == (lo, hi)
        if not fine:
            problems.append(f"shard {shard['index']}: id range does not match shard_size")
        for kind in manifest["kinds"]:
            entry = shard["files"].get(kind)
            path = out / entry["name"] if entry else None
            if entry is None or not path.is_file():
                problems.append(f"shard {shard['index']}: {kind} file missing")
                fine = False
                continue
            if _sha256(path) != entry["sha256"]:
                problems.append(f"{entry['name']}: sha256 differs from the manifest")
                fine = False
                continue
            array = np.load(path, mmap_mode="r")
            if list(array.shape) != entry["shape"] or array.shape[0] != hi - lo:
                problems.append(f"{entry['name']}: shape {array.shape} != {entry['shape']}")
                fine = False
            if str(array.dtype) != params["dtype"]:
                problems.append(f"{entry['name']}: dtype {array.dtype} != {params['dtype']}")
                fine = False
        report.shards_checked += 1
        if fine:
            good.append(shard)
    names = {e["name"] for s in shards for e in s["files"].values()}
    for path in sorted(out.glob("*.npy")):
        if path.name not in names and manifest["complete"]:
            problems.append(f"{path.name}: a shard file the manifest does not list")

    if sample == 0 or not good:
        return report
    dataset_ids = np.concatenate([np.arange(s["id_start"], s["id_stop"]) for s in good])
    if sample >= len(dataset_ids):
        chosen = dataset_ids
    elif sample <= 2:
        chosen = dataset_ids[[0, -1]][:sample]
    else:
        pick = np.random.default_rng(seed).choice(len(dataset_ids) - 2, sample - 2, replace=False)
        chosen = np.concatenate([dataset_ids[[0, -1]], dataset_ids[1 + pick]])[:sample]
    chosen = np.sort(chosen)
    if source is None:
        source = manifest["source"]["spec"]
    if not isinstance(source, ImageSource):
        source = open_source(source, resize=params["resize"])
    if source.fingerprint() != manifest["source"]["fingerprint"]:
        problems.append(
            f"the source {source.spec} has fingerprint {source.fingerprint()}, the run's was "
            f"{manifest['source']['fingerprint']}: it changed; nothing regenerated"
        )
        return report
    ids = torch.as_tensor(chosen, dtype=torch.int64)
    images = _batch_for_ids(source, ids, params["per_image"]).to(device)
    fresh = _perturb(images, ids.to(device), params, device, backend)
    mine = (_resolved_backend(backend, device), device.type)
    starts = [s["id_start"] for s in good]
    in_context: dict[tuple[int, int], dict] = {}

    def original_batch(shard: dict, id_: int) -> tuple[int, dict]:
        """The id recomputed inside the very batch that produced it (kernels may round
        differently with the batch's size); ``(row, outputs)``."""
        size = shard.get("batch_size") or (shard["id_stop"] - shard["id_start"])
        lo = shard["id_start"] + (id_ - shard["id_start"]) // size * size
        hi = min(lo + size, shard["id_stop"])
        if (lo, hi) not in in_context:
            batch_ids = torch.arange(lo, hi, dtype=torch.int64)
            batch = _batch_for_ids(source, batch_ids, params["per_image"]).to(device)
            in_context[lo, hi] = _perturb(batch, batch_ids.to(device), params, device, backend)
        return id_ - lo, in_context[lo, hi]

    for row, id_ in enumerate(chosen.tolist()):
        shard = good[bisect_right(starts, id_) - 1]
        exact = (shard["backend"], shard["device"]) == mine
        report.exact &= exact
        for kind in manifest["kinds"]:
            shard_file = np.load(out / shard["files"][kind]["name"], mmap_mode="r")
            stored = torch.from_numpy(np.array(shard_file[id_ - shard["id_start"]]))
            new = fresh[kind][row].cpu()
            if exact and not torch.equal(stored, new):
                context_row, outputs = original_batch(shard, id_)
                new = outputs[kind][context_row].cpu()
            diff = float((stored.double() - new.double()).abs().max())
            report.max_abs_diff = max(report.max_abs_diff, diff)
            if exact:
                bad = not torch.equal(stored, new)
            elif params["dtype"] == "uint8":
                bad = diff > 1
            else:
                scale = max(1.0, float(new.double().abs().max()))
                bad = diff > TOLERANCE[params["dtype"]] * scale
            if bad:
                problems.append(
                    f"id {id_} ({kind}): regenerated image differs (max |diff| {diff:.3g})"
                )
    report.ids_checked = chosen.tolist()
    return report


# ---------------------------------------------------------------------------------- CLI


def _run_generate(args: argparse.Namespace) -> int:
    device = args.device
    if device is None:  # generate's own default, which the process group must know
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with distributed_session(device, timeout_s=getattr(args, "dist_timeout", None)) as ctx:
            return _generate_rank(args, ctx)
    except DistributedError as error:
        print(f"diffeo-engine generate: error: {error}", file=sys.stderr)
        return 1


def _generate_rank(args: argparse.Namespace, ctx: DistributedContext) -> int:
    try:
        manifest = generate(
            args.input,
            args.out,
            T=args.T,
            cut=args.cut,
            per_image=args.per_image,
            seed=args.seed,
            noise=None if args.noise is None else _parse_noise(args.noise),
            dtype=args.dtype,
            shard_size=args.shard_size,
            interp=args.interp,
            resize=args.resize,
            batch_size=args.batch_size,
            device=args.device,
            backend=args.backend,
            resume=args.resume,
            progress=not args.quiet,
            distributed=ctx,
        )
    except (ValueError, TypeError, FileNotFoundError):
        raise
    except OSError as error:
        print(f"diffeo-engine generate: error: {error}", file=sys.stderr)
        return 1
    if not ctx.is_main:
        return 0
    print(
        f"{manifest['total_images']} images in {manifest['n_shards']} shards "
        f"({', '.join(manifest['kinds'])}) in {args.out}; see {MANIFEST}"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    report = verify(
        args.dir, args.sample, source=args.input, device=args.device, backend=args.backend
    )
    print(report.summary())
    return 0 if report.ok else 1


def add_commands(subparsers) -> None:
    """Register ``generate`` and ``verify`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "generate",
        help="write perturbed copies of a data set to resumable shards",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--input",
        default=None,
        help="SRC: .npy, .npz[:KEY], image folder, IDX file, torchvision:NAME:ROOT",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--T", type=float, default=None, help="temperature")
    p.add_argument("--cut", type=int, default=None, help="high-frequency cut-off")
    p.add_argument("--per-image", type=int, default=None, help="K perturbations per image")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--noise", default=None, help="matched (default) | none | SIGMA")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default uint8")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULT_BATCH_SIZE}")
    p.add_argument("--interp", default=None, choices=("bilinear", "nearest"))
    p.add_argument("--resize", default=None, help="HxW: resize every source image")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: fail when a rank has not joined a collective after this long "
        "(default: $DIFFEO_ENGINE_DIST_TIMEOUT, else 300); must exceed one shard's time",
    )
    p.set_defaults(run=_run_generate)

    v = subparsers.add_parser(
        "verify", help="re-hash a generated data set and regenerate a sample of its ids"
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--sample", type=int, default=16, help="ids to regenerate (0: hash only)")
    v.add_argument("--input", default=None, help="the source, if it moved")
    v.add_argument("--device", default=None, help="default: the run's, if available")
    v.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default: the run's")
    v.set_defaults(run=_run_verify)
