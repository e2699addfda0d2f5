"""Scale-detection data, its perturbations, and the one-hot inputs of the analytical model.

Labels are checked against plain loops over the definitions; perturbations for label
invariance, unit moves, matched norms and independence from batching.
"""

import itertools
import math

import pytest
import torch

from diffeo_engine.data.scale_detection import (
    OneHotShift,
    ScaleDetection,
    ScaleDetectionPerturbation,
    one_hot_signals,
    positions_to_images,
    scale_detection_labels,
)
from diffeo_engine.transforms import Perturbation


def _label_loop(pts, L, xi, task, gap, distance):
    """The definitions, one pair at a time."""
    if task == 2:
        return 1 if all(a // xi == b // xi for a, b in zip(*pts)) else -1
    offsets = [min(abs(a - b), L - abs(a - b)) for a, b in zip(*pts)]
    d = math.sqrt(sum(o * o for o in offsets)) if distance == "L2" else max(offsets)
    return 1 if d < xi - gap else (-1 if d >= xi + gap else 0)


@pytest.mark.parametrize(
    "task, xi, gap, distance", [(2, 4, 0, "Linf"), (1, 5, 0, "Linf"), (1, 6, 2, "L2")]
)
def test_labels_1d_every_pair(task, xi, gap, distance):
    L = 16
    pairs = torch.tensor(list(itertools.combinations(range(L), 2)))
    labels = scale_detection_labels(pairs, L, xi, task=task, gap=gap, distance=distance)
    for (a, b), label in zip(pairs.tolist(), labels.tolist()):
        assert label == _label_loop(([a], [b]), L, xi, task, gap, distance)


@pytest.mark.parametrize("task, xi, distance", [(2, 4, "Linf"), (1, 3.5, "L2"), (1, 3, "Linf")])
def test_labels_2d(task, xi, distance):
    L = 8
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, L, (500, 2, 2), generator=g)
    labels = scale_detection_labels(pos, L, xi, task=task, distance=distance)
    for p, label in zip(pos.tolist(), labels.tolist()):
        assert label == _label_loop(p, L, xi, task, 0, distance)


def test_dataset_1d_matches_definition_and_is_balanced():
    L, xi = 32, 8
    data = ScaleDetection(L, xi, task=2, seed=0)
    n_plus = (L // xi) * math.comb(xi, 2)  # every same-block pair
    assert len(data) == 2 * n_plus
    assert data.labels[0::2].eq(1).all() and data.labels[1::2].eq(-1).all()
    pairs = {tuple(p) for p in data.positions.tolist()}
    assert len(pairs) == len(data)  # distinct pairs
    for (a, b), label in zip(data.positions.tolist(), data.labels.tolist()):
        assert a < b and label == _label_loop(([a], [b]), L, xi, 2, 0, "Linf")
    x, y = data[3]
    assert x.shape == (1, L) and y == data.labels[3]
    assert torch.nonzero(x[0]).flatten().tolist() == data.positions[3].tolist()
    torch.testing.assert_close(x[x != 0], torch.full((2,), math.sqrt(L / 2)))
    X, _ = data.tensors()
    torch.testing.assert_close(X.pow(2).sum((1, 2)), torch.full((len(data),), float(L)))


def test_dataset_gap_excludes_distances_near_xi():
    L, xi, gap = 32, 8, 2
    data = ScaleDetection(L, xi, task=1, gap=gap, seed=1)
    d = (data.positions[:, 0] - data.positions[:, 1]).abs()
    d = torch.minimum(d, L - d)
    assert ((d < xi - gap) == (data.labels == 1)).all()
    assert ((d >= xi + gap) == (data.labels == -1)).all()


def test_dataset_deterministic_from_seed_and_split_disjoint():
    a = ScaleDetection(32, 8, task=1, n=100, seed=3)
    b = ScaleDetection(32, 8, task=1, n=100, seed=3)
    c = ScaleDetection(32, 8, task=1, n=100, seed=4)
    assert torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, c.positions)
    train, test = a.split(60)
    assert len(train) == 60 and len(test) == 40
    assert train.labels.sum() == 0 and test.labels.sum() == 0
    assert not {tuple(p) for p in train.positions.tolist()} & {
        tuple(p) for p in test.positions.tolist()
    }


