"""The one claims table every experiment appends to, and the helpers they share.

A claim is a dict ``{id, claim, statement, expected, measured, verdict, experiment, values,
thresholds, quick_note}``. ``verdict`` is ``PASS`` or ``FAIL`` for a claim with a threshold
(fixed in the code before any outcome was seen), ``INCONCLUSIVE`` when the measured number
sits within two standard errors across seeds of its threshold (noise could pass or fail
it: :func:`judge`), ``MEASURED`` for a number reported without a verdict, ``NOT
TESTABLE`` (with the reason in ``measured``) when what it needs is missing: data, a net
that learned, or a run with ``--full``.

Quantities measured over seeds are judged on the log scale: the geometric mean over seeds
and the standard error of the per-seed logs (:class:`SeedEstimate`). :func:`run_jobs` runs
the independent trainings of every experiment in worker processes and prints its progress
with an estimate of the time left.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from diffeo_engine.sensitivity import SensitivityMeter

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "STANDARD_ERRORS",
    "VERDICTS",
    "Claims",
    "Job",
    "Normalize",
    "SeedEstimate",
    "claims_table",
    "combine",
    "geometric_mean",
    "judge",
    "last_over_first",
    "log",
    "measure",
    "ratio",
    "run_jobs",
    "threads",
]

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", "MEASURED", "NOT TESTABLE")
STANDARD_ERRORS = 2.0  # a verdict needs its margin to exceed this many standard errors
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Claims(list):
    """The claims of a run, in order: ``add(...)`` one, ``table()`` prints them all."""

    def add(
        self,
        id: str,
        claim: str,
        *,
        statement: str,
        expected: str,
        measured: str,
        verdict: str | bool,
        experiment: str,
        values: dict | None = None,
        thresholds: dict | None = None,
        quick_note: str | None = None,
    ) -> dict:
        if isinstance(verdict, bool):
            verdict = "PASS" if verdict else "FAIL"
        if verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {VERDICTS}, got {verdict!r}")
        entry = {
            "id": id,
            "claim": claim,
            "statement": statement,
            "expected": expected,
            "measured": measured,
            "verdict": verdict,
            "experiment": experiment,
            "values": dict(values or {}),
            "thresholds": dict(thresholds or {}),
            "quick_note": quick_note,
        }
        self.append(entry)
        return entry

    def table(self) -> str:
        return claims_table(self)


def claims_table(claims: list[dict]) -> str:
    """The claims as a plain-text table: id, claim, measured figure, verdict."""
    w_id = max(len("id"), *(len(c["id"]) for c in claims))
    w_claim = max(len("claim"), *(len(c["claim"]) for c in claims))
    w_meas = max(len("measured"), *(len(c["measured"]) for c in claims))
    head = f"{'id':<{w_id}} {'claim':<{w_claim}}  {'measured':<{w_meas}}  verdict"
    lines = [head, "-" * len(head)]
    for c in claims:
        lines.append(
            f"{c['id']:<{w_id}} {c['claim']:<{w_claim}}  {c['measured']:<{w_meas}}  {c['verdict']}"
        )
    return "\n".join(lines)


def log(echo: Callable[[str], None] | None, message: str) -> None:
    if echo is not None:
        echo(message)


def ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


def geometric_mean(values) -> float:
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class SeedEstimate:
    """A positive quantity measured once per seed, on the log scale: ``mean`` and ``se``
    (sample standard deviation over ``sqrt(n)``; ``inf`` with one seed) of the logs."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values) -> SeedEstimate:
        values = [float(v) for v in values]
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            return cls(math.nan, math.nan, len(values))
        logs = [math.log(v) for v in values]
        n = len(logs)
        mean = sum(logs) / n
        if n < 2:
            return cls(mean, math.inf, n)
        var = sum((x - mean) ** 2 for x in logs) / (n - 1)
        return cls(mean, math.sqrt(var / n), n)

    @property
    def gm(self) -> float:
        """The geometric mean over seeds."""
        return math.exp(self.mean) if math.isfinite(self.mean) else math.nan

    @property
    def factor(self) -> float:
        """``exp(STANDARD_ERRORS * se)``: the geometric mean is known within this factor."""
        return math.exp(STANDARD_ERRORS * self.se) if math.isfinite(self.se) else math.inf

    def to_dict(self) -> dict:
        return {"gm": self.gm, "log_mean": self.mean, "log_se": self.se, "seeds": self.n}


def judge(estimate: SeedEstimate, bound: float, side: str) -> str:
    """``PASS`` when the geometric mean is on ``side`` (``"below"`` or ``"above"``) of
    ``bound`` by more than ``STANDARD_ERRORS`` standard errors (on the log scale),
    ``FAIL`` when it is on the other side by as much, ``INCONCLUSIVE`` in between or when
    the number is not finite."""
    if side not in ("below", "above"):
        raise ValueError(f"side: expected 'below' or 'above', got {side!r}")
    if not (math.isfinite(estimate.mean) and bound > 0) or math.isnan(estimate.se):
        return "INCONCLUSIVE"
    margin = math.log(bound) - estimate.mean
    if side == "above":
        margin = -margin
    width = STANDARD_ERRORS * estimate.se
    if margin > width:
        return "PASS"
    if margin < -width:
        return "FAIL"
    return "INCONCLUSIVE"


