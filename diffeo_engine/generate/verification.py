"""``verify``: re-hash every shard against the manifest and regenerate a sample of ids."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffeo_engine import ops
from diffeo_engine.data.sources import ImageSource, open_source
from diffeo_engine.generate.files import _sha256
from diffeo_engine.generate.manifest import FORMAT_VERSION, read_manifest
from diffeo_engine.generate.plan import (
    _batch_for_ids,
    _check_device,
    _perturb,
    _resolved_backend,
)

__all__ = ["TOLERANCE", "VerifyReport", "shard_problems", "verify"]

# Cross-backend tolerance of verify (same backend and device type: exact equality):
# |stored - regenerated| <= TOLERANCE[dtype] * max(1, max |regenerated|), and 1 for uint8.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3}


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


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN matching NaN (a run made with allow_nonfinite may hold NaN)."""
    return (
        bool(((a == b) | (a.isnan() & b.isnan())).all())
        if a.is_floating_point()
        else (torch.equal(a, b))
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; NaN against NaN counts 0, NaN against a number inf."""
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    diff[a.isnan() & b.isnan()] = 0
    diff[(a == b) & a.isinf()] = 0
    return float(diff.nan_to_num(nan=float("inf")).max())


def shard_problems(out: Path, manifest: dict, shard: dict) -> list[str]:
    """What is wrong with one listed shard's files (missing, unreadable, hash, shape,
    dtype); empty when they are as the manifest says. The names are the manifest's,
    already checked to be plain ``KIND-NNNNN.npy`` names (``read_manifest``)."""
    problems = []
    dtype = manifest["parameters"]["dtype"]
    for kind in manifest["kinds"]:
        entry = shard["files"][kind]
        name = entry["name"]
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing (shard {shard['index']}, {kind})")
            continue
        try:
            if _sha256(path) != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
                continue
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            problems.append(f"{name}: cannot read it: {getattr(error, 'strerror', None) or error}")
            continue
        if list(array.shape) != entry["shape"]:
            problems.append(f"{name}: shape {list(array.shape)} != {entry['shape']}")
        elif str(array.dtype) != dtype:
            problems.append(f"{name}: dtype {array.dtype} != {dtype}")
    return problems


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
    shards = manifest["shards"]
    report = VerifyReport(
        out=str(out),
        complete=bool(manifest["complete"]),
        shards_checked=0,
        n_shards=manifest["n_shards"],
    )
    problems = report.problems
    if not manifest["complete"]:
        problems.append(f"incomplete: {len(shards)} of {manifest['n_shards']} shards written")
    good = []
    for shard in shards:
        found = shard_problems(out, manifest, shard)
        problems += found
        report.shards_checked += 1
        if not found:
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
    # format 1 recorded a sampled fingerprint that cannot be recomputed: the ids are
    # regenerated from the source as it is (which finds a change in the sampled ids)
    current = manifest["format_version"] == FORMAT_VERSION
    if current and source.fingerprint() != manifest["source"]["fingerprint"]:
        problems.append(
            f"the source {source.spec} has fingerprint {source.fingerprint()}, the run's was "
            f"{manifest['source']['fingerprint']}: it changed; nothing regenerated"
        )
        return report
    ids = torch.as_tensor(chosen, dtype=torch.int64)
    images = _batch_for_ids(source, ids, params["per_image"]).to(device)
    # NaN/inf pixels of a run made with allow_nonfinite are regenerated as they were
    fresh = _perturb(images, ids.to(device), params, device, backend, True)
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
            in_context[lo, hi] = _perturb(
                batch, batch_ids.to(device), params, device, backend, True
            )
        return id_ - lo, in_context[lo, hi]

    for row, id_ in enumerate(chosen.tolist()):
        shard = good[bisect_right(starts, id_) - 1]
        exact = (shard["backend"], shard["device"]) == mine
        report.exact &= exact
        for kind in manifest["kinds"]:
            shard_file = np.load(out / shard["files"][kind]["name"], mmap_mode="r")
            stored = torch.from_numpy(np.array(shard_file[id_ - shard["id_start"]]))
            new = fresh[kind][row].cpu()
            if exact and not _same(stored, new):
                context_row, outputs = original_batch(shard, id_)
                new = outputs[kind][context_row].cpu()
            diff = _max_diff(stored, new)
            report.max_abs_diff = max(report.max_abs_diff, diff)
            if exact:
                bad = not _same(stored, new)
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
