"""Image sources: arrays, npz, image folders, IDX/MNIST, torchvision, fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffeo_engine.data import sources
from diffeo_engine.data.sources import load_mnist, open_source, parse_resize, read_idx

Image = pytest.importorskip("PIL.Image")

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # beside the checkout
# Published MNIST test-set label counts (digits 0..9).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------ arrays


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [
        ((5, 6, 7), lambda a: a[:, None]),
        ((5, 3, 6, 7), lambda a: a),
        ((5, 6, 7, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 6, 7, 4), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 1, 6, 7), lambda a: a),
    ],
)
def test_npy_layouts_are_memory_mapped(tmp_path, rng, shape, to_nchw):
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    src = open_source(tmp_path / "a.npy")
    assert isinstance(src._array, np.memmap)
    expected = to_nchw(array)
    assert len(src) == 5 and src.shape == expected.shape[1:] and src.dtype == torch.uint8
    got = src.batch(1, 4)
    assert got.dtype == torch.uint8 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected[1:4])
    assert src.batch(2, 2).shape == (0, *expected.shape[1:])


@pytest.mark.parametrize("dtype", [">f4", "<f8", "<f2"])
def test_npy_float_dtypes_and_byte_order(tmp_path, rng, dtype):
    array = rng.random((4, 2, 5, 3)).astype(dtype)  # (N, H, W, C): axis 1 is 2, last is 3
    np.save(tmp_path / "a.npy", array)
    src = open_source(str(tmp_path / "a.npy"))
    assert src.dtype == {"f4": torch.float32, "f8": torch.float64, "f2": torch.float16}[dtype[1:]]
    np.testing.assert_array_equal(src.batch(0, 4).numpy(), array.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("array", "error", "words"),
    [
        (np.zeros((3, 5, 5, 5), np.uint8), ValueError, "C in {1, 3, 4}"),
        (np.zeros((3, 5), np.uint8), ValueError, "(N, H, W)"),
        (np.zeros((3, 5, 5), np.int16), TypeError, "int16"),
        (np.zeros((3, 5, 5), bool), TypeError, "bool"),
    ],
)
def test_npy_bad_arrays(tmp_path, array, error, words):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(error, match="input") as info:
        open_source(tmp_path / "a.npy")
    assert words in str(info.value)


def test_npz_stored_compressed_and_keys(tmp_path, rng):
    a = rng.integers(0, 256, (9, 6, 6), dtype=np.uint8)
    b = rng.random((9, 3, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "one.npz", images=a)
    np.savez_compressed(tmp_path / "packed.npz", images=a)
    np.savez(tmp_path / "two.npz", x=a, y=b)

    stored = open_source(tmp_path / "one.npz")
    assert isinstance(stored._array, np.memmap)  # mapped in place, not loaded
    packed = open_source(tmp_path / "packed.npz")
    for src in (stored, packed):
        assert src.shape == (1, 6, 6) and len(src) == 9
        # forwards, then backwards (the compressed stream rewinds)
        np.testing.assert_array_equal(src.batch(5, 9).numpy(), a[5:9, None])
        np.testing.assert_array_equal(src.batch(0, 3).numpy(), a[0:3, None])

    with pytest.raises(ValueError, match=r"holds 2 arrays.*'x', 'y'.*:KEY"):
        open_source(tmp_path / "two.npz")
    src = open_source(f"{tmp_path / 'two.npz'}:y")
    np.testing.assert_array_equal(src.batch(0, 9).numpy(), b)
    with pytest.raises(ValueError, match="no array 'z'"):
        open_source(f"{tmp_path / 'two.npz'}:z")


def test_npz_fingerprint_sees_compressed_content(tmp_path, rng):
    a = rng.integers(0, 256, (9, 6, 6), dtype=np.uint8)
    np.savez_compressed(tmp_path / "a.npz", images=a)
    b = a.copy()
    b[4, 3, 3] ^= 1
    np.savez_compressed(tmp_path / "b.npz", images=b)
    first = open_source(tmp_path / "a.npz").fingerprint()
    assert first == open_source(tmp_path / "a.npz").fingerprint()
    assert first != open_source(tmp_path / "b.npz").fingerprint()


def test_fingerprint_hashes_every_row(tmp_path, rng, monkeypatch):
    """A change in any row changes the fingerprint (issue 16 item 2: sampled rows missed
    a change), also when the rows are streamed in many chunks."""
    monkeypatch.setattr(sources.base, "HASH_CHUNK_BYTES", 40)  # 2 rows of 16 bytes per chunk
    a = rng.integers(0, 256, (101, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    base = open_source(tmp_path / "a.npy").fingerprint()
    assert base.startswith("sha256:")
    np.save(tmp_path / "copy.npy", a)  # another path, same content
    assert open_source(tmp_path / "copy.npy").fingerprint() == base
    for row in (0, 7, 50, 63, 100):
        b = a.copy()
        b[row, 3, 2] ^= 0x01
        np.save(tmp_path / "b.npy", b)
        assert open_source(tmp_path / "b.npy").fingerprint() != base, row
    monkeypatch.setattr(sources.base, "HASH_CHUNK_BYTES", 16 << 20)  # one chunk: the same hash
    assert open_source(tmp_path / "a.npy").fingerprint() == base
    # shape, dtype and resize are part of it
    np.save(tmp_path / "c.npy", a.reshape(101, 2, 8))
    assert open_source(tmp_path / "c.npy").fingerprint() != base
    assert open_source(tmp_path / "a.npy", resize=(3, 3)).fingerprint() != base


def test_small_data_is_hashed_whole(tmp_path, rng):
    a = rng.integers(0, 256, (300, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    base = open_source(tmp_path / "a.npy").fingerprint()
    a[137, 2, 2] ^= 1  # a row no 64-row sample would pick
    np.save(tmp_path / "a.npy", a)
    assert open_source(tmp_path / "a.npy").fingerprint() != base


def test_resize_arrays(tmp_path):
    flat = np.full((2, 3, 10, 12), 77, dtype=np.uint8)
    np.save(tmp_path / "flat.npy", flat)
    src = open_source(tmp_path / "flat.npy", resize=(5, 7))
    assert src.shape == (3, 5, 7)
    got = src.batch(0, 2)
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 5, 7)
    assert bool((got == 77).all())
    same = open_source(tmp_path / "flat.npy", resize="10x12").batch(0, 2)
    assert torch.equal(same, torch.from_numpy(flat))


@pytest.mark.parametrize("bad", ["32", "axb", (0, 4), (4,), (4.0, 4), "1x8", [True, 3]])
def test_bad_resize(bad):
    with pytest.raises(ValueError, match="resize"):
        parse_resize(bad)


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input: no such file.*nope\.npy"):
        open_source(tmp_path / "nope.npy")
    (tmp_path / "bad.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match=r"input: .*bad\.npy is not a readable \.npy"):
        open_source(tmp_path / "bad.npy")
    (tmp_path / "bad.npz").write_bytes(b"PK garbage")
    with pytest.raises(ValueError, match=r"bad\.npz is not a readable \.npz"):
        open_source(tmp_path / "bad.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell what"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="input"):
        open_source("")
    with pytest.raises(TypeError, match="input"):
        open_source(42)


def test_batch_bounds(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.uint8))
    src = open_source(tmp_path / "a.npy")
    for start, stop in ((0, 4), (-1, 2), (2, 1)):
        with pytest.raises(IndexError, match="batch"):
            src.batch(start, stop)


# ----------------------------------------------------------------------------- folders


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_folder_sorted_recursive(tmp_path, rng):
    root = tmp_path / "imgs"
    arrays = {
        "a.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "b/c.PNG": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "b/d/e.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "z.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        _png(root / name, array)
    (root / "readme.txt").write_text("not an image")
    src = open_source(root)
    order = ["a.png", "b/c.PNG", "b/d/e.png", "z.png"]  # component-wise path order
    assert [p.relative_to(root).as_posix() for p in src.files] == order
    assert src.shape == (3, 6, 5) and src.dtype == torch.uint8
    expected = np.stack([arrays[n].transpose(2, 0, 1) for n in order])
    np.testing.assert_array_equal(src.batch(0, 4).numpy(), expected)
    np.testing.assert_array_equal(src.batch(1, 3).numpy(), expected[1:3])


def test_folder_modes_and_jpeg(tmp_path, rng):
    grey = rng.integers(0, 256, (7, 4), dtype=np.uint8)
    _png(tmp_path / "g" / "0.png", grey)
    src = open_source(tmp_path / "g")
    assert src.shape == (1, 7, 4)
    np.testing.assert_array_equal(src.batch(0, 1)[0, 0].numpy(), grey)

    rgba = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    _png(tmp_path / "a" / "0.png", rgba)
    assert open_source(tmp_path / "a").shape == (4, 3, 4)

    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "j").mkdir()
    Image.fromarray(colour).save(tmp_path / "j" / "0.jpg", quality=90)
    src = open_source(tmp_path / "j")
    decoded = np.asarray(Image.open(tmp_path / "j" / "0.jpg").convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(src.batch(0, 1)[0].numpy(), decoded)


def test_folder_mixed_shapes_names_first_offender(tmp_path, rng):
    root = tmp_path / "mixed"
    _png(root / "00.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "01.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "02.png", rng.integers(0, 256, (9, 8, 3), dtype=np.uint8))
    _png(root / "03.png", rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"mixed shapes.*02\.png is 9x8.*00\.png.*8x8.*resize"
    ) as e:
        open_source(root)
    assert "03.png" not in str(e.value)
    src = open_source(root, resize=(6, 7))
    assert src.shape == (3, 6, 7)
    batch = src.batch(0, 4)
    assert batch.shape == (4, 3, 6, 7) and batch.dtype == torch.uint8
    # the folder's resize is the array sources' resize: one rule everywhere
    first = np.asarray(Image.open(root / "02.png")).transpose(2, 0, 1)[None]
    np.save(tmp_path / "one.npy", first)
    via_array = open_source(tmp_path / "one.npy", resize=(6, 7)).batch(0, 1)
    assert torch.equal(batch[2:3], via_array)


def test_folder_mixed_channels_and_bad_files(tmp_path, rng):
    root = tmp_path / "chan"
    _png(root / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "1.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mixed channel counts.*1\.png has C=1"):
        open_source(root, resize=(8, 8))

    broken = tmp_path / "broken"
    _png(broken / "0.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (broken / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image .*1\.png"):
        open_source(broken)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images"):
        open_source(tmp_path / "empty")


def test_folder_fingerprint_tracks_content(tmp_path, rng):
    root = tmp_path / "f"
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _png(root / "0.png", a)
    _png(root / "1.png", a)
    base = open_source(root).fingerprint()
    assert open_source(root).fingerprint() == base
    b = a.copy()
    b[0, 0] ^= 1
    _png(root / "1.png", b)
    assert open_source(root).fingerprint() != base


# -------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_raw_and_gzip(tmp_path, rng):
    images = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    raw = tmp_path / "imgs-idx3-ubyte"
    raw.write_bytes(_idx_bytes(images, 0x08))
    gz = tmp_path / "imgs-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    floats = rng.random((3, 2)).astype(np.float32)
    (tmp_path / "f.idx").write_bytes(_idx_bytes(floats, 0x0D))

    np.testing.assert_array_equal(read_idx(raw), images)
    np.testing.assert_array_equal(read_idx(gz), images)
    assert isinstance(read_idx(raw, mmap=True), np.memmap)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)
    for path in (raw, gz):
        src = open_source(path)
        assert src.shape == (1, 5, 4) and src.dtype == torch.uint8 and len(src) == 6
        np.testing.assert_array_equal(src.batch(2, 6).numpy(), images[2:6, None])
    assert open_source(raw).fingerprint() != ""

    (tmp_path / "short").write_bytes(_idx_bytes(images, 0x08)[:-3])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.arange(6, dtype=np.uint8), 0x08))
    with pytest.raises(ValueError, match="labels file"):
        open_source(labels)
    with pytest.raises(FileNotFoundError, match="IDX"):
        read_idx(tmp_path / "absent")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sep", ["-", "."])
def test_load_mnist_tiny(tmp_path, rng, gz, sep):
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    for name, data in (
        (f"train-images{sep}idx3-ubyte", _idx_bytes(images, 0x08)),
        (f"train-labels{sep}idx1-ubyte", _idx_bytes(labels, 0x08)),
    ):
        (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    x, y = load_mnist(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (7, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    with pytest.raises(FileNotFoundError, match="no MNIST test images"):
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "val")


@pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST test set not present")
def test_real_mnist_test_set():
    x, y = load_mnist(MNIST)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS
    raw = gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.sha256(x.numpy().tobytes()).digest() == hashlib.sha256(raw[16:]).digest()
    src = open_source(MNIST / "t10k-images-idx3-ubyte.gz")
    assert len(src) == 10000 and src.shape == (1, 28, 28)
    assert torch.equal(src.batch(9990, 10000), x[9990:])


# ------------------------------------------------------------------------- torchvision


def test_torchvision_spec_with_a_stand_in(monkeypatch, rng):
    arrays = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)

    class Fake:
        def __init__(self, root, train=True, download=False):
            assert download is False
            self.root, self.data = root, arrays if train else arrays[:2]

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return Image.fromarray(self.data[i]), i % 3

    torchvision = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.Fake = Fake
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)

    src = open_source("torchvision:Fake:/data/root")
    assert len(src) == 5 and src.shape == (3, 6, 6) and src._dataset.root == "/data/root"
    np.testing.assert_array_equal(src.batch(1, 4).numpy(), arrays[1:4].transpose(0, 3, 1, 2))
    test = open_source("torchvision:Fake:/data/root:test")
    assert len(test) == 2
    assert test.fingerprint() != src.fingerprint()
    assert open_source("torchvision:Fake:/r", resize=(3, 3)).batch(0, 5).shape == (5, 3, 3, 3)
    with pytest.raises(ValueError, match="no data set named 'Nope'"):
        open_source("torchvision:Nope:/r")
    with pytest.raises(ValueError, match="torchvision:NAME:ROOT"):
        open_source("torchvision:Fake")


def test_torchvision_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    with pytest.raises(ValueError, match="needs torchvision"):
        open_source("torchvision:MNIST:/tmp")


def test_zip_member_offsets_with_extra_fields(tmp_path, rng):
    """A stored member whose local header carries an extra field is still mapped right."""
    a = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    with zipfile.ZipFile(tmp_path / "x.npz", "w", zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo("images.npy")
        info.extra = struct.pack("<HH", 0xCAFE, 4) + b"abcd"
        archive.writestr(info, (tmp_path / "a.npy").read_bytes())
    src = open_source(tmp_path / "x.npz")
    np.testing.assert_array_equal(src.batch(0, 4).numpy(), a[:, None])
