"""One benchmark run over the matrix, and the merge of runs made as separate commands."""

from __future__ import annotations

import datetime
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from diffeo_engine.benchmark.bytes_model import BYTES_MODEL
from diffeo_engine.benchmark.device import ClockSampler, device_info
from diffeo_engine.benchmark.providers import (
    ISSUE_CUTS,
    ISSUE_DTYPES,
    ISSUE_SHAPES,
    PROVIDERS,
    PlanItem,
    plan,
)
from diffeo_engine.benchmark.timing import Runner, copy_bandwidth, time_callable

__all__ = ["SCHEMA", "merge_results", "run_benchmarks"]

SCHEMA = "diffeo-engine-bench/1"
INTERLEAVED_REPS = 15


def _measure(item: PlanItem, copy_GBps: float, *, smoke: bool, timer: str) -> dict:
    runner = Runner(item.provider, item.case)
    sampler = ClockSampler(item.case.device)
    timing = time_callable(runner.step, item.case.device, smoke=smoke, timer=timer, sampler=sampler)
    record = _record(item, runner, timing, copy_GBps, sampler.summary())
    del runner
    return record


def _record(item: PlanItem, runner: Runner, timing: dict, copy_GBps: float, telemetry) -> dict:
    """One result record from a timing (median, min and max seconds per call)."""
    provider = runner.provider
    case = item.case
    per_s = case.batch / timing["median_s"]
    gbps = per_s * runner.bytes_per_item / 1e9
    record = {
        "provider": item.provider,
        "kind": provider.kind,
        "law": provider.law,
        "shape": list(case.shape),
        "batch": case.batch,
        "dtype": case.dtype_label,
        "in_dtype": str(case.in_dtype).removeprefix("torch."),
        "out_dtype": str(case.out_dtype).removeprefix("torch."),
        "cut": case.cut,
        "T": case.T,
        "pairs_per_s": per_s,
        # spread between rounds: the slowest and the fastest round, as pairs/s
        "pairs_per_s_min": case.batch / timing["max_s"],
        "pairs_per_s_max": case.batch / timing["min_s"],
        "bytes_per_pair": runner.bytes_per_item,
        "effective_GBps": gbps,
        "fraction_of_copy": gbps / copy_GBps if copy_GBps else None,
        "n_buffers": runner.n_buffers,
        "timing": timing,
        "telemetry": telemetry,
    }
    if provider.kind == "deform":
        record["note"] = "tau x only: pairs_per_s counts images, bytes per deform_bytes"
    if case.batch != item.requested_batch:
        record["note"] = f"run at batch {case.batch} (small batch only)"
    return record


def _interleaved(items: list[PlanItem], copy_GBps: float, *, reps: int, group_s: float) -> list:
    """Every provider of one case timed round by round, in a new order each round (A B C,
    C A B, B C A, ...), so that a machine whose speed drifts (a shared CPU) slows all of
    them alike: each record gets the median of its own rounds and, per baseline, the
    median of the per-round ratios."""
    runners = [Runner(item.provider, item.case) for item in items]
    inner = []
    for runner in runners:  # warm-up (JIT cache, allocation) and one estimate each
        runner.step()
        start = time.perf_counter()
        runner.step()
        estimate = time.perf_counter() - start
        inner.append(max(1, min(1000, math.ceil(group_s / max(estimate, 1e-9)))))
    times: list[list[float]] = [[] for _ in runners]
    order = random.Random(0)  # fixed: the same orders every run
    for _ in range(reps):
        # shuffled each round: which provider runs right after which (after another
        # runtime's OpenMP threads, still spinning for ~10 ms on a core) changes
        for k in order.sample(range(len(runners)), len(runners)):
            runner = runners[k]
            start = time.perf_counter()
            for _ in range(inner[k]):
                runner.step()
            times[k].append((time.perf_counter() - start) / inner[k])
    records = []
    for item, runner, t, n in zip(items, runners, times, inner):
        timing = {
            "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "reps": reps,
            "inner": n, "timer": "perf_counter, interleaved", "rounds_s": t,
        }  # fmt: skip
        records.append(_record(item, runner, timing, copy_GBps, {}))
    by_provider = {item.provider: (item, t) for item, t in zip(items, times)}
    for record, item, t in zip(records, items, times):
        for base, field in BASELINES:
            if base == item.provider or base not in by_provider:
                continue
            base_item, base_t = by_provider[base]
            ratios = [(item.case.batch / a) / (base_item.case.batch / b) for a, b in zip(t, base_t)]
            record[field] = statistics.median(ratios)
            record[f"{field}_range"] = [min(ratios), max(ratios)]
    return records


BASELINES = (
    ("grid_sample", "vs_grid_sample"),
    ("grid_sample-compiled", "vs_grid_sample_compiled"),
    ("published-loop", "vs_published_loop"),
)


