"""Data sets that pipelines read (issue 20): labels from every source kind, several (T, cut)
settings in one run, the CIFAR-10-C and WebDataset exports, and ``verify --full``.

Expected values come from the test's own construction: the labels it wrote, the ids it
computes from ``(setting, source index, k)``, and ``ops`` called image by image.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffeo_engine import generate as gen
from diffeo_engine import ops
from diffeo_engine.cli import main
from diffeo_engine.generate import (
    FAULT_ENV,
    MANIFEST,
    export,
    generate,
    load_generated,
    read_manifest,
    verify,
)

Image = pytest.importorskip("PIL.Image")

SEED, K = 7, 2
H, W = 9, 8
MNIST = Path("/work/shared/data/mnist")


def _images(rng: np.random.Generator, n: int, channels: int = 3) -> np.ndarray:
    """(N, H, W, C) uint8 with smooth structure (deformations move pixels) and noise."""
    y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    phase = rng.uniform(0, 6, (n, 1, 1, channels))
    waves = 127.5 + 110 * np.sin(x[None, ..., None] / 2.0 + y[None, ..., None] / 3.0 + phase)
    return np.clip(waves + rng.integers(0, 16, (n, H, W, channels)), 0, 255).astype(np.uint8)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _expected(nchw: np.ndarray, ids, settings, n: int, noise="matched") -> dict:
    """Each id's images computed alone: setting s = id // (n K), image (id % (n K)) // K."""
    out = {"tau": [], "noisy": []}
    for id_ in ids:
        s, i = id_ // (n * K), (id_ % (n * K)) // K
        T, cut = settings[s]
        x = torch.from_numpy(np.ascontiguousarray(nchw[i : i + 1]))
        tau, noisy = ops.perturb(
            x, T, cut, seed=SEED, ids=[id_], noise=noise, out_dtype=torch.uint8
        )
        out["tau"].append(tau[0])
        out["noisy"].append(noisy[0])
    return {kind: torch.stack(values) for kind, values in out.items()}


# --------------------------------------------------------------- labels, per source kind


def _idx_source(tmp_path: Path, rng) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    images = _images(rng, 6, 1)[..., 0]
    labels = rng.integers(0, 10, 6).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return str(tmp_path / "t10k-images-idx3-ubyte.gz"), [], images[:, None], labels