def test_dataset_2d_enumerated_and_sampled():
    small = ScaleDetection(8, 4, task=2, dim=2, n=40, seed=0)
    assert small.positions.shape == (40, 2, 2)
    x, _ = small[0]
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x.pow(2).sum(), torch.tensor(64.0))  # value sqrt(L^2 / 2)
    big = ScaleDetection(40, 5, task=1, dim=2, n=20, distance="L2", seed=0)  # > enumerate limit
    labels = [_label_loop(p, 40, 5, 1, 0, "L2") for p in big.positions.tolist()]
    assert labels == big.labels.tolist()
    assert len({tuple(map(tuple, p)) for p in big.positions.tolist()}) == 20


def test_dataset_bad_arguments():
    with pytest.raises(ValueError, match="xi"):
        ScaleDetection(30, 8, task=2)
    with pytest.raises(ValueError, match="gap"):
        ScaleDetection(32, 8, task=2, gap=1)
    with pytest.raises(ValueError, match="gap"):
        ScaleDetection(32, 4, task=1, gap=4)
    with pytest.raises(ValueError, match="task"):
        ScaleDetection(32, 8, task=3)
    with pytest.raises(ValueError, match="distance"):
        ScaleDetection(32, 8, task=1, distance="L1")
    with pytest.raises(ValueError, match="n: expected an even"):
        ScaleDetection(32, 8, n=11)
    with pytest.raises(ValueError, match="n: the task has"):
        ScaleDetection(16, 4, n=1000)
    with pytest.raises(TypeError, match="L"):
        ScaleDetection(32.0, 8)


# ----------------------------------------------------------------------------- perturbation


def _moved_positions(images, tau):
    B = images.shape[0]
    old = torch.topk((images.reshape(B, -1) != 0).int(), 2).indices.sort(1).values
    new = torch.topk((tau.reshape(B, -1) != 0).int(), 2).indices.sort(1).values
    return old, new


@pytest.mark.parametrize("task, xi, gap", [(2, 4, 0), (2, 8, 0), (1, 5, 0), (1, 6, 2)])
def test_perturbation_1d_keeps_label_and_moves_by_one(task, xi, gap):
    L = 32
    data = ScaleDetection(L, xi, task=task, gap=gap, seed=0)
    X, y = data.tensors()
    pert = data.perturbation(seed=7)
    assert isinstance(pert, Perturbation)
    tau, noisy = pert(X, torch.arange(len(X)))
    assert tau.shape == X.shape
    old, new = _moved_positions(X, tau)
    new_labels = scale_detection_labels(new, L, xi, task=task, gap=gap)
    assert torch.equal(new_labels.float(), y)
    # each pixel moved by exactly one (periodically): match old and new as sets
    for o, n in zip(old.tolist(), new.tolist()):
        assert set(o) != set(n)
        assert any(
            all(min(abs(a - b), L - abs(a - b)) == 1 for a, b in zip(o, perm))
            for perm in itertools.permutations(n)
        )
    torch.testing.assert_close(tau.pow(2).sum((1, 2)), X.pow(2).sum((1, 2)))  # values kept
    # matched noise, per sample
    torch.testing.assert_close((noisy - X).norm(dim=(1, 2)), (tau - X).norm(dim=(1, 2)))