def combine(verdicts) -> str:
    """A claim made of several conditions: ``FAIL`` if any fails, else ``PASS`` if all
    pass, else ``INCONCLUSIVE``."""
    verdicts = list(verdicts)
    if "FAIL" in verdicts:
        return "FAIL"
    if verdicts and all(v == "PASS" for v in verdicts):
        return "PASS"
    return "INCONCLUSIVE"


class Normalize:
    """``(x - mean) / std``: scalars (MNIST's by default, pixels in ``[0, 1]``) or one value
    per channel of ``(B, C, H, W)`` batches (CIFAR-10's)."""

    def __init__(self, mean=MNIST_MEAN, std=MNIST_STD) -> None:
        self.mean, self.std = mean, std

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean, self.std
        if isinstance(mean, (tuple, list)):
            shape = (1, -1) + (1,) * (batch.dim() - 2)
            mean = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(shape)
            std = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(shape)
        return (batch - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


_KEEP = (
    "name",
    "D",
    "G",
    "R",
    "D_err",
    "G_err",
    "R_err",
    "denominator",
    "D_numerator",
    "G_numerator",
    "count",
    "perturbations",
    "shape",
    "features",
)


def measure(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sites: dict[str, int],
    batch_size: int,
    device: torch.device,
    id_offset: int = 0,
    **meter_kwargs,
) -> list[dict]:
    """Per-layer records ``{k, name, D, G, R, *_err, ...}`` of ``model`` (eval mode) on
    ``images``; ``sites`` maps layer names (``"input"`` and ``"output"`` included) to
    their depth ``k``."""
    model.eval()
    records = []
    layers = [name for name in sites if name != "output"]
    with SensitivityMeter(model, layers=layers, **meter_kwargs) as meter:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            ids = torch.arange(start, start + batch.shape[0], device=device) + id_offset
            meter.update(batch, ids=ids)
        result = meter.compute()
    for record in result.layers:
        if record.name not in sites:
            continue
        out = {"k": sites[record.name]}
        out.update({key: record[key] for key in _KEEP})
        records.append(out)
    return sorted(records, key=lambda r: r["k"])


def last_over_first(records: list[dict]) -> dict[str, float]:
    """``X_last / X_1`` for X in D, G, R: deepest hidden layer over the first (k = 1)."""
    hidden = [r for r in records if r["k"] >= 1]
    first, last = hidden[0], hidden[-1]
    return {key: ratio(last[key], first[key]) for key in ("D", "G", "R")}


@dataclass(frozen=True)
class Job:
    """One independent run for :func:`run_jobs`: ``function(*args)`` (a module-level
    function, so that a worker process can import it), ``cost`` its expected share of the
    time (for the estimate of the time left) and a ``label`` to print."""

    function: Callable
    args: tuple
    cost: float
    label: str


def _single_thread(function: Callable, args: tuple):
    with threads(1):
        return function(*args)


SECONDS_PER_COST = 1.5  # a job's cost unit: one scale-detection epoch, ~1.5 s on one core
HEARTBEAT = 60.0  # seconds between progress lines while no job finishes


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int,
    echo: Callable[[str], None] | None = None,
    describe: Callable[[Job, object], str] | None = None,
    heartbeat: float = HEARTBEAT,
) -> list:
    """Run ``jobs`` (each with one torch thread), in ``workers`` processes on the CPU, the
    costliest first; return their results in the order of ``jobs``. Each job depends only
    on its arguments, so the results are those of one process. A line after each job (what
    finished) and every ``heartbeat`` seconds in between: the time so far and the time
    left, estimated from the jobs' ``cost`` (``SECONDS_PER_COST`` per unit and core until
    enough has finished to measure the rate)."""
    results: list = [None] * len(jobs)
    total = sum(job.cost for job in jobs) or 1.0
    start, done, n_done = time.perf_counter(), 0.0, 0
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    prior = total * SECONDS_PER_COST / max(1, min(workers, _cores()))

    def timing(running: float) -> str:
        """The time so far and left; running jobs count as half done."""
        elapsed = time.perf_counter() - start
        expected = max(prior, 1.1 * elapsed)
        if done > 0:
            weight = done / total
            observed = elapsed * total / (done + 0.5 * running)
            expected = weight * observed + (1 - weight) * expected
        return f"{elapsed:.0f} s so far, about {max(expected - elapsed, 0.0):.0f} s left"

    def report(i: int, running: float = 0.0) -> None:
        nonlocal done, n_done
        done += jobs[i].cost
        n_done += 1
        what = describe(jobs[i], results[i]) if describe is not None else ""
        log(echo, f"  [{n_done}/{len(jobs)}] {jobs[i].label}{': ' + what if what else ''} "
            f"({timing(running)})")  # fmt: skip

    if workers <= 1 or len(jobs) <= 1:
        for i in order:
            results[i] = _single_thread(jobs[i].function, jobs[i].args)
            report(i)
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(_single_thread, jobs[i].function, jobs[i].args): i for i in order}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=heartbeat, return_when=FIRST_COMPLETED)
            running = sum(jobs[futures[f]].cost for f in pending if f.running())
            if not finished:
                log(echo, f"  ... {n_done}/{len(jobs)} done ({timing(running)})")
            for future in finished:
                i = futures[future]
                results[i] = future.result()
                report(i, running)
    return results


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (then restore). The scale-detection nets are
    small batches of small convolutions: on a loaded 2-core machine one thread ran them
    5x faster than two (2.0 s against 11.6 s for one ``--quick`` seed, side by side)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