def _cifar_bytes(images_chw: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels[:, None], images_chw.reshape(len(labels), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


def _cifar_source(tmp_path: Path, rng, spelling: str):
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 5).astype(np.uint8)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(_cifar_bytes(images, labels))
    spec = f"cifar10:{tmp_path}" if spelling == "dir" else str(folder / "test_batch.bin")
    return spec, [], images, labels


def _folder_source(tmp_path: Path, rng):
    names = ["zebra", "ant", "moth"]  # classes are numbered in sorted order: ant, moth, zebra
    images = _images(rng, 6)
    labels, order = [], []
    for j, image in enumerate(images):
        name = names[j % 3]
        (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / name / f"{j}.png")
        order.append((name, f"{j}.png", j))
    order.sort()  # the folder reader sorts by path: class, then file
    nchw = np.stack([images[j] for _, _, j in order]).transpose(0, 3, 1, 2)
    labels = np.array([sorted(names).index(name) for name, _, _ in order])
    return str(tmp_path / "imgs"), [], nchw, labels


def _npz_source(tmp_path: Path, rng):
    images = _images(rng, 6)
    labels = rng.integers(0, 1000, 6)
    np.savez(tmp_path / "data.npz", x=images, y=labels)
    return f"{tmp_path / 'data.npz'}:x", ["--labels", "y"], images.transpose(0, 3, 1, 2), labels


def _npy_source(tmp_path: Path, rng, labels_format: str):
    images = _images(rng, 6)
    labels = rng.integers(0, 10, 6)
    np.save(tmp_path / "x.npy", images)
    if labels_format == "npy":
        np.save(tmp_path / "y.npy", labels.astype(np.int16))
        given = str(tmp_path / "y.npy")
    else:
        (tmp_path / "y-idx1-ubyte").write_bytes(_idx_bytes(labels.astype(np.uint8)))
        given = str(tmp_path / "y-idx1-ubyte")
    return str(tmp_path / "x.npy"), ["--labels", given], images.transpose(0, 3, 1, 2), labels


SOURCES = {
    "idx": lambda tmp, rng: _idx_source(tmp, rng),
    "cifar10-dir": lambda tmp, rng: _cifar_source(tmp, rng, "dir"),
    "cifar10-bin": lambda tmp, rng: _cifar_source(tmp, rng, "bin"),
    "folder": _folder_source,
    "npz-key": _npz_source,
    "npy-labels-npy": lambda tmp, rng: _npy_source(tmp, rng, "npy"),
    "npy-labels-idx": lambda tmp, rng: _npy_source(tmp, rng, "idx"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_labels_round_trip_from_every_source_kind(kind, tmp_path):
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    spec, flags, nchw, labels = SOURCES[kind](tmp_path, rng)
    n = len(labels)
    out = tmp_path / "run"
    argv = ["generate", "--input", spec, "--out", str(out), *flags, "--T", "0.01", "0.03"]
    argv += ["--cut", "3", "--per-image", str(K), "--seed", str(SEED), "--shard-size", "5"]
    assert main([*argv, "--quiet", "--batch-size", "3"]) == 0
    manifest = read_manifest(out)
    recorded = manifest["source"]["labels"]
    assert recorded["count"] == n
    if kind == "folder":
        assert recorded["classes"] == ["ant", "moth", "zebra"]
    if kind.startswith("cifar10"):
        assert recorded["classes"][:3] == ["airplane", "automobile", "bird"]

    data = load_generated(out, check=True)
    total = 2 * n * K
    assert len(data) == total
    ids = list(range(total))
    want = _expected(nchw, ids, [(0.01, 3), (0.03, 3)], n)
    for id_ in ids:
        item = data[id_]
        s, i, k = id_ // (n * K), (id_ % (n * K)) // K, id_ % K
        assert (item["setting"], item["source_index"], item["k"]) == (s, i, k)
        assert item["label"] == int(labels[i])
        assert torch.equal(item["tau"], want["tau"][id_])
        assert torch.equal(item["noisy"], want["noisy"][id_])

    cifar_c = tmp_path / "cifar-c"
    assert main(["export", str(out), "--format", "cifar-c", "--out", str(cifar_c), "--quiet"]) == 0
    assert np.array_equal(np.load(cifar_c / "labels.npy"), np.tile(np.repeat(labels, K), 2))
    wds_out = tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--out", str(wds_out)]) == 0
    got = {}
    for tar_path in sorted(wds_out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    got[int(member.name.split(".")[0])] = int(tar.extractfile(member).read())
    assert got == {id_: int(labels[(id_ % (n * K)) // K]) for id_ in ids}


def test_label_count_mismatch_is_refused_before_anything_is_written(tmp_path, capsys):
    rng = np.random.default_rng(11)
    np.save(tmp_path / "x.npy", _images(rng, 5))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 4))
    out = tmp_path / "run"
    base = ["generate", "--input", str(tmp_path / "x.npy"), "--out", str(out), "--T", "0.01"]
    base += ["--cut", "3", "--per-image", "1", "--seed", "0", "--quiet"]
    assert main([*base, "--labels", str(tmp_path / "y.npy")]) == 2
    err = capsys.readouterr().err
    assert "--labels:" in err and "4 labels" in err and "5 images" in err
    assert err.count("\n") == 1 and not out.exists()

    # a labels file found beside IDX images, of the wrong length: refused, --no-labels helps
    images = _images(rng, 5, 1)[..., 0]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(6)))
    base[2] = str(tmp_path / "train-images-idx3-ubyte")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte holds 6 labels" in err and "--no-labels" in err
    assert not out.exists()
    assert main([*base, "--no-labels"]) == 0
    assert read_manifest(out)["source"]["labels"] is None
    assert "label" not in load_generated(out)[0] and not list(out.glob("label-*"))

    for bad, words in ((np.array([0.5, 1.0, 2, 3, 4]), "integer labels"), (-np.ones(5), "")):
        np.save(tmp_path / "bad.npy", bad.astype(np.float64 if words else np.int64))
        argv = [*base[:4], str(tmp_path / "new"), *base[5:], "--labels", str(tmp_path / "bad.npy")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--labels:" in err and (words or "[0, 2**63)") in err
        assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------- several settings


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "x.npy"
    np.save(path, _images(np.random.default_rng(3), 6))
    np.save(path.with_name("y.npy"), np.random.default_rng(4).integers(0, 5, 6))
    return path


SETTINGS = dict(T=[0.004, 0.02, 0.05], cut=[3], per_image=K, seed=SEED, shard_size=5)
MULTI_CLI = ["--T", "0.004", "0.02", "0.05", "--cut", "3", "--per-image", str(K)]
MULTI_CLI += ["--seed", str(SEED), "--shard-size", "5", "--batch-size", "3", "--quiet"]


@pytest.fixture(scope="module")
def multi(source, tmp_path_factory) -> Path:
    """Three temperatures, shards of 5 straddling the settings' blocks of 12 ids."""
    out = tmp_path_factory.mktemp("multi") / "run"
    argv = ["generate", "--input", str(source), "--out", str(out), *MULTI_CLI]
    assert main([*argv, "--labels", str(source.with_name("y.npy"))]) == 0
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_settings_are_ordered_and_each_id_is_its_setting(source, tmp_path):
    nchw = np.load(source).transpose(0, 3, 1, 2)
    out = tmp_path / "run"
    manifest = generate(source, out, T=[0.01, 0.003], cut=[4, 3], **{"per_image": K,
                        "seed": SEED, "shard_size": 7, "batch_size": 4}, labels=False)  # fmt: skip
    order = [(0.01, 4), (0.003, 4), (0.01, 3), (0.003, 3)]  # cut outer, T inner, as given
    assert manifest["parameters"]["settings"] == [{"T": t, "cut": c} for t, c in order]
    assert manifest["total_images"] == 4 * 6 * K
    data = load_generated(out)
    ids = [0, 11, 12, 25, 30, 47]  # first and last of blocks, both cuts
    want = _expected(nchw, ids, order, 6)
    for row, id_ in enumerate(ids):
        item = data[id_]
        assert (item["T"], item["cut"]) == order[id_ // 12]
        assert torch.equal(item["tau"], want["tau"][row])
        assert torch.equal(item["noisy"], want["noisy"][row])
    other = generate(source, tmp_path / "pairs", settings=order, per_image=K, seed=SEED,
                     shard_size=7, batch_size=5, labels=False)  # fmt: skip
    assert other["parameters"] == manifest["parameters"]
    assert all(
        (tmp_path / "pairs" / p.name).read_bytes() == p.read_bytes() for p in out.glob("*.npy")
    )
    with pytest.raises(ValueError, match=r"T, cut: the setting \(T=0.01, cut=3\) is given twice"):
        generate(source, tmp_path / "dup", T=[0.01, 0.01], cut=3, per_image=1, seed=0)
    with pytest.raises(ValueError, match="settings: give either"):
        generate(source, tmp_path / "dup", T=0.01, settings=order, per_image=1, seed=0)
    assert not (tmp_path / "dup").exists()


RUNNER = "import sys; from diffeo_engine.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("fault", ["shard-write:3", "between-shards:2"])
def test_multi_setting_run_killed_and_resumed_is_byte_identical(source, multi, tmp_path, fault):
    out = tmp_path / "run"
    command = ["generate", "--input", str(source), "--out", str(out), *MULTI_CLI]
    command += ["--labels", str(source.with_name("y.npy"))]
    env = {**os.environ, FAULT_ENV: fault}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *command], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert not read_manifest(out)["complete"]
    assert main(["generate", "--out", str(out), "--resume", "--quiet"]) == 0
    assert _snapshot(out) == _snapshot(multi)
    assert verify(out, full=True).ok


def test_resume_with_other_settings_is_refused(source, multi, tmp_path, capsys):
    before = _snapshot(multi)
    argv = ["generate", "--input", str(source), "--out", str(multi), *MULTI_CLI]
    argv[argv.index("0.05")] = "0.06"
    assert main([*argv, "--labels", str(source.with_name("y.npy"))]) == 2
    err = capsys.readouterr().err
    assert "different parameters" in err and "settings" in err and "0.06" in err
    assert main(argv) == 2  # and without its labels, another source
    assert "different source" in capsys.readouterr().err
    assert main(["generate", "--out", str(multi), "--resume", "--T", "0.004", "0.02"]) == 2
    assert "different parameters" in capsys.readouterr().err
    assert _snapshot(multi) == before


# ------------------------------------------------------------------------------ exports


def test_cifar_c_export_matches_load_generated_item_for_item(multi, tmp_path):
    dest = tmp_path / "c"
    info = export(multi, dest, format="cifar-c")
    data = load_generated(multi)
    tau, noisy = np.load(dest / "tau.npy"), np.load(dest / "noisy.npy")
    labels = np.load(dest / "labels.npy")
    assert tau.shape == (36, H, W, 3) and tau.dtype == np.uint8 and labels.dtype == np.int64
    for row in range(36):
        item = data[row]
        assert np.array_equal(tau[row], item["tau"].numpy().transpose(1, 2, 0))
        assert np.array_equal(noisy[row], item["noisy"].numpy().transpose(1, 2, 0))
        assert labels[row] == item["label"]
    written = json.loads((dest / "export.json").read_text())
    assert written == info
    assert [(b["T"], b["cut"], b["rows"]) for b in written["blocks"]] == [
        (0.004, 3, [0, 12]),
        (0.02, 3, [12, 24]),
        (0.05, 3, [24, 36]),
    ]
    assert sorted(p.name for p in dest.iterdir()) == [
        "export.json", "labels.npy", "noisy.npy", "tau.npy",
    ]  # fmt: skip


@pytest.mark.skipif(not (MNIST / "t10k-labels-idx1-ubyte.gz").exists(), reason="no MNIST here")
def test_cifar_c_export_of_real_mnist_at_three_temperatures(tmp_path):
    """The first 400 MNIST test images (an IDX file with its labels file beside it)."""
    from diffeo_engine.data.sources import read_idx

    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:400]
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:400]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    out = tmp_path / "mnist-diffeo"
    temperatures = [0.002, 0.01, 0.03]
    generate(tmp_path / "t10k-images-idx3-ubyte", out, T=temperatures, cut=3, per_image=1,
             seed=0, progress=False)  # fmt: skip
    assert main(["export", str(out), "--format", "cifar-c", "--out", str(tmp_path / "c")]) == 0
    tau = np.load(tmp_path / "c" / "tau.npy")
    got_labels = np.load(tmp_path / "c" / "labels.npy")
    assert tau.shape == (1200, 28, 28, 1)
    assert np.array_equal(got_labels, np.tile(labels, 3))  # MNIST's own labels, per block
    data = load_generated(out)
    for row in range(0, 1200, 7):
        assert np.array_equal(tau[row, ..., 0], data[row]["tau"].numpy()[0])
        assert data[row]["label"] == got_labels[row] and data[row]["T"] == temperatures[row // 400]
    block = json.loads((tmp_path / "c" / "export.json").read_text())["blocks"]
    assert [b["T"] for b in block] == temperatures
    moved = np.abs(tau[800:].astype(int) - images[:, :, :, None]).mean()
    assert moved > np.abs(tau[:400].astype(int) - images[:, :, :, None]).mean()  # hotter moves more


@pytest.mark.parametrize("image", ["png", "npy"])
def test_webdataset_export_reads_back_with_webdataset(multi, tmp_path, image):
    wds = pytest.importorskip("webdataset")
    dest = tmp_path / "wds"
    info = export(multi, dest, format="webdataset", image=image)
    urls = [str(dest / name) for name in info["shards"]]
    assert len(urls) == read_manifest(multi)["n_shards"]
    decoder = "pil" if image == "png" else None
    pipeline = wds.WebDataset(urls, shardshuffle=False)
    pipeline = pipeline.decode(decoder) if decoder else pipeline.decode()
    data = load_generated(multi)
    seen = []
    for sample in pipeline:
        meta = sample["json"]
        item = data[meta["id"]]
        for kind in ("tau", "noisy"):
            got = sample[f"{kind}.{image}"]
            got = np.asarray(got).transpose(2, 0, 1) if image == "png" else got
            assert np.array_equal(got, item[kind].numpy()), (meta["id"], kind)
        assert sample["cls"] == item["label"] == meta["label"]
        assert (meta["setting"], meta["T"], meta["cut"]) == (item["setting"], item["T"], 3)
        assert (meta["source_index"], meta["k"], meta["seed"]) == (
            item["source_index"], item["k"], SEED,
        )  # fmt: skip
        seen.append(meta["id"])
    assert seen == list(range(36))
    again = tmp_path / "again"
    export(multi, again, format="webdataset", image=image)  # the same bytes, time-stamp free
    assert _snapshot(again) == _snapshot(dest)


def test_exports_are_atomic_and_never_overwrite(multi, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "taken"
    dest.mkdir()
    before = sorted(tmp_path.iterdir())
    for fmt in ("cifar-c", "webdataset"):
        assert main(["export", str(multi), "--format", fmt, "--out", str(dest)]) == 2
        err = capsys.readouterr().err
        assert "--out:" in err and "never overwrites" in err
    assert sorted(tmp_path.iterdir()) == before and not list(dest.iterdir())

    calls = []

    def fail_late(array, Image):
        calls.append(1)
        if len(calls) == 30:
            raise OSError(28, "No space left on device")
        return real(array, Image)

    real = gen.exports._png
    monkeypatch.setattr(gen.exports, "_png", fail_late)
    with pytest.raises(OSError, match="No space left"):
        export(multi, tmp_path / "half", format="webdataset")
    assert sorted(tmp_path.iterdir()) == before  # neither the export nor its temporary folder


def test_export_refuses_what_it_cannot_write(multi, source, tmp_path, capsys):
    out = tmp_path / "f32"
    generate(source, out, T=0.01, cut=3, per_image=1, seed=1, dtype="float32", labels=False)
    with pytest.raises(ValueError, match="format: cifar-c holds uint8 images"):
        export(out, tmp_path / "c", format="cifar-c")
    with pytest.raises(ValueError, match="image: PNG holds uint8"):
        export(out, tmp_path / "w", format="webdataset", image="png")
    info = export(out, tmp_path / "w", format="webdataset")  # .npy by default for floats
    assert info["members"] == ["tau.npy", "noisy.npy", "json"]
    with tarfile.open(tmp_path / "w" / info["shards"][0]) as tar:
        first = tar.extractfile(tar.getmembers()[0]).read()
    import io

    assert np.array_equal(np.load(io.BytesIO(first)), load_generated(out)[0]["tau"].numpy())

    damaged = tmp_path / "damaged"
    generate(source, damaged, T=0.01, cut=3, per_image=1, seed=1, labels=False)
    data = bytearray((damaged / "noisy-00001.npy").read_bytes())
    data[-1] ^= 4
    (damaged / "noisy-00001.npy").write_bytes(bytes(data))
    assert main(["export", str(damaged), "--format", "cifar-c", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "noisy-00001.npy: sha256 differs" in err and "--repair" in err
    assert not (tmp_path / "d").exists()
    assert main(["export", str(tmp_path / "nope"), "--format", "cifar-c", "--out", "x"]) == 2
    assert "DIR: no such folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- verify --full


def _alter_with_hash(out: Path, name: str, row: int) -> None:
    """Change one pixel of ``row`` and record the new sha256: only regeneration can tell."""
    array = np.load(out / name)
    array[row, 0, 4, 4] ^= 0x20
    np.save(out / name, array)
    manifest = json.loads((out / MANIFEST).read_text())
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            if entry["name"] == name:
                entry["sha256"] = gen.files._sha256(out / name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def test_verify_full_catches_a_shard_altered_with_its_hash_and_repair_restores_it(
    multi, tmp_path, capsys
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(multi, out)
    _alter_with_hash(out, "tau-00004.npy", 3)  # id 23: setting 1, image 5, k 1
    assert verify(out, sample=0).ok  # every hash agrees with the manifest
    report = verify(out, full=True, progress=True)
    assert "verify: 36/36 images" in capsys.readouterr().err
    assert report.problems == [
        "tau-00004.npy: 1 of 5 images differ from their regeneration: ids 23 (max |diff| 32)"
    ]
    assert report.bad_shards == [4] and report.images_regenerated == 36 and report.exact

    labels = np.load(out / "label-00006.npy")
    labels[1:3] += 1
    np.save(out / "label-00006.npy", labels)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][6]["files"]["label"]["sha256"] = gen.files._sha256(out / "label-00006.npy")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    report = verify(out, full=True)
    assert report.problems[1] == (
        "label-00006.npy: 2 of 5 labels differ from their regeneration: ids 31-32 (max |diff| 1)"
    )

    assert main(["verify", str(out), "--full", "--repair", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ids 23" in printed and "ids 31-32" in printed and printed.rstrip().endswith("OK")
    assert _snapshot(out) == _snapshot(multi)  # byte for byte, the manifest included
    assert main(["verify", str(out), "--full", "--quiet"]) == 0
    assert "all 36 images regenerated and compared exactly" in capsys.readouterr().out
