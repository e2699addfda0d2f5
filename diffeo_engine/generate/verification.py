"""``verify``: re-hash every shard against the manifest and regenerate ids from the source,
a sample of them or (``full=True``) every one, compared byte for byte.

Every image is a pure function of ``(seed, id)`` and the source, so a data set can be
checked completely: ``verify(full=True)`` recomputes each shard in the batches that made it
and compares every image, the labels, and the sha256 of the file generate would write with
the manifest's, which catches a shard altered together with its hash. :class:`Regenerator`
is the one way ids are regenerated, shared with ``load_generated(check=True)`` and repair.
"""

from __future__ import annotations

import hashlib
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffeo_engine.data.sources import ImageSource, open_source
from diffeo_engine.data.sources.labels import reopen_argument
from diffeo_engine.generate.files import ShardFileProblem, npy_header, open_listed
from diffeo_engine.generate.manifest import (
    LABEL,
    check_out_path,
    labels_of,
    read_manifest,
)
from diffeo_engine.generate.plan import (
    Recipe,
    _batch_for_ids,
    _check_backend,
    _check_device,
    _perturb,
    _resolved_backend,
    labels_for,
)
from diffeo_engine.progress import Progress

__all__ = ["TOLERANCE", "Regenerator", "VerifyReport", "shard_problems", "verify"]

# Cross-backend tolerance of verify (same backend and device type: exact equality):
# |stored - regenerated| <= TOLERANCE[dtype] * max(1, max |regenerated|), and 1 for uint8.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` is true when there is nothing in ``problems``.
    ``bad_shards``: indices of listed shards found damaged (what repair rewrites)."""

    out: str
    complete: bool
    shards_checked: int
    n_shards: int
    ids_checked: list[int] = field(default_factory=list)
    exact: bool = True
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)
    full: bool = False
    images_regenerated: int = 0
    seconds: float = 0.0
    bad_shards: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        mode = "exactly" if self.exact else "within the cross-backend tolerance"
        if self.full:
            rate = self.images_regenerated / max(self.seconds, 1e-9)
            regenerated = (
                f"all {self.images_regenerated} images regenerated and compared {mode} "
                f"({self.seconds:.1f} s, {rate:.0f} images/s; max |diff| "
                f"{self.max_abs_diff:.3g})"
            )
        else:
            regenerated = (
                f"{len(self.ids_checked)} ids regenerated (compared {mode}, max |diff| "
                f"{self.max_abs_diff:.3g})"
            )
        lines = [
            f"{self.out}: {self.shards_checked} of {self.n_shards} shards hashed, {regenerated}"
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED ({len(self.problems)} problems)")
        return "\n".join(lines)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN matching NaN (a run made with allow_nonfinite may hold NaN)."""
    return (
        bool(((a == b) | (a.isnan() & b.isnan())).all())
        if a.is_floating_point()
        else (torch.equal(a, b))
    )


