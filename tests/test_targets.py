"""diffeo_engine.targets: masks, keypoints, boxes and the inverse field, each against an
independent computation (the warp itself, float64 loops over points, a dense forward map)."""

import math
import warnings

import numpy as np
import pytest
import torch

import diffeo_engine as de
from diffeo_engine import targets

SIDE = 32


def _field(B, cut, fraction, generator, side=SIDE, seed=5):
    """A field of B images at ``fraction * T_max`` (per-image cuts allowed), and its ids."""
    cuts = torch.as_tensor(cut).expand(B) if not isinstance(cut, int) else torch.full((B,), cut)
    T = torch.tensor([fraction * de.temperature_range(side, int(c))[1] for c in cuts])
    ids = torch.randint(0, 2**40, (B,), generator=generator)
    return de.sample_displacement(B, cuts, T, side, seed=seed, ids=ids), T, cuts, ids


def _d(field: np.ndarray, x: float, y: float) -> np.ndarray:
    """The field (2, H, W) at a real point, bilinear between pixel centres, in plain float64."""
    _, H, W = field.shape
    x, y = min(max(x, 0.0), W - 1.0), min(max(y, 0.0), H - 1.0)
    x0, y0 = min(math.floor(x), W - 2), min(math.floor(y), H - 2)
    fx, fy = x - x0, y - y0
    return (
        (1 - fy) * (1 - fx) * field[:, y0, x0]
        + (1 - fy) * fx * field[:, y0, x0 + 1]
        + fy * (1 - fx) * field[:, y0 + 1, x0]
        + fy * fx * field[:, y0 + 1, x0 + 1]
    )


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sample_displacement_is_the_field_deform_applies(generator, backend):
    images = torch.rand(4, 2, SIDE, 24, generator=generator)
    cuts = torch.tensor([2, 5, 3, 8])
    T = torch.tensor([0.004, 0.001, 0.003, 0.0005])
    ids = torch.tensor([3, 91, 2**33, 7])
    field = de.sample_displacement(4, cuts, T, (SIDE, 24), seed=9, ids=ids)
    assert field.shape == (4, 2, SIDE, 24) and field.dtype == torch.float32
    assert field.abs().amax() > 1.0  # displacements of pixels: the check is not trivial
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*the fused CPU kernel needs numba", RuntimeWarning)
        tau = de.deform(images, T, cuts, seed=9, ids=ids, backend=backend)
    torch.testing.assert_close(de.warp(images, field), tau, rtol=0, atol=2e-5)


def test_warp_mask_equals_the_nearest_warp_of_the_same_field(generator):
    field, *_ = _field(3, 4, 0.5, generator)
    labels = torch.randint(0, 1000, (3, SIDE, SIDE), generator=generator)  # beyond uint8
    moved = de.warp_mask(labels, field)
    expected = de.warp(labels[:, None].float(), field, interp="nearest")[:, 0]  # exact < 2**24
    assert moved.dtype == torch.int64 and torch.equal(moved, expected.long())
    assert not torch.equal(moved, labels)  # the field moves the labels
    one_hot = torch.nn.functional.one_hot(labels % 5, 5).permute(0, 3, 1, 2).bool()
    moved_hot = de.warp_mask(one_hot, field)
    assert moved_hot.dtype == torch.bool and torch.equal(moved_hot.sum(1), torch.ones_like(labels))
    assert torch.equal(moved_hot.float().argmax(1), moved % 5)  # never blended


def test_keypoints_solve_the_forward_field(generator):
    field, *_ = _field(6, torch.tensor([3, 3, 5, 8, 15, 2]), 0.25, generator)
    points = torch.rand(6, 9, 2, generator=generator, dtype=torch.float64) * (SIDE - 1)
    points[:, 0] = torch.tensor([0.0, 17.0])  # on the border (the field vanishes there)
    with warnings.catch_warnings():
        warnings.simplefilter("error", targets.InversionWarning)
        moved = de.move_keypoints(points, field)
    assert moved.dtype == torch.float64 and moved.shape == points.shape
    f = field.double().numpy()
    residuals, shifts = [], []
    for b in range(6):
        for k in range(9):
            q = moved[b, k].numpy()
            residuals.append(np.abs(q - _d(f[b], *q) - points[b, k].numpy()).max())
            shifts.append(np.abs(q - points[b, k].numpy()).max())
    assert max(residuals) < 1e-3
    assert max(shifts) > 0.5  # the points moved by more than the tolerance
    torch.testing.assert_close(moved[:, 0], points[:, 0], rtol=0, atol=1e-9)


