"""Pictures of the perturbation: what ``demo --out`` and ``show`` draw (needs matplotlib).

Two panels for one image. Top: the image deformed at ``T_min``, ``sqrt(T_min T_max)`` and
``T_max`` of :func:`~diffeo_engine.physics.temperature_range`, its matched-noise copy
``x + eta`` (``||eta|| = ||tau x - x||``) and the displacement field (colour: length in
pixels, arrows: the motion). Bottom: the phase picture of Petrini et al. (NeurIPS 2021,
Fig. 2): the same image deformed across ``T`` (columns, log-spaced) and ``cut`` (rows),
with the lines ``T = T_min(cut)`` (half-pixel motion) and ``T = T_max(cut)`` (folds begin).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from diffeo_engine import ops
from diffeo_engine.physics import (
    FoldingWarning,
    check_cut,
    check_images,
    check_int,
    check_memory,
    max_cut,
    temperature_range,
)
from diffeo_engine.reference import displacement_field, sample_coefficients

__all__ = ["figure_bytes", "load_image", "perturbation_figure", "save_perturbation_figure"]

PHASE_CUTS = (2, 3, 4, 6, 8, 12, 16)
PHASE_COLUMNS = 8


def figure_bytes(C: int, H: int, W: int) -> int:
    """About the bytes :func:`perturbation_figure` of one ``C x H x W`` image takes: the
    perturbed copies (3, then 8 per row of the phase picture), the float64 fields and what
    matplotlib keeps of every panel (float64 RGB)."""
    panels = 3 * 3 + PHASE_COLUMNS * len(PHASE_CUTS)
    return H * W * (panels * (2 * 4 * C + 3 * 8) + 3 * 2 * 8 * 3)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("pictures need matplotlib: pip install 'diffeo-engine[plot]'") from error
    return Figure, FigureCanvasAgg


def _display(image: torch.Tensor, low: float, high: float) -> np.ndarray:
    """``(C, H, W)`` -> what ``imshow`` takes: ``(H, W)`` grey or ``(H, W, 3)`` colour."""
    values = image.detach().to("cpu", torch.float64)
    values = ((values - low) / (high - low if high > low else 1.0)).clamp(0, 1)
    if values.shape[0] == 1:
        return values[0].numpy()
    return values[:3].permute(1, 2, 0).numpy()


def _show(ax, image, low, high, title=None) -> None:
    data = _display(image, low, high)
    ax.imshow(data, cmap="gray" if data.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _side(H: int, W: int) -> float:
    return math.sqrt(H * W)


def _temperatures(side: float, cut: int) -> list[tuple[str, float]]:
    T_min, T_max = temperature_range(side, cut)
    return [("T_min", T_min), ("sqrt(T_min T_max)", math.sqrt(T_min * T_max)), ("T_max", T_max)]


def _field_panel(figure, ax, field: torch.Tensor) -> None:
    """Colour: the displacement's length in pixels; arrows: true length, about 12 per side."""
    dx, dy = field[0].double().numpy(), field[1].double().numpy()
    H, W = dx.shape
    length = np.hypot(dx, dy)
    shown = ax.imshow(length, cmap="viridis")
    colourbar = figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    colourbar.set_label("|displacement| (px)", fontsize=7)
    colourbar.ax.tick_params(labelsize=6)
    step = max(1, round(max(H, W) / 12))
    ys, xs = np.mgrid[0:H:step, 0:W:step]
    ax.quiver(
        xs, ys, dx[::step, ::step], dy[::step, ::step],
        angles="xy", scale_units="xy", scale=1, color="white", width=0.006,
    )  # fmt: skip
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _phase_panel(ax, image, low, high, *, seed: int, image_id: int, backend: str) -> None:
    """The same image across ``T`` (columns) and ``cut`` (rows), T_min/T_max drawn on it."""
    C, H, W = image.shape
    side = _side(H, W)
    cuts = [c for c in PHASE_CUTS if c <= max_cut(H, W)] or [2]
    ranges = {c: temperature_range(side, c, strict=False) for c in cuts}  # crossed: drawn
    lo = min(r[0] for r in ranges.values()) / 4
    hi = max(r[1] for r in ranges.values()) * 4
    temps = np.geomspace(lo, hi, PHASE_COLUMNS)
    ids = torch.full((PHASE_COLUMNS,), image_id, dtype=torch.int64, device=image.device)
    batch = image.unsqueeze(0).expand(PHASE_COLUMNS, C, H, W).contiguous()
    T = torch.tensor(temps, dtype=torch.float32, device=image.device)
    for row, cut in enumerate(cuts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FoldingWarning)  # beyond T_max on purpose
            tau = ops.deform(batch, T, cut, seed=seed, ids=ids, backend=backend)
        for col in range(PHASE_COLUMNS):
            data = _display(tau[col], low, high)
            ax.imshow(
                data, cmap="gray" if data.ndim == 2 else None, vmin=0, vmax=1,
                extent=(col - 0.45, col + 0.45, row + 0.45, row - 0.45),
            )  # fmt: skip

    def column_of(value: float) -> float:  # log T -> column coordinate
        return (
            (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo)) * (PHASE_COLUMNS - 1)
        )

    rows = np.arange(len(cuts))
    ax.plot([column_of(ranges[c][0]) for c in cuts], rows, "-o", color="tab:blue", lw=2, ms=3,
            label="T_min(cut): half-pixel motion")  # fmt: skip
    ax.plot([column_of(ranges[c][1]) for c in cuts], rows, "-o", color="tab:red", lw=2, ms=3,
            label="T_max(cut): the image folds")  # fmt: skip
    ax.set_xlim(-0.6, PHASE_COLUMNS - 0.4)
    ax.set_ylim(len(cuts) - 0.4, -0.6)
    ax.set_xticks(range(PHASE_COLUMNS))
    ax.set_xticklabels([f"{t:.1e}" for t in temps], fontsize=7)
    ax.set_yticks(rows)
    ax.set_yticklabels([str(c) for c in cuts], fontsize=8)
    ax.set_xlabel("temperature T (log-spaced)")
    ax.set_ylabel("cut")
    ax.set_aspect("equal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title("phase picture: the same image across T and cut", fontsize=10)


def perturbation_figure(
    image: torch.Tensor,
    *,
    cut: int = 3,
    seed: int = 0,
    image_id: int = 0,
    backend: str = "auto",
    title: str | None = None,
):
    """The two panels above for one image ``(C, H, W)`` (uint8 or float); a Figure."""
    Figure, FigureCanvasAgg = _matplotlib()
    if not torch.is_tensor(image) or image.dim() != 3:
        raise ValueError(
            f"image: expected one image (C, H, W), got {getattr(image, 'shape', image)}"
        )
    check_images(image.unsqueeze(0), "image")
    cut = check_cut(cut, minimum=2)
    C, H, W = image.shape
    check_memory("image", figure_bytes(C, H, W), image.device, what=f"drawing a {C}x{H}x{W} image")
    if image.dtype == torch.uint8:
        low, high = 0.0, 255.0
    else:
        low, high = float(image.min()), float(image.max())
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
    temps = _temperatures(_side(H, W), cut)
    batch = image.unsqueeze(0).expand(len(temps), C, H, W).contiguous()
    T = torch.tensor([t for _, t in temps], dtype=torch.float32, device=image.device)
    ids = torch.full((len(temps),), image_id, dtype=torch.int64, device=image.device)
    out_dtype = torch.float32 if image.dtype == torch.uint8 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldingWarning)  # T_max itself is shown on purpose
        tau, noisy = ops.perturb(
            batch, T, cut, seed=seed, ids=ids, out_dtype=out_dtype, backend=backend
        )
    coeffs = sample_coefficients(len(temps), cut, T.cpu(), seed=seed, ids=ids.cpu())
    fields = displacement_field(coeffs.double(), H, W)

    figure = Figure(figsize=(11.0, 12.5), constrained_layout=True)
    FigureCanvasAgg(figure)
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.45, 1.0])
    axes = top.subplots(3, 4)
    _show(axes[0, 0], image, low, high, "x (the image)")
    info = (
        f"{C}x{H}x{W}, cut = {cut}, seed = {seed}, id = {image_id}\n"
        f"T_min = {temps[0][1]:.3g}\nT_max = {temps[2][1]:.3g}\n\n"
        "columns: tau x, x + eta with\n||eta|| = ||tau x - x||,\n"
        "and the displacement field"
    )
    axes[1, 0].text(0.0, 0.95, info, va="top", fontsize=9, family="monospace")
    axes[2, 0].text(0.0, 0.95, "arrows: true length\n(pixels), the content\nmoves along them",
                    va="top", fontsize=8)  # fmt: skip
    for ax in (axes[1, 0], axes[2, 0]):
        ax.axis("off")
    for row, (label, value) in enumerate(temps):
        shift = float(fields[row].norm(dim=0).pow(2).mean().sqrt())
        _show(axes[row, 1], tau[row], low, high, f"tau x at {label}\nT = {value:.3g}")
        _show(axes[row, 2], noisy[row], low, high, "x + eta (matched)")
        _field_panel(top, axes[row, 3], fields[row])
        axes[row, 3].set_title(f"field, rms {shift:.2f} px", fontsize=9)
    top.suptitle(title or "max-entropy diffeomorphism and matched noise", fontsize=12)
    _phase_panel(bottom.subplots(1, 1), image, low, high, seed=seed, image_id=image_id,
                 backend=backend)  # fmt: skip
    return figure