def _worst(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``(n, D)`` tensors: max |a - b| in float64 (NaN against NaN counts 0, NaN
    against a number inf)."""
    if a.shape[1] == 0:
        return torch.zeros(len(a), dtype=torch.float64)
    diff = (a.double() - b.double()).abs()
    if a.is_floating_point():
        diff[a.isnan() & b.isnan()] = 0
        diff[(a == b) & a.isinf()] = 0
        diff = diff.nan_to_num(nan=float("inf"))
    return diff.amax(dim=1)


def _row_diffs(stored: torch.Tensor, new: torch.Tensor, exact: bool, dtype: str):
    """Per row: ``(differs (bool tensor), max |diff| per row)``; exact compares the bytes
    (and measures only the rows that differ)."""
    n = len(stored)
    a, b = stored.reshape(n, -1), new.reshape(n, -1)
    if exact:
        differs = (a.contiguous().view(torch.uint8) != b.contiguous().view(torch.uint8)).any(dim=1)
        worst = torch.zeros(n, dtype=torch.float64)
        if bool(differs.any()):
            worst[differs] = _worst(a[differs], b[differs])
        return differs, worst
    worst = _worst(a, b)
    if dtype == "uint8":
        return worst > 1, worst
    scale = b.double().abs().nan_to_num(posinf=0, neginf=0).amax(dim=1).clamp(min=1.0)
    return worst > TOLERANCE[dtype] * scale, worst


def id_ranges(ids: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts, start = [], None
    for j, id_ in enumerate(ids):
        if start is None:
            start = id_
        if j + 1 == len(ids) or ids[j + 1] != id_ + 1:
            parts.append(str(start) if start == id_ else f"{start}-{id_}")
            start = None
    return ", ".join(parts)


def shard_problems(out: Path, manifest: dict, shard: dict) -> list[str]:
    """What is wrong with one listed shard's files (missing, not a regular file, size,
    hash, header); empty when they are as the manifest says. Nothing but regular files
    inside ``out`` is read."""
    problems = []
    for entry in shard["files"].values():
        try:
            open_listed(out, entry, check_hash=True)
        except ShardFileProblem as problem:
            problems.append(str(problem))
    return problems


class Regenerator:
    """Regenerates the ids of a data set from its source, as generate made them.

    The source (``source``, else the manifest's spec) and its labels are opened on first use
    and compared with the manifest's record of them (fingerprint and labels; format 1
    recorded a sampled fingerprint, which cannot be recomputed). ``device`` and ``backend``
    default to the run's own where available (else the CPU). A shard computed by the same
    backend on the same device type is compared exactly, others within ``TOLERANCE``.
    """

    def __init__(
        self,
        out: Path,
        manifest: dict,
        *,
        source: str | Path | ImageSource | None = None,
        labels: str | Path | bool | None = None,
        device: str | torch.device | None = None,
        backend: str | None = None,
    ) -> None:
        self.out, self.manifest = out, manifest
        self.recipe = Recipe.of(manifest)
        run_before = manifest["execution"]
        if device is None:
            device = run_before["device"]
            cuda = torch.cuda.is_available()
            device = device if cuda or not str(device).startswith("cuda") else "cpu"
        self.device = _check_device(device)
        self.backend = _check_backend(run_before["backend"] if backend is None else backend)
        self.mine = (
            _resolved_backend(self.backend, self.device, manifest["source"]["dtype"]),
            self.device.type,
        )
        self._given, self._labels = source, labels
        self._source: ImageSource | None = None

    def source(self) -> tuple[ImageSource | None, str | None]:
        """``(source, None)``, or ``(None, problem)`` when it no longer is the run's: its
        description (kind, length, shape, dtype, resize, fingerprint, labels) differs from
        the manifest's (format 1's sampled fingerprint and formats 1-2's lack of labels
        excepted)."""
        if self._source is not None:
            return self._source, None
        manifest, source = self.manifest, self._given
        resize = manifest["parameters"]["resize"]
        recorded = labels_of(manifest)
        labels = self._labels
        if labels is None and not isinstance(source, ImageSource):
            labels = reopen_argument(recorded)
        if source is None:
            source = manifest["source"]["spec"]
        if not isinstance(source, ImageSource):
            source = open_source(source, resize=tuple(resize) if resize else None, labels=labels)
        elif labels is not None:
            source.attach_labels(labels)
        version = manifest["format_version"]
        skip = (
            {"spec"}
            | ({"labels"} if version < 3 else set())
            | ({"fingerprint"} if version < 2 else set())
        )
        recorded_source = {k: v for k, v in manifest["source"].items() if k not in skip}
        found = {k: v for k, v in source.describe().items() if k not in skip}
        for key in sorted(set(found) | set(recorded_source)):
            if found.get(key) != recorded_source.get(key):
                return None, (
                    f"the source {source.spec} changed since the run: its {key} is "
                    f"{found.get(key)!r}, the run's was {recorded_source.get(key)!r}; nothing "
                    "regenerated"
                )
        self._source = source
        return source, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None  # each process opens (and checks) the source itself
        return state

    def exact(self, shard: dict) -> bool:
        return (shard["backend"], shard["device"]) == self.mine

    def outputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The images of ``ids``, in one batch of their own (CPU tensors)."""
        source, _ = self.source()
        images = _batch_for_ids(source, ids, self.recipe).to(self.device)
        # NaN/inf pixels of a run made with allow_nonfinite are regenerated as they were
        made = _perturb(images, ids.to(self.device), self.recipe, self.backend, True)
        return {kind: values.cpu() for kind, values in made.items()}

    def batches(self, shard: dict, lo: int | None = None, hi: int | None = None):
        """``(start, stop, outputs)`` over ids ``lo..hi`` of ``shard`` (default all) in the
        batches that produced them (a kernel's rounding could depend on the batch)."""
        size = shard["batch_size"]
        first = shard["id_start"]
        lo = first if lo is None else lo
        hi = shard["id_stop"] if hi is None else hi
        start = first + (lo - first) // size * size
        while start < hi:
            stop = min(start + size, shard["id_stop"])
            yield start, stop, self.outputs(torch.arange(start, stop, dtype=torch.int64))
            start = stop

    def labels(self, ids) -> np.ndarray | None:
        source, _ = self.source()
        if source.labels is None:
            return None
        return labels_for(ids, self.recipe, source.labels.values)

    def check_ids(
        self, shard: dict, arrays: dict[str, np.ndarray], ids: list[int], fresh=None, rows=None
    ):
        """Compare ids of ``shard`` with ``arrays`` (the shard's files), regenerated alone
        (``fresh``, their outputs at ``rows``, if already made in a batch of their own), and
        again inside their original batch when an exact comparison fails;
        ``(problems, max |diff|)``."""
        exact = self.exact(shard)
        dtype = self.recipe.dtype
        if fresh is None:
            fresh, rows = self.outputs(torch.tensor(ids, dtype=torch.int64)), range(len(ids))
        problems, worst = [], 0.0
        for row, id_ in zip(rows, ids):
            local = id_ - shard["id_start"]
            for kind in self.recipe.kinds:
                stored = torch.from_numpy(np.array(arrays[kind][local : local + 1]))
                new = fresh[kind][row : row + 1]
                if exact and not _same(stored, new):
                    for start, _, outputs in self.batches(shard, id_, id_ + 1):
                        new = outputs[kind][id_ - start : id_ - start + 1]
                bad, diff = _row_diffs(stored, new, exact, dtype)
                worst = max(worst, float(diff.max()))
                if bool(bad.any()):
                    problems.append(
                        f"id {id_} ({kind}): regenerated image differs (max |diff| "
                        f"{float(diff.max()):.3g})"
                    )
            if LABEL in arrays:
                want = self.labels(np.array([id_]))
                if int(arrays[LABEL][local]) != int(want[0]):
                    problems.append(
                        f"id {id_} (label): stored {int(arrays[LABEL][local])}, the source "
                        f"says {int(want[0])}"
                    )
        return problems, worst

    def compare_shard(self, shard: dict, arrays: dict[str, np.ndarray], bar=None):
        """Regenerate every id of ``shard`` and compare with its readable ``arrays``;
        ``(problems naming each differing image and file, max |diff|)``. Exact comparisons
        are byte for byte, the header and the manifest's sha256 included."""
        exact = self.exact(shard)
        dtype = self.recipe.dtype
        first, n = shard["id_start"], shard["id_stop"] - shard["id_start"]
        files = shard["files"]
        differing: dict[str, list[int]] = {kind: [] for kind in arrays}
        worst: dict[str, float] = {kind: 0.0 for kind in arrays}
        digests = {}
        for kind in arrays:
            entry = files[kind]
            digests[kind] = hashlib.sha256(npy_header(entry["shape"], entry["dtype"]))
        for start, stop, outputs in self.batches(shard):
            ids = np.arange(start, stop)
            rows = slice(start - first, stop - first)
            for kind, array in arrays.items():
                new = torch.from_numpy(self.labels(ids)) if kind == LABEL else outputs[kind]
                stored = torch.from_numpy(np.array(array[rows]))
                digests[kind].update(new.numpy().tobytes())
                bad, diff = _row_diffs(stored, new, exact or kind == LABEL, dtype)
                if len(diff):
                    worst[kind] = max(worst[kind], float(diff.max()))
                differing[kind] += ids[bad.numpy()].tolist()
            if bar is not None:
                bar.update(stop - start)
        problems = []
        for kind, ids in differing.items():
            name = files[kind]["name"]
            what = "labels" if kind == LABEL else "images"
            if ids:
                problems.append(
                    f"{name}: {len(ids)} of {n} {what} differ from their regeneration: ids "
                    f"{id_ranges(ids)} (max |diff| {worst[kind]:.3g})"
                )
            elif (exact or kind == LABEL) and digests[kind].hexdigest() != files[kind]["sha256"]:
                problems.append(
                    f"{name}: its sha256 is not that of the file generate writes for these "
                    "ids (the header or the manifest's hash was changed)"
                )
        images_worst = max((v for k, v in worst.items() if k != LABEL), default=0.0)
        return problems, images_worst


