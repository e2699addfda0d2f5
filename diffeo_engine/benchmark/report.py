"""Reports of a run: a fixed-width or Markdown table, a PNG, the result file's name."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from diffeo_engine.benchmark.providers import MAX_ENTROPY

__all__ = ["format_table", "result_filename", "write_plot"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(record: dict) -> str:
    """Min-max pairs/s over the timed rounds (the median is the pairs/s column)."""
    lo, hi = record.get("pairs_per_s_min"), record.get("pairs_per_s_max")
    return "-" if lo is None or hi is None else f"{lo:.3g}-{hi:.3g}"


def _ratio(record: dict, field: str) -> str:
    """A ratio to a baseline; interleaved runs add the range of the per-round ratios."""
    value, span = record.get(field), record.get(f"{field}_range")
    if value is None or span is None:
        return _fmt(value, ".3g")
    return f"{value:.3g} [{span[0]:.2g}-{span[1]:.2g}]"


def format_table(doc: dict, *, markdown: bool = False) -> str:
    """The results as a fixed-width (or Markdown) table, skipped providers listed after.

    pairs/s is the median over rounds, ``min-max`` the slowest and fastest round; with
    interleaved rounds each ratio is the median of the per-round ratios, [its range].
    """
    head = ["provider", "shape", "B", "dtype", "cut", "pairs/s", "min-max", "GB/s", "% copy"]
    head += ["x grid_s", "x compiled", "x loop"]
    rows = []
    for r in doc["results"]:
        C, H, W = r["shape"]
        rows.append(
            [
                r["provider"] + ("" if r["law"] == MAX_ENTROPY else " *"),
                f"{C}x{H}x{W}",
                str(r["batch"]),
                r["dtype"],
                str(r["cut"]),
                _fmt(r["pairs_per_s"], ".3g"),
                _spread(r),
                _fmt(r["effective_GBps"], ".4g"),
                _fmt(None if r["fraction_of_copy"] is None else 100 * r["fraction_of_copy"], ".3g"),
                _ratio(r, "vs_grid_sample"),
                _ratio(r, "vs_grid_sample_compiled"),
                _ratio(r, "vs_published_loop"),
            ]
        )
    name = doc["device"].get("name", "?")
    lines = [f"device: {name}; copy bandwidth {doc['copy_bandwidth_GBps']:.1f} GB/s (read+write)"]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if any(r["law"] != MAX_ENTROPY for r in doc["results"]):
        lines.append("* different law from design.md section 2 (not comparable semantics)")
    reasons: dict[str, set] = {}
    for s in doc.get("skipped", []):
        reasons.setdefault(s["provider"], set()).add(s["reason"])
    for provider, why in reasons.items():
        for reason in sorted(why):
            if "measured already" not in reason:
                lines.append(f"{provider}: {reason}")
    return "\n".join(lines)


def write_plot(doc: dict, path: str | Path) -> Path | None:
    """Pairs/s and fraction of copy per case and provider as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = doc["results"]
    if not results:
        return None
    cases = []
    for r in results:
        key = (tuple(r["shape"]), r["batch"], r["dtype"], r["cut"])
        if key not in cases and r["provider"] != "published-loop":
            cases.append(key)
    providers = list(dict.fromkeys(r["provider"] for r in results))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(cases) + 3), 8), sharex=True)
    width = 0.8 / max(len(providers), 1)
    for k, provider in enumerate(providers):
        for ax, field, scale in ((axes[0], "pairs_per_s", 1), (axes[1], "fraction_of_copy", 100)):
            xs, ys = [], []
            for n, (shape, batch, dtype, cut) in enumerate(cases):
                for r in results:
                    same = (tuple(r["shape"]), r["dtype"], r["cut"]) == (shape, dtype, cut)
                    ok = r["provider"] == provider and same and r[field] is not None
                    if ok and (r["batch"] == batch or provider == "published-loop"):
                        xs.append(n + (k - len(providers) / 2) * width)
                        ys.append(r[field] * scale)
                        break
            ax.bar(xs, ys, width=width, label=provider)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("pairs / s")
    axes[1].set_ylabel("% of measured copy bandwidth")
    axes[0].legend(fontsize=7, ncol=2)
    labels = [f"{'x'.join(map(str, s))} B={b}\n{d} cut={c}" for s, b, d, c in cases]
    axes[1].set_xticks(range(len(cases)), labels, rotation=90, fontsize=6)
    axes[0].set_title(
        f"{doc['device'].get('name', '?')}: copy {doc['copy_bandwidth_GBps']:.0f} GB/s"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_filename(doc: dict, date: datetime.date | None = None) -> str:
    """``<gpu>-<yyyy-mm-dd>.json``, the name results are committed under in bench/results."""
    name = doc["device"].get("name", "device")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
    return f"{slug}-{(date or datetime.date.today()).isoformat()}.json"
