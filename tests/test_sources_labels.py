"""Labels of image sources (``open_source(spec, labels=...)``, ``source.labels``) and the
one safe-open helper every reader uses."""

from __future__ import annotations

import gzip
import os
import struct
import threading

import numpy as np
import pytest

from diffeo_engine.data.sources import LabelSet, open_source, read_labels
from diffeo_engine.data.sources.safe import check_input_path, open_regular, read_regular

Image = pytest.importorskip("PIL.Image")


def _idx(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    )


@pytest.fixture
def rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def test_idx_labels_beside_are_found_lazily(tmp_path, rng):
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "train-labels.idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    source = open_source(tmp_path / "train-images.idx3-ubyte")
    assert np.array_equal(source.labels.values, labels) and source.labels.kind == "idx"
    assert source.describe()["labels"]["count"] == 7
    # a broken labels file beside the images: opening and reading images still work (the
    # readers that never ask for labels are not affected); asking for them is refused
    (tmp_path / "train-labels.idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:5])))
    source = open_source(tmp_path / "train-images.idx3-ubyte")
    assert source.batch(0, 7).shape == (7, 1, 5, 4)
    with pytest.raises(ValueError, match=r"labels: .*holds 5 labels, but .* holds 7 images"):
        source.labels  # noqa: B018
    assert open_source(tmp_path / "train-images.idx3-ubyte", labels=False).labels is None
    with pytest.raises(TypeError, match="labels: expected None"):
        open_source(tmp_path / "train-images.idx3-ubyte", labels=True)


def test_folder_labels_only_when_every_image_is_in_a_class_folder(tmp_path, rng):
    for name in ("b", "a", "c"):
        (tmp_path / name).mkdir()
        for j in range(2):
            image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / name / f"{j}.png")
    source = open_source(tmp_path)
    assert source.labels.classes == ["a", "b", "c"]
    assert source.labels.values.tolist() == [0, 0, 1, 1, 2, 2]
    Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert open_source(tmp_path).labels is None  # an image outside every class folder


def test_cifar10_batches_carry_their_labels(tmp_path, rng):
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 3).astype(np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(3, -1)], axis=1)
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes())
    for spec in (tmp_path / "test_batch.bin", f"cifar10:{tmp_path}", f"cifar10:{tmp_path}:test"):
        source = open_source(spec)
        assert np.array_equal(source.batch(0, 3).numpy(), images)
        assert np.array_equal(source.labels.values, labels)
        assert source.labels.classes[int(labels[0])] in source.labels.classes
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes()[:-5])
    with pytest.raises(ValueError, match="not a whole number of CIFAR-10 records"):
        open_source(tmp_path / "test_batch.bin")
    with pytest.raises(FileNotFoundError, match="train"):
        open_source(f"cifar10:{tmp_path}:train")


@pytest.mark.parametrize(
    ("array", "error", "words"),
    [
        (np.zeros((3, 2), dtype=np.int64) + 1, ValueError, "1-d array"),
        (np.array([1.0, 2.0, 3.0]), TypeError, "integer labels"),
        (np.array([True, False, True]), TypeError, "integer labels"),
        (np.array([1, -2, 3]), ValueError, r"\[0, 2\*\*63\)"),
        (np.array([1, 2**63 + 5, 3], dtype=np.uint64), ValueError, r"\[0, 2\*\*63\)"),
    ],
)
def test_bad_labels_are_refused(tmp_path, array, error, words):
    np.save(tmp_path / "y.npy", array)
    with pytest.raises(error, match=words):
        read_labels(tmp_path / "y.npy")


def test_npz_keys_and_label_files(tmp_path, rng):
    images = rng.integers(0, 256, (4, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 99, 4)
    np.savez(tmp_path / "d.npz", x=images, y=labels, z=labels[:3])
    source = open_source(f"{tmp_path / 'd.npz'}:x", labels="y")
    assert np.array_equal(source.labels.values, labels) and source.labels.spec.endswith("d.npz:y")
    with pytest.raises(ValueError, match="holds 3 labels"):
        open_source(f"{tmp_path / 'd.npz'}:x", labels="z")
    assert np.array_equal(read_labels(f"{tmp_path / 'd.npz'}:y").values, labels)
    with pytest.raises(ValueError, match=r"holds arrays \['x', 'y', 'z'\]"):
        read_labels(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="labels: no such file"):
        read_labels(tmp_path / "none.npy")
    described = LabelSet(labels, "npy", "f.npy").describe()
    assert (
        described["fingerprint"] != LabelSet(labels + 1, "npy", "f.npy").describe()["fingerprint"]
    )


def test_safe_open_refuses_special_files_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real").write_bytes(b"data")
    done = []

    def attempt():
        for call in (
            lambda: open_regular(tmp_path / "fifo", "x"),
            lambda: read_regular("/dev/zero", "x", follow=True),
            lambda: check_input_path(tmp_path / "fifo", "input"),
        ):
            with pytest.raises(ValueError, match="refused without reading it"):
                call()
        with pytest.raises(ValueError, match="a symbolic link to .*real"):
            open_regular(tmp_path / "link", "x")
        done.append(read_regular(tmp_path / "link", "x", follow=True))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(20)
    assert done == [b"data"]