def _add_ratios(results: list[dict]) -> None:
    """Ratios of each pair provider's pairs/s to the baselines at the same case."""
    by_key = {}
    for r in results:
        key = (r["provider"], tuple(r["shape"]), r["dtype"], r["cut"])
        by_key.setdefault(key, {})[r["batch"]] = r
    for r in results:
        if r["kind"] != "pair":
            continue
        for base, field in BASELINES:
            if r["provider"] == base or field in r:  # interleaved runs paired their own
                continue
            runs = by_key.get((base, tuple(r["shape"]), r["dtype"], r["cut"]), {})
            # Same batch where measured; the published loop is measured at small batch only.
            other = runs.get(r["batch"]) or (
                next(iter(runs.values())) if base == "published-loop" and runs else None
            )
            if other and other["pairs_per_s"]:
                r[field] = r["pairs_per_s"] / other["pairs_per_s"]


def run_benchmarks(
    shapes: Sequence[Sequence[int]] = ISSUE_SHAPES,
    dtypes: Sequence[str] = ISSUE_DTYPES,
    cuts: Sequence[int] = ISSUE_CUTS,
    providers: Sequence[str] = tuple(PROVIDERS),
    *,
    device: str | torch.device | None = None,
    smoke: bool = False,
    seed: int = 0,
    timer: str = "events",
    interleave: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every provider over the matrix (``shapes`` as ``(B, C, H, W)``) in one run;
    ``interleave``: the providers of each case round by round in turn, their ratios paired
    round by round (for a machine whose speed drifts; not in smoke).

    Returns design.md section 5's structure: ``device``, ``copy_bandwidth_GBps`` (measured
    here, first), ``results`` (one record per provider, shape, dtype, cut), plus
    ``skipped`` (provider, case and why) and the settings.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    items = plan(shapes, dtypes, cuts, providers, device, seed=seed)
    say = progress or (lambda _: None)
    say(f"measuring copy bandwidth on {device}")
    copy = copy_bandwidth(device, smoke=smoke)
    copy_GBps = copy["copy_bandwidth_GBps"]
    results, skipped = [], []
    if interleave and not smoke:
        cases: dict = {}
        for item in items:
            if item.skip is None:
                key = (item.requested_batch, item.case.shape, item.case.dtype, item.case.cut)
                cases.setdefault(key, []).append(item)
        for group in cases.values():
            say(f"{', '.join(i.provider for i in group)} at {group[0].id}, interleaved")
            results.extend(_interleaved(group, copy_GBps, reps=INTERLEAVED_REPS, group_s=0.05))
        items = [item for item in items if item.skip is not None]
    for item in items:
        where = {
            "provider": item.provider,
            "shape": list(item.case.shape),
            "batch": item.requested_batch,
            "dtype": item.case.dtype_label,
            "cut": item.case.cut,
        }
        if item.skip is not None:
            skipped.append({**where, "reason": item.skip})
            continue
        say(f"{item.id}")
        try:
            results.append(_measure(item, copy_GBps, smoke=smoke, timer=timer))
        except Exception as error:  # one failing provider must not lose the whole run
            what = "skipped: torch.compile failed" if "compiled" in item.provider else "error"
            skipped.append({**where, "reason": f"{what}: {type(error).__name__}: {error}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _add_ratios(results)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "copy_bandwidth_GBps": copy_GBps,
        "copy": copy,
        "settings": {
            "shapes": [list(s) for s in shapes],
            "dtypes": list(dtypes),
            "cuts": list(cuts),
            "providers": list(providers),
            "seed": seed,
            "smoke": smoke,
            "timer": timer,
            "interleave": interleave and not smoke,
            "bytes_model": BYTES_MODEL,
        },
        "results": results,
        "skipped": skipped,
    }


def merge_results(docs: Sequence[dict]) -> dict:
    """One document from several runs (parts of a matrix run as separate commands).

    Each record keeps the ``copy_bandwidth_GBps`` of its own run (its ``fraction_of_copy``
    is against that); the top level gives the median over runs and lists each part.
    """
    if not docs:
        raise ValueError("docs: expected at least one result document")
    results, skipped, parts = [], [], []
    for doc in docs:
        for r in doc["results"]:
            r = {k: v for k, v in r.items() if not k.startswith("vs_")}
            r.setdefault("copy_bandwidth_GBps", doc["copy_bandwidth_GBps"])
            results.append(r)
        skipped.extend(doc.get("skipped", []))
        parts.append(
            {
                "created": doc.get("created"),
                "copy_bandwidth_GBps": doc["copy_bandwidth_GBps"],
                "settings": doc.get("settings"),
                "device": doc.get("device"),
            }
        )
    _add_ratios(results)
    names = {json.dumps(p["device"].get("name")) for p in parts if p.get("device")}
    if len(names) > 1:
        raise ValueError(f"docs: expected runs on one device, got {sorted(names)}")
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": docs[0]["device"],
        "copy_bandwidth_GBps": statistics.median(p["copy_bandwidth_GBps"] for p in parts),
        "parts": parts,
        "results": results,
        "skipped": skipped,
    }
