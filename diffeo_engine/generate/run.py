"""``generate``: validate (``plan``), claim ``out`` (the lock, the first manifest), deal the
missing shards to the ranks, compute them on the main thread while the writer thread writes.
A run that fails before any shard is listed leaves ``out`` as it found it.

Throughput: the main thread computes (on the GPU, into pinned host buffers) while the
writer thread hashes and writes; the two share a pool of two shard buffers, so memory is
bounded by two shards whatever the size of the data set.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import torch

from diffeo_engine.data.sources import ImageSource, open_source
from diffeo_engine.data.sources.labels import reopen_argument
from diffeo_engine.distributed import DistributedContext, DistributedError
from diffeo_engine.generate.files import LOCK, _fault_spec, _is_ours, _lock, _unlock
from diffeo_engine.generate.manifest import (
    DTYPES,
    LABEL,
    MANIFEST,
    _write_manifest,
    check_out_path,
    labels_of,
    read_manifest,
)
from diffeo_engine.generate.plan import (
    Recipe,
    _batch_for_ids,
    _check_device,
    _check_listed_shards,
    _check_source_finite,
    _perturb,
    _prepare,
    _resolved_backend,
    labels_for,
)
from diffeo_engine.generate.writer import _Writer
from diffeo_engine.physics import OutputOverflowError
from diffeo_engine.progress import Progress

__all__ = ["generate"]


def generate(
    source: str | Path | ImageSource | None,
    out: str | Path,
    *,
    T: float | Sequence[float] | None = None,
    cut: int | Sequence[int] | None = None,
    settings: Sequence[tuple[float, int]] | None = None,
    labels: str | Path | bool | None = None,
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
    allow_nonfinite: bool = False,
) -> dict:
    """Write ``per_image`` perturbations of every image of ``source`` to shards in ``out``,
    at every ``(T, cut)`` setting.

    ``T`` and ``cut`` are a value or a list each (every ``cut`` with every ``T``, ``cut``
    outer), or ``settings=[(T, cut), ...]`` lists the settings; perturbation ``k`` of image
    ``i`` at setting ``s`` has id ``(s * len(source) + i) * per_image + k``. ``labels``: the
    source's own (``None``: MNIST's labels file beside the images, CIFAR-10's records, class
    sub-folders), ``False`` for none, or a labels file (an ``.npz`` source's ``KEY``); each
    shard stores its items' labels (``label-NNNNN.npy``), and a count that does not match
    the images is refused. ``noise``: ``"matched"`` (default), ``"none"`` (only ``tau`` is
    written) or a sigma; ``dtype``: ``"uint8"`` (default), ``"float16"`` or ``"float32"``;
    ``shard_size``: ids per shard (default: 16 MiB per file, at least 8 shards). A directory
    holding the same run (same parameters and source fingerprint) is continued from its last
    complete shard; with ``resume=True`` the directory must hold a run and parameters left
    ``None`` (the source included) are taken from its manifest. Different parameters,
    another run or foreign files in ``out`` are refused before anything is written.

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

    NaN or inf source pixels are refused (naming the source image) unless
    ``allow_nonfinite=True``, which needs a float ``dtype`` (uint8 cannot hold them); outputs
    that overflow ``dtype`` are refused before their shard is written. An exception or
    ``KeyboardInterrupt`` leaves the listed shards, removes the lock and temporary files:
    the run resumes. A run that fails before its first shard is listed (a refusal included)
    removes what it wrote, leaving ``out`` as it found it.
    """
    out = check_out_path(out)
    fault = _fault_spec()
    ctx = distributed if distributed is not None else DistributedContext()
    given_source = source
    lock = failure = None
    fresh = created = False
    try:
        if ctx.is_main:
            try:
                source, old, manifest, batch_size, device, backend = _prepare(
                    source, out, resume=resume, T=T, cut=cut, settings=settings,
                    per_image=per_image, seed=seed, noise=noise, dtype=dtype,
                    shard_size=shard_size, interp=interp, resize=resize,
                    batch_size=batch_size, device=device, backend=backend,
                    allow_nonfinite=allow_nonfinite, labels=labels,
                )  # fmt: skip
                fresh, created = old is None, not out.exists()
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
                 progress, ctx, allow_nonfinite)  # fmt: skip
    except BaseException:
        if fresh:  # a new run that failed: leave out as it was if no shard is listed
            if lock is not None:
                with contextlib.suppress(Exception):
                    _remove_empty_run(out)
                _unlock(out, lock)
                lock = None
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if the failed run left it empty
        raise
    finally:
        if lock is not None:
            _unlock(out, lock)
    return manifest


_OUR_FILE = re.compile(r"(tau|noisy|label)-\d{5}\.npy")


def _remove_empty_run(out: Path) -> None:
    """Remove what a failed run wrote, if its manifest on disk lists no shard yet: the
    manifest, unlisted shard files (other ranks') and temporary files (regular files only;
    the lock goes when it is released)."""
    if read_manifest(out)["shards"]:
        return
    for entry in os.scandir(out):
        ours = (
            entry.name == MANIFEST
            or _OUR_FILE.fullmatch(entry.name)
            or (entry.name != LOCK and _is_ours(entry.name))
        )
        if ours and stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            os.unlink(entry.path)


def _error_of(name: str) -> type[Exception]:
    """The exception type to re-raise on the other ranks for rank 0's refusal."""
    known = (ValueError, TypeError, FileNotFoundError)
    return next((kind for kind in known if kind.__name__ == name), DistributedError)


def _rank_source(source, manifest: dict) -> ImageSource:
    """The source of a rank other than 0: its own argument (or the run's spec), checked
    against the fingerprint rank 0 recorded."""
    resize = manifest["parameters"]["resize"]
    recorded = labels_of(manifest)
    if not isinstance(source, ImageSource):
        spec = manifest["source"]["spec"] if source is None else source
        labels = reopen_argument(recorded)
        source = open_source(spec, resize=tuple(resize) if resize else None, labels=labels)
    if source.fingerprint() != manifest["source"]["fingerprint"]:
        raise ValueError(
            f"input: {source.spec} has fingerprint {source.fingerprint()} here, rank 0 read "
            f"{manifest['source']['fingerprint']}; every rank needs the same data"
        )
    found = None if source.labels is None else source.labels.describe()
    if found != recorded:
        raise ValueError(
            f"labels: {source.spec} has labels {found} here, rank 0 read {recorded}; every "
            "rank needs the same data"
        )
    return source


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
        _unlock(out, lock)
        raise
    return lock, manifest


def _run(
    source, out, manifest, mine, rounds, batch_size, device, backend, fault, progress, ctx,
    allow_nonfinite=False,
) -> None:  # fmt: skip
    """Compute this rank's shards ``mine``, one per round for ``rounds`` rounds."""
    params = manifest["parameters"]
    recipe = Recipe.of(manifest)
    S = params["shard_size"]
    total = manifest["total_images"]
    out_dtype = DTYPES[params["dtype"]]
    shape = tuple(manifest["image_shape"])
    pinned = device.type == "cuda"
    label_values = None if source.labels is None else source.labels.values
    free: queue.Queue = queue.Queue()
    for _ in range(2 if mine else 0):  # two shard buffers: one filling, one writing
        buffers = {
            kind: torch.empty((min(S, total), *shape), dtype=out_dtype, pin_memory=pinned)
            for kind in manifest["kinds"]
        }
        if label_values is not None:
            buffers[LABEL] = torch.empty(min(S, total), dtype=torch.int64)
        free.put(buffers)
    work: queue.Queue = queue.Queue(maxsize=1)
    extra = {
        "backend": _resolved_backend(backend, device, manifest["source"]["dtype"]),
        "device": device.type,
        "batch_size": batch_size,
    }
    done_images = sum(s["id_stop"] - s["id_start"] for s in manifest["shards"])
    bar = Progress(
        total, desc="generate", done=done_images, enabled=progress if ctx.is_main else False
    )
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
            finite = torch.ones((), dtype=torch.bool, device=device)
            for start in range(lo, hi, batch_size):
                stop = min(start + batch_size, hi)
                ids = torch.arange(start, stop, dtype=torch.int64)
                source_images = _batch_for_ids(source, ids, recipe)
                if label_values is not None:
                    found = labels_for(ids.numpy(), recipe, label_values)
                    buffers[LABEL][start - lo : stop - lo] = torch.from_numpy(found)
                images = source_images.to(device)
                try:  # ops checks the pixels and the outputs in the kernels' own pass
                    outputs = _perturb(images, ids.to(device), recipe, backend, allow_nonfinite)
                except OutputOverflowError:  # said below, for the shard
                    finite = torch.zeros((), dtype=torch.bool)
                    break
                except ValueError:  # NaN or inf pixels: name the source image
                    if not allow_nonfinite:
                        _check_source_finite(source_images, ids, recipe)
                    raise
                for kind, values in outputs.items():
                    buffers[kind][start - lo : stop - lo].copy_(values, non_blocking=pinned)
                if not ctx.active:
                    bar.update(stop - start)
            if pinned:
                torch.cuda.current_stream(device).synchronize()
            if not bool(finite):  # finite pixels, yet outputs beyond the dtype's range
                raise ValueError(
                    f"dtype: outputs of ids {lo}..{hi - 1} overflow {params['dtype']} "
                    f"(inf); nothing of shard {index} was written. Use a smaller --noise "
                    "sigma, smaller pixel values, or --dtype float32"
                )
            work.put((index, lo, hi, buffers))
    finally:
        work.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error