def test_a_keypoint_follows_the_bright_spot_it_marks(generator):
    """End to end: a Gaussian spot centred on p, deformed as an image, is centred near the
    moved keypoint (within 0.25 px; the spot moves by pixels)."""
    n, cut = 48, 3
    T = 0.25 * de.temperature_range(n, cut)[1]
    ids = torch.arange(4)
    centres = torch.tensor([[20.0, 24.0], [26.5, 19.0], [23.0, 28.0], [21.0, 21.5]])
    y, x = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij")
    spots = torch.exp(
        -((x - centres[:, 0, None, None]) ** 2 + (y - centres[:, 1, None, None]) ** 2) / 3.0
    )
    moved_spots = de.deform(spots[:, None].double(), T, cut, seed=1, ids=ids, backend="torch")[:, 0]
    mass = moved_spots.sum((1, 2))
    centroid = (
        torch.stack(((moved_spots * x).sum((1, 2)), (moved_spots * y).sum((1, 2))), 1)
        / mass[:, None]
    )
    field = de.sample_displacement(4, cut, T, n, seed=1, ids=ids)
    moved = de.move_keypoints(centres[:, None], field)[:, 0]
    assert (moved - centres).abs().max() > 1.0
    torch.testing.assert_close(centroid.float(), moved, rtol=0, atol=0.25)


def test_inverse_displacement_undoes_the_warp(generator):
    field, *_ = _field(2, 3, 0.25, generator)
    inverse = de.inverse_displacement(field)
    assert inverse.shape == field.shape and inverse.dtype == torch.float32
    f = field.double().numpy()
    for b in range(2):
        for y, x in [(0, 0), (5, 9), (16, 16), (30, 2), (31, 31)]:
            q = np.array([x, y]) + inverse[b, :, y, x].double().numpy()
            assert np.abs(q - _d(f[b], *q) - np.array([x, y])).max() < 1e-3
    yy, xx = torch.meshgrid(torch.arange(float(SIDE)), torch.arange(float(SIDE)), indexing="ij")
    smooth = torch.sin(xx / 6)[None, None] * torch.cos(yy / 7) + 0.2 * xx / SIDE
    smooth = smooth.expand(2, 1, SIDE, SIDE).double()
    there = de.warp(smooth, field.double())
    back = de.warp(there, -inverse.double())
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (there - smooth)[inner].abs().max() > 0.2  # the warp changes the image
    assert (back - smooth)[inner].abs().max() < 0.03  # bilinear interpolation twice


def _forward_map(field: np.ndarray, step=0.02):
    """Every point q of a dense grid over the canvas (pixel-edge frame) and its source
    ``q - d(q)``, by the forward field alone."""
    _, H, W = field.shape
    QX, QY = np.meshgrid(np.arange(0, W + 1e-9, step), np.arange(0, H + 1e-9, step))
    cx, cy = np.clip(QX - 0.5, 0, W - 1), np.clip(QY - 0.5, 0, H - 1)
    x0 = np.minimum(np.floor(cx).astype(int), W - 2)
    y0 = np.minimum(np.floor(cy).astype(int), H - 2)
    fx, fy = cx - x0, cy - y0
    d = (
        (1 - fy) * (1 - fx) * field[:, y0, x0]
        + (1 - fy) * fx * field[:, y0, x0 + 1]
        + fy * (1 - fx) * field[:, y0 + 1, x0]
        + fy * fx * field[:, y0 + 1, x0 + 1]
    )
    return QX, QY, QX - d[0], QY - d[1]


def _moved_region_box(forward, box_xyxy):
    """The bounding box of the grid points whose source lies in the box (clipped)."""
    QX, QY, sx, sy = forward
    x1, y1, x2, y2 = box_xyxy
    inside = (sx >= x1) & (sx <= x2) & (sy >= y1) & (sy <= y2)
    return np.array([QX[inside].min(), QY[inside].min(), QX[inside].max(), QY[inside].max()])


def test_boxes_are_the_box_of_the_moved_region(generator):
    field, *_ = _field(2, torch.tensor([3, 6]), 0.25, generator)
    boxes = torch.tensor(
        [[[4.0, 5.5, 20.0, 18.0], [0.0, 0.0, 32.0, 32.0], [10.2, 1.0, 11.7, 30.0]],
         [[12.0, 12.0, 26.0, 27.5], [1.0, 20.0, 31.0, 31.0], [15.0, 15.0, 16.0, 16.0]]]
    )  # fmt: skip
    moved = de.move_boxes(boxes, field)
    assert moved.dtype == torch.float32
    f = field.double().numpy()
    for b in range(2):
        forward = _forward_map(f[b])
        for k in range(3):
            expected = _moved_region_box(forward, boxes[b, k].tolist())
            np.testing.assert_allclose(moved[b, k].numpy(), expected, atol=0.05)
    assert torch.equal(moved[0, 1], boxes[0, 1])  # the whole canvas stays the whole canvas
    assert (moved - boxes).abs().max() > 0.5


