"""``generate`` / ``verify`` / ``load_generated``: exactness, crash safety, refusals."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
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
    add_commands,
    generate,
    load_generated,
    read_manifest,
    verify,
)

T, CUT, K, SEED, SHARD = 0.02, 3, 3, 11, 8
N_SOURCE = 10  # 30 ids -> shards of 8, 8, 8, 6
ARGS = dict(T=T, cut=CUT, per_image=K, seed=SEED, shard_size=SHARD, batch_size=5)
CLI = ["--T", str(T), "--cut", str(CUT), "--per-image", str(K), "--seed", str(SEED)]
CLI += ["--shard-size", str(SHARD), "--batch-size", "5", "--quiet"]


def _images(n: int, seed: int = 3) -> np.ndarray:
    """(N, H, W, C) uint8 with smooth structure, so deformations change pixels."""
    y, x = np.meshgrid(np.arange(9), np.arange(8), indexing="ij")
    k = np.arange(n)[:, None, None, None]
    c = np.arange(3)[None, None, None, :]
    waves = 127.5 + 127 * np.sin((1 + k % 4) * x[None, ..., None] / 2.0 + c + k)
    noise = np.random.default_rng(seed).integers(0, 20, (n, 9, 8, 3))
    return np.clip(waves * np.cos(y[None, ..., None] / 3.0) ** 2 + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "images.npy"
    np.save(path, _images(N_SOURCE))
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    """An uninterrupted run, the yardstick of every crash test."""
    out = tmp_path_factory.mktemp("ref") / "run"
    manifest = generate(source, out, **ARGS)
    assert manifest["complete"] and manifest["n_shards"] == 4
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}


def _state(out: Path) -> dict:
    """Names, bytes and modification times: to prove that nothing was written."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    got, want = _snapshot(out), _snapshot(reference)
    assert sorted(got) == sorted(want)  # nothing missing, nothing extra, no temp files
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    ids = [item["id"] for item in load_generated(out)]
    assert ids == list(range(N_SOURCE * K))  # each id exactly once, in order


def _direct(source: Path, ids, noise="matched", dtype=torch.uint8, interp="bilinear"):
    """What a user gets from ops for these ids, in one batch of its own."""
    array = np.load(source).transpose(0, 3, 1, 2)
    ids = torch.as_tensor(ids)
    images = torch.from_numpy(np.ascontiguousarray(array[(ids // K).numpy()]))
    if noise == "none":
        return {"tau": ops.deform(images, T, CUT, seed=SEED, ids=ids, out_dtype=dtype)}
    tau, noisy = ops.perturb(
        images, T, CUT, seed=SEED, ids=ids, noise=noise, out_dtype=dtype, interp=interp
    )
    return {"tau": tau, "noisy": noisy}


# ------------------------------------------------------------------------- exactness


def test_reference_run_matches_ops_directly(reference, source):
    manifest = read_manifest(reference)
    assert manifest["parameters"] == {
        "settings": [{"T": T, "cut": CUT}],
        "per_image": K,
        "seed": SEED,
        "noise": "matched",
        "dtype": "uint8",
        "shard_size": SHARD,
        "interp": "bilinear",
        "resize": None,
    }
    assert manifest["source"]["spec"] == str(source.resolve())
    assert manifest["versions"]["torch"] == torch.__version__
    assert [(s["id_start"], s["id_stop"]) for s in manifest["shards"]] == [
        (0, 8),
        (8, 16),
        (16, 24),
        (24, 30),
    ]
    want = _direct(source, torch.arange(30).flip(0))  # another batch, another order
    for shard in manifest["shards"]:
        for kind in ("tau", "noisy"):
            stored = np.load(reference / shard["files"][kind]["name"])
            assert stored.dtype == np.uint8 and stored.shape == (
                shard["id_stop"] - shard["id_start"],
                3,
                9,
                8,
            )
            expected = want[kind].flip(0)[shard["id_start"] : shard["id_stop"]]
            assert torch.equal(torch.from_numpy(stored), expected)
    tau = np.concatenate([np.load(reference / f"tau-0000{i}.npy") for i in range(4)])
    assert (tau != np.load(source).transpose(0, 3, 1, 2).repeat(K, 0)).any()


@pytest.mark.parametrize(
    ("noise", "dtype", "interp"),
    [(0.5, "float32", "nearest"), ("none", "float16", "bilinear")],
)
def test_noise_and_dtype_options_match_ops(source, tmp_path, noise, dtype, interp):
    out = tmp_path / "run"
    manifest = generate(
        source, out, **{**ARGS, "shard_size": 7}, noise=noise, dtype=dtype, interp=interp
    )
    kinds = ["tau"] if noise == "none" else ["tau", "noisy"]
    assert manifest["kinds"] == kinds
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        f"{kind}-{i:05d}.npy" for kind in kinds for i in range(5)
    )
    want = _direct(source, torch.arange(30), noise, getattr(torch, dtype), interp)
    data = load_generated(out)
    for kind in kinds:
        got = torch.stack([data[j][kind] for j in range(30)])
        assert got.dtype == getattr(torch, dtype)
        assert torch.equal(got, want[kind])


def test_load_generated_dataset(reference, source):
    data = load_generated(reference)
    assert len(data) == 30
    item = data[17]
    assert (item["source_index"], item["k"], item["id"]) == (5, 2, 17)
    shard = np.load(reference / "noisy-00002.npy", mmap_mode="r")
    assert torch.equal(item["noisy"], torch.from_numpy(np.array(shard[1])))
    assert torch.equal(data[-1]["tau"], data[29]["tau"])
    with pytest.raises(IndexError):
        data[30]
    clone = pickle.loads(pickle.dumps(data))
    assert torch.equal(clone[3]["tau"], data[3]["tau"])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=30)))
    assert batch["tau"].shape == (30, 3, 9, 8) and batch["id"].tolist() == list(range(30))