def _readable(out: Path, shard: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """The shard's files that open as listed (size and header, not hashed), and the
    problems of the others."""
    arrays, problems = {}, []
    for kind, entry in shard["files"].items():
        try:
            arrays[kind] = open_listed(out, entry, check_hash=False)
        except ShardFileProblem as problem:
            problems.append(str(problem))
    return arrays, problems


def verify(
    out: str | Path,
    sample: int = 16,
    *,
    full: bool = False,
    source: str | Path | ImageSource | None = None,
    labels: str | Path | bool | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    seed: int = 0,
    shards: list[int] | None = None,
    progress: bool | None = False,
) -> VerifyReport:
    """Re-hash every shard against the manifest and regenerate ids from the source: a
    sample of ``sample`` ids, or with ``full=True`` every id of every listed shard.

    Sampled ids are the first and last listed plus others drawn with ``seed``, regenerated
    alone, in one batch. ``full=True`` recomputes each shard in the batches that made it and
    compares every image byte for byte (and the labels, and the sha256 of the file generate
    writes with the manifest's), naming each differing image and file; it reports its rate
    and shows a progress line (``progress``). ``shards`` restricts it to those indices. A
    shard computed by the same backend on the same device type must match exactly (a
    sampled id that does not is recomputed once more inside the batch that produced it);
    otherwise within ``TOLERANCE[dtype] * max(1, max |x|)`` for float outputs and 1 for
    uint8. ``source`` (and ``labels``) override the manifest's (the fingerprint must still
    match); ``device`` and ``backend`` default to the run's where available (else the CPU).
    An incomplete run is reported as a problem.
    """
    out = check_out_path(out)
    manifest = read_manifest(out)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ValueError(f"sample: expected an integer >= 0, got {sample!r}")
    if not isinstance(full, bool):
        raise TypeError(f"full: expected True or False, got {full!r}")
    regenerator = Regenerator(
        out, manifest, source=source, labels=labels, device=device, backend=backend
    )
    listed = manifest["shards"]
    if shards is not None:
        listed = [s for s in listed if s["index"] in set(shards)]
    report = VerifyReport(
        out=str(out),
        complete=bool(manifest["complete"]),
        shards_checked=0,
        n_shards=manifest["n_shards"],
        full=full,
    )
    problems = report.problems
    if not manifest["complete"]:
        problems.append(
            f"incomplete: {len(manifest['shards'])} of {manifest['n_shards']} shards written"
        )
    names = {e["name"] for s in manifest["shards"] for e in s["files"].values()}
    if manifest["complete"] and shards is None:
        for path in sorted(out.glob("*.npy")):
            if path.name not in names:
                problems.append(f"{path.name}: a shard file the manifest does not list")

    if full:
        return _verify_full(out, manifest, listed, regenerator, report, progress)

    good = []
    for shard in listed:
        found = shard_problems(out, manifest, shard)
        problems += found
        report.shards_checked += 1
        if found:
            report.bad_shards.append(shard["index"])
        else:
            good.append(shard)
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
    _, problem = regenerator.source()
    if problem is not None:
        problems.append(problem)
        return report
    fresh = regenerator.outputs(torch.as_tensor(chosen, dtype=torch.int64))  # one batch
    starts = [s["id_start"] for s in good]
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for row, id_ in enumerate(chosen.tolist()):
        by_shard.setdefault(bisect_right(starts, id_) - 1, []).append((row, id_))
    for position, pairs in by_shard.items():
        shard = good[position]
        report.exact &= regenerator.exact(shard)
        arrays = {k: open_listed(out, e, check_hash=False) for k, e in shard["files"].items()}
        rows, ids = zip(*pairs)
        found, worst = regenerator.check_ids(shard, arrays, list(ids), fresh, rows)
        report.max_abs_diff = max(report.max_abs_diff, worst)
        problems += found
        if found:
            report.bad_shards.append(shard["index"])
    report.ids_checked = chosen.tolist()
    return report


def _verify_full(out, manifest, listed, regenerator, report, progress) -> VerifyReport:
    problems = report.problems
    _, problem = regenerator.source()
    if problem is not None:
        for shard in listed:
            problems += shard_problems(out, manifest, shard)
            report.shards_checked += 1
        problems.append(problem)
        return report
    total = sum(s["id_stop"] - s["id_start"] for s in listed)
    bar = Progress(total, desc="verify", enabled=progress)
    began = time.perf_counter()
    try:
        for shard in listed:
            found = shard_problems(out, manifest, shard)  # hashes: a changed file shows here
            report.shards_checked += 1
            arrays, unreadable = _readable(out, shard)
            report.exact &= regenerator.exact(shard)
            compared, worst = regenerator.compare_shard(shard, arrays, bar)
            report.max_abs_diff = max(report.max_abs_diff, worst)
            report.images_regenerated += shard["id_stop"] - shard["id_start"]
            found = list(dict.fromkeys(found + unreadable + compared))
            problems += found
            if found:
                report.bad_shards.append(shard["index"])
    finally:
        bar.close()
        report.seconds = time.perf_counter() - began
    return report