def save_perturbation_figure(path: str | os.PathLike, image: torch.Tensor, **kwargs) -> str:
    """Draw :func:`perturbation_figure` and write it to ``path`` (format from the suffix)."""
    figure = perturbation_figure(image, **kwargs)
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)


def load_image(spec: str, *, index: int = 0, resize=None) -> torch.Tensor:
    """One image ``(C, H, W)`` from a PNG/JPEG file, or item ``index`` of any data source
    that :func:`diffeo_engine.data.sources.open_source` reads (folder, ``.npy``, IDX, ...)."""
    from diffeo_engine.data.sources import IMAGE_SUFFIXES, open_source, parse_resize

    path = os.fspath(spec)
    index = check_int("index", index, 0)
    size = parse_resize(resize)
    if size is not None:  # up to 4 channels, float32, and the interpolation's temporaries
        nbytes = 4 * 4 * 4 * size[0] * size[1]
        check_memory("resize", nbytes, "cpu", what=f"an image resized to {size[0]}x{size[1]}")
    if os.path.isfile(path) and path.lower().endswith(IMAGE_SUFFIXES):
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError("reading an image file needs Pillow: pip install pillow") from error
        if index != 0:
            raise ValueError(f"index: a single image file has only index 0, got {index}")
        try:
            with Image.open(path) as handle:
                picture = handle.convert("L" if handle.mode in ("L", "I", "I;16", "1") else "RGB")
        except OSError as error:
            raise ValueError(f"input: {path} is not a readable image ({error})") from None
        array = np.asarray(picture)
        image = torch.from_numpy(array.copy())
        image = image[None] if image.dim() == 2 else image.permute(2, 0, 1)
        if size is not None:
            scaled = torch.nn.functional.interpolate(
                image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )
            image = scaled[0].add(0.5).floor().clamp(0, 255).to(torch.uint8)
        return image.contiguous()
    source = open_source(spec, resize=resize)
    if index >= len(source):
        raise ValueError(f"index: expected an integer in [0, {len(source)}), got {index}")
    return source.batch(index, index + 1)[0]