def test_boxes_are_the_box_of_the_outline_moved_point_by_point(generator):
    optimize = pytest.importorskip("scipy.optimize", reason="scipy solves the points here")
    field, *_ = _field(1, 4, 0.25, generator)
    f = field[0].double().numpy()
    box = [6.0, 3.5, 21.0, 25.0]
    outline = []
    for t in np.linspace(0, 1, 301):
        x, y = box[0] + t * (box[2] - box[0]), box[1] + t * (box[3] - box[1])
        outline += [(x, box[1]), (x, box[3]), (box[0], y), (box[2], y)]
    moved = []
    for px, py in outline:  # pixel-edge frame: the field is read half a pixel back
        p = np.array([px, py])
        q = optimize.fsolve(lambda q, p=p: q - _d(f, *(q - 0.5)) - p, p, xtol=1e-12)
        moved.append(q)
    moved = np.array(moved)
    expected = np.concatenate([moved.min(0), moved.max(0)])
    got = de.move_boxes(torch.tensor([[box]]), field)[0, 0].double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_box_formats_agree(generator):
    field, *_ = _field(1, 3, 0.25, generator)
    xyxy = torch.tensor([[[3.0, 4.0, 19.0, 22.0], [8.0, 8.5, 9.0, 30.0]]], dtype=torch.float64)
    x1, y1, x2, y2 = xyxy.unbind(-1)
    xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), -1)
    cxcywh = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)
    want = de.move_boxes(xyxy, field)
    a, b, c, d = want.unbind(-1)
    torch.testing.assert_close(
        de.move_boxes(xywh, field, box_format="XYWH"), torch.stack((a, b, c - a, d - b), -1)
    )
    torch.testing.assert_close(
        de.move_boxes(cxcywh, field, box_format="cxcywh"),
        torch.stack(((a + c) / 2, (b + d) / 2, c - a, d - b), -1),
    )


def test_a_zero_field_leaves_every_target_alone(generator):
    zero = torch.zeros(2, 2, 12, 10)
    labels = torch.randint(0, 7, (2, 12, 10), generator=generator)
    points = torch.rand(2, 5, 2, generator=generator) * 9
    assert torch.equal(de.warp_mask(labels, zero), labels)
    assert torch.equal(de.move_keypoints(points, zero), points)
    boxes = torch.tensor([[[1.0, 2.0, 5.0, 9.0]], [[0.5, 0.25, 10.0, 12.0]]])
    assert torch.equal(de.move_boxes(boxes, zero), boxes)
    assert torch.equal(de.inverse_displacement(zero), zero)


def test_nan_keypoints_stay_missing_and_integer_points_come_back_as_float(generator):
    field, *_ = _field(1, 3, 0.25, generator)
    points = torch.tensor([[[3.0, 4.0], [float("nan"), 2.0]]])
    moved = de.move_keypoints(points, field)
    assert torch.isnan(moved[0, 1, 0]) and torch.isfinite(moved[0, 0]).all()
    ints = de.move_keypoints(torch.tensor([[[3, 4], [10, 12]]]), field)
    assert ints.dtype == torch.float32


def test_a_folding_field_warns_that_points_could_not_be_moved(generator):
    field, *_ = _field(8, 3, 20.0, generator)
    points = torch.rand(8, 64, 2, generator=generator) * (SIDE - 1)
    with pytest.warns(targets.InversionWarning, match="folds"):
        de.move_keypoints(points, field)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda f: de.move_boxes(torch.zeros(1, 3, 5), f),
            ValueError,
            r"boxes: expected shape \(1, N, 4\)",
        ),
        (lambda f: de.move_boxes(torch.zeros(3, 4), f), ValueError, "boxes: expected shape"),
        (
            lambda f: de.move_boxes(torch.zeros(1, 1, 4), f, box_format="xyxyr"),
            ValueError,
            "box_format",
        ),
        (lambda f: de.move_boxes(torch.zeros(1, 1, 4), f, box_format=3), TypeError, "box_format"),
        (lambda f: de.move_boxes(torch.tensor([[[5.0, 1, 2, 3]]]), f), ValueError, "x1 <= x2"),
        (
            lambda f: de.move_boxes(torch.tensor([[[1.0, 1, float("nan"), 3]]]), f),
            ValueError,
            "finite",
        ),
        (lambda f: de.move_boxes(torch.zeros(1, 1, 4), f, spacing=0), ValueError, "spacing"),
        (lambda f: de.move_boxes([[0, 0, 1, 1]], f), TypeError, "boxes: expected a torch.Tensor"),
        (
            lambda f: de.move_keypoints(torch.zeros(1, 3, 3), f),
            ValueError,
            r"keypoints: expected shape \(1, ..., 2\)",
        ),
        (lambda f: de.move_keypoints(torch.zeros(2, 3, 2), f), ValueError, "keypoints"),
        (
            lambda f: de.move_keypoints(torch.zeros(1, 2, dtype=torch.bool), f),
            TypeError,
            "keypoints",
        ),
        (lambda f: de.warp_mask(torch.zeros(1, 9, 9), f), ValueError, "masks: expected shape"),
        (lambda f: de.warp_mask(torch.zeros(2, 12, 10), f), ValueError, "masks"),
        (lambda f: de.move_keypoints(torch.zeros(1, 1, 2), f[:, :1]), ValueError, "displacement"),
        (lambda f: de.inverse_displacement(f.long()), TypeError, "displacement"),
        (lambda f: de.inverse_displacement(f * float("nan")), ValueError, "displacement"),
        (lambda f: de.sample_displacement(1, 3, 0.1, (1, 5), seed=0), ValueError, "size"),
    ],
)
def test_bad_targets_are_refused_naming_the_argument(call, error, match):
    field = torch.zeros(1, 2, 12, 10)
    with pytest.raises(error, match=match):
        call(field)