def test_default_shard_size_and_progress(source, tmp_path, capsys):
    manifest = generate(source, tmp_path / "run", T=T, cut=CUT, per_image=2, seed=1, progress=True)
    # 20 ids: at least 8 shards by default, so an interrupted run loses little
    assert manifest["parameters"]["shard_size"] == 3 and manifest["n_shards"] == 7
    err = capsys.readouterr().err
    assert "generate: 20/20 images" in err and "images/s" in err and "ETA" in err


@pytest.mark.parametrize(
    ("image_bytes", "total", "want"),
    [
        (784, 10_000, 1250),  # MNIST's test set, K = 1: 8 shards
        (784, 60_000 * 10, 16 * 2**20 // 784),  # 16 MiB files: 21399 images, 29 shards
        (3 * 224 * 224, 10**6, 16 * 2**20 // (3 * 224 * 224)),  # 111 images per file
        (4 * 2**20, 100, 4),  # bigger than a default file: one image per shard, >= 1
        (1, 10**9, 65536),  # tiny images: capped at 65536 ids
    ],
)
def test_default_shard_size_by_bytes(image_bytes, total, want):
    assert gen.plan.default_shard_size(image_bytes, total) == max(1, min(want, 65536))


# ----------------------------------------------------------------------- crash safety

RUNNER = "import sys; from diffeo_engine.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize(
    ("fault", "listed", "resume_with"),
    [
        ("shard-write:1", 1, "--resume"),
        ("shard-renamed:2", 2, "same command"),
        ("manifest-write:1", 1, "same command"),
        ("between-shards:0", 1, "--resume"),
    ],
)
def test_sigkill_then_resume_is_byte_identical(
    source, reference, tmp_path, fault, listed, resume_with
):
    out = tmp_path / "run"
    command = ["generate", "--input", str(source), "--out", str(out), *CLI]
    env = {**os.environ, FAULT_ENV: fault}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *command], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()

    manifest = read_manifest(out)  # the manifest on disk is always whole
    assert not manifest["complete"]
    assert [s["index"] for s in manifest["shards"]] == list(range(listed))
    partial = load_generated(out, allow_incomplete=True)
    assert [item["id"] for item in partial] == list(range(listed * SHARD))
    with pytest.raises(ValueError, match="incomplete"):
        load_generated(out)
    report = verify(out, sample=0)
    assert report.problems == [f"incomplete: {listed} of 4 shards written"]
    leftovers = {p.name for p in out.iterdir()}
    if fault.startswith(("shard-write", "manifest-write")):
        assert any(name.endswith(".tmp") for name in leftovers)

    if resume_with == "--resume":
        assert main(["generate", "--out", str(out), "--resume", "--quiet"]) == 0
    else:
        assert main(command) == 0
    _assert_same_as_reference(out, reference)
    assert verify(out, sample=30).ok


