"""The one claims table every experiment appends to, and the helpers they share.

A claim is a dict ``{id, claim, statement, expected, measured, verdict, experiment, values,
thresholds, quick_note}``. ``verdict`` is ``PASS`` or ``FAIL`` for a claim with a threshold
(fixed in the code before any outcome was seen), ``MEASURED`` for a number reported
without a verdict, ``NOT TESTABLE`` (with the reason in ``measured``) when the data it
needs is missing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from diffeo_engine.sensitivity import SensitivityMeter

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "VERDICTS",
    "Claims",
    "Normalize",
    "claims_table",
    "geometric_mean",
    "last_over_first",
    "log",
    "measure",
    "ratio",
    "threads",
]

VERDICTS = ("PASS", "FAIL", "MEASURED", "NOT TESTABLE")
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
