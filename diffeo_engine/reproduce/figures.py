"""The figures of ``reproduce``: one PNG per experiment, drawn from ``results.json`` data.

Init is dashed with open markers, trained solid with filled ones (the legend says which);
where a verdict compares layers, the threshold it uses is drawn as a dotted line; the y
labels say what each quantity is normalised by.
"""

from __future__ import annotations

import math

import numpy as np

from diffeo_engine.reproduce.analytical import ANALYTICAL
from diffeo_engine.reproduce.claims import geometric_mean

__all__ = [
    "have_matplotlib",
    "plot_analytical",
    "plot_bars",
    "plot_layers",
    "plot_mnist",
    "plot_scale_detection",
]

YLABEL = {
    "D": "$D_k = E\\|f(\\tau x)-f(x)\\|^2 / E\\|f(x)-f(z)\\|^2$",
    "G": "$G_k = E\\|f(x+\\eta)-f(x)\\|^2 / E\\|f(x)-f(z)\\|^2$",
    "R": "$R_k = D_k / G_k$",
}
INIT = {"ls": "--", "mfc": "none"}
TRAINED = {"ls": "-"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(rows: int = 3, cols: int = 1, size=(6.5, 8.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, constrained_layout=True)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, sharex="col", squeeze=False)


def _series(ax, ks, values, **style) -> None:
    values = [v if v is not None and v > 0 else math.nan for v in values]
    ax.plot(ks, values, marker="o", ms=4, **style)


def _finish(axes, xlabel: str, note: str = "") -> None:
    for row, key in zip(axes, "DGR"):
        for ax in row:
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_ylabel(YLABEL[key] + (f"\n{note}" if note else ""), fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    from matplotlib.ticker import MaxNLocator

    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_analytical(data: dict, path) -> None:
    figure, axes = _figure(3, 2, (10.0, 8.0))
    for col, case in enumerate(ANALYTICAL):
        result = data["cases"][case.name]
        records, (lo, hi) = result["records"], case.fit
        fit = [r for r in records if lo <= r["k"] <= hi]
        for row, key in enumerate("DGR"):
            ax = axes[row][col]
            _series(
                ax,
                [r["k"] for r in records],
                [r[key] for r in records],
                color="C0",
                label="measured (no training)",
            )
            slope = result["predicted"][key]
            ks = np.array([r["k"] for r in fit], dtype=float)
            ys = np.array([r[key] for r in fit], dtype=float)
            grid = np.array([r["k"] for r in records], dtype=float)
            if case.scale == "exponential":
                c = np.mean(np.log2(ys)) - slope * np.mean(ks)
                ax.plot(grid, 2 ** (c + slope * grid), ":", color="C3", label="prediction")
                text = f"2^({slope:+g} k)"
            else:
                c = np.mean(np.log(ys)) - slope * np.mean(np.log(ks))
                ax.plot(grid, np.exp(c + slope * np.log(grid)), ":", color="C3", label="prediction")
                ax.set_xscale("log")
                text = f"k^({slope:+g})"
            ax.axvspan(lo, hi, color="0.9", zorder=0, label="fit range")
            ax.set_title(
                f"{key}: fitted {result['exponents'][key]:+.2f}, predicted {text}", fontsize=8
            )
        axes[0][col].legend(fontsize=7)
    figure.suptitle("claim 1: constant filters (left f=s=2, right f=2, s=1)", fontsize=9)
    _finish(axes, "layer k")
    figure.savefig(path, dpi=90)


def _gm_by_layer(runs: list[dict], when: str, key: str) -> tuple[list[int], list[float]]:
    ks = [r["k"] for r in runs[0][when]]
    return ks, [geometric_mean(run[when][i][key] for run in runs) for i in range(len(ks))]


def plot_scale_detection(data: dict, path2, path3, *, r_drop: float) -> None:
    """Claim 2 (ReLU, init vs trained, with its thresholds) and claim 3 (ReLU vs tanh);
    per layer, the geometric mean over the seeds."""
    runs = data["runs"]
    n = len(runs["relu"])
    note = f"(channel mean; geometric mean of {n} seeds)"
    figure, axes = _figure()
    for when, style in (("init", INIT), ("trained", TRAINED)):
        for row, key in enumerate("DGR"):
            ks, ys = _gm_by_layer(runs["relu"], when, key)
            _series(axes[row][0], ks, ys, color="C0", label=f"ReLU, {when}", **style)
    for row, key in enumerate("DGR"):
        ks, ys = _gm_by_layer(runs["relu"], "trained", key)
        first = ys[1]
        level, text = (
            (first * r_drop, f"threshold R_1 x {r_drop:g}")
            if key == "R"
            else (first, f"trained {key}_1 (verdict: {key}_last {'<' if key == 'D' else '>'} it)")
        )
        axes[row][0].axhline(level, color="C3", ls=":", label=text)
        axes[row][0].legend(fontsize=6)
    axes[0][0].set_title("claim 2: scale detection, ReLU, init vs trained", fontsize=9)
    _finish(axes, "layer k (0 = input)", note)
    figure.savefig(path2, dpi=90)

    if not runs.get("tanh"):
        return
    figure, axes = _figure()
    for act, color in (("relu", "C0"), ("tanh", "C1")):
        for when, style in (("init", INIT), ("trained", TRAINED)):
            for row, key in enumerate("DGR"):
                ks, ys = _gm_by_layer(runs[act], when, key)
                _series(axes[row][0], ks, ys, color=color, label=f"{act}, {when}", **style)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title("claim 3: scale detection, ReLU vs tanh", fontsize=9)
    _finish(axes, "layer k (0 = input)", note)
    figure.savefig(path3, dpi=90)


def plot_mnist(data: dict, path) -> None:
    """4x: the LeNets of N2 layer by layer, init and trained (geometric mean of seeds)."""
    runs = data["runs"]
    figure, axes = _figure()
    for when, style in (("init", INIT), ("trained", TRAINED)):
        for row, key in enumerate("DGR"):
            ks, ys = _gm_by_layer(runs, when, key)
            _series(axes[row][0], ks, ys, color="C0", label=f"LeNet, {when}", **style)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title("4x (exploratory): MNIST LeNet, max-entropy diffeomorphisms", fontsize=9)
    _finish(axes, "layer k (0 = input)", f"(full representation; {len(runs)} seeds)")
    figure.savefig(path, dpi=90)


def plot_bars(
    groups: dict[str, dict[str, float]],
    path,
    *,
    title: str,
    ylabel: str,
    lines: dict[str, tuple[list[float], str]] | None = None,
) -> None:
    """Grouped bars on a log axis: ``groups[series][category]``; ``lines`` maps a label to
    the ``(levels, linestyle)`` of the thresholds it draws."""
    figure, axes = _figure(1, 1, (6.5, 4.0))
    ax = axes[0][0]
    series = list(groups)
    categories = list(groups[series[0]])
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [groups[name].get(c, math.nan) for c in categories]
        x = np.arange(len(categories)) + (i - (len(series) - 1) / 2) * width
        ax.bar(
            x,
            values,
            width,
            label=name,
            hatch="//" if "init" in name else None,
            fill="init" not in name,
            edgecolor=f"C{i}",
            color=f"C{i}",
        )
    for j, (label, (levels, style)) in enumerate((lines or {}).items()):
        for i, level in enumerate(levels):
            ax.axhline(level, color=f"C{3 + j}", ls=style, label=label if i == 0 else None)
    ax.set_xticks(np.arange(len(categories)), categories)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=90)


def plot_layers(series: dict[str, list[dict]], path, *, key: str, title: str, ylabel: str) -> None:
    """One quantity by layer for several nets; names with ``init`` draw dashed."""
    figure, axes = _figure(1, 1, (6.5, 4.0))
    ax = axes[0][0]
    colors: dict[str, str] = {}
    for name, records in series.items():
        net = name.split(",")[0]
        color = colors.setdefault(net, f"C{len(colors)}")
        style = INIT if "init" in name else TRAINED
        _series(
            ax,
            [r["k"] for r in records],
            [r[key] for r in records],
            color=color,
            label=name,
            **style,
        )
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("ReLU layer k (0 = input)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=90)