@pytest.mark.parametrize("full_at", ["noisy-00002.npy", "manifest.json"])
def test_full_disk_surfaces_and_resumes(source, reference, tmp_path, monkeypatch, capsys, full_at):
    real_write = gen.files._write_all
    manifests = []

    def full_disk(fd, data, path):
        if path.name == MANIFEST:
            manifests.append(1)
        # the manifest fails on the write that would list shard 2 (the initial one first)
        if path.name == full_at and (full_at != MANIFEST or len(manifests) >= 4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data, path)

    monkeypatch.setattr(gen.files, "_write_all", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=rf"{full_at.replace('.', '[.]')}.*No space left") as info:
        generate(source, out, **ARGS)
    assert info.value.errno == errno.ENOSPC
    manifest = read_manifest(out)  # the last good manifest, whole
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    names = {p.name for p in out.iterdir()}
    assert not any(n.endswith(".tmp") for n in names)
    if full_at != MANIFEST:
        assert full_at not in names
    # the CLI reports it as an error, not a traceback
    command = ["generate", "--input", str(source), "--out", str(out), *CLI]
    assert main(command) == 1
    assert "No space left on device" in capsys.readouterr().err

    # a resumed run with other parameters is refused and writes nothing
    before = _state(out)
    for flag, value in (("--T", "0.03"), ("--seed", "12"), ("--per-image", "2")):
        changed = list(command)
        changed[changed.index(flag) + 1] = value
        assert main(changed) == 2
        err = capsys.readouterr().err
        assert "different parameters" in err and flag.lstrip("-").replace("-", "_") in err
        assert _state(out) == before
    assert main(["generate", "--out", str(out), "--resume", "--dtype", "float32"]) == 2
    assert "dtype: the run has 'uint8', this call 'float32'" in capsys.readouterr().err
    assert _state(out) == before

    monkeypatch.setattr(gen.files, "_write_all", real_write)
    assert main(["generate", "--out", str(out), "--resume", "--quiet"]) == 0
    _assert_same_as_reference(out, reference)


# ------------------------------------------------------------------------ refusals


def test_output_dir_holding_something_else(source, reference, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = _state(foreign)
    with pytest.raises(ValueError, match=r"out: .* not empty .*notes\.txt"):
        generate(source, foreign, **ARGS)
    assert _state(foreign) == before

    other = tmp_path / "other.npy"
    np.save(other, _images(N_SOURCE, seed=4))
    before = _state(reference)
    with pytest.raises(ValueError, match="holds another run, made from a different source"):
        generate(other, reference, **ARGS)
    assert _state(reference) == before

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a diffeo-engine generate manifest"):
        generate(source, fake, **ARGS)

    with pytest.raises(ValueError, match="no run to resume"):
        generate(source, tmp_path / "new", **ARGS, resume=True)
    assert not (tmp_path / "new").exists()


def test_complete_run_rerun_is_a_no_op(source, reference):
    before = _state(reference)
    manifest = generate(source, reference, **{**ARGS, "batch_size": 3})
    assert manifest["complete"]
    assert {k: v[0] for k, v in _state(reference).items()} == {k: v[0] for k, v in before.items()}


def test_batch_size_changes_nothing_written(source, reference, tmp_path):
    out = tmp_path / "run"
    manifest = generate(source, out, **{**ARGS, "batch_size": 7})
    assert [s["batch_size"] for s in manifest["shards"]] == [7] * 4
    got, want = _snapshot(out), _snapshot(reference)
    assert sorted(got) == sorted(want)
    assert all(got[name] == want[name] for name in want if name != MANIFEST)


def test_concurrent_writer_is_refused(source, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another generate process"):
            generate(source, out, **ARGS)
    finally:
        os.close(fd)


def test_damaged_listed_shard_is_refused(source, reference, tmp_path):
    out = tmp_path / "run"
    generate(source, out, **ARGS)
    (out / "tau-00001.npy").unlink()
    with pytest.raises(ValueError, match=r"tau-00001\.npy is listed .* missing"):
        generate(source, out, **ARGS)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"per_image": 0}, ValueError, "per_image"),
        ({"cut": 0}, ValueError, "cut"),
        ({"T": -1.0}, ValueError, "T"),
        ({"T": "hot"}, TypeError, "T"),
        ({"seed": -1}, ValueError, "seed"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"noise": "loud"}, ValueError, "noise"),
        ({"shard_size": 0}, ValueError, "shard_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"device": "gpu7"}, ValueError, "device"),
        ({"backend": "magic"}, ValueError, "backend"),
        ({"resize": "big"}, ValueError, "resize"),
        ({"seed": None}, ValueError, "seed: required"),
    ],
)
def test_bad_parameters_write_nothing(source, tmp_path, change, error, words):
    out = tmp_path / "run"
    with pytest.raises(error, match=words):
        generate(source, out, **{**ARGS, **change})
    assert not out.exists()


def test_bad_sources_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), *CLI]
    assert main(["generate", "--input", str(tmp_path / "missing.npy"), *args]) == 2
    assert "input: no such file or directory" in capsys.readouterr().err
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    assert main(["generate", "--input", str(tmp_path / "broken.npy"), *args]) == 2
    assert "not a readable .npy" in capsys.readouterr().err
    assert not out.exists()