@pytest.mark.parametrize("task, xi, distance", [(2, 4, "Linf"), (1, 3, "L2"), (1, 4, "Linf")])
def test_perturbation_2d_keeps_label_and_moves_to_neighbours(task, xi, distance):
    L = 12
    data = ScaleDetection(L, xi, task=task, dim=2, n=200, distance=distance, seed=2)
    X, y = data.tensors()
    pert = data.perturbation(seed=1)
    new, moved = pert.move(data.positions, torch.arange(len(X)))
    assert moved.all()
    assert torch.equal(scale_detection_labels(new, L, xi, task=task, distance=distance).float(), y)
    step = (new - data.positions).abs()
    step = torch.minimum(step, L - step).sum(-1)  # periodic Manhattan length per pixel
    assert (step == 1).all()
    tau, noisy = pert(X)
    torch.testing.assert_close(tau, positions_to_images(new, L, dim=2))
    vnorm = torch.linalg.vector_norm
    torch.testing.assert_close(vnorm(noisy - X, dim=(1, 2, 3)), vnorm(tau - X, dim=(1, 2, 3)))


def test_perturbation_unmovable_sample_is_reported():
    pert = ScaleDetectionPerturbation(16, 2, task=2)  # xi = 2: block {0, 1} has no valid move
    new, moved = pert.move(torch.tensor([[0, 1], [0, 5]]))
    assert moved.tolist() == [False, True]
    assert new[0].tolist() == [0, 1]


def test_perturbation_independent_of_batching():
    data = ScaleDetection(32, 8, task=1, n=64, seed=0)
    X, _ = data.tensors()
    ids = torch.arange(1000, 1064)
    pert = data.perturbation(seed=11)
    tau, noisy = pert(X, ids)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(10):
        t, n = pert(X[chunk], ids[chunk])
        assert torch.equal(t, tau[chunk]) and torch.equal(n, noisy[chunk])
    other, _ = data.perturbation(seed=12)(X, ids)
    assert not torch.equal(other, tau)


def test_perturbation_noise_modes():
    data = ScaleDetection(32, 8, task=2, n=20, seed=0)
    X, _ = data.tensors()
    tau, noisy = data.perturbation(rectify=True)(X)
    eta = noisy - X
    assert (eta >= 0).all()
    torch.testing.assert_close(eta.norm(dim=(1, 2)), (tau - X).norm(dim=(1, 2)))
    _, fixed = data.perturbation(noise=0.5)(X)
    assert abs(float((fixed - X).std()) - 0.5) < 0.05


def test_perturbation_bad_input():
    pert = ScaleDetectionPerturbation(16, 4)
    with pytest.raises(ValueError, match="exactly 2 active"):
        pert(torch.zeros(2, 1, 16))
    with pytest.raises(ValueError, match="images: expected shape"):
        pert(torch.zeros(2, 16))
    with pytest.raises(TypeError, match="images"):
        pert(torch.zeros(2, 1, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids"):
        pert(positions_to_images(torch.tensor([[0, 1]]), 16), torch.arange(3))
    with pytest.raises(ValueError, match="noise"):
        ScaleDetectionPerturbation(16, 4, noise="white")


# ----------------------------------------------------------------------------- one-hot


def test_one_hot_shift():
    L = 16
    x, positions = one_hot_signals(L, 40)
    assert x.shape == (40, 1, L) and positions.tolist() == [i % L for i in range(40)]
    pert = OneHotShift(seed=3)
    tau, noisy = pert(x)
    new = tau[:, 0].argmax(1)
    step = (new - positions) % L
    assert set(step.tolist()) == {1, L - 1}  # both directions occur, by exactly one
    torch.testing.assert_close((noisy - x).norm(dim=(1, 2)), torch.full((40,), math.sqrt(2)))
    assert (noisy - x < 0).any()  # plain Gaussian: rectification is the network's ReLU
    t2, n2 = pert(x[7:19], torch.arange(7, 19))
    assert torch.equal(t2, tau[7:19]) and torch.equal(n2, noisy[7:19])
    walls = OneHotShift(seed=3, periodic=False).move(torch.tensor([0, L - 1]), L)
    assert walls.tolist() == [1, L - 2]
    with pytest.raises(ValueError, match="exactly 1 active"):
        pert(x + x.roll(1, -1))
