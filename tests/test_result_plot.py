"""SensitivityResult.plot as a reader sees it: the legend off the data, no duplicate output
point, readable labels with 66 layers, and error bars below zero shown, not dropped."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffeo_engine.sensitivity.result import LayerRecord, SensitivityResult

pytest.importorskip("matplotlib")

ZERO_CROSSING = {9, 30}  # layers whose D error bar reaches below zero


def record(name: str, depth: int, setting: str, T: float, scale: float) -> LayerRecord:
    v = math.exp(-depth / 20) * scale
    return LayerRecord(
        name=name, depth=depth, type="Conv2d", shape=[4, 8, 8], features=256, reduce="full",
        setting=setting, T=T, cut=3, D=v, G=1 / v, R=v * v,
        D_err=1.5 * v if depth in ZERO_CROSSING else 0.1 * v, G_err=0.1 / v, R_err=0.1 * v * v,
        denominator=1.0, denominator_err=0.0, D_numerator=v, D_numerator_err=0.0,
        G_numerator=1 / v, G_numerator_err=0.0, count=100, perturbations=100,
    )  # fmt: skip


def deep_result() -> SensitivityResult:
    """66 layers (the last is the network's output module) plus the ``output`` record."""
    layers = []
    for s, T in enumerate((0.001, 0.004)):
        setting = f"T={T}, cut=3"
        for k in range(1, 67):
            layers.append(record(f"layer{k // 4}.{k % 4}.conv", k, setting, T, 1 + s))
        last = layers[-1]
        output = LayerRecord(**{**last.__dict__, "name": "output", "depth": 67})
        layers.append(output)
    return SensitivityResult(layers, {"reduce": "full"})


def test_plot_reads_well_with_66_layers(tmp_path):
    path = tmp_path / "s.png"
    figure = deep_result().plot(path)
    figure.canvas.draw()
    axes = figure.axes
    labels = [t.get_text() for t in axes[-1].get_xticklabels()]
    shown = [t for t in labels if t]
    # output is merged into the layer it is, not a second point
    assert "layer16.2.conv = output" in shown and "output" not in shown
    assert len(labels) == 66 and len(shown) <= 41
    # every line holds one point per distinct layer: 66, not 67
    lines = [line for line in axes[0].get_lines() if len(line.get_xdata()) > 2]
    assert lines and all(len(line.get_xdata()) == 66 for line in lines)
    # the legend sits above the top panel, not on the data
    renderer = figure.canvas.get_renderer()
    legend = axes[0].get_legend().get_window_extent(renderer)
    assert legend.y0 >= axes[0].get_window_extent(renderer).y1 - 1
    texts = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert any("below 0" in t for t in texts)
    # each error bar that crosses zero ends in a marker on the panel's bottom edge
    bottom = axes[0].get_ylim()[0]
    markers = [
        line for line in axes[0].get_lines()
        if line.get_marker() == "v" and np.allclose(line.get_ydata(), bottom)
    ]  # fmt: skip
    assert sorted(float(m.get_xdata()[0]) for m in markers) == sorted(2 * list(ZERO_CROSSING))
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[1] > 1000 and pixels.std() > 10
