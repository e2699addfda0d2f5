"""What the meter returns: per-layer records, JSON/CSV writers and readers, and a plot.

``SensitivityResult.to_json`` writes ``{"settings": {...}, "layers": [records]}``
(design.md section 5); non-finite numbers are written as ``null`` (strict JSON) and read
back as ``nan``. The CSV has one row per layer and ``(T, cut)`` setting, with the seed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

__all__ = ["LayerRecord", "SensitivityResult", "finite_or_none"]

QUANTITIES = ("D", "G", "R", "denominator", "D_numerator", "G_numerator")


@dataclass
class LayerRecord:
    """One layer under one ``(T, cut)`` setting. Item access works too: ``record["D"]``.

    ``shape`` is one image's activation shape before the reduction, ``features`` the size
    measured after it; ``count`` is the number of images ``N``, ``perturbations`` the number
    of perturbed samples (``N`` times the perturbations per image).
    """

    name: str
    depth: int
    type: str
    shape: list[int]
    features: int
    reduce: str
    setting: str
    T: float | None
    cut: int | None
    D: float
    G: float
    R: float
    D_err: float
    G_err: float
    R_err: float
    denominator: float
    denominator_err: float
    D_numerator: float
    D_numerator_err: float
    G_numerator: float
    G_numerator_err: float
    count: int
    perturbations: int
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerRecord:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in names:
            if key in known and known[key] is None and key not in ("T", "cut"):
                known[key] = math.nan
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


CSV_COLUMNS = [f.name for f in fields(LayerRecord) if f.name != "extra"] + ["seed"]


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class SensitivityResult:
    """Records in forward order (then setting order) with the run's settings."""

    def __init__(self, layers: list[LayerRecord], settings: dict) -> None:
        self.layers = list(layers)
        self.settings = dict(settings)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerRecord:
        """The record of layer ``name`` (the only setting, or the first one)."""
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(f"no layer named {name!r}; layers: {self.names()}")

    def names(self) -> list[str]:
        return list(dict.fromkeys(r.name for r in self.layers))

    def select(self, T=None, cut=None, setting: str | None = None) -> list[LayerRecord]:
        """The records of one setting, in forward order."""
        return [
            r
            for r in self.layers
            if (T is None or r.T == T)
            and (cut is None or r.cut == cut)
            and (setting is None or r.setting == setting)
        ]

    # ------------------------------------------------------------------------- files

    def to_dict(self) -> dict:
        return {"settings": self.settings, "layers": [r.to_dict() for r in self.layers]}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(finite_or_none(self.to_dict()), handle, indent=2, allow_nan=False)
            handle.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SensitivityResult:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or "layers" not in data or "settings" not in data:
            raise ValueError(f"{path}: expected a JSON object with 'settings' and 'layers'")
        return cls([LayerRecord.from_dict(r) for r in data["layers"]], data["settings"])

    def to_csv(self, path: str | os.PathLike) -> None:
        seed = self.settings.get("seed")
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in self.layers:
                row = record.to_dict()
                row["shape"] = "x".join(str(n) for n in record.shape)
                row["seed"] = seed
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> SensitivityResult:
        """Records from :meth:`to_csv`; the settings hold only the seed."""
        records, seed = [], None
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                seed = int(row.pop("seed")) if row.get("seed") else None
                records.append(LayerRecord.from_dict(_parse_row(row)))
        return cls(records, {"seed": seed})

    # -------------------------------------------------------------------------- show

    def table(self) -> str:
        """A plain-text table: one line per layer and setting."""
        head = f"{'depth':>5}  {'layer':<28} {'setting':<22} {'D':>10} {'G':>10} {'R':>10}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(
                f"{r.depth:>5}  {r.name[:28]:<28} {r.setting[:22]:<22} "
                f"{r.D:>10.4g} {r.G:>10.4g} {r.R:>10.4g}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SensitivityResult({len(self.names())} layers, {len(self.layers)} records)"

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None):
        """``D_k``, ``G_k``, ``R_k`` against depth, log scale, one line per setting, with
        jackknife error bars. Needs matplotlib (optional dependency); returns the Figure
        and writes it to ``path`` when given.

        The legend sits above the panels, never on the data; the ``output`` record is
        merged into the last layer when it is that layer (same values: one point labelled
        ``name = output``); with many layers the labels are thinned to about 40; an error
        bar that reaches below zero is drawn dashed down to the panel's bottom edge with a
        ``v`` marker there, instead of being clipped by the log axis.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.lines import Line2D
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SensitivityResult.plot needs matplotlib: pip install 'diffeo-engine[plot]'"
            ) from error
        keys = ("D", "G", "R")
        records_by_setting, names = {}, {}
        for label in dict.fromkeys(r.setting for r in self.layers):
            records = _merge_output(sorted(self.select(setting=label), key=lambda r: r.depth))
            records_by_setting[label] = records
            for record, name in records:
                names.setdefault(record.depth, name)
        n_ticks = len(names)
        width = min(18.0, max(7.5, 0.16 * n_ticks + 3.0))
        figure = Figure(figsize=(width, 8.5), constrained_layout=True)
        FigureCanvasAgg(figure)
        axes = figure.subplots(3, 1, sharex=True)
        below_zero = []  # (ax, depth, value, colour)
        handles = []
        for index, (label, records) in enumerate(records_by_setting.items()):
            colour = f"C{index % 10}"
            depth = [r.depth for r, _ in records]
            for ax, key in zip(axes, keys):
                values = [r[key] for r, _ in records]
                errors = [r[f"{key}_err"] for r, _ in records]
                errors = [e if math.isfinite(e) else 0.0 for e in errors]
                lower = []
                for d, v, e in zip(depth, values, errors):
                    if math.isfinite(v) and v > 0 and e >= v:
                        below_zero.append((ax, d, v, colour))
                        lower.append(0.0)  # drawn below, dashed to the edge
                    else:
                        lower.append(e)
                ax.errorbar(
                    depth, values, yerr=[lower, errors], marker="o", ms=3, capsize=2,
                    color=colour, lw=1.2,
                )  # fmt: skip
            handles.append(Line2D([], [], color=colour, marker="o", ms=3, label=label))
        for ax, key in zip(axes, keys):
            ax.set_yscale("log")
            ax.set_ylabel(f"${key}_k$")
            ax.grid(True, which="both", alpha=0.3)
        for ax in {id(a): a for a, *_ in below_zero}.values():
            ax.set_ylim(*ax.get_ylim())  # freeze: the bars below must not rescale the panel
        for ax, d, v, colour in below_zero:
            bottom = ax.get_ylim()[0]
            ax.vlines(d, bottom, v, colors=colour, linestyles="dashed", lw=1)
            ax.plot([d], [bottom], marker="v", color=colour, ms=6, clip_on=False)
        if below_zero:
            handles.append(
                Line2D([], [], color="0.3", ls="dashed", marker="v", ms=5,
                       label="error bar reaches below 0 (cut at the panel edge)")
            )  # fmt: skip
        if names:
            ticks = sorted(names)
            step = max(1, math.ceil(len(ticks) / 40))
            shown = set(ticks[::step]) | {ticks[-1]}
            axes[-1].set_xticks(ticks)
            axes[-1].set_xticklabels(
                [names[t] if t in shown else "" for t in ticks],
                rotation=90, fontsize=6 if len(ticks) > 20 else 8,
            )  # fmt: skip
        axes[-1].set_xlabel("layer (depth k)")
        reduce = self.settings.get("reduce")
        figure.suptitle(title or f"sensitivities by depth (reduce={reduce})")
        if handles:  # above the top panel, outside the data
            axes[0].legend(
                handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.01), fontsize=8,
                frameon=False, ncol=min(len(handles), 3),
            )  # fmt: skip
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


def _merge_output(records: list[LayerRecord]) -> list[tuple[LayerRecord, str]]:
    """``(record, label)`` in depth order; an ``output`` record equal to the layer before it
    (the last hooked module is the network's output) becomes that layer's ``name = output``."""
    out: list[tuple[LayerRecord, str]] = []
    for record in records:
        if (
            record.name == "output"
            and out
            and all(out[-1][0][k] == record[k] for k in ("D", "G", "R", "shape"))
        ):
            previous = out[-1][0]
            out[-1] = (previous, f"{previous.name} = output")
            continue
        out.append((record, record.name))
    return out


def _parse_row(row: dict) -> dict:
    out: dict = {}
    for key, value in row.items():
        if key == "shape":
            out[key] = [int(n) for n in value.split("x")] if value else []
        elif key in ("name", "type", "reduce", "setting"):
            out[key] = value
        elif key in ("depth", "features", "count", "perturbations", "cut"):
            out[key] = int(value) if value != "" else None
        elif key == "T":
            out[key] = float(value) if value != "" else None
        else:
            out[key] = float(value) if value != "" else math.nan
    return out