def test_folder_with_mixed_shapes_and_resize(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    images = _images(4)
    for i, image in enumerate(images):
        Image.fromarray(image if i != 2 else image[:7]).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["generate", "--input", str(folder), "--out", str(out), *CLI]
    assert main(argv) == 2
    assert "2.png" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--resize", "6x5"]) == 0
    manifest = read_manifest(out)
    assert manifest["parameters"]["resize"] == [6, 5] and manifest["image_shape"] == [3, 6, 5]
    from diffeo_engine.data.sources import open_source

    resized = open_source(folder, resize=(6, 5)).batch(0, 4)
    ids = torch.arange(12)
    tau, noisy = ops.perturb(resized[ids // K], T, CUT, seed=SEED, ids=ids, out_dtype=torch.uint8)
    data = load_generated(out)
    assert torch.equal(torch.stack([data[i]["tau"] for i in range(12)]), tau)
    assert torch.equal(torch.stack([data[i]["noisy"] for i in range(12)]), noisy)


# --------------------------------------------------------------------------- verify


def _rewrite(out: Path, name: str, change) -> None:
    """Change a stored image and record the new sha256, so only regeneration can tell."""
    array = np.load(out / name)
    change(array)
    np.save(out / name, array)
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            if entry["name"] == name:
                entry["sha256"] = gen.files._sha256(out / name)
                entry["bytes"] = (out / name).stat().st_size
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_verify_catches_damage(source, tmp_path):
    out = tmp_path / "run"
    generate(source, out, **ARGS)
    assert verify(out, sample=30).ok

    data = bytearray((out / "tau-00003.npy").read_bytes())
    data[-1] ^= 1
    (out / "tau-00003.npy").write_bytes(bytes(data))
    report = verify(out, sample=0)
    assert report.problems == ["tau-00003.npy: sha256 differs from the manifest"]

    _rewrite(out, "tau-00003.npy", lambda a: None)  # accept the flipped byte's hash
    report = verify(out, sample=30)
    assert not report.ok and report.exact
    assert report.problems == ["id 29 (tau): regenerated image differs (max |diff| 1)"]


def test_verify_cross_backend_tolerance(source, tmp_path):
    out = tmp_path / "run"
    generate(source, out, **ARGS)
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        shard["backend"], shard["device"] = "triton", "cuda"  # as if made on a GPU
    (out / MANIFEST).write_text(json.dumps(manifest))

    def bump(by):
        def change(a):
            a[2, 0, 4, 4] = min(255, int(a[2, 0, 4, 4]) + by)

        return change

    _rewrite(out, "noisy-00000.npy", bump(1))
    report = verify(out, sample=30)
    assert report.ok and not report.exact and report.max_abs_diff <= 1
    _rewrite(out, "noisy-00000.npy", bump(2))
    report = verify(out, sample=30)
    assert report.problems == ["id 2 (noisy): regenerated image differs (max |diff| 3)"]


def test_verify_recomputes_in_the_original_batch(source, tmp_path, monkeypatch):
    """Were a backend's rounding to depend on the batch's size, verify still demands, and
    finds, exact equality: in the batch that produced the id (sizes 5 and 3 here)."""
    out = tmp_path / "run"
    generate(source, out, **ARGS)
    real = gen.verification._perturb

    def batch_dependent(images, ids, *args):
        outputs = real(images, ids, *args)
        if len(ids) > ARGS["batch_size"]:
            outputs["tau"] = outputs["tau"] ^ 1
        return outputs

    monkeypatch.setattr(gen.verification, "_perturb", batch_dependent)
    report = verify(out, sample=12)
    assert report.ok and report.exact and report.max_abs_diff == 0
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        shard["batch_size"] = 8  # claim another batching: the difference now shows
    (out / MANIFEST).write_text(json.dumps(manifest))
    report = verify(out, sample=12)
    assert len(report.problems) == 12 and all("(tau)" in p for p in report.problems)


def test_verify_source_changed_and_cli(source, tmp_path, capsys):
    out = tmp_path / "run"
    copy = tmp_path / "copy.npy"
    np.save(copy, np.load(source))
    generate(copy, out, **ARGS)
    assert main(["verify", str(out), "--sample", "5"]) == 0
    assert "5 ids regenerated" in capsys.readouterr().out
    np.save(copy, _images(N_SOURCE, seed=9))
    report = verify(out)
    assert len(report.problems) == 1 and "changed" in report.problems[0]
    assert main(["verify", str(out), "--input", str(source)]) == 0  # moved, same content
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_add_commands_registers_both():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--input", "x.npy", "--out", "o", "--T", "0.1"])
    assert (args.command, args.T, args.cut, args.batch_size) == ("generate", [0.1], None, None)
    assert args.run is gen.command._run_generate
    args = parser.parse_args(["verify", "o", "--sample", "3"])
    assert (args.dir, args.sample, args.run) == ("o", 3, gen.command._run_verify)
