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
        and writes it to ``path`` when given."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SensitivityResult.plot needs matplotlib: pip install 'diffeo-engine[plot]'"
            ) from error
        figure = Figure(figsize=(7.5, 8.0), constrained_layout=True)
        FigureCanvasAgg(figure)
        axes = figure.subplots(3, 1, sharex=True)
        labels = list(dict.fromkeys(r.setting for r in self.layers))
        for label in labels:
            records = sorted(self.select(setting=label), key=lambda r: r.depth)
            depth = [r.depth for r in records]
            for ax, key in zip(axes, ("D", "G", "R")):
                values = [r[key] for r in records]
                errors = [r[f"{key}_err"] for r in records]
                errors = [e if math.isfinite(e) else 0.0 for e in errors]
                ax.errorbar(depth, values, yerr=errors, marker="o", ms=3, capsize=2, label=label)
        for ax, key in zip(axes, ("D", "G", "R")):
            ax.set_yscale("log")
            ax.set_ylabel(f"${key}_k$")
            ax.grid(True, which="both", alpha=0.3)
        if self.layers:
            by_depth = {r.depth: r.name for r in self.layers}
            ticks = sorted(by_depth)
            axes[-1].set_xticks(ticks)
            axes[-1].set_xticklabels(
                [by_depth[t] for t in ticks], rotation=90, fontsize=6 if len(ticks) > 20 else 8
            )
        axes[-1].set_xlabel("layer (depth k)")
        axes[0].legend(fontsize=8)
        reduce = self.settings.get("reduce")
        axes[0].set_title(title or f"sensitivities by depth (reduce={reduce})")
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


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
