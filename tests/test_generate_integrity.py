"""``generate`` under hostile files and absurd numbers (issue 16) and its repair path
(issue 14 item 8): each test makes the fault, then checks the refusal or the correct result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffeo_engine import generate as gen
from diffeo_engine import ops
from diffeo_engine.cli import main
from diffeo_engine.generate import MANIFEST, generate, load_generated, read_manifest, verify

T, CUT, K, SEED, SHARD = 0.02, 3, 3, 5, 8
ARGS = dict(T=T, cut=CUT, per_image=K, seed=SEED, shard_size=SHARD, batch_size=4)
N_SOURCE = 10  # 30 ids -> shards of 8, 8, 8, 6


def _images(n: int, seed: int = 0) -> np.ndarray:
    """(N, H, W, C) uint8 with structure, drawn fresh from ``seed``."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(9), np.arange(8), indexing="ij")
    phase = rng.uniform(0, 6, (n, 1, 1, 3))
    waves = 127.5 + 120 * np.sin(x[None, ..., None] / 2.0 + y[None, ..., None] / 3.0 + phase)
    return np.clip(waves + rng.integers(0, 8, (n, 9, 8, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "images.npy"
    np.save(path, _images(N_SOURCE))
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    generate(source, out, **ARGS)
    return out


def _copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _state(out: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def _edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _refused_everywhere(out: Path, source: Path, words: str) -> None:
    """verify, load_generated and a resume all refuse in one line naming ``words``."""
    before = _state(out)
    for call in (
        lambda: verify(out),
        lambda: load_generated(out),
        lambda: generate(source, out, **ARGS),
        lambda: generate(None, out, resume=True),
    ):
        with pytest.raises(ValueError, match=words) as info:
            call()
        assert "\n" not in str(info.value)
    assert _state(out) == before


# ----------------------------------------------------------------- item 1: traversal


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_cannot_name_a_file_outside_the_folder(source, reference, tmp_path, where):
    secret = tmp_path / "secret" / "data.npy"
    secret.parent.mkdir()
    np.save(secret, np.load(reference / "tau-00000.npy") // 2)  # same shape and dtype
    data = secret.read_bytes()
    out = _copy(reference, tmp_path)
    name = "../secret/data.npy" if where == "relative" else str(secret)

    def point_outside(manifest):
        entry = manifest["shards"][0]["files"]["tau"]
        entry.update(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_manifest(out, point_outside)
    assert (out / name).resolve() == secret.resolve()  # the name does reach the secret
    _refused_everywhere(out, source, r"field shards\[0\]\.files\.tau\.name: expected 'tau-00000")
    assert main(["verify", str(out)]) == 2  # one line, no "OK"


# ------------------------------------------------------------- item 3: the schema


def _delete(path):
    def change(manifest):
        *parents, last = path
        for key in parents:
            manifest = manifest[key]
        del manifest[last]

    return change


def _set(path, value):
    def change(manifest):
        *parents, last = path
        for key in parents:
            manifest = manifest[key]
        manifest[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_delete(["parameters", "seed"]), r"field parameters\.seed is missing"),
        (_delete(["shards"]), "field shards is missing"),
        (_delete(["shards", 2, "files", "noisy"]), r"field shards\[2\]\.files: expected"),
        (_set(["shards", 1, "id_stop"], 17), r"field shards\[1\]\.id_stop: expected 16"),
        (_set(["shards", 1, "index"], 0), r"field shards\[1\]\.index: expected an integer"),
        (_set(["total_images"], "30"), "field total_images: expected 30"),
        (_set(["n_shards"], 3), "field n_shards: expected 4"),
        (_set(["complete"], False), "field complete: expected True"),
        (_set(["kinds"], ["tau"]), "field kinds: expected"),
        (_set(["parameters", "per_image"], 2), "field total_images: expected 20"),
        (
            _set(["parameters", "settings", 0, "T"], float("nan")),
            r"field parameters\.settings\[0\]\.T: expected a finite",
        ),
        (_set(["shards", 0, "files", "tau", "sha256"], "00"), r"tau\.sha256: expected 64"),
        (_set(["shards", 3, "files", "tau", "shape"], [6, 3, 9, 9]), r"tau\.shape: expected"),
        (_set(["execution", "backend"], "magic"), r"field execution\.backend: expected one"),
    ],
)
def test_tampered_manifest_is_refused_naming_the_field(source, reference, tmp_path, change, field):
    out = _copy(reference, tmp_path)
    _edit_manifest(out, change)
    _refused_everywhere(out, source, field)


def _as_format(version: int):
    """A format-3 manifest of one setting and no labels rewritten as format 1 or 2 wrote it."""

    def change(manifest):
        assert manifest["source"].pop("labels") is None
        params = manifest["parameters"]
        (setting,) = params.pop("settings")
        manifest["parameters"] = {"T": setting["T"], "cut": setting["cut"], **params}
        manifest["format_version"] = version
        manifest["ids"] = "id = source_index * per_image + k, k in [0, per_image)"
        K = params["per_image"]
        for i, shard in enumerate(manifest["shards"]):
            lo, hi = shard["id_start"], shard["id_stop"]
            manifest["shards"][i] = {
                "index": shard["index"], "id_start": lo, "id_stop": hi,
                "source_start": lo // K, "source_stop": (hi - 1) // K + 1,
                **{k: shard[k] for k in ("backend", "device", "batch_size", "files")},
            }  # fmt: skip

    return change


@pytest.mark.parametrize("version", [1, 2])
def test_older_manifest_formats_are_read_and_verified_not_resumed(
    source, reference, tmp_path, version
):
    out = _copy(reference, tmp_path)
    _edit_manifest(out, _as_format(version))
    data = load_generated(out, check=True)
    assert len(data) == 30 and torch.equal(data[7]["tau"], load_generated(reference)[7]["tau"])
    assert (data[7]["setting"], data[7]["T"], data[7]["cut"]) == (0, T, CUT)
    assert verify(out, sample=4).ok  # regenerated from the source as it is
    assert verify(out, full=True).ok
    before = _state(out)
    for call in (lambda: generate(source, out, **ARGS), lambda: gen.repair(out)):
        with pytest.raises(ValueError, match=f"manifest format {version}.*not resumed or repaired"):
            call()
    assert _state(out) == before
    _edit_manifest(out, _set(["parameters", "cut"], 0))  # the old schema is validated too
    with pytest.raises(ValueError, match=r"field parameters\.cut: expected an integer in"):
        load_generated(out)
    _edit_manifest(out, _set(["format_version"], 7))
    with pytest.raises(ValueError, match="format_version 7, this library reads"):
        load_generated(out)


# ---------------------------------------------------------- item 2: changed source


def test_resume_over_a_changed_source_is_refused(tmp_path, monkeypatch):
    """Above 8 MiB the old fingerprint sampled 64 rows; row 5000 of 11000 was not one."""
    images = np.random.default_rng(1).integers(0, 256, (11_000, 28, 28), dtype=np.uint8)
    path = tmp_path / "big.npy"
    np.save(path, images)
    assert path.stat().st_size > 8 << 20
    args = dict(T=T, cut=CUT, per_image=1, seed=SEED, shard_size=16, batch_size=16)
    out = tmp_path / "run"
    real, calls = gen.run._perturb, []

    def interrupt(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(gen.run, "_perturb", interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(path, out, **args, progress=False)
    monkeypatch.setattr(gen.run, "_perturb", real)
    assert len(read_manifest(out)["shards"]) == 2

    images[5000, 3, 4] ^= 0x40  # one pixel, far from every row the old scheme sampled
    np.save(path, images)
    before = _state(out)
    with pytest.raises(ValueError, match="different source"):
        generate(path, out, **args)
    with pytest.raises(ValueError, match="different source"):
        generate(path, out, resume=True)
    assert _state(out) == before  # nothing written


# ---------------------------------------------------- item 4: non-finite pixels


def _float_source(tmp_path: Path, values: np.ndarray, name: str = "f.npy") -> Path:
    path = tmp_path / name
    np.save(path, values.astype(np.float32))
    return path


def test_nonfinite_source_pixels_are_refused_by_default(tmp_path, capsys):
    images = _images(6, seed=2).astype(np.float32)
    images[4, 2, 3, 1] = np.nan
    images[5, 0, 0, 0] = np.inf
    path = _float_source(tmp_path, images)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"input: source image 4: 1 pixel\(s\) are NaN or inf"):
        generate(path, out, **{**ARGS, "shard_size": 30}, dtype="float32")
    assert not list(out.glob("*.npy")) and not (out / ".lock").exists()
    argv = ["generate", "--input", str(path), "--out", str(tmp_path / "cli"), "--quiet"]
    argv += ["--T", str(T), "--cut", str(CUT), "--per-image", str(K), "--seed", str(SEED)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "source image 4" in err and "--allow-nonfinite" in err and err.count("\n") == 1

    # uint8 output cannot hold NaN: the opt-out needs a float dtype
    with pytest.raises(ValueError, match="allow_nonfinite: uint8 output cannot hold NaN"):
        generate(path, tmp_path / "u8", **ARGS, allow_nonfinite=True)
    assert main([*argv, "--allow-nonfinite"]) == 2
    assert "--allow-nonfinite: uint8 output" in capsys.readouterr().err

    # with the opt-out and float32, NaN and inf propagate exactly as ops makes them
    out = tmp_path / "allowed"
    generate(path, out, **ARGS, dtype="float32", allow_nonfinite=True)
    data = load_generated(out)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.arange(6 * K)
    tau, noisy = ops.perturb(
        x[ids // K], T, CUT, seed=SEED, ids=ids, out_dtype=torch.float32, allow_nonfinite=True
    )
    got_tau = torch.stack([data[i]["tau"] for i in range(len(data))])
    got_noisy = torch.stack([data[i]["noisy"] for i in range(len(data))])
    assert torch.equal(got_tau.isnan(), tau.isnan()) and got_noisy[12:].isnan().all()
    assert torch.equal(got_tau.nan_to_num(), tau.nan_to_num())
    assert torch.equal(got_noisy.nan_to_num(), noisy.nan_to_num())
    assert verify(out, sample=18).ok  # NaN regenerated as NaN counts as equal


# -------------------------------------------------------- item 5: absurd noise


def test_absurd_noise_is_refused_naming_the_flag(source, tmp_path, capsys):
    base = ["generate", "--input", str(source), "--out", str(tmp_path / "o"), "--quiet"]
    base += ["--T", str(T), "--cut", str(CUT), "--per-image", str(K), "--seed", str(SEED)]
    refusals = {"abc": "expected 'matched', 'none' or a number", "1e39": "1e+39 overflows float32"}
    for value, words in refusals.items():
        assert main([*base, "--noise", value]) == 2
        err = capsys.readouterr().err
        assert f"error: --noise: {words}" in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match=r"noise: expected a sigma that float16 .* got 100000"):
        generate(source, tmp_path / "f16", **ARGS, noise=1e5, dtype="float16")
    assert not (tmp_path / "o").exists() and not (tmp_path / "f16").exists()


def test_outputs_that_overflow_are_never_written(source, tmp_path):
    out = tmp_path / "run"
    # every image overflows: found on the first image, before anything is written
    with pytest.raises(ValueError, match=r"dtype: the outputs of source image 0 .*overflow"):
        generate(source, out, **ARGS, noise=3e38, dtype="float32")
    assert not out.exists()
    # only image 5 overflows: found in the first shard, whose run is then removed whole
    images = _images(8, seed=6).astype(np.float32)
    images[5] *= np.float32(3.3e38 / 255)
    path = _float_source(tmp_path, images)
    with pytest.raises(ValueError, match=r"dtype: outputs of ids 0\.\.23 overflow float32"):
        generate(path, out, **{**ARGS, "shard_size": 30}, noise=1e37, dtype="float32")
    assert not out.exists()  # the folder as it was found: absent
    out.mkdir()
    with pytest.raises(ValueError, match="overflow float32"):
        generate(path, out, **{**ARGS, "shard_size": 30}, noise=1e37, dtype="float32")
    assert list(out.iterdir()) == []  # an empty folder stays, empty


# ------------------------------------------------- item 7: floats in [0, 1] to uint8


@pytest.mark.parametrize(
    ("scale", "shift", "words"),
    [(1 / 255, 0.0, "round every pixel to 0 or 1"), (2 / 255, -1.0, "clamp negative")],
)
def test_uint8_output_of_unit_range_floats_is_refused(tmp_path, scale, shift, words):
    path = _float_source(tmp_path, _images(8, seed=3) * scale + shift)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"dtype: .*{words}.*--dtype float32"):
        generate(path, out, **ARGS)
    assert not out.exists()
    manifest = generate(path, out, **ARGS, dtype="float32")  # the way forward works
    assert manifest["complete"]
    # floats already on the 0..255 scale are fine in uint8
    path = _float_source(tmp_path, _images(8, seed=3), "scaled.npy")
    assert generate(path, tmp_path / "u8", **ARGS)["complete"]


# ---------------------------------------------------------------- item 10: sizes


def test_absurd_per_image_is_refused_before_allocating(source, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"per_image: .* must stay below 2\*\*63"):
        generate(source, out, T=T, cut=CUT, per_image=2**62, seed=0)
    with pytest.raises(ValueError, match="shard_size: .* shards, more than 100000"):
        generate(source, out, T=T, cut=CUT, per_image=2**40, seed=0)
    assert not out.exists()
    ok = 2**63 // N_SOURCE  # the largest K whose last id is below 2**63 ...
    with pytest.raises(ValueError, match="shard_size"):  # ... passes the id check
        generate(source, out, T=T, cut=CUT, per_image=ok, seed=0)


# ----------------------------------------------------------- one-line errors


def test_unreadable_shard_is_a_problem_not_a_traceback(reference, tmp_path, monkeypatch):
    out = _copy(reference, tmp_path)
    real = gen.files.open_regular

    def denied(path, *args, **kwargs):
        if Path(path).name == "noisy-00001.npy":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gen.files, "open_regular", denied)
    report = verify(out, sample=4)
    assert report.problems == ["noisy-00001.npy: cannot read it: Permission denied"]


def test_load_generated_names_the_file(reference, tmp_path):
    out = _copy(reference, tmp_path)
    data = bytearray((out / "tau-00002.npy").read_bytes())
    data[-3] ^= 0x10
    (out / "tau-00002.npy").write_bytes(bytes(data))
    served = load_generated(out)[23]["tau"]  # unchecked: the bytes as they are
    assert not torch.equal(served, load_generated(reference)[23]["tau"])
    checked = load_generated(out, check=True)
    assert torch.equal(checked[3]["tau"], load_generated(reference)[3]["tau"])
    with pytest.raises(ValueError, match=r"tau-00002\.npy: sha256 differs .*--repair"):
        checked[16]
    (out / "noisy-00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"noisy-00001\.npy: listed in the manifest"):
        load_generated(out)[9]
    (out / "tau-00003.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match=r"tau-00003\.npy: 6 bytes, the manifest lists"):
        load_generated(out)[25]
    with pytest.raises(TypeError, match="check: expected True or False"):
        load_generated(out, check="yes")


def test_dataset_index_types(reference):
    data = load_generated(reference)
    assert data[np.int64(4)]["id"] == data[torch.tensor(4)]["id"] == data[-26]["id"] == 4
    for bad in (1.0, "1", slice(0, 2), True, torch.tensor(1.0), torch.tensor([1, 2]), None):
        with pytest.raises(TypeError, match="index: expected an integer"):
            data[bad]


# ----------------------------------------------- issue 14 item 8: flags, repair, lock


def test_missing_flags_reported_at_once_in_cli_spelling(source, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--out", str(out), "--cut", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: --input, --T, --per-image, --seed: required (or --resume" in err
    assert err.count("\n") == 1 and not out.exists()
    assert main(["generate", "--out", str(out), "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="^T, per_image: required"):
        generate(source, out, T=None, cut=3, per_image=None, seed=0)
    assert main(["generate", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "required (unless --resume" in usage and "--per-image" in usage


def test_repair_rewrites_damaged_and_missing_shards(source, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    data = bytearray((out / "tau-00001.npy").read_bytes())
    data[200] ^= 0x01
    (out / "tau-00001.npy").write_bytes(bytes(data))
    (out / "noisy-00003.npy").unlink()
    assert not verify(out, sample=0).ok
    with pytest.raises(ValueError, match=r"noisy-00003\.npy is listed .*--repair"):
        generate(source, out, **ARGS)
    assert main(["verify", str(out), "--repair", "--quiet", "--sample", "30"]) == 0
    printed = capsys.readouterr().out
    assert "tau-00001.npy: sha256 differs" in printed
    assert "noisy-00003.npy: listed in the manifest but missing" in printed
    assert printed.rstrip().endswith("OK")
    assert _snapshot(out) == _snapshot(reference)  # byte for byte, manifest included
    assert gen.repair(out) == []  # nothing left to repair


def test_no_lock_left_and_interrupt_resumes(source, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = gen.run._perturb, []

    def interrupt(*a):
        calls.append(1)
        if len(calls) == 5:  # in shard 2 (batches of 4 in shards of 8)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(gen.run, "_perturb", interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(source, out, **ARGS)
    names = {p.name for p in out.iterdir()}
    assert ".lock" not in names and not any(n.endswith(".tmp") for n in names)
    assert [s["index"] for s in read_manifest(out)["shards"]] == [0, 1]
    monkeypatch.setattr(gen.run, "_perturb", real)
    generate(None, out, resume=True)
    assert _snapshot(out) == _snapshot(reference)  # no .lock in either
